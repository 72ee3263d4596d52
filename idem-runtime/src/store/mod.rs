//! The [`Store`] trait every backend implements, and the records it keeps.
//!
//! A store keeps one record per storage key (`namespace:hex(digest)`), in one of
//! two states: `PROCESSING` (claimed, with a lease and a fencing token) or
//! `COMPLETED` (holding the encoded outcome until the ttl elapses). The whole
//! claim decision is one atomic [`Store::claim`] call; the table it implements is
//! in the crate docs and docs/CONTRACT.md §3.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Error;
use crate::key::Digest;

/// The longest lease, ttl or wait idem uses: 100 years, the same limit the
/// `#[idempotent]` attribute enforces on its duration literals. Longer durations
/// given to the runtime APIs are capped to it (they would overflow clock
/// arithmetic in some backends), and every store accepts any `Duration` up to it.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// `d` capped to [`MAX_DURATION`].
pub fn cap_duration(d: Duration) -> Duration {
    if d > MAX_DURATION {
        MAX_DURATION
    } else {
        d
    }
}

pub mod admin;
pub mod cache;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod reaper;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;
mod sync;

/// A claim's fencing token: never reused for a key, increasing where the backend allows.
///
/// `complete`, `release` and `renew` succeed only with the record's current token.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl FencingToken {
    /// The token as a number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FencingToken({})", self.0)
    }
}

/// What a caller asks of [`Store::claim`].
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    /// The storage key, `namespace:hex(digest)`.
    pub key: &'a str,
    /// The request fingerprint, if the caller has one.
    pub fingerprint: Option<&'a Digest>,
    /// How long the claim is held without renewal.
    pub lease: Duration,
}

/// The whole decision of one atomic claim.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim {
    /// The caller now holds the key (it was absent, expired, or its lease lapsed).
    Acquired {
        /// The new fencing token.
        token: FencingToken,
        /// Whether this claim continues an earlier attempt that did not finish:
        /// a lapsed claim of another caller was taken over, or an earlier
        /// attempt recorded [steps](Store::record_step) that are still kept.
        took_over: bool,
    },
    /// The key is completed: replay this encoded outcome.
    Completed {
        /// The encoded outcome (see [`codec`](crate::codec)).
        outcome: Vec<u8>,
        /// The fingerprint stored with the record (already checked against the
        /// request's; kept so a cache in front of the store can check it too).
        fingerprint: Option<Digest>,
        /// Time left before the record expires, by the store's clock.
        expires_in: Duration,
    },
    /// Another caller holds a live lease on the key.
    InProgress {
        /// How long until that lease lapses (unless renewed).
        lease_remaining: Duration,
    },
    /// A live record exists for the key with a different fingerprint.
    FingerprintMismatch,
}

/// The state of a stored record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordState {
    /// Claimed and running (or abandoned, once the lease has lapsed).
    Processing,
    /// Finished; the outcome is replayed until the record expires.
    Completed,
}

/// A stored record, as [`Store::get`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// The storage key.
    pub key: String,
    /// Processing or completed.
    pub state: RecordState,
    /// The current fencing token.
    pub token: FencingToken,
    /// The fingerprint stored with the claim, if any.
    pub fingerprint: Option<Digest>,
    /// The encoded outcome, for completed records.
    pub outcome: Option<Vec<u8>>,
    /// Time left, by the store's clock: of the lease while processing, of the ttl once completed.
    /// Zero for a processing record whose lease has lapsed.
    pub expires_in: Duration,
}

impl Record {
    /// Builds a record (for store implementations).
    pub fn new(
        key: String,
        state: RecordState,
        token: FencingToken,
        fingerprint: Option<Digest>,
        outcome: Option<Vec<u8>>,
        expires_in: Duration,
    ) -> Self {
        Record {
            key,
            state,
            token,
            fingerprint,
            outcome,
            expires_in,
        }
    }
}

/// A step of a call, as recorded by [`Store::record_step`] and read back by
/// [`Store::steps`]: the `Ok` value of one
/// [`step`](crate::step) inside the call holding the key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Step {
    /// Where the step came in the call: 0 for its first step, and so on.
    pub at: u32,
    /// The step's id as the body named it (see [`StepId`](crate::StepId)).
    pub id: String,
    /// The encoded value (see [`codec`](crate::codec)).
    pub value: Vec<u8>,
}

impl Step {
    /// Builds a step (for store implementations).
    pub fn new(at: u32, id: String, value: Vec<u8>) -> Self {
        Step { at, id, value }
    }
}

/// A backend that keeps idempotency records.
///
/// Implementations decide every claim atomically in one round trip (never a
/// get followed by a set), judge leases and expiry by their own clock, and
/// check the fencing token on `complete`, `release` and `renew`. Run
/// [`testing::conformance`](crate::testing) (feature `testing`) against a new store.
///
/// The trait is object-safe: `Arc<dyn Store>` and `Box<dyn Store>` are stores.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an idempotency store",
    label = "this must be a value implementing `idem_runtime::Store` (or a reference, `Arc` or `Box` of one)",
    note = "stores are `MemoryStore`, or any type that implements `idem_runtime::Store`"
)]
#[async_trait]
pub trait Store: Send + Sync {
    /// Atomically decides a claim, per the table in CONTRACT §3.2:
    /// absent / expired / lapsed → [`Claim::Acquired`] with a new token;
    /// live processing → [`Claim::InProgress`]; completed → [`Claim::Completed`];
    /// a live record with a different fingerprint → [`Claim::FingerprintMismatch`].
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim, Error>;

    /// Records the outcome and keeps it for `ttl`. Fails with [`Error::LeaseLost`]
    /// (changing nothing) unless `token` is the record's current token and the
    /// record is processing.
    async fn complete(
        &self,
        key: &str,
        token: FencingToken,
        outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), Error>;

    /// Deletes a processing record so the next claim runs at once. Fails with
    /// [`Error::LeaseLost`] (changing nothing) unless `token` is current.
    async fn release(&self, key: &str, token: FencingToken) -> Result<(), Error>;

    /// Extends a processing record's lease to `lease` from now. Fails with
    /// [`Error::LeaseLost`] (changing nothing) unless `token` is current.
    async fn renew(&self, key: &str, token: FencingToken, lease: Duration) -> Result<(), Error>;

    /// Reads a live record (expired completed records are absent).
    async fn get(&self, key: &str) -> Result<Option<Record>, Error>;

    /// Deletes up to `batch` expired records; returns how many were deleted.
    async fn purge_expired(&self, batch: usize) -> Result<u64, Error>;

    /// Records `step` of the call that holds `key` with `token`, atomically
    /// checked like [`complete`](Store::complete): [`Error::LeaseLost`]
    /// (changing nothing) unless `token` is current and the record processing.
    /// A step at the same position is replaced.
    ///
    /// Steps outlive the attempt that recorded them: a release keeps them (the
    /// record is then released, not deleted), and so does a lapsed lease, for
    /// at least `keep` from now; the next claim of the key carries them over
    /// and reports [`took_over`](Claim::Acquired). Completing the record
    /// drops them, and so do expiry and [`purge_expired`](Store::purge_expired)
    /// once `keep` has passed. See CONTRACT §3.4.
    ///
    /// The default refuses with [`Error::Store`]: a store that does not keep
    /// steps must not pretend to. A store that keeps them also answers
    /// [`keeps_steps`](Store::keeps_steps) with `true`.
    async fn record_step(
        &self,
        key: &str,
        token: FencingToken,
        step: &Step,
        keep: Duration,
    ) -> Result<(), Error> {
        let _ = (key, token, step, keep);
        Err(Error::Store("this store does not record steps".into()))
    }

    /// The steps recorded for `key` and still kept, by position (empty when
    /// none are, or when the record is completed). With `held`, for the claim
    /// that holds `key` with that token only: [`Error::LeaseLost`] unless the
    /// record is processing with it (a holder taken over meanwhile must not
    /// read a completed record's "no steps" and run a recorded step again).
    async fn steps(&self, key: &str, held: Option<FencingToken>) -> Result<Vec<Step>, Error> {
        let _ = (key, held);
        Ok(Vec::new())
    }

    /// Whether this store keeps steps ([`record_step`](Store::record_step)):
    /// asked before a step runs, so on a store that does not, a step is
    /// refused before its work is done, not after. Default `false`.
    fn keeps_steps(&self) -> bool {
        false
    }

    /// An owned handle to this store, used by the engine to renew the lease while
    /// the body runs and to release a claim whose caller went away.
    ///
    /// For a store that is cheap to clone: `Arc::new(self.clone())`.
    fn handle(&self) -> Arc<dyn Store>;

    /// Releases a claim without awaiting, when the caller's future was dropped or
    /// panicked. Return `None` if the store cannot do it synchronously: the engine
    /// then spawns [`release`](Store::release) on the current Tokio runtime.
    fn release_now(&self, key: &str, token: FencingToken) -> Option<Result<(), Error>> {
        let _ = (key, token);
        None
    }

    /// Whether a caller may get its result while its completion is still being
    /// recorded (the default, `true`): when the store keeps failing, the engine
    /// answers with the result and records it in the background, the claim held
    /// meanwhile. A store that promises more before it answers (a
    /// [`RedisStore`](crate::RedisStore) waiting for replicas) returns `false`:
    /// the background recording goes on, but the call fails with the store's error.
    fn answers_before_recorded(&self) -> bool {
        true
    }

    /// What kind of backend this is, for metrics and logs: `"memory"`,
    /// `"sqlite"`, `"postgres"`, `"redis"`, `"redis-cluster"`; a wrapper answers
    /// for the store it wraps. Default `"custom"`.
    fn kind(&self) -> &'static str {
        "custom"
    }
}

/// A store that can write its records inside the caller's open transaction `X`
/// (`tx =` in the macro): the claim, the body's own writes and the completed
/// record then commit or roll back together.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot write idempotency records inside a `{X}`",
    label = "`tx =` needs a store that shares the transaction's database",
    note = "`tx =` works with `SqliteStore` (a `sqlx::Transaction<'_, Sqlite>`) and `PostgresStore` (a `sqlx::Transaction<'_, Postgres>`); remove `tx =` to use this store"
)]
#[async_trait]
pub trait TransactionalStore<X: Send + ?Sized>: Store {
    /// [`Store::claim`], executed inside `tx`.
    async fn claim_in(&self, tx: &mut X, request: ClaimRequest<'_>) -> Result<Claim, Error>;

    /// [`Store::complete`], executed inside `tx`.
    async fn complete_in(
        &self,
        tx: &mut X,
        key: &str,
        token: FencingToken,
        outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), Error>;

    /// [`Store::release`], executed inside `tx`.
    async fn release_in(&self, tx: &mut X, key: &str, token: FencingToken) -> Result<(), Error>;

    /// [`Store::record_step`], executed inside `tx`: the step is recorded if
    /// and when `tx` commits, with the step's own writes
    /// ([`step_in_tx`](crate::step_in_tx)). The default refuses.
    async fn record_step_in(
        &self,
        tx: &mut X,
        key: &str,
        token: FencingToken,
        step: &Step,
        keep: Duration,
    ) -> Result<(), Error> {
        let _ = (tx, key, token, step, keep);
        Err(Error::Store(
            "this store cannot record a step inside a transaction".into(),
        ))
    }
}

#[async_trait]
impl<X: Send + ?Sized, S: TransactionalStore<X> + ?Sized> TransactionalStore<X> for &S {
    async fn claim_in(&self, tx: &mut X, request: ClaimRequest<'_>) -> Result<Claim, Error> {
        (**self).claim_in(tx, request).await
    }
    async fn complete_in(
        &self,
        tx: &mut X,
        key: &str,
        token: FencingToken,
        outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        (**self).complete_in(tx, key, token, outcome, ttl).await
    }
    async fn release_in(&self, tx: &mut X, key: &str, token: FencingToken) -> Result<(), Error> {
        (**self).release_in(tx, key, token).await
    }
    async fn record_step_in(
        &self,
        tx: &mut X,
        key: &str,
        token: FencingToken,
        step: &Step,
        keep: Duration,
    ) -> Result<(), Error> {
        (**self).record_step_in(tx, key, token, step, keep).await
    }
}

macro_rules! forward_store {
    ($($ty:ty),*) => {$(
        #[async_trait]
        impl<S: Store + ?Sized> Store for $ty {
            async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim, Error> {
                (**self).claim(request).await
            }
            async fn complete(
                &self,
                key: &str,
                token: FencingToken,
                outcome: &[u8],
                ttl: Duration,
            ) -> Result<(), Error> {
                (**self).complete(key, token, outcome, ttl).await
            }
            async fn release(&self, key: &str, token: FencingToken) -> Result<(), Error> {
                (**self).release(key, token).await
            }
            async fn renew(&self, key: &str, token: FencingToken, lease: Duration) -> Result<(), Error> {
                (**self).renew(key, token, lease).await
            }
            async fn get(&self, key: &str) -> Result<Option<Record>, Error> {
                (**self).get(key).await
            }
            async fn purge_expired(&self, batch: usize) -> Result<u64, Error> {
                (**self).purge_expired(batch).await
            }
            async fn record_step(
                &self,
                key: &str,
                token: FencingToken,
                step: &Step,
                keep: Duration,
            ) -> Result<(), Error> {
                (**self).record_step(key, token, step, keep).await
            }
            async fn steps(&self, key: &str, held: Option<FencingToken>) -> Result<Vec<Step>, Error> {
                (**self).steps(key, held).await
            }
            fn keeps_steps(&self) -> bool {
                (**self).keeps_steps()
            }
            fn handle(&self) -> Arc<dyn Store> {
                (**self).handle()
            }
            fn release_now(&self, key: &str, token: FencingToken) -> Option<Result<(), Error>> {
                (**self).release_now(key, token)
            }
            fn answers_before_recorded(&self) -> bool {
                (**self).answers_before_recorded()
            }
            fn kind(&self) -> &'static str {
                (**self).kind()
            }
        }
    )*};
}

forward_store!(&S, Arc<S>, Box<S>);
