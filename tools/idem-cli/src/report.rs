//! How results and failures are written: a table for people, one JSON
//! document for scripts.

use std::io::Write;

use idem_runtime::store::admin::{Count, Entry, Status};
use serde_json::{json, Value};

use crate::args::Cli;
use crate::duration::human;
use crate::Exit;

/// Writes a failure: the message to `err` (`error: ..`), and with `--json`
/// the error document to `out` as well. Returns `exit`.
pub(crate) fn failure(
    cli: &Cli,
    out: &mut dyn Write,
    err: &mut dyn Write,
    exit: Exit,
    message: &str,
) -> Exit {
    failure_with(cli, out, err, exit, message, Value::Null)
}

/// [`failure`], with more for the JSON document (`"entry"`, `"would"` ..).
pub(crate) fn failure_with(
    cli: &Cli,
    out: &mut dyn Write,
    err: &mut dyn Write,
    exit: Exit,
    message: &str,
    detail: Value,
) -> Exit {
    let _ = writeln!(err, "error: {message}");
    if cli.json {
        let mut error = json!({ "exit": exit.code(), "kind": exit.kind(), "message": message });
        if let (Value::Object(error), Value::Object(detail)) = (&mut error, detail) {
            error.extend(detail);
        }
        let _ = writeln!(out, "{}", json!({ "error": error }));
    }
    exit
}

/// Writes a success: `human` for people, `document` with `--json`.
pub(crate) fn success(cli: &Cli, out: &mut dyn Write, human: &str, document: Value) -> Exit {
    let written = if cli.json {
        writeln!(out, "{document}")
    } else {
        write!(out, "{human}")
    };
    // A closed pipe (`idem list | head`) is not the store's failure.
    let _ = written;
    Exit::Ok
}

/// An entry as JSON. Tokens are strings: they can exceed 2^53, where
/// JSON readers that use doubles would round them.
pub(crate) fn entry_json(entry: &Entry) -> Value {
    json!({
        "key": entry.key,
        "namespace": entry.namespace(),
        "status": entry.status.as_str(),
        "token": entry.token.get().to_string(),
        "expires_in_ms": entry.expires_in.as_millis() as u64,
        "fingerprint": entry.fingerprint.map(|d| d.to_hex()),
        "outcome_bytes": entry.outcome_len,
        "steps": entry.steps,
        "takeover_mark": entry.takeover_mark,
        "problem": entry.problem,
    })
}

/// The steps column: `2`, `2+mark`, `-`.
fn steps_text(entry: &Entry) -> String {
    match (entry.steps, entry.takeover_mark) {
        (0, false) => "-".into(),
        (n, false) => n.to_string(),
        (n, true) => format!("{n}+mark"),
    }
}

/// What the time left means for this status.
fn left_text(entry: &Entry) -> String {
    match entry.status {
        Status::Running => format!("{} (lease)", human(entry.expires_in)),
        Status::Completed => format!("{} (ttl)", human(entry.expires_in)),
        Status::Released => format!("{} (steps kept)", human(entry.expires_in)),
        Status::Lapsed => "lapsed: the next call takes it over".into(),
        Status::Expired => "expired: reads as absent; purge removes it".into(),
        Status::Corrupt => "-".into(),
        _ => human(entry.expires_in),
    }
}

/// One record, a field a line.
pub(crate) fn entry_human(entry: &Entry) -> String {
    let mark = if entry.takeover_mark {
        " + the takeover mark (on_takeover = fail refuses every retry)"
    } else {
        ""
    };
    let rows = [
        ("key", entry.key.clone()),
        ("namespace", entry.namespace().to_owned()),
        ("status", entry.status.to_string()),
        ("token", entry.token.to_string()),
        ("time left", left_text(entry)),
        (
            "fingerprint",
            entry.fingerprint.map_or("-".into(), |d| d.to_hex()),
        ),
        (
            "outcome",
            entry
                .outcome_len
                .map_or("-".into(), |n| format!("{n} bytes")),
        ),
        ("steps", format!("{} kept{mark}", entry.steps)),
    ];
    let problem = entry.problem.as_ref().map(|p| ("problem", p.clone()));
    rows.iter()
        .chain(problem.as_ref())
        .map(|(name, value)| format!("{name:<12} {value}\n"))
        .collect()
}

/// Records as a table, the key last (its width varies).
pub(crate) fn entries_human(entries: &[Entry]) -> String {
    let mut rows = vec![[
        "STATUS".to_owned(),
        "TOKEN".into(),
        "LEFT".into(),
        "STEPS".into(),
        "OUTCOME".into(),
        "KEY".into(),
    ]];
    rows.extend(entries.iter().map(|e| {
        [
            e.status.to_string(),
            e.token.to_string(),
            match e.status {
                Status::Lapsed | Status::Expired | Status::Corrupt => "-".into(),
                _ => human(e.expires_in),
            },
            steps_text(e),
            e.outcome_len.map_or("-".into(), |n| format!("{n}B")),
            e.key.clone(),
        ]
    }));
    let mut text = table(&rows);
    for e in entries {
        if let Some(problem) = &e.problem {
            text.push_str(&format!("{}: {problem}\n", e.key));
        }
    }
    text
}

/// How many statuses there are: a count per status.
type Row = [u64; Status::ALL.len()];

/// Counts as a table: a row per namespace, a column per status (`corrupt`
/// only when there are any), totals last.
pub(crate) fn stats(counts: &[Count]) -> (String, Value) {
    let mut namespaces: Vec<(String, Row)> = Vec::new();
    for count in counts {
        let at = match namespaces.iter().position(|(ns, _)| *ns == count.namespace) {
            Some(at) => at,
            None => {
                namespaces.push((count.namespace.clone(), Row::default()));
                namespaces.len() - 1
            }
        };
        if let Some(column) = Status::ALL.iter().position(|s| *s == count.status) {
            namespaces[at].1[column] += count.records;
        }
    }
    let mut totals = Row::default();
    for (_, row) in &namespaces {
        for (total, n) in totals.iter_mut().zip(row) {
            *total += n;
        }
    }
    let as_json = |row: &Row| {
        let mut object = serde_json::Map::new();
        for (status, n) in Status::ALL.iter().zip(row) {
            object.insert(status.as_str().into(), json!(n));
        }
        object.insert("records".into(), json!(row.iter().sum::<u64>()));
        object
    };
    let document = json!({
        "namespaces": namespaces.iter().map(|(ns, row)| {
            let mut object = as_json(row);
            object.insert("namespace".into(), json!(ns));
            Value::Object(object)
        }).collect::<Vec<_>>(),
        "total": Value::Object(as_json(&totals)),
    });
    // The columns people see: every status but `corrupt` when none is.
    let shown: Vec<usize> = (0..Status::ALL.len())
        .filter(|&c| Status::ALL[c] != Status::Corrupt || totals[c] > 0)
        .collect();
    let mut header = vec!["NAMESPACE".to_owned()];
    header.extend(
        shown
            .iter()
            .map(|&c| Status::ALL[c].as_str().to_uppercase()),
    );
    header.push("TOTAL".into());
    let line = |name: &str, row: &Row| {
        let mut cells = vec![name.to_owned()];
        cells.extend(shown.iter().map(|&c| row[c].to_string()));
        cells.push(row.iter().sum::<u64>().to_string());
        cells
    };
    let mut rows = vec![header];
    rows.extend(namespaces.iter().map(|(ns, row)| line(ns, row)));
    rows.push(line("(all)", &totals));
    (table(&rows), document)
}

/// Left-aligned columns, two spaces apart.
fn table<R: AsRef<[String]>>(rows: &[R]) -> String {
    let columns = rows.first().map_or(0, |r| r.as_ref().len());
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.as_ref()[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in rows {
        let cells = row.as_ref();
        for (c, cell) in cells.iter().enumerate() {
            if c + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        text.push('\n');
    }
    text
}
