//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`).
//!
//! idem records what it decides and how long the store took; the application
//! picks where the numbers go by installing a recorder (a Prometheus exporter,
//! `metrics-exporter-opentelemetry` for OpenTelemetry, a statsd sink). Without
//! a recorder the facade drops every event; without the feature the calls are
//! compiled out.
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | [`idem_outcomes_total`](OUTCOMES) | counter | `namespace`, `store`, `outcome` | one per decision, below |
//! | [`idem_claim_duration_seconds`](CLAIM_DURATION) | histogram | `namespace`, `store` | each claim round trip to the store |
//! | [`idem_complete_duration_seconds`](COMPLETE_DURATION) | histogram | `namespace`, `store` | each completion, retries included |
//!
//! `namespace` is the key's namespace (the function's path for `#[idempotent]`,
//! the layer's or consumer's namespace), `store` is [`Store::kind`](crate::Store::kind)
//! (`memory`, `sqlite`, `postgres`, `redis`, `redis-cluster`).
//!
//! `outcome` is one of:
//!
//! | outcome | counted when |
//! |---|---|
//! | `claimed` | a claim was won on a fresh key: the work runs |
//! | `taken_over` | a claim was won on a key an earlier attempt did not finish (its lease lapsed, or it kept steps) |
//! | `replayed` | the key was completed: the stored outcome is replayed |
//! | `in_progress` | another call holds the key (after any wait): the caller is refused |
//! | `key_reused` | the key is held or completed with another request's fingerprint |
//! | `completed` | the outcome was recorded |
//! | `released_after_error` | the claim was released instead of recorded (an error the codec does not cache, a status not stored, an outcome that cannot be encoded, a step mismatch) |
//! | `cancelled` | the caller went away (dropped or panicked) and the claim was released |
//! | `lease_lost` | the completion found another caller holding the key: nothing was recorded |
//! | `store_error` | the store failed a claim (the work did not run) or a completion |
//!
//! A duplicate that waits for the running call and then replays counts once,
//! as `replayed`. Every call is thus counted once by its claim (`claimed`,
//! `taken_over`, `replayed`, `in_progress`, `key_reused`, `store_error`), and
//! every claim won once more by how it ended.
//!
//! Why `metrics` rather than OpenTelemetry: it is a facade in the manner of
//! `log` and `tracing` — a library depends on it alone (one small crate), the
//! application chooses the exporter, and OpenTelemetry is one of them. Depending
//! on the OpenTelemetry SDK would make that choice for every user.

use std::time::Duration;

/// The counter of decisions: `idem_outcomes_total{namespace, store, outcome}`.
pub const OUTCOMES: &str = "idem_outcomes_total";
/// The claim latency histogram: `idem_claim_duration_seconds{namespace, store}`.
pub const CLAIM_DURATION: &str = "idem_claim_duration_seconds";
/// The completion latency histogram: `idem_complete_duration_seconds{namespace, store}`.
pub const COMPLETE_DURATION: &str = "idem_complete_duration_seconds";

/// What a claim or an attempt came to, as the `outcome` label spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Claimed,
    TakenOver,
    Replayed,
    InProgress,
    KeyReused,
    Completed,
    ReleasedAfterError,
    Cancelled,
    LeaseLost,
    StoreError,
}

impl Outcome {
    /// Every outcome, in declaration order (`ALL[o as usize] == o`).
    #[cfg(feature = "metrics")]
    const ALL: [Outcome; 10] = [
        Outcome::Claimed,
        Outcome::TakenOver,
        Outcome::Replayed,
        Outcome::InProgress,
        Outcome::KeyReused,
        Outcome::Completed,
        Outcome::ReleasedAfterError,
        Outcome::Cancelled,
        Outcome::LeaseLost,
        Outcome::StoreError,
    ];

    #[cfg(feature = "metrics")]
    fn label(self) -> &'static str {
        match self {
            Outcome::Claimed => "claimed",
            Outcome::TakenOver => "taken_over",
            Outcome::Replayed => "replayed",
            Outcome::InProgress => "in_progress",
            Outcome::KeyReused => "key_reused",
            Outcome::Completed => "completed",
            Outcome::ReleasedAfterError => "released_after_error",
            Outcome::Cancelled => "cancelled",
            Outcome::LeaseLost => "lease_lost",
            Outcome::StoreError => "store_error",
        }
    }
}

/// Describes idem's metrics (help text and units) to the installed recorder.
/// Call it once after installing the recorder; exporters that print help text
/// (Prometheus) show it. Without the `metrics` feature it does nothing.
pub fn describe() {
    #[cfg(feature = "metrics")]
    {
        metrics::describe_counter!(
            OUTCOMES,
            metrics::Unit::Count,
            "idempotent calls by what idem decided: claimed, taken_over, replayed, in_progress, \
             key_reused, completed, released_after_error, cancelled, lease_lost, store_error"
        );
        metrics::describe_histogram!(
            CLAIM_DURATION,
            metrics::Unit::Seconds,
            "time of one claim round trip to the store"
        );
        metrics::describe_histogram!(
            COMPLETE_DURATION,
            metrics::Unit::Seconds,
            "time to record an outcome, retries included"
        );
    }
}

/// The labels of one call's events (its namespace and store kind), looked up
/// once per claim: each event then hands the recorder a ready key. Without
/// the `metrics` feature it is empty and every event compiles to nothing.
#[derive(Clone)]
pub(crate) struct Labels {
    #[cfg(feature = "metrics")]
    keys: std::sync::Arc<keys::Keys>,
}

impl Labels {
    #[inline]
    pub(crate) fn new(namespace: &str, store: &'static str) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = (namespace, store);
        Labels {
            #[cfg(feature = "metrics")]
            keys: keys::get(namespace, store),
        }
    }

    /// Counts one `outcome`.
    #[inline]
    pub(crate) fn outcome(&self, outcome: Outcome) {
        #[cfg(feature = "metrics")]
        metrics::with_recorder(|r| {
            r.register_counter(&self.keys.outcomes[outcome as usize], &keys::METADATA)
                .increment(1)
        });
        #[cfg(not(feature = "metrics"))]
        let _ = outcome;
    }

    /// Records one claim round trip.
    #[inline]
    pub(crate) fn claim_duration(&self, took: Duration) {
        #[cfg(feature = "metrics")]
        Self::record(&self.keys.claim, took);
        #[cfg(not(feature = "metrics"))]
        let _ = took;
    }

    /// Records one completion (its retries included).
    #[inline]
    pub(crate) fn complete_duration(&self, took: Duration) {
        #[cfg(feature = "metrics")]
        Self::record(&self.keys.complete, took);
        #[cfg(not(feature = "metrics"))]
        let _ = took;
    }

    /// Records `took` in the histogram `key` names.
    #[cfg(feature = "metrics")]
    #[inline]
    fn record(key: &metrics::Key, took: Duration) {
        metrics::with_recorder(|r| {
            r.register_histogram(key, &keys::METADATA)
                .record(took.as_secs_f64())
        });
    }
}

impl std::fmt::Debug for Labels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Labels").finish_non_exhaustive()
    }
}

/// The metric keys (name and labels) of each namespace and store kind, built
/// once: an event then hands the recorder a ready key, as the facade's
/// macros do with constant labels, instead of building its labels anew. The
/// recorder is still asked every time, so one installed later is used at once.
#[cfg(feature = "metrics")]
mod keys {
    use std::collections::HashMap;
    use std::sync::{Arc, OnceLock, RwLock};

    use metrics::{Key, Label, Level, Metadata};

    use super::{CLAIM_DURATION, COMPLETE_DURATION, OUTCOMES};

    pub(super) static METADATA: Metadata<'static> = Metadata::new(
        "idem_runtime::metrics",
        Level::INFO,
        Some("idem_runtime::metrics"),
    );

    const OUTCOME_COUNT: usize = super::Outcome::StoreError as usize + 1;

    pub(super) struct Keys {
        pub(super) outcomes: [Key; OUTCOME_COUNT],
        pub(super) claim: Key,
        pub(super) complete: Key,
    }

    impl Keys {
        fn new(namespace: &str, store: &'static str) -> Self {
            let labels = |extra: Option<&'static str>| {
                let mut labels = vec![
                    Label::new("namespace", namespace.to_owned()),
                    Label::new("store", store),
                ];
                labels.extend(extra.map(|outcome| Label::new("outcome", outcome)));
                labels
            };
            Keys {
                outcomes: super::Outcome::ALL
                    .map(|outcome| Key::from_parts(OUTCOMES, labels(Some(outcome.label())))),
                claim: Key::from_parts(CLAIM_DURATION, labels(None)),
                complete: Key::from_parts(COMPLETE_DURATION, labels(None)),
            }
        }
    }

    type Hasher = foldhash::fast::RandomState;
    type Map = HashMap<&'static str, HashMap<Box<str>, Arc<Keys>, Hasher>, Hasher>;

    /// Namespaces are few (function paths, layer and consumer names), so
    /// the map stays small; a poisoned lock is still a usable map. It never
    /// shrinks: a service that builds namespaces at run time (`execute` with
    /// `KeyBuilder::new(dynamic)`) makes a label value of each, here as in
    /// any recorder — keep namespaces a fixed set.
    static KEYS: OnceLock<RwLock<Map>> = OnceLock::new();

    pub(super) fn get(namespace: &str, store: &'static str) -> Arc<Keys> {
        let map = KEYS.get_or_init(Default::default);
        let found = map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(store)
            .and_then(|by| by.get(namespace))
            .cloned();
        found.unwrap_or_else(|| {
            let mut map = map.write().unwrap_or_else(|e| e.into_inner());
            Arc::clone(
                map.entry(store)
                    .or_default()
                    .entry(namespace.into())
                    .or_insert_with(|| Arc::new(Keys::new(namespace, store))),
            )
        })
    }
}

/// A timer that costs nothing without the `metrics` feature.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timer {
    #[cfg(feature = "metrics")]
    started: std::time::Instant,
}

impl Timer {
    #[inline]
    pub(crate) fn start() -> Self {
        Timer {
            #[cfg(feature = "metrics")]
            started: std::time::Instant::now(),
        }
    }

    #[inline]
    pub(crate) fn elapsed(self) -> Duration {
        #[cfg(feature = "metrics")]
        return self.started.elapsed();
        #[cfg(not(feature = "metrics"))]
        Duration::ZERO
    }
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use super::Outcome;

    #[test]
    fn every_outcome_is_at_its_own_index() {
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, i, "{outcome:?}");
        }
        let labels: std::collections::BTreeSet<_> =
            Outcome::ALL.iter().map(|o| o.label()).collect();
        assert_eq!(labels.len(), Outcome::ALL.len());
    }
}
