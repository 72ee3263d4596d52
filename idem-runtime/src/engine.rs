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

use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument as _;

use crate::codec::Codec;
use crate::error::Error;
use crate::key::{Digest, Key};
use crate::store::{cap_duration, Claim, ClaimRequest, FencingToken, Store, TransactionalStore};

mod lease;

pub use lease::COMPLETION_RETRY_LIMIT;
use lease::{Completion, Watchdog};

/// What to do when a duplicate arrives while the first call is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InProgress {
    /// Fail at once with [`Error::InProgress`].
    Reject,
    /// Wait up to this long for the first call's outcome (then replay it, or run
    /// if the first call released its claim); after that, [`Error::InProgress`].
    Wait(Duration),
}

/// Per-function settings: ttl, lease and in-progress policy. (The namespace is
/// the key's own: [`Key::namespace`](crate::Key::namespace).)
///
/// Durations are kept between 1 ms and [`MAX_DURATION`](crate::store::MAX_DURATION)
/// (100 years, the attribute's own limit): the builder methods cap them, and the
/// engine caps fields set directly, so `Duration::MAX` means "as long as idem allows"
/// on every store instead of an overflow.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// How long a completed outcome is replayed.
    pub ttl: Duration,
    /// How long a claim is held without renewal.
    pub lease: Duration,
    /// What a duplicate does while the first call runs.
    pub in_progress: InProgress,
}

impl Default for Options {
    fn default() -> Self {
        Options::new()
    }
}

impl Options {
    /// The defaults: ttl 24 h, lease 30 s, reject duplicates in progress.
    pub const fn new() -> Self {
        Options {
            ttl: Duration::from_secs(24 * 60 * 60),
            lease: Duration::from_secs(30),
            in_progress: InProgress::Reject,
        }
    }

    /// Sets the ttl (capped to 1 ms – 100 years).
    pub const fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = bounded(ttl);
        self
    }

    /// Sets the lease (capped to 1 ms – 100 years).
    pub const fn lease(mut self, lease: Duration) -> Self {
        self.lease = bounded(lease);
        self
    }

    /// Sets the in-progress policy (a wait is capped to 100 years).
    pub const fn in_progress(mut self, policy: InProgress) -> Self {
        self.in_progress = match policy {
            InProgress::Wait(d) if d.as_secs() >= crate::store::MAX_DURATION.as_secs() => {
                InProgress::Wait(crate::store::MAX_DURATION)
            }
            other => other,
        };
        self
    }

    /// These options with every duration within idem's limits (fields are public,
    /// so the engine applies the builder's caps once more before using them).
    pub fn bounded(&self) -> Options {
        Options::new()
            .ttl(self.ttl)
            .lease(self.lease)
            .in_progress(self.in_progress)
    }
}

/// `d` within 1 ms – [`MAX_DURATION`](crate::store::MAX_DURATION), in a `const fn`.
const fn bounded(d: Duration) -> Duration {
    if d.as_secs() >= crate::store::MAX_DURATION.as_secs() {
        crate::store::MAX_DURATION
    } else if d.as_secs() == 0 && d.subsec_nanos() < 1_000_000 {
        Duration::from_millis(1)
    } else {
        d
    }
}

/// The attempt that is running now: what [`current`] returns inside the body.
#[derive(Debug, Clone)]
pub struct Attempt {
    key: Key,
    token: FencingToken,
    /// The attempt this one runs inside of (an idempotent call made from another's body).
    outer: Option<Arc<Attempt>>,
}

impl Attempt {
    /// The attempt for a claim taken now, inside whatever attempt is running.
    fn new(key: Key, token: FencingToken) -> Self {
        Attempt {
            key,
            token,
            outer: current().map(Arc::new),
        }
    }

    /// Whether this attempt, or one it runs inside of, holds `key`.
    fn holds(&self, key: &Key) -> bool {
        let mut attempt = self;
        loop {
            if attempt.key == *key {
                return true;
            }
            match &attempt.outer {
                Some(outer) => attempt = outer,
                None => return false,
            }
        }
    }

    /// The key this attempt holds (namespace and digest, never the raw key material).
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The digest of the key material.
    pub fn digest(&self) -> &Digest {
        self.key.digest()
    }

    /// This attempt's fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// A key for a downstream call (a payment provider's idempotency key, say),
    /// derived from this key's digest and `purpose`. It is the same for every
    /// attempt of the same logical call, so a rerun after a crash is deduplicated
    /// downstream too; 64 hex characters.
    pub fn derive_key(&self, purpose: &str) -> String {
        crate::key::FingerprintBuilder::new()
            .bytes(self.key.as_str().as_bytes())
            .bytes(purpose.as_bytes())
            .finish_bytes()
            .to_hex()
    }
}

tokio::task_local! {
    static CURRENT: Attempt;
}

/// The attempt running now, inside an `#[idempotent]` body; `None` elsewhere.
pub fn current() -> Option<Attempt> {
    CURRENT.try_with(Attempt::clone).ok()
}

/// Refuses a call whose key the running attempt (or one it runs inside of) holds:
/// it would wait for itself.
fn check_reentrant(key: &Key) -> Result<(), Error> {
    match CURRENT.try_with(|attempt| attempt.holds(key)) {
        Ok(true) => {
            tracing::error!(digest = %key.digest(), "re-entrant call with the key its own caller holds");
            Err(Error::Reentrant)
        }
        _ => Ok(()),
    }
}

/// The longest `retry_after` suggested by [`Error::InProgress`]: a running call
/// usually finishes well before its lease lapses, so hint a short retry.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(1);

fn retry_after(lease_remaining: Duration) -> Duration {
    lease_remaining.clamp(Duration::from_millis(1), MAX_RETRY_AFTER)
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
    let (key, fingerprint) = match (key, fingerprint.transpose()) {
        (Ok(key), Ok(fingerprint)) => (key, fingerprint),
        (Err(err), _) | (_, Err(err)) => return Err(codec.error(err)),
    };
    let span = tracing::debug_span!(
        "idempotent",
        namespace = key.namespace(),
        digest = %key.digest(),
    );
    run(store, options, key, fingerprint, codec, body)
        .instrument(span)
        .await
}

/// Like [`execute`], inside the caller's open transaction `tx`: the claim, the
/// body's writes (the body gets `tx` back) and the completed record are all
/// written in `tx`, so they commit or roll back together when the caller ends it.
///
/// The macro's `tx =` expands to the two halves, [`claim_in_tx`] and
/// [`finish_in_tx`], with the body awaited in between, so the body borrows the
/// transaction directly.
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
    let claim = match claim_in_tx(store, tx, options, key, fingerprint, &codec).await {
        ControlFlow::Continue(claim) => claim,
        ControlFlow::Break(done) => return done,
    };
    let outcome = claim.scope(body(tx)).await;
    finish_in_tx(store, tx, options, claim, &codec, outcome).await
}

/// A claim held inside the caller's transaction, between [`claim_in_tx`] and
/// [`finish_in_tx`].
#[derive(Debug)]
pub struct TxClaim {
    key: Key,
    token: FencingToken,
    span: tracing::Span,
}

impl TxClaim {
    /// The key held.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The claim's fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// Runs `body` as this attempt, so [`current`] sees it.
    pub async fn scope<F: Future>(&self, body: F) -> F::Output {
        let attempt = Attempt::new(self.key.clone(), self.token);
        CURRENT.scope(attempt, body).await
    }
}

/// Claims the key inside `tx`. `Break` carries the answer for the caller
/// (a replay, or an error); `Continue` means run the body, then [`finish_in_tx`].
///
/// No lease is renewed in a transaction: the claim row is the caller's
/// uncommitted write, which nobody else can take over, and the store's
/// transaction-scoped lock tells a duplicate the key is in progress until the
/// caller commits or rolls back.
pub async fn claim_in_tx<S, X, T, E>(
    store: &S,
    tx: &mut X,
    options: &Options,
    key: Result<Key, Error>,
    fingerprint: Option<Result<Digest, Error>>,
    codec: &Codec<T, E>,
) -> ControlFlow<Result<T, E>, TxClaim>
where
    S: TransactionalStore<X> + ?Sized,
    X: Send + ?Sized,
{
    let (key, fingerprint) = match (key, fingerprint.transpose()) {
        (Ok(key), Ok(fingerprint)) => (key, fingerprint),
        (Err(err), _) | (_, Err(err)) => return ControlFlow::Break(Err(codec.error(err))),
    };
    if let Err(err) = check_reentrant(&key) {
        return ControlFlow::Break(Err(codec.error(err)));
    }
    let options = &options.bounded();
    let span = tracing::debug_span!(
        "idempotent",
        namespace = key.namespace(),
        digest = %key.digest(),
        tx = true,
    );
    let claimed = async {
        let request = ClaimRequest {
            key: key.as_str(),
            fingerprint: fingerprint.as_ref(),
            lease: options.lease,
        };
        let mut waiter = Waiter::new(options);
        loop {
            let result = store.claim_in(tx, request).await;
            if let Some(claimed) = waiter.decide(result).await? {
                return Ok(claimed);
            }
        }
    }
    .instrument(span.clone())
    .await;
    match claimed {
        Ok(Claimed::Run(token)) => ControlFlow::Continue(TxClaim { key, token, span }),
        Ok(Claimed::Replay(outcome)) => {
            ControlFlow::Break(span.in_scope(|| replay(codec, &outcome)))
        }
        Err(err) => ControlFlow::Break(Err(codec.error(err))),
    }
}

/// Records the body's outcome inside `tx` (or deletes the claim there, for an
/// error that is not cached), and returns the outcome to the caller.
pub async fn finish_in_tx<S, X, T, E>(
    store: &S,
    tx: &mut X,
    options: &Options,
    claim: TxClaim,
    codec: &Codec<T, E>,
    outcome: Result<T, E>,
) -> Result<T, E>
where
    S: TransactionalStore<X> + ?Sized,
    X: Send + ?Sized,
{
    let TxClaim { key, token, span } = claim;
    let ttl = cap_duration(options.ttl);
    async move {
        match codec.encode(&outcome) {
            None => {
                match store.release_in(tx, key.as_str(), token).await {
                    Ok(()) => tracing::debug!(token = token.0, "released after error"),
                    Err(err) => tracing::warn!(
                        token = token.0, error = %err,
                        "could not release the claim in the transaction"
                    ),
                }
                outcome
            }
            Some(Ok(bytes)) => match store
                .complete_in(tx, key.as_str(), token, &bytes, ttl)
                .await
            {
                Ok(()) => {
                    tracing::debug!(token = token.0, "completed in the transaction");
                    outcome
                }
                Err(err) => {
                    tracing::error!(
                        token = token.0, error = %err,
                        "could not record the outcome in the transaction"
                    );
                    Err(codec.error(err))
                }
            },
            Some(Err(err)) => {
                // Never leave a claim behind for an outcome that cannot be stored:
                // a caller that commits anyway must not block retries until the
                // lease lapses.
                tracing::error!(token = token.0, error = %err, "the outcome cannot be encoded; releasing");
                if let Err(release) = store.release_in(tx, key.as_str(), token).await {
                    tracing::warn!(token = token.0, error = %release, "could not release the claim in the transaction");
                }
                Err(codec.error(err))
            }
        }
    }
    .instrument(span)
    .await
}

async fn run<T, E, F>(
    store: Arc<dyn Store>,
    options: &Options,
    key: Key,
    fingerprint: Option<Digest>,
    codec: Codec<T, E>,
    body: F,
) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
{
    let held = match begin(store, options, key, fingerprint.as_ref()).await {
        Ok(Begin::Run(held)) => held,
        Ok(Begin::Replay(outcome)) => return replay(&codec, &outcome),
        Err(err) => return Err(codec.error(err)),
    };
    let outcome = held.run(body).await;

    // From here the outcome is in hand: record it, or release the claim.
    match codec.encode(&outcome) {
        None => {
            held.release_because("released after error").await;
            outcome
        }
        Some(Ok(bytes)) => match held.complete(&bytes, options.ttl).await {
            Ok(()) => outcome,
            Err(err) => Err(codec.error(err)),
        },
        Some(Err(err)) => {
            tracing::error!(error = %err, "the outcome cannot be encoded; releasing");
            held.release().await;
            Err(codec.error(err))
        }
    }
}

/// What [`begin`] decided for a key.
#[derive(Debug)]
#[non_exhaustive]
pub enum Begin {
    /// The caller holds the key: run the work with [`HeldClaim::run`], then
    /// [`complete`](HeldClaim::complete) or [`release`](HeldClaim::release).
    Run(HeldClaim),
    /// The key is completed: replay this encoded outcome.
    Replay(Vec<u8>),
}

/// Claims `key` (waiting for a running duplicate if `options` say so): the
/// building block under [`execute`], for callers that store something other than
/// a `Result<T, E>` (the HTTP layer stores whole responses).
///
/// Errors are [`Error::InProgress`], [`Error::KeyReused`] and [`Error::Store`];
/// the work must not run after any of them.
pub async fn begin(
    store: Arc<dyn Store>,
    options: &Options,
    key: Key,
    fingerprint: Option<&Digest>,
) -> Result<Begin, Error> {
    check_reentrant(&key)?;
    let options = options.bounded();
    // The claim's events carry the key's own namespace (a consumer's, a
    // layer's), like the attribute's.
    let span = tracing::debug_span!(
        "idempotent",
        namespace = key.namespace(),
        digest = %key.digest(),
    );
    let claimed = claim(&store, &options, &key, fingerprint)
        .instrument(span)
        .await?;
    Ok(match claimed {
        Claimed::Run(token) => {
            let watchdog = std::sync::OnceLock::new();
            // On a multi-threaded runtime the watchdog starts with the claim, so
            // even a body that blocks its thread before its first await keeps its
            // lease. On a current-thread runtime such a body would block the
            // watchdog too, so it starts when the body first waits: a body that
            // finishes at once costs no task.
            if lease::multi_threaded() {
                let _ = watchdog.set(Watchdog::start(
                    Arc::clone(&store),
                    key.clone(),
                    token,
                    options.lease,
                ));
            }
            Begin::Run(HeldClaim {
                store,
                key,
                token,
                lease: options.lease,
                watchdog,
                armed: true,
            })
        }
        Claimed::Replay(outcome) => Begin::Replay(outcome),
    })
}

/// A claim this caller holds. Its lease is renewed by a watchdog task for as long
/// as the claim is held, however rarely the caller polls. Dropping it without
/// [`complete`](Self::complete) or [`release`](Self::release) (a cancelled future,
/// a panic) releases the claim, so a retry runs at once instead of waiting for the
/// lease to lapse.
pub struct HeldClaim {
    store: Arc<dyn Store>,
    key: Key,
    token: FencingToken,
    lease: Duration,
    /// Renews the lease until the claim is completed, released or dropped.
    watchdog: std::sync::OnceLock<Watchdog>,
    armed: bool,
}

impl std::fmt::Debug for HeldClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldClaim")
            .field("key", &self.key)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl HeldClaim {
    /// The key held.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The claim's fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// Runs `work` as this attempt ([`current`] sees it). The lease is renewed
    /// by the claim's watchdog meanwhile, whether or not `work` is polled.
    pub async fn run<F: Future>(&self, work: F) -> F::Output {
        let attempt = Attempt::new(self.key.clone(), self.token);
        let mut work = std::pin::pin!(CURRENT.scope(attempt, work));
        if self.watchdog.get().is_some() {
            return work.await;
        }
        std::future::poll_fn(|cx| {
            let polled = work.as_mut().poll(cx);
            if polled.is_pending() {
                self.watchdog.get_or_init(|| self.start_watchdog());
            }
            polled
        })
        .await
    }

    fn start_watchdog(&self) -> Watchdog {
        Watchdog::start(
            Arc::clone(&self.store),
            self.key.clone(),
            self.token,
            self.lease,
        )
    }

    /// Records `outcome` for `ttl` (capped to 100 years).
    ///
    /// A transient store failure is retried twice in place (20 ms, 40 ms). If the
    /// store still fails, `Ok` is returned and the completion goes on in the
    /// background for up to [`COMPLETION_RETRY_LIMIT`], the lease renewed
    /// meanwhile, so duplicates wait and then replay instead of running the work
    /// again. A completion whose reply was lost but whose write landed is `Ok`.
    /// [`Error::LeaseLost`] means another caller took the key over meanwhile and
    /// nothing was written.
    pub async fn complete(mut self, outcome: &[u8], ttl: Duration) -> Result<(), Error> {
        self.armed = false;
        let token = self.token;
        let (store, key) = (Arc::clone(&self.store), self.key.clone());
        let watchdog = match self.watchdog.take() {
            Some(watchdog) => watchdog.into(),
            None => lease::Lazy::Start(self.lease),
        };
        match lease::complete(store, key, token, watchdog, outcome, cap_duration(ttl)).await {
            Completion::Recorded => {
                tracing::debug!(token = token.0, "completed");
                Ok(())
            }
            Completion::Deferred => Ok(()),
            Completion::Lost => {
                tracing::error!(
                    token = token.0,
                    "lease lost: another call took the key over while this one ran; \
                     its outcome was not recorded"
                );
                Err(Error::LeaseLost)
            }
            Completion::Failed(err) => {
                tracing::error!(token = token.0, error = %err, "could not record the outcome");
                Err(err)
            }
        }
    }

    /// Deletes the claim so the next call runs at once. A failure is logged, not
    /// returned: the claim then lapses with its lease.
    pub async fn release(self) {
        self.release_because("released").await
    }

    /// [`release`](Self::release), logged as `what` ("released after error", …).
    pub(crate) async fn release_because(mut self, what: &'static str) {
        self.armed = false;
        drop(self.watchdog.take());
        let token = self.token;
        match self.store.release(self.key.as_str(), token).await {
            Ok(()) => tracing::debug!(token = token.0, "{what}"),
            Err(err) => tracing::warn!(
                token = token.0, error = %err,
                "could not release the claim; it lapses with its lease"
            ),
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

enum Claimed {
    Run(FencingToken),
    Replay(Vec<u8>),
}

/// Claims the key, waiting for a running duplicate if the policy says so.
async fn claim(
    store: &Arc<dyn Store>,
    options: &Options,
    key: &Key,
    fingerprint: Option<&Digest>,
) -> Result<Claimed, Error> {
    let mut waiter = Waiter::new(options);
    loop {
        let request = InFlight::send(store, key, fingerprint.copied(), options.lease);
        if let Some(claimed) = waiter.decide(request.await).await? {
            return Ok(claimed);
        }
    }
}

type ClaimFuture = std::pin::Pin<Box<dyn Future<Output = Result<Claim, Error>> + Send>>;

/// One claim request on its way to the store. If the caller's future is dropped
/// before the reply (a request timeout, a `select!`), the claim may still land
/// on the store: the request is then finished in a spawned task and a claim it
/// won is released, so a retry runs at once instead of after the lease.
struct InFlight {
    request: Option<ClaimFuture>,
    store: Arc<dyn Store>,
    key: Key,
    sent: bool,
}

impl InFlight {
    fn send(
        store: &Arc<dyn Store>,
        key: &Key,
        fingerprint: Option<Digest>,
        lease: Duration,
    ) -> Self {
        let (owned_store, owned_key) = (Arc::clone(store), key.clone());
        InFlight {
            request: Some(Box::pin(async move {
                let request = ClaimRequest {
                    key: owned_key.as_str(),
                    fingerprint: fingerprint.as_ref(),
                    lease,
                };
                owned_store.claim(request).await
            })),
            store: Arc::clone(store),
            key: key.clone(),
            sent: false,
        }
    }
}

impl Future for InFlight {
    type Output = Result<Claim, Error>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.sent = true;
        let request = self.request.as_mut().expect("polled after its reply");
        let reply = std::task::ready!(request.as_mut().poll(cx));
        self.request = None;
        std::task::Poll::Ready(reply)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(request) = self.request.take().filter(|_| self.sent) else {
            return;
        };
        let (store, key) = (Arc::clone(&self.store), self.key.clone());
        let finish = async move {
            if let Ok(Claim::Acquired { token, .. }) = request.await {
                match store.release(key.as_str(), token).await {
                    Ok(()) => {
                        tracing::debug!(token = token.0, "released a claim whose caller went away")
                    }
                    Err(err) => tracing::warn!(
                        token = token.0, error = %err,
                        "could not release a claim whose caller went away; it lapses with its lease"
                    ),
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(finish.in_current_span())),
            Err(_) => tracing::warn!(
                "a claim request was cancelled outside a Tokio runtime; if it landed, it lapses with its lease"
            ),
        }
    }
}

/// Turns one claim's result into what the engine does next, sleeping with
/// backoff between attempts while a duplicate may wait for the running call.
struct Waiter {
    deadline: Option<tokio::time::Instant>,
    backoff: Duration,
    /// Whether a running duplicate was seen: from then on this caller is waiting,
    /// and a transient store error is retried within the wait instead of ending it.
    waiting: bool,
}

impl Waiter {
    fn new(options: &Options) -> Self {
        let now = tokio::time::Instant::now();
        Waiter {
            deadline: match options.in_progress {
                InProgress::Wait(d) => Some(now.checked_add(cap_duration(d)).unwrap_or(now)),
                InProgress::Reject => None,
            },
            backoff: Duration::from_millis(2),
            waiting: false,
        }
    }

    /// Sleeps before the next claim: the backoff (doubling to 100 ms), never past
    /// `limit` or the deadline.
    async fn pause(&mut self, deadline: tokio::time::Instant, limit: Duration) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let pause = self.backoff.min(limit).min(left);
        tokio::time::sleep(pause.max(Duration::from_millis(1))).await;
        self.backoff = (self.backoff * 2).min(Duration::from_millis(100));
    }

    /// `Some` to run or replay, `None` to claim again (after a pause).
    async fn decide(&mut self, result: Result<Claim, Error>) -> Result<Option<Claimed>, Error> {
        match result {
            Ok(Claim::Acquired { token, took_over }) => {
                if took_over {
                    tracing::warn!(token = token.0, "took over a claim whose lease lapsed");
                } else {
                    tracing::debug!(token = token.0, "claimed");
                }
                Ok(Some(Claimed::Run(token)))
            }
            Ok(Claim::Completed { outcome, .. }) => Ok(Some(Claimed::Replay(outcome))),
            Ok(Claim::InProgress { lease_remaining }) => {
                let now = tokio::time::Instant::now();
                match self.deadline {
                    Some(deadline) if now < deadline => {
                        self.waiting = true;
                        self.pause(deadline, lease_remaining).await;
                        Ok(None)
                    }
                    _ => {
                        tracing::debug!("in progress");
                        Err(Error::InProgress {
                            retry_after: retry_after(lease_remaining),
                        })
                    }
                }
            }
            Ok(Claim::FingerprintMismatch) => {
                tracing::warn!("key reused with a different fingerprint");
                Err(Error::KeyReused)
            }
            Err(Error::Store(err))
                if self.waiting
                    && self
                        .deadline
                        .is_some_and(|deadline| tokio::time::Instant::now() < deadline) =>
            {
                tracing::warn!(error = %err, "claim failed while waiting for a running duplicate; retrying");
                let deadline = self.deadline.expect("checked above");
                self.pause(deadline, Duration::MAX).await;
                Ok(None)
            }
            Err(err) => {
                tracing::error!(error = %err, "claim failed; the body did not run");
                Err(err)
            }
        }
    }
}

impl Drop for HeldClaim {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        drop(self.watchdog.take());
        let token = self.token;
        match self.store.release_now(self.key.as_str(), token) {
            Some(Ok(())) => tracing::debug!(token = token.0, "released after cancellation"),
            Some(Err(err)) => {
                tracing::warn!(token = token.0, error = %err, "could not release after cancellation")
            }
            None => match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let store = Arc::clone(&self.store);
                    let key = self.key.clone();
                    runtime.spawn(async move {
                        match store.release(key.as_str(), token).await {
                            Ok(()) => tracing::debug!(token = token.0, "released after cancellation"),
                            Err(err) => tracing::warn!(
                                token = token.0, error = %err,
                                "could not release after cancellation; the claim lapses with its lease"
                            ),
                        }
                    });
                }
                Err(_) => tracing::warn!(
                    token = token.0,
                    "cancelled outside a Tokio runtime; the claim lapses with its lease"
                ),
            },
        }
    }
}
