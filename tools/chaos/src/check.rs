//! The checker: reads a run's history once its faults healed and reports what
//! the run promised and what held.
//!
//! - **effects**: each operation's effect exists at most once; exactly once for
//!   an operation that was acknowledged (where the effect is made by a
//!   deduplicating downstream or commits with the record, `derived` and `tx`);
//! - **responses**: every 2xx answer for an operation (under faults and in the
//!   replay afterwards) equals the first one byte for byte;
//! - **acknowledged**: no acknowledged operation is lost: its replay after the
//!   run answers, with the first answer (a lost record would run the body again);
//! - **liveness**: every operation completes once the faults stop, within a bound
//!   the report prints.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::history::{Execution, Fault, Phase, Request};

/// One broken promise.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Violation {
    /// `duplicate effect`, `missing effect`, `response differs`, `lost`, `not done`.
    pub kind: String,
    /// The operation.
    pub op: String,
    /// What was seen.
    pub detail: String,
    /// When it showed (µs since the epoch): the answer that differed under
    /// faults, the first answer of one whose replay differed, or the second
    /// execution.
    pub at_us: u64,
}

/// The figures of one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Logical operations.
    pub ops: usize,
    /// Operations acknowledged (a 2xx answer) during the workload.
    pub acked: usize,
    /// Requests sent during the workload.
    pub requests: usize,
    /// Requests beyond the first of each operation.
    pub retries: usize,
    /// Executions of bodies (effects attempted).
    pub executions: usize,
    /// Faults injected.
    pub faults: usize,
    /// 99th percentile latency of the workload's requests, ms.
    pub p99_ms: f64,
    /// The longest time from the last fault's end to the completion of an
    /// operation that was under way before it, ms (0 when all of them
    /// completed before it).
    pub recovery_ms: f64,
    /// Every broken promise.
    pub violations: Vec<Violation>,
}

impl Report {
    /// How many violations of `kind`.
    pub fn count(&self, kind: &str) -> usize {
        self.violations.iter().filter(|v| v.kind == kind).count()
    }
}

/// Every violation kind, in table order.
pub const KINDS: [&str; 5] = [
    "duplicate effect",
    "missing effect",
    "response differs",
    "lost",
    "not done",
];

/// Checks a run. `effects` counts each operation's effects where they are
/// made (rows of a downstream or of the transaction; for `plain`, the
/// executions themselves). An answered operation must have at least one in
/// every mode: an answer no body produced for that operation is a broken
/// promise whatever the effect's kind.
pub fn check(
    ops: &[String],
    requests: &[Request],
    executions: &[Execution],
    effects: &BTreeMap<String, usize>,
    faults: &[Fault],
) -> Report {
    let mut report = Report {
        ops: ops.len(),
        faults: faults.len(),
        executions: executions.len(),
        ..Report::default()
    };
    let mut by_op: BTreeMap<&str, Vec<&Request>> = BTreeMap::new();
    for r in requests {
        by_op.entry(&r.op).or_default().push(r);
    }
    let mut latencies: Vec<u64> = Vec::new();
    let healed_us = faults.iter().map(|f| f.end_us).max().unwrap_or(0);
    let mut execs_by_op: BTreeMap<&str, Vec<&Execution>> = BTreeMap::new();
    for e in executions {
        execs_by_op.entry(&e.op).or_default().push(e);
    }
    for op in ops {
        let mut rs = by_op.remove(op.as_str()).unwrap_or_default();
        rs.sort_by_key(|r| r.end_us);
        let work: Vec<&&Request> = rs.iter().filter(|r| r.phase == Phase::Work).collect();
        report.requests += work.len();
        report.retries += work.len().saturating_sub(1);
        latencies.extend(work.iter().map(|r| r.end_us.saturating_sub(r.start_us)));
        let first_ok = work.iter().find(|r| r.body.is_some());
        if first_ok.is_some() {
            report.acked += 1;
        }
        let first = rs.iter().find(|r| r.body.is_some());
        match first {
            None => report.violations.push(Violation {
                kind: "not done".into(),
                op: op.clone(),
                detail: format!("{} requests, none answered 2xx", rs.len()),
                at_us: rs.last().map_or(0, |r| r.end_us),
            }),
            Some(first) => {
                // Only operations already under way when the faults stopped:
                // one started later has nothing to recover from.
                let started_us = rs.iter().map(|r| r.start_us).min().unwrap_or(u64::MAX);
                if first.end_us > healed_us && started_us < healed_us && healed_us > 0 {
                    let ms = (first.end_us - healed_us) as f64 / 1000.0;
                    report.recovery_ms = report.recovery_ms.max(ms);
                }
                let body = first.body.as_deref().unwrap_or_default();
                if let Some(other) = named_op(body).filter(|o| o != op) {
                    report.violations.push(Violation {
                        kind: "response differs".into(),
                        op: op.clone(),
                        detail: format!("answered with operation {other}'s answer {body}"),
                        at_us: first.end_us,
                    });
                }
                for r in rs.iter().filter(|r| r.body.is_some()) {
                    if r.body.as_deref() != Some(body) {
                        // A later answer from an older claim is a stale
                        // completion that landed over the first (fencing
                        // failed); from a newer claim after the run, the
                        // record was lost and the body ran again.
                        // Without tokens (order-service's answers) neither
                        // can be told: the plain kind.
                        let later = token(r.body.as_deref().unwrap_or_default());
                        let newer = matches!((later, token(body)), (Some(l), Some(f)) if l > f);
                        let kind =
                            if newer && first.phase == Phase::Work && r.phase == Phase::Verify {
                                "lost"
                            } else {
                                "response differs"
                            };
                        report.violations.push(Violation {
                            kind: kind.into(),
                            op: op.clone(),
                            detail: format!(
                                "first answer {body}, then {}",
                                r.body.as_deref().unwrap_or_default()
                            ),
                            // Drawn where it can be seen: the answer that
                            // differed under faults, or, when only the replay
                            // after the run shows it, the first answer (the
                            // one that did not hold).
                            at_us: if r.phase == Phase::Work {
                                r.end_us
                            } else {
                                first.end_us
                            },
                        });
                        break;
                    }
                }
                if first.phase == Phase::Work
                    && !rs
                        .iter()
                        .any(|r| r.phase == Phase::Verify && r.body.is_some())
                {
                    report.violations.push(Violation {
                        kind: "lost".into(),
                        op: op.clone(),
                        detail: "acknowledged, but its replay after the run never answered".into(),
                        at_us: rs.last().map_or(0, |r| r.end_us),
                    });
                }
            }
        }
        let n = effects.get(op).copied().unwrap_or(0);
        let execs = execs_by_op
            .get(op.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if n > 1 {
            let second = execs.get(1).map_or(0, |e| e.at_us);
            report.violations.push(Violation {
                kind: "duplicate effect".into(),
                op: op.clone(),
                detail: format!(
                    "{n} effects; executions {}",
                    execs
                        .iter()
                        .map(|e| format!("{} (token {})", e.exec, e.token))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                at_us: second,
            });
        }
        if n == 0 && first.is_some() {
            report.violations.push(Violation {
                kind: "missing effect".into(),
                op: op.clone(),
                detail: "acknowledged, but no effect was made".into(),
                at_us: first.map_or(0, |r| r.end_us),
            });
        }
    }
    latencies.sort_unstable();
    if !latencies.is_empty() {
        let i = ((latencies.len() as f64) * 0.99).ceil() as usize - 1;
        report.p99_ms = latencies[i.min(latencies.len() - 1)] as f64 / 1000.0;
    }
    report
}

/// The fencing token an answer names, if it names one.
fn token(body: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("token")?.as_u64())
}

/// The operation an answer names (`idem-chaos serve`'s `op`), if it names one.
fn named_op(body: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| Some(v.get("op")?.as_str()?.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(op: &str, phase: Phase, end_us: u64, body: Option<&str>) -> Request {
        Request {
            op: op.into(),
            attempt: 1,
            client: 0,
            service: 0,
            start_us: end_us - 10,
            end_us,
            status: if body.is_some() { 200 } else { 0 },
            body: body.map(str::to_owned),
            phase,
        }
    }

    fn exec(op: &str, exec: &str, at_us: u64) -> Execution {
        Execution {
            op: op.into(),
            token: 1,
            exec: exec.into(),
            at_us,
        }
    }

    #[test]
    fn a_clean_history_has_no_violation() {
        let ops = vec!["a".to_owned()];
        let requests = [
            req("a", Phase::Work, 100, None),
            req("a", Phase::Work, 200, Some("x")),
            req("a", Phase::Verify, 300, Some("x")),
        ];
        let effects = BTreeMap::from([("a".to_owned(), 1)]);
        let r = check(&ops, &requests, &[exec("a", "1-0", 150)], &effects, &[]);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!((r.acked, r.requests, r.retries), (1, 2, 1));
    }

    #[test]
    fn each_broken_promise_is_reported() {
        let ops: Vec<String> = ["dup", "differs", "lost", "stale", "never", "missing"]
            .map(str::to_owned)
            .into();
        let requests = [
            req("dup", Phase::Work, 100, Some("x")),
            req("dup", Phase::Verify, 300, Some("x")),
            req("differs", Phase::Work, 100, Some("x")),
            req("differs", Phase::Work, 150, Some("y")),
            req("differs", Phase::Verify, 300, Some("x")),
            req("lost", Phase::Work, 100, Some(r#"{"token":2}"#)),
            req("lost", Phase::Verify, 300, Some(r#"{"token":3}"#)),
            req("stale", Phase::Work, 100, Some(r#"{"token":2}"#)),
            req("stale", Phase::Verify, 300, Some(r#"{"token":1}"#)),
            req("never", Phase::Work, 100, None),
            req("missing", Phase::Work, 100, Some("x")),
            req("missing", Phase::Verify, 300, Some("x")),
        ];
        let effects = BTreeMap::from([
            ("dup".to_owned(), 2),
            ("differs".to_owned(), 1),
            ("lost".to_owned(), 1),
            ("stale".to_owned(), 1),
        ]);
        let r = check(&ops, &requests, &[], &effects, &[]);
        let kinds: Vec<(&str, &str)> = r
            .violations
            .iter()
            .map(|v| (v.op.as_str(), v.kind.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("dup", "duplicate effect"),
                ("differs", "response differs"),
                ("lost", "lost"),
                ("stale", "response differs"),
                ("never", "not done"),
                ("missing", "missing effect"),
            ]
        );
    }

    #[test]
    fn a_plain_answer_no_execution_made_is_a_missing_effect() {
        // plain mode: effects are the executions; "a" was acknowledged (and
        // replayed) although no body ever ran for it.
        let ops = vec!["a".to_owned()];
        let body = r#"{"op":"a","exec":"9-9","token":1}"#;
        let requests = [
            req("a", Phase::Work, 100, Some(body)),
            req("a", Phase::Verify, 300, Some(body)),
        ];
        let r = check(&ops, &requests, &[], &BTreeMap::new(), &[]);
        assert_eq!(r.count("missing effect"), 1, "{:?}", r.violations);
    }

    #[test]
    fn an_answer_naming_another_operation_differs() {
        // "a" ran once (its effect exists), but every answer it got is "b"'s.
        let ops = vec!["a".to_owned(), "b".to_owned()];
        let b = r#"{"op":"b","exec":"1-1","token":1}"#;
        let requests = [
            req("a", Phase::Work, 100, Some(b)),
            req("a", Phase::Verify, 300, Some(b)),
            req("b", Phase::Work, 90, Some(b)),
            req("b", Phase::Verify, 310, Some(b)),
        ];
        let effects = BTreeMap::from([("a".to_owned(), 1), ("b".to_owned(), 1)]);
        let r = check(
            &ops,
            &requests,
            &[exec("a", "1-0", 50), exec("b", "1-1", 60)],
            &effects,
            &[],
        );
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
    }

    #[test]
    fn a_difference_between_tokenless_answers_is_not_called_lost() {
        // order-service answers name no token: a work answer then a
        // different replay cannot be told apart, yet it is called "lost".
        let ops = vec!["o".to_owned()];
        let requests = [
            req("o", Phase::Work, 100, Some(r#"{"id":"new"}"#)),
            req("o", Phase::Verify, 300, Some(r#"{"id":"old"}"#)),
        ];
        let effects = BTreeMap::from([("o".to_owned(), 1)]);
        let r = check(&ops, &requests, &[], &effects, &[]);
        assert_eq!(r.count("response differs"), 1, "{:?}", r.violations);
    }

    #[test]
    fn two_hedged_answers_that_differ_are_reported() {
        let ops = vec!["h".to_owned()];
        let requests = [
            req("h", Phase::Work, 100, Some(r#"{"token":2,"exec":"a"}"#)),
            req("h", Phase::Work, 101, Some(r#"{"token":1,"exec":"b"}"#)),
            req("h", Phase::Verify, 300, Some(r#"{"token":2,"exec":"a"}"#)),
        ];
        let effects = BTreeMap::from([("h".to_owned(), 1)]);
        let r = check(&ops, &requests, &[], &effects, &[]);
        assert_eq!(r.count("response differs"), 1, "{:?}", r.violations);
    }

    #[test]
    fn recovery_does_not_count_operations_sent_after_healing() {
        let ops = vec!["late".to_owned()];
        let requests = [
            req("late", Phase::Work, 5_000_010, Some("x")),
            req("late", Phase::Verify, 9_000_000, Some("x")),
        ];
        let effects = BTreeMap::from([("late".to_owned(), 1)]);
        let fault = Fault {
            what: "pause service 0".into(),
            start_us: 500,
            end_us: 1_000,
        };
        let r = check(&ops, &requests, &[], &effects, &[fault]);
        // The op was sent 5 s after the fault healed and took 10 µs.
        assert!(r.recovery_ms < 1.0, "recovery_ms = {}", r.recovery_ms);
    }
}
