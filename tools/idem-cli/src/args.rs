//! The command line, as clap parses it.

use clap::{Args, Parser, Subcommand};

/// idem's operator CLI: inspect, list, count, release, invalidate and purge
/// idempotency records.
///
/// Exit codes: 0 ok, 1 not found, 2 usage, 3 refused (the record's state),
/// 4 store error, 5 conflict (the record changed meanwhile), 6 not
/// confirmed (a destructive command without --yes).
#[derive(Debug, Parser)]
#[command(name = "idem", version)]
pub(crate) struct Cli {
    /// The store: sqlite://PATH, postgres://USER@HOST/DB, redis://HOST:PORT,
    /// or redis-cluster://HOST:PORT,HOST:PORT.
    #[arg(long, env = "IDEM_STORE", global = true, value_name = "URL")]
    pub store: Option<String>,
    /// The SQL table records live in (default idem_records).
    #[arg(long, global = true, value_name = "NAME")]
    pub table: Option<String>,
    /// The Redis key prefix (default `idem:`).
    #[arg(long, global = true, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// PostgreSQL: how long a statement waits for a row another transaction
    /// holds (a running call's `tx =`) before failing with nothing changed
    /// (default 5s; 0s waits without limit; at most 24d20h31m23s).
    #[arg(long, global = true, value_name = "DURATION")]
    pub lock_timeout: Option<String>,
    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Show one record: status, token, time left, fingerprint, outcome size, kept steps.
    Inspect {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// List records: all, one namespace's, or the stuck (lapsed) claims.
    List {
        /// Only lapsed claims: processing past their lease.
        #[arg(long)]
        stuck: bool,
        /// Only records of this namespace.
        #[arg(long, value_name = "NAMESPACE")]
        namespace: Option<String>,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Count records by namespace and status.
    Stats,
    /// End a processing claim (fenced by its token) so the next call runs now.
    ///
    /// Recorded steps are kept: the next call resumes them. With
    /// --forget-steps they are dropped with the takeover mark (also from an
    /// already released record), and the next call starts over.
    Release {
        #[command(flatten)]
        target: TargetArgs,
        /// Drop the kept steps and the takeover mark too.
        #[arg(long)]
        forget_steps: bool,
        /// Act only if the record still holds this token.
        #[arg(long, value_name = "TOKEN")]
        token: Option<u64>,
        /// Do it (without: say what would be done, exit 6).
        #[arg(long)]
        yes: bool,
    },
    /// Forget a completed result (fenced by its token) so the next call runs again.
    Invalidate {
        #[command(flatten)]
        target: TargetArgs,
        /// Act only if the record still holds this token.
        #[arg(long, value_name = "TOKEN")]
        token: Option<u64>,
        /// Do it (without: say what would be done, exit 6).
        #[arg(long)]
        yes: bool,
    },
    /// Delete expired records, batch by batch, until none is left.
    Purge {
        /// Delete expired records (the only kind purge deletes; required).
        #[arg(long, required = true)]
        expired: bool,
        /// Records per batch.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        batch: u32,
        /// Do it (without: say what would be done, exit 6).
        #[arg(long)]
        yes: bool,
    },
}

/// Which record: `NAMESPACE KEY_PARTS_JSON`, `NAMESPACE:HEX`, `NAMESPACE
/// --digest HEX`, or `--digest HEX` alone (searched in every namespace).
#[derive(Debug, Args)]
pub(crate) struct TargetArgs {
    /// The function's namespace (as `#[idempotent]` names it), or a whole
    /// storage key NAMESPACE:HEX.
    #[arg(value_name = "NAMESPACE|KEY")]
    pub namespace_or_key: Option<String>,
    /// The key parts as a JSON array, one element per part of `key = (..)`:
    /// '[7, "sku-1"]'.
    #[arg(value_name = "KEY_PARTS_JSON")]
    pub parts: Option<String>,
    /// The key's digest (64 hex digits).
    #[arg(long, value_name = "HEX")]
    pub digest: Option<String>,
    /// The function's `window` (e.g. 1d): adds the time bucket as the macro does.
    #[arg(long, value_name = "DURATION")]
    pub window: Option<String>,
    /// The time whose window bucket to use, in Unix milliseconds (default now).
    #[arg(long, value_name = "UNIX_MS", requires = "window")]
    pub at: Option<u64>,
}
