//! What the demo did, as rows and a printable table.

use std::fmt;

/// One line of the demo's table.
#[derive(Debug, Clone)]
pub struct Row {
    /// The request the client sent.
    pub request: String,
    /// The status (or statuses) it got.
    pub status: String,
    /// Whether the response was a replay (`Idempotent-Replayed: true`).
    pub replayed: String,
    /// Orders (of this run's users) in the database after the request.
    pub orders: i64,
    /// Charges (for this run's orders) in the database after the request.
    pub charges: i64,
    /// Whether the request got what idem promises, with the expected counts.
    pub as_expected: bool,
}

/// Everything the demo did, printable as a table.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The database the demo ran on.
    pub backend: &'static str,
    /// Its URL.
    pub url: String,
    /// Where the server listened.
    pub server: String,
    /// The requests, in order.
    pub rows: Vec<Row>,
    /// Lines printed under the table (what a checkout left behind, the metrics).
    pub notes: Vec<String>,
    /// This run's `idem_outcomes_total` by outcome, read from `GET /metrics`.
    pub metrics: std::collections::BTreeMap<String, u64>,
    /// The `idem` commands run on the database, and what each printed.
    pub operated: Vec<(String, String)>,
}

impl Report {
    /// Whether every request behaved as promised.
    pub fn all_passed(&self) -> bool {
        self.rows.iter().all(|r| r.as_expected)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let req_w = self
            .rows
            .iter()
            .map(|r| r.request.chars().count())
            .max()
            .unwrap_or(7)
            .max(7);
        let st_w = self
            .rows
            .iter()
            .map(|r| r.status.chars().count())
            .max()
            .unwrap_or(6)
            .max(6);
        let rep_w = self
            .rows
            .iter()
            .map(|r| r.replayed.chars().count())
            .max()
            .unwrap_or(8)
            .max(8);
        writeln!(
            f,
            "idem order-service demo: server on {}, orders and idempotency records in {} ({})",
            self.server, self.backend, self.url
        )?;
        writeln!(f)?;
        writeln!(
            f,
            " # | {:req_w$} | {:st_w$} | {:rep_w$} | orders | charges | check",
            "request", "status", "replayed"
        )?;
        writeln!(
            f,
            "---+-{}-+-{}-+-{}-+--------+---------+------",
            "-".repeat(req_w),
            "-".repeat(st_w),
            "-".repeat(rep_w)
        )?;
        for (i, r) in self.rows.iter().enumerate() {
            writeln!(
                f,
                "{:>2} | {:req_w$} | {:st_w$} | {:rep_w$} | {:>6} | {:>7} | {}",
                i + 1,
                r.request,
                r.status,
                r.replayed,
                r.orders,
                r.charges,
                if r.as_expected { "ok" } else { "FAIL" }
            )?;
        }
        writeln!(f)?;
        for note in &self.notes {
            writeln!(f, "{note}")?;
        }
        if !self.operated.is_empty() {
            writeln!(f)?;
            writeln!(
                f,
                "the same database, as an operator sees it (the idem CLI):"
            )?;
            for (command, output) in &self.operated {
                writeln!(f, "{command}")?;
                write!(f, "{output}")?;
                if !output.ends_with('\n') {
                    writeln!(f)?;
                }
            }
            writeln!(f)?;
        }
        let last = self.rows.last();
        writeln!(
            f,
            "orders created: {}, charges: {} — {}",
            last.map_or(0, |r| r.orders),
            last.map_or(0, |r| r.charges),
            if self.all_passed() {
                "every duplicate was answered without running twice"
            } else {
                "SOMETHING RAN TWICE OR FAILED"
            }
        )
    }
}
