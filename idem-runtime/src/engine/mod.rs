//! The engine: claim → run → complete / release, as CONTRACT §3.2 lays out.
//!
//! [`execute`] is what `#[idempotent]` expands to. It is an ordinary async
//! function, so services that cannot use the attribute (a closure, a trait
//! object) call it directly:
//!
//! ```
//! use std::sync::Arc;
//! use idem_runtime::engine::{execute, Options};
//! use idem_runtime::codec::Codec;
//! use idem_runtime::key::KeyBuilder;
//! use idem_runtime::{Error, MemoryStore, Store};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! static OPTIONS: Options = Options::new();
//! let store = MemoryStore::new();
//! let key = KeyBuilder::new("doc::charge").part("order-7").finish();
//! let out: Result<u32, Error> =
//!     execute(store.handle(), &OPTIONS, key, None, Codec::release_errors(), async { Ok(42) }).await;
//! assert_eq!(out.unwrap(), 42);
//! # }
//! ```
//!
//! One step per combination of what is stored and where:
//!
//! | | the store's own connection | the caller's transaction |
//! |---|---|---|
//! | a `Result<T, E>` through a [`Codec`] | [`execute`] | [`execute_in_tx`] |
//! | raw bytes (HTTP responses, message marks) | [`claim`] → [`Held`] | [`claim_in_tx`] → [`HeldInTx`] |
//!
//! Both raw steps answer [`Claimed`]: run the work under the held claim, then
//! complete or release it; or replay the stored bytes. The typed steps are the
//! raw ones plus one shared rule for settling an outcome (record it, release
//! after an error the codec does not cache, release when it cannot be encoded).
//!
//! Files: options ([`Options`]), the attempt and [`current`], the claim and its
//! wait, the held claim and its lease renewal, the transaction path.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument as _;

use crate::codec::Codec;
use crate::error::Error;
use crate::key::{Digest, Key};
use crate::store::Store;

mod attempt;
mod claim;
mod held;
mod keeper;
mod lease;
mod options;
mod steps;
mod tx;

pub use attempt::{current, withhold_outcome, Attempt};
pub use claim::{claim, MAX_RETRY_AFTER};
pub use held::Held;
pub use lease::COMPLETION_RETRY_LIMIT;
pub use options::{InProgress, OnTakeover, Options};
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use steps::step_in_tx;
pub use steps::{step, Phase, StepId};
pub use tx::{begin_in_tx, claim_in_tx, execute_in_tx, finish_in_tx, HeldInTx};

/// What a claim decided for a key: run the work under the held claim `H`
/// ([`Held`], or [`HeldInTx`] in a transaction), or replay what a previous
/// call stored.
#[derive(Debug)]
#[non_exhaustive]
pub enum Claimed<H> {
    /// The caller holds the key: run the work, then complete or release.
    Run(H),
    /// The key is completed: replay these stored bytes.
    Replay(Vec<u8>),
}

/// Runs `body` at most once per key: claims `key`, runs the body while renewing
/// the lease, then records the outcome (or releases the claim), or replays the
/// recorded outcome to a duplicate.
///
/// `key` and `fingerprint` are passed as results so a key that could not be
/// derived fails the call without running the body.
pub async fn execute<T, E, F>(
    store: Arc<dyn Store>,
    options: &Options,
    key: Result<Key, Error>,
    fingerprint: Option<Result<Digest, Error>>,
    codec: Codec<T, E>,
    body: F,
) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
{
    let (key, fingerprint) = match split(key, fingerprint) {
        Ok(parts) => parts,
        Err(err) => return Err(codec.error(err)),
    };
    let span = tracing::debug_span!(
        "idempotent",
        namespace = key.namespace(),
        digest = %key.digest(),
    );
    async move {
        match claim(store, options, key, fingerprint.as_ref()).await {
            Ok(Claimed::Run(held)) => {
                let outcome = held.run(body).await;
                settle(held, &codec, options.ttl, outcome).await
            }
            Ok(Claimed::Replay(outcome)) => replay(&codec, &outcome),
            Err(err) => Err(codec.error(err)),
        }
    }
    .instrument(span)
    .await
}

/// The key and fingerprint, or the first error deriving them.
fn split(
    key: Result<Key, Error>,
    fingerprint: Option<Result<Digest, Error>>,
) -> Result<(Key, Option<Digest>), Error> {
    Ok((key?, fingerprint.transpose()?))
}

/// A held claim, on either path, as [`settle`] ends it.
trait Settle {
    /// Whether the outcome must not be recorded (released instead).
    fn withheld(&self) -> bool;
    /// Records `outcome` for `ttl`.
    async fn record(self, outcome: &[u8], ttl: Duration) -> Result<(), Error>;
    /// Deletes the claim, logged as `why`.
    async fn release(self, why: &'static str);
    /// Ends a claim whose body refused to go on (a `reconcile` that said
    /// no): the next attempt must meet the takeover again.
    async fn refuse(self);
}

/// Ends a held claim with the body's `outcome`, the one rule of both typed
/// paths: record what the codec encodes; release after an error it does not
/// cache; release when the outcome cannot be encoded (never leave a claim
/// behind for an outcome that cannot be stored: a retry must not wait for the
/// lease) and answer with that error.
async fn settle<T, E>(
    held: impl Settle,
    codec: &Codec<T, E>,
    ttl: Duration,
    outcome: Result<T, E>,
) -> Result<T, E> {
    if held.withheld() {
        held.refuse().await;
        return outcome;
    }
    match codec.encode(&outcome) {
        None => {
            held.release("released after error").await;
            outcome
        }
        Some(Ok(bytes)) => match held.record(&bytes, ttl).await {
            Ok(()) => outcome,
            Err(err) => Err(codec.error(err)),
        },
        Some(Err(err)) => {
            tracing::error!(error = %err, "the outcome cannot be encoded; releasing");
            held.release("released").await;
            Err(codec.error(err))
        }
    }
}

/// Decodes a stored outcome for a duplicate.
fn replay<T, E>(codec: &Codec<T, E>, outcome: &[u8]) -> Result<T, E> {
    match codec.decode(outcome) {
        Ok(outcome) => {
            tracing::debug!("replayed");
            outcome
        }
        Err(err) => {
            tracing::error!(error = %err, "stored outcome could not be decoded");
            Err(codec.error(err))
        }
    }
}
