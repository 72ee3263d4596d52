//! [`Admin`]: what an operator needs beyond [`Store`] — read any record as it
//! is stored, list and count records, forget a result, end a call's record —
//! for the `idem` CLI (`tools/idem-cli`) and a service's own admin endpoints.
//!
//! The engine never calls these. Reads see every stored record, including
//! those [`Store::get`] reads as absent (a released record that keeps steps,
//! a lapsed claim, an expired record not yet purged). Every write is one
//! atomic, fenced operation (one statement, one Lua script, one lock), like
//! [`Store::complete`]: it changes nothing and fails with
//! [`Error::LeaseLost`] unless the record is in the state it names with the
//! token the caller read. See docs/CONTRACT.md §5.3.
//!
//! ```
//! use idem_runtime::store::admin::{Admin, Query, Status};
//! use idem_runtime::{ClaimRequest, MemoryStore, Store};
//! use std::time::Duration;
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_runtime::Error> {
//! let store = MemoryStore::new();
//! let key = idem_runtime::Key::derive("orders", &42)?;
//! store.claim(ClaimRequest { key: key.as_str(), fingerprint: None, lease: Duration::from_secs(30) }).await?;
//! let entry = store.inspect(key.as_str()).await?.expect("claimed");
//! assert_eq!(entry.status, Status::Running);
//! let listed = store.list(&Query::new().namespace("orders")).await?;
//! assert_eq!(listed.len(), 1);
//! // The operator's release: fenced by the token just read.
//! store.release(key.as_str(), entry.token).await?;
//! assert!(store.inspect(key.as_str()).await?.is_none());
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{FencingToken, Step, Store};
use crate::error::Error;
use crate::key::Digest;

/// The position of the mark a refused takeover (`on_takeover = fail`) records
/// among a call's steps (`idem:takeover`, at the last position).
pub const TAKEOVER_MARK_AT: u32 = u32::MAX;

/// What a stored record is, as an operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Status {
    /// Processing, its lease live: a call holds the key.
    Running,
    /// Processing, its lease lapsed: the holder stopped renewing (crashed,
    /// hung, partitioned). The next claim takes it over.
    Lapsed,
    /// Completed: its outcome replays until the record expires.
    Completed,
    /// Released while it keeps steps (or the takeover mark): it decides no
    /// claim, and the next claim resumes its steps.
    Released,
    /// Stored but no longer deciding anything (a completed record past its
    /// ttl, a released one whose steps are no longer kept): reads as absent;
    /// `purge_expired` removes it.
    Expired,
    /// Stored, but not readable as an idem record (written by another
    /// program, damaged, or of a newer format): [`Admin::list`] and
    /// [`Admin::stats`] report it apart, with [`Entry::problem`] saying what
    /// is wrong, instead of failing. An operator removes it with the store's
    /// own tools; see docs/CONTRACT.md §5.3.
    Corrupt,
}

impl Status {
    /// Every status, in the order they are reported.
    pub const ALL: [Status; 6] = [
        Status::Running,
        Status::Lapsed,
        Status::Completed,
        Status::Released,
        Status::Expired,
        Status::Corrupt,
    ];

    /// The status as one lowercase word (`running`, `lapsed`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Lapsed => "lapsed",
            Status::Completed => "completed",
            Status::Released => "released",
            Status::Expired => "expired",
            Status::Corrupt => "corrupt",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s word.
    pub fn parse(word: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == word)
    }

    /// Whether the record is processing (running or lapsed).
    pub fn is_processing(self) -> bool {
        matches!(self, Status::Running | Status::Lapsed)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stored record, as [`Admin::inspect`] and [`Admin::list`] read it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Entry {
    /// The storage key, `namespace:hex(digest)`.
    pub key: String,
    /// What the record is.
    pub status: Status,
    /// Its current fencing token (the one [`Admin::invalidate`],
    /// [`Admin::forget`] and [`Store::release`] are fenced by).
    pub token: FencingToken,
    /// The fingerprint stored with the claim, if any.
    pub fingerprint: Option<Digest>,
    /// The stored outcome's size in bytes, for a completed (or expired
    /// completed) record.
    pub outcome_len: Option<u64>,
    /// Time left by the store's clock: of the lease while running, of the ttl
    /// while completed, of the kept steps while released; zero once lapsed or
    /// expired.
    pub expires_in: Duration,
    /// How many recorded steps are kept (the takeover mark not counted).
    pub steps: u32,
    /// Whether the takeover mark is kept (`on_takeover = fail` refused a
    /// takeover: every retry is refused until the mark is forgotten or the
    /// call's ttl passes).
    pub takeover_mark: bool,
    /// What is wrong with a [`Status::Corrupt`] record (`None` otherwise).
    pub problem: Option<String>,
}

impl Entry {
    /// Builds an entry (for store implementations), counting `kept` steps
    /// (the steps still kept; pass none for a record whose steps are not).
    pub fn new(
        key: String,
        status: Status,
        token: FencingToken,
        fingerprint: Option<Digest>,
        outcome_len: Option<u64>,
        expires_in: Duration,
        kept: &[Step],
    ) -> Self {
        let takeover_mark = kept.iter().any(|s| s.at == TAKEOVER_MARK_AT);
        Entry {
            key,
            status,
            token,
            fingerprint,
            outcome_len,
            expires_in,
            steps: kept.iter().filter(|s| s.at != TAKEOVER_MARK_AT).count() as u32,
            takeover_mark,
            problem: None,
        }
    }

    /// The entry of a record stored under `key` that cannot be read
    /// ([`Status::Corrupt`]): `problem` says why; its token reads as 0 and
    /// it has no fingerprint, outcome, time left or steps.
    pub fn corrupt(key: String, problem: impl fmt::Display) -> Self {
        Entry {
            key,
            status: Status::Corrupt,
            token: FencingToken(0),
            fingerprint: None,
            outcome_len: None,
            expires_in: Duration::ZERO,
            steps: 0,
            takeover_mark: false,
            problem: Some(problem.to_string()),
        }
    }

    /// `read`'s entry, or, when the record cannot be read
    /// ([`Error::Codec`]), a [`Status::Corrupt`] entry for `key` saying why
    /// (for store implementations of [`Admin::list`]); other errors pass.
    pub fn or_corrupt(key: &str, read: Result<Entry, Error>) -> Result<Entry, Error> {
        match read {
            Err(Error::Codec(problem)) => Ok(Entry::corrupt(key.to_owned(), problem)),
            read => read,
        }
    }

    /// The record's namespace (the storage key before its last `:`).
    pub fn namespace(&self) -> &str {
        namespace_of(&self.key)
    }
}

/// The namespace of a storage key: everything before its last `:` (a
/// namespace may itself hold `:`, as `crate::module::f` does).
pub fn namespace_of(key: &str) -> &str {
    key.rfind(':').map_or(key, |at| &key[..at])
}

/// Whether `key` is a storage key of exactly `namespace` (not of a
/// namespace that merely starts with it).
pub fn in_namespace(key: &str, namespace: &str) -> bool {
    key.len() == namespace.len() + 65
        && key.starts_with(namespace)
        && key.as_bytes()[namespace.len()] == b':'
}

/// Whether `key` is a storage key with `digest`.
pub fn has_digest(key: &str, digest: &Digest) -> bool {
    let hex = digest.to_hex();
    key.len() > 65 && key.ends_with(&hex) && key.as_bytes()[key.len() - 65] == b':'
}

/// Which records [`Admin::list`] reads: all by default; at most
/// [`DEFAULT_LIMIT`](Query::DEFAULT_LIMIT).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Query {
    /// Only records of this namespace (exactly).
    pub namespace: Option<String>,
    /// Only records whose key has this digest (in any namespace, unless
    /// [`namespace`](Self::namespace) is given too).
    pub digest: Option<Digest>,
    /// Only lapsed claims ([`Status::Lapsed`]).
    pub stuck: bool,
    /// At most this many records.
    pub limit: usize,
}

impl Default for Query {
    fn default() -> Self {
        Self::new()
    }
}

impl Query {
    /// How many records a query reads unless told otherwise.
    pub const DEFAULT_LIMIT: usize = 100;

    /// Every record, up to [`DEFAULT_LIMIT`](Self::DEFAULT_LIMIT).
    pub fn new() -> Self {
        Query {
            namespace: None,
            digest: None,
            stuck: false,
            limit: Self::DEFAULT_LIMIT,
        }
    }

    /// Only records of `namespace`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Only records whose key has `digest`.
    pub fn digest(mut self, digest: Digest) -> Self {
        self.digest = Some(digest);
        self
    }

    /// Only lapsed claims.
    pub fn stuck(mut self) -> Self {
        self.stuck = true;
        self
    }

    /// At most `limit` records.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Whether `entry` is one this query asks for (for store implementations
    /// that filter as they read).
    pub fn matches(&self, entry: &Entry) -> bool {
        (!self.stuck || entry.status == Status::Lapsed)
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| in_namespace(&entry.key, ns))
            && self.digest.is_none_or(|d| has_digest(&entry.key, &d))
    }
}

/// How many records one namespace holds in one status ([`Admin::stats`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub struct Count {
    /// The namespace.
    pub namespace: String,
    /// The status.
    pub status: Status,
    /// How many records.
    pub records: u64,
}

impl Count {
    /// Builds a count (for store implementations).
    pub fn new(namespace: String, status: Status, records: u64) -> Self {
        Count {
            namespace,
            status,
            records,
        }
    }
}

/// Tallies `entries` into counts by namespace and status, sorted.
pub fn tally<'a>(entries: impl IntoIterator<Item = (&'a str, Status)>) -> Vec<Count> {
    let mut counts = std::collections::BTreeMap::<(String, Status), u64>::new();
    for (key, status) in entries {
        *counts
            .entry((namespace_of(key).to_owned(), status))
            .or_default() += 1;
    }
    counts
        .into_iter()
        .map(|((namespace, status), records)| Count::new(namespace, status, records))
        .collect()
}

/// An operator's view of a [`Store`]: read, list and count records, forget
/// a result, end a call's record. Implemented by every store idem ships; the
/// conformance suite is `testing::admin_conformance` (feature `testing`).
///
/// Object-safe: the CLI works on `&dyn Admin`.
#[async_trait]
pub trait Admin: Store {
    /// Reads the record stored under `key`, whatever its status (`None` when
    /// nothing is stored). A record that cannot be read is [`Error::Codec`].
    async fn inspect(&self, key: &str) -> Result<Option<Entry>, Error>;

    /// Reads the records `query` asks for, at most `query.limit`: by key on
    /// the SQL and memory stores, in no promised order on Redis (which scans).
    /// A record that cannot be read is listed as [`Status::Corrupt`] (unless
    /// the query asks only for stuck records), not failing the list.
    async fn list(&self, query: &Query) -> Result<Vec<Entry>, Error>;

    /// How many records each namespace holds in each status, sorted by
    /// namespace then status; records that cannot be read are counted as
    /// [`Status::Corrupt`]. On Redis this reads every record (a `SCAN` of
    /// every master, then one script per key): a cost in proportion to the store.
    async fn stats(&self) -> Result<Vec<Count>, Error>;

    /// Forgets a completed result so the next call with its key runs again:
    /// atomically, if the record is completed (live or expired) with `token`,
    /// it becomes a released record without steps (SQL, Redis: a tombstone
    /// keeping the token sequence) or is removed (memory). Otherwise changes
    /// nothing and fails with [`Error::LeaseLost`] (a processing record is
    /// never touched: a caller may still complete it).
    async fn invalidate(&self, key: &str, token: FencingToken) -> Result<(), Error>;

    /// Ends a call's record without a result and forgets its kept steps and
    /// takeover mark, so the next call starts over: atomically, if the record
    /// is processing (running or lapsed) or released with `token`, as
    /// [`invalidate`](Self::invalidate) does. Otherwise changes nothing and
    /// fails with [`Error::LeaseLost`]. A holder still running loses its
    /// claim (its completion fails with `LeaseLost`). To end a claim and
    /// keep its steps, [`Store::release`] it.
    async fn forget(&self, key: &str, token: FencingToken) -> Result<(), Error>;
}

macro_rules! forward_admin {
    ($($ty:ty),*) => {$(
        #[async_trait]
        impl<S: Admin + ?Sized> Admin for $ty {
            async fn inspect(&self, key: &str) -> Result<Option<Entry>, Error> {
                (**self).inspect(key).await
            }
            async fn list(&self, query: &Query) -> Result<Vec<Entry>, Error> {
                (**self).list(query).await
            }
            async fn stats(&self) -> Result<Vec<Count>, Error> {
                (**self).stats().await
            }
            async fn invalidate(&self, key: &str, token: FencingToken) -> Result<(), Error> {
                (**self).invalidate(key, token).await
            }
            async fn forget(&self, key: &str, token: FencingToken) -> Result<(), Error> {
                (**self).forget(key, token).await
            }
        }
    )*};
}

forward_admin!(&S, Arc<S>, Box<S>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_split_at_the_last_colon() {
        let digest = "a".repeat(64);
        let key = format!("crate::m::f:{digest}");
        assert_eq!(namespace_of(&key), "crate::m::f");
        assert!(in_namespace(&key, "crate::m::f"));
        assert!(!in_namespace(&key, "crate::m"));
        assert!(!in_namespace(
            &format!("crate::m::fx:{digest}"),
            "crate::m::f"
        ));
    }

    #[test]
    fn statuses_round_trip_their_words() {
        for status in Status::ALL {
            assert_eq!(Status::parse(status.as_str()), Some(status));
        }
        assert_eq!(Status::parse("stuck"), None);
    }
}
