//! The transaction path: the claim, the body's writes and the completed record
//! all in the caller's open transaction, so they commit or roll back together.
//!
//! No lease is renewed in a transaction: the claim row is the caller's
//! uncommitted write, which nobody else can take over, and the store's
//! transaction-scoped lock tells a duplicate the key is in progress until the
//! caller commits or rolls back.

use std::future::Future;
use std::ops::ControlFlow;
use std::time::Duration;

use tracing::Instrument as _;

use super::attempt::{check_reentrant, run_as};
use super::claim::Waiter;
use super::{replay, settle, split, Claimed, Options, Settle};
use crate::codec::Codec;
use crate::error::Error;
use crate::key::{Digest, Key};
use crate::metrics::{self, Outcome};
use crate::store::{cap_duration, ClaimRequest, FencingToken, TransactionalStore};

/// A claim held inside the caller's transaction, from [`claim_in_tx`] until it
/// is completed or released there.
#[derive(Debug)]
pub struct HeldInTx {
    key: Key,
    token: FencingToken,
    took_over: bool,
    /// Whether the work withheld its outcome ([`withhold_outcome`](super::withhold_outcome)).
    withheld: std::sync::atomic::AtomicBool,
    span: tracing::Span,
    /// The metrics' labels.
    labels: metrics::Labels,
    /// Whether how the claim ended is counted: one dropped before (the
    /// caller went away, its transaction with it) is counted `cancelled`.
    counted: bool,
}

impl HeldInTx {
    /// The key held.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The claim's fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// Whether this claim took over one whose lease lapsed
    /// (see [`Attempt::took_over`](super::Attempt::took_over)).
    pub fn took_over(&self) -> bool {
        self.took_over
    }

    /// Runs `work` as this attempt, so [`current`](super::current) sees it.
    /// Steps are refused inside it ([`Error::StepMisuse`]).
    pub async fn run<F: Future>(&self, work: F) -> F::Output {
        let steps = Err(
            "steps inside a `tx =` call are not supported: the call's writes already commit \
             together with its record",
        );
        let mut work = std::pin::pin!(run_as(&self.key, self.token, self.took_over, steps, work));
        let output = work.as_mut().await;
        if work.as_mut().take_value().is_some_and(|a| a.withheld()) {
            self.withheld
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        output
    }

    /// Records `outcome` in `tx` for `ttl` (capped to 100 years). Commit `tx`
    /// after `Ok`; an error means nothing was recorded.
    pub async fn complete<S, X>(
        mut self,
        store: &S,
        tx: &mut X,
        outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), Error>
    where
        S: TransactionalStore<X> + ?Sized,
        X: Send + ?Sized,
    {
        let (token, span) = (self.token, self.span.clone());
        let (key, labels) = (&self.key, &self.labels);
        let written = async {
            let timer = metrics::Timer::start();
            let written = store
                .complete_in(tx, key.as_str(), token, outcome, cap_duration(ttl))
                .await;
            labels.complete_duration(timer.elapsed());
            labels.outcome(match &written {
                Ok(()) => Outcome::Completed,
                Err(Error::LeaseLost) => Outcome::LeaseLost,
                Err(_) => Outcome::StoreError,
            });
            match &written {
                Ok(()) => tracing::debug!(token = token.0, "completed in the transaction"),
                Err(err) => tracing::error!(
                    token = token.0, error = %err,
                    "could not record the outcome in the transaction"
                ),
            }
            written
        }
        .instrument(span)
        .await;
        self.counted = true;
        written
    }

    /// Deletes the claim in `tx`, so the key is free once `tx` commits (a
    /// rollback frees it too). A failure is logged, not returned.
    pub async fn release<S, X>(self, store: &S, tx: &mut X)
    where
        S: TransactionalStore<X> + ?Sized,
        X: Send + ?Sized,
    {
        self.release_because(store, tx, "released").await
    }

    /// [`release`](Self::release), logged as `why`.
    pub(crate) async fn release_because<S, X>(mut self, store: &S, tx: &mut X, why: &'static str)
    where
        S: TransactionalStore<X> + ?Sized,
        X: Send + ?Sized,
    {
        let token = self.token;
        self.labels.outcome(Outcome::ReleasedAfterError);
        self.counted = true;
        let span = self.span.clone();
        let key = &self.key;
        async move {
            match store.release_in(tx, key.as_str(), token).await {
                Ok(()) => tracing::debug!(token = token.0, "{why}"),
                Err(err) => tracing::warn!(
                    token = token.0, error = %err,
                    "could not release the claim in the transaction"
                ),
            }
        }
        .instrument(span)
        .await
    }
}

impl Drop for HeldInTx {
    fn drop(&mut self) {
        if !self.counted {
            self.labels.outcome(Outcome::Cancelled);
        }
    }
}

/// A [`HeldInTx`] with the store and transaction to settle it in.
struct InTx<'a, S: ?Sized, X: ?Sized> {
    held: HeldInTx,
    store: &'a S,
    tx: &'a mut X,
}

impl<S, X> Settle for InTx<'_, S, X>
where
    S: TransactionalStore<X> + ?Sized,
    X: Send + ?Sized,
{
    fn withheld(&self) -> bool {
        self.held
            .withheld
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn record(self, outcome: &[u8], ttl: Duration) -> Result<(), Error> {
        self.held.complete(self.store, self.tx, outcome, ttl).await
    }

    async fn release(self, why: &'static str) {
        self.held.release_because(self.store, self.tx, why).await
    }

    /// In the caller's transaction, which it rolls back after the refusal:
    /// the lapsed claim stays as it was, for the next attempt to meet.
    async fn refuse(mut self) {
        // Counted as taken over only, as a refused takeover is.
        self.held.counted = true;
        tracing::warn!("a reconcile refused; the caller rolls back its transaction");
    }
}

/// Claims `key` inside `tx` (waiting for a running duplicate if `options` say
/// so): the raw step of the transaction path, for callers that record
/// something other than a `Result<T, E>` (a message consumer's mark).
///
/// Errors are [`Error::InProgress`], [`Error::KeyReused`], [`Error::Reentrant`]
/// and [`Error::Store`]; the work must not run after any of them.
pub async fn claim_in_tx<S, X>(
    store: &S,
    tx: &mut X,
    options: &Options,
    key: Key,
    fingerprint: Option<&Digest>,
) -> Result<Claimed<HeldInTx>, Error>
where
    S: TransactionalStore<X> + ?Sized,
    X: Send + ?Sized,
{
    let span = tx_span(&key);
    claim_in_tx_spanned(store, tx, options, key, fingerprint, span).await
}

fn tx_span(key: &Key) -> tracing::Span {
    tracing::debug_span!(
        "idempotent",
        namespace = key.namespace(),
        digest = %key.digest(),
        tx = true,
    )
}

async fn claim_in_tx_spanned<S, X>(
    store: &S,
    tx: &mut X,
    options: &Options,
    key: Key,
    fingerprint: Option<&Digest>,
    span: tracing::Span,
) -> Result<Claimed<HeldInTx>, Error>
where
    S: TransactionalStore<X> + ?Sized,
    X: Send + ?Sized,
{
    check_reentrant(&key)?;
    let options = options.bounded();
    let mut waiter = Waiter::new(&options, &key, store.kind());
    let claimed = async {
        let request = ClaimRequest {
            key: key.as_str(),
            fingerprint,
            lease: options.lease,
        };
        loop {
            let timer = crate::metrics::Timer::start();
            let result = store.claim_in(tx, request).await;
            waiter.timed(timer);
            if let Some(claimed) = waiter.decide(result).await? {
                return Ok::<_, Error>(claimed);
            }
        }
    }
    .instrument(span.clone())
    .await?;
    Ok(match claimed {
        // Refused inside the transaction, which the caller rolls back: the
        // lapsed claim stays as it was, for the next attempt to meet again.
        Claimed::Run((_, true)) if options.on_takeover == super::OnTakeover::Fail => {
            tracing::error!("an earlier attempt did not finish; on_takeover = fail");
            return Err(Error::TakenOver);
        }
        Claimed::Run((token, took_over)) => Claimed::Run(HeldInTx {
            labels: waiter.into_labels(),
            key,
            token,
            took_over,
            withheld: std::sync::atomic::AtomicBool::new(false),
            span,
            counted: false,
        }),
        Claimed::Replay(outcome) => Claimed::Replay(outcome),
    })
}

/// Like [`execute`](super::execute), inside the caller's open transaction `tx`:
/// the claim, the body's writes (the body gets `tx` back) and the completed
/// record are all written in `tx`, so they commit or roll back together when
/// the caller ends it.
pub async fn execute_in_tx<S, X, T, E, F>(
    store: &S,
    tx: &mut X,
    options: &Options,
    key: Result<Key, Error>,
    fingerprint: Option<Result<Digest, Error>>,
    codec: Codec<T, E>,
    body: F,
) -> Result<T, E>
where
    S: TransactionalStore<X> + ?Sized,
    X: Send + ?Sized,
    F: AsyncFnOnce(&mut X) -> Result<T, E>,
{
    let held = match begin_in_tx(store, tx, options, key, fingerprint, &codec).await {
        ControlFlow::Continue(held) => held,
        ControlFlow::Break(done) => return done,
    };
    let outcome = held.run(body(tx)).await;
    finish_in_tx(store, tx, options, held, &codec, outcome).await
}

/// The first half of [`execute_in_tx`], which the attribute's `tx =` expands
/// to with the body awaited in between (so the body borrows the transaction
/// directly). `Break` carries the answer for the caller (a replay, or an
/// error); `Continue` means run the body, then [`finish_in_tx`].
#[doc(hidden)]
pub async fn begin_in_tx<S, X, T, E>(
    store: &S,
    tx: &mut X,
    options: &Options,
    key: Result<Key, Error>,
    fingerprint: Option<Result<Digest, Error>>,
    codec: &Codec<T, E>,
) -> ControlFlow<Result<T, E>, HeldInTx>
where
    S: TransactionalStore<X> + ?Sized,
    X: Send + ?Sized,
{
    let (key, fingerprint) = match split(key, fingerprint) {
        Ok(parts) => parts,
        Err(err) => return ControlFlow::Break(Err(codec.error(err))),
    };
    let span = tx_span(&key);
    match claim_in_tx_spanned(store, tx, options, key, fingerprint.as_ref(), span.clone()).await {
        Ok(Claimed::Run(held)) => ControlFlow::Continue(held),
        Ok(Claimed::Replay(outcome)) => {
            ControlFlow::Break(span.in_scope(|| replay(codec, &outcome)))
        }
        Err(err) => ControlFlow::Break(Err(codec.error(err))),
    }
}

/// The second half of [`execute_in_tx`]: records the body's outcome inside `tx`
/// (or deletes the claim there, for an error that is not cached), and returns
/// the outcome to the caller.
#[doc(hidden)]
pub async fn finish_in_tx<S, X, T, E>(
    store: &S,
    tx: &mut X,
    options: &Options,
    held: HeldInTx,
    codec: &Codec<T, E>,
    outcome: Result<T, E>,
) -> Result<T, E>
where
    S: TransactionalStore<X> + ?Sized,
    X: Send + ?Sized,
{
    let span = held.span.clone();
    let settle = settle(InTx { held, store, tx }, codec, options.ttl, outcome);
    settle.instrument(span).await
}
