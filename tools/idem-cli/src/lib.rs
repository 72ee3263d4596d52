//! `idem`, the operator CLI for idem's stores, and the library behind it.
//!
//! The binary is a thin `main` around [`run`]; a service (or the
//! order-service demo) can run the same commands in process with [`run`]
//! (it opens the store from `--store`) or [`run_on`] (on a store it already
//! holds, a [`MemoryStore`](idem_runtime::MemoryStore) included):
//!
//! ```
//! use idem_cli::{run_on, Exit};
//! use idem_runtime::MemoryStore;
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let store = MemoryStore::new();
//! let (mut out, mut err) = (Vec::new(), Vec::new());
//! let exit = run_on(&store, ["idem", "stats", "--json"], &mut out, &mut err).await;
//! assert_eq!(exit, Exit::Ok);
//! let stats: serde_json::Value = serde_json::from_slice(&out).unwrap();
//! assert_eq!(stats["total"]["records"], 0);
//! # }
//! ```
//!
//! Commands (README.md, "Operating idem: the `idem` CLI", has examples):
//!
//! | command | what it does |
//! |---|---|
//! | `inspect NAMESPACE KEY_PARTS_JSON [--window D [--at UNIX_MS]]`, `inspect NAMESPACE:HEX`, `inspect [NAMESPACE] --digest HEX` | one record: status, token, time left, fingerprint, outcome size, kept steps |
//! | `list [--stuck] [--namespace N] [--limit N]` | records, one a line |
//! | `stats` | records by namespace and status |
//! | `release KEY [--forget-steps] [--token T] --yes` | ends a processing claim, fenced by its token; steps kept unless `--forget-steps` |
//! | `invalidate KEY [--token T] --yes` | forgets a completed result, fenced by its token |
//! | `purge --expired [--batch N] --yes` | deletes expired records until none is left |
//!
//! Every command prints a table by default and one JSON document with
//! `--json` (errors too: `{"error": {"exit": 3, "kind": "refused", "message": ".."}}`).
//! Exit codes are [`Exit`]'s.
#![forbid(unsafe_code)]

mod args;
mod commands;
mod connect;
mod duration;
mod report;
mod target;

use std::ffi::OsString;
use std::io::Write;

use clap::Parser;
use idem_runtime::store::admin::Admin;

/// What a command's exit code means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Exit {
    /// 0: done (or, for reads, found).
    Ok,
    /// 1: no such record.
    NotFound,
    /// 2: the command line is wrong (unknown flag, bad key parts, bad URL).
    Usage,
    /// 3: refused: the record is in a state the command does not act on
    /// (`invalidate` of a processing record, `release` of a completed one,
    /// a digest found in several namespaces).
    Refused,
    /// 4: the store failed: unreachable, timed out, or a record it cannot read.
    Store,
    /// 5: conflict: the record changed between the read and the fenced write
    /// (or no longer holds `--token`); nothing was changed.
    Conflict,
    /// 6: a destructive command without `--yes`: it says what it would do,
    /// and does nothing.
    NotConfirmed,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::NotFound => 1,
            Exit::Usage => 2,
            Exit::Refused => 3,
            Exit::Store => 4,
            Exit::Conflict => 5,
            Exit::NotConfirmed => 6,
        }
    }

    /// The code as one word, as `--json` errors name it.
    pub fn kind(self) -> &'static str {
        match self {
            Exit::Ok => "ok",
            Exit::NotFound => "not_found",
            Exit::Usage => "usage",
            Exit::Refused => "refused",
            Exit::Store => "store",
            Exit::Conflict => "conflict",
            Exit::NotConfirmed => "not_confirmed",
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit.code())
    }
}

/// Runs one command line (`args`, starting with the program name): opens the
/// store `--store` (or `IDEM_STORE`) names, writes the report to `out`
/// (a table, or JSON with `--json`) and messages to `err`.
pub async fn run<I, T>(args: I, out: &mut (dyn Write + Send), err: &mut (dyn Write + Send)) -> Exit
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match parse(args, out, err) {
        Ok(cli) => cli,
        Err(exit) => return exit,
    };
    let Some(url) = cli.store.as_deref() else {
        let message = format!(
            "no store: give --store URL or set IDEM_STORE ({})",
            connect::SCHEMES
        );
        return report::failure(&cli, out, err, Exit::Usage, &message);
    };
    let lock_timeout = match cli
        .lock_timeout
        .as_deref()
        .map(connect::lock_timeout)
        .transpose()
    {
        Ok(timeout) => timeout,
        Err(e) => {
            let message = format!("--lock-timeout: {e}");
            return report::failure(&cli, out, err, Exit::Usage, &message);
        }
    };
    let options = connect::Options {
        url,
        table: cli.table.as_deref(),
        prefix: cli.prefix.as_deref(),
        lock_timeout,
    };
    let store = match connect::open(&options).await {
        Ok(store) => store,
        Err(connect::Failure::Usage(message)) => {
            return report::failure(&cli, out, err, Exit::Usage, &message)
        }
        Err(connect::Failure::Store(e)) => {
            return report::failure(&cli, out, err, Exit::Store, &e.to_string())
        }
    };
    commands::run(&cli, &*store, out, err).await
}

/// Runs one command line (`args`, starting with the program name) on
/// `store`, which the caller opened: `--store` (and `IDEM_STORE`) is
/// ignored, `--table` and `--prefix` are refused (a usage error). Writes as
/// [`run`] does.
pub async fn run_on<I, T>(
    store: &dyn Admin,
    args: I,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Exit
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match parse(args, out, err) {
        Ok(cli) => cli,
        Err(exit) => return exit,
    };
    if cli.table.is_some() || cli.prefix.is_some() {
        let message = "--table and --prefix name a store; this one is already open";
        return report::failure(&cli, out, err, Exit::Usage, message);
    }
    commands::run(&cli, store, out, err).await
}

/// Parses the command line; help and version go to `out` (exit 0), usage
/// errors to `err` (exit 2).
fn parse<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> Result<args::Cli, Exit>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    args::Cli::try_parse_from(&args).map_err(|e| {
        let text = e.render().to_string();
        if e.use_stderr() {
            let _ = write!(err, "{text}");
            // A script that asked for JSON gets its one document, usage errors too.
            if args.iter().skip(1).any(|a| a == "--json") {
                // clap's message up to its usage line, on one line (a
                // missing argument is named on the lines after the first).
                let message = text
                    .lines()
                    .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ");
                let message = message.trim_start_matches("error: ");
                let document = serde_json::json!({ "error": {
                    "exit": Exit::Usage.code(),
                    "kind": Exit::Usage.kind(),
                    "message": message,
                }});
                let _ = writeln!(out, "{document}");
            }
            Exit::Usage
        } else {
            let _ = write!(out, "{text}");
            Exit::Ok
        }
    })
}
