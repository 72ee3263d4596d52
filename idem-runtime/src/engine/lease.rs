//! Holding a claim: the lease watchdog, and completions that outlast a store hiccup.
//!
//! The lease is renewed by a [`Watchdog`] that lives exactly as long as the
//! claim (the [keeper](super::keeper) thread on a multi-threaded runtime, a task
//! of the claim's own on a current-thread one), so it does not depend on how
//! often the caller polls the call's future (a `select!` whose other branch runs
//! long, a stream combinator, a body that blocks its thread on a multi-threaded
//! runtime). Dropping the claim stops it.
//!
//! A completion is tried three times in place (at once, after 20 ms and 40 ms).
//! If the store still fails, the outcome is in hand and the work must not run
//! again: the claim is handed to a background task that keeps the lease renewed
//! and retries the completion with backoff (up to [`COMPLETION_RETRY_LIMIT`]),
//! while duplicates get `InProgress`. A completion whose reply was lost (the
//! write landed, the connection dropped before the answer) is recognised on the
//! retry: the record is completed with this claim's own token, so it succeeded.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument as _;

use super::keeper::Kept;
use crate::error::Error;
use crate::key::Key;
use crate::store::{FencingToken, RecordState, Store};

/// How long a completion that keeps failing with store errors is retried in the
/// background before the claim is left to lapse with its lease (5 minutes).
pub const COMPLETION_RETRY_LIMIT: Duration = Duration::from_secs(5 * 60);

/// Renews a claim's lease every third of it until dropped: from the
/// [keeper](super::keeper) thread on a multi-threaded runtime, else from a task of
/// its own.
pub(crate) enum Watchdog {
    /// Registered with the keeper (unregistered when dropped).
    Kept { _registered: Kept },
    /// A task on the current runtime.
    Task(tokio::task::AbortHandle),
}

impl Watchdog {
    /// Starts renewing `token`'s lease on `key` (`lease` at a time) through the
    /// keeper, on a multi-threaded runtime; `None` on any other.
    pub(crate) fn kept(
        store: Arc<dyn Store>,
        key: Key,
        token: FencingToken,
        lease: Duration,
    ) -> Option<Self> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        if runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return None;
        }
        Kept::register(runtime, store, key, token, lease)
            .map(|kept| Watchdog::Kept { _registered: kept })
    }

    /// Starts renewing `token`'s lease on `key` (`lease` at a time): through the
    /// keeper where it can, else from a task of its own.
    pub(crate) fn start(
        store: Arc<dyn Store>,
        key: Key,
        token: FencingToken,
        lease: Duration,
    ) -> Self {
        match Self::kept(Arc::clone(&store), key.clone(), token, lease) {
            Some(watchdog) => watchdog,
            None => Self::task(store, key, token, lease),
        }
    }

    /// A task that renews the lease (on a current-thread runtime, whose clock
    /// tests may pause; or where the keeper cannot be used: its thread could
    /// not start, or the process was forked from the one it runs in).
    fn task(store: Arc<dyn Store>, key: Key, token: FencingToken, lease: Duration) -> Self {
        let task = tokio::spawn(
            async move {
                let mut pause = interval(lease);
                loop {
                    tokio::time::sleep(pause).await;
                    match next_renewal(store.renew(key.as_str(), token, lease).await, token, lease)
                    {
                        Some(next) => pause = next,
                        None => return,
                    }
                }
            }
            .in_current_span(),
        )
        .abort_handle();
        // On a multi-threaded runtime (the keeper could not be used) a task
        // spawned from a worker waits in that worker's "LIFO slot", which
        // other workers never steal: a body that blocks its thread right away
        // would keep the watchdog from ever starting. Spawning one more
        // (empty) task moves it to the worker's stealable queue and wakes an
        // idle worker to take it.
        if tokio::runtime::Handle::try_current()
            .is_ok_and(|rt| rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        {
            drop(tokio::spawn(async {}));
        }
        Watchdog::Task(task)
    }
}

/// Renewals are due every third of the lease (a lease of a few milliseconds
/// cannot be kept reliably by any store on a network; this keeps trying).
pub(super) fn interval(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_micros(100))
}

/// When to renew next after a renewal answered `renewed` (`None`: stop, the
/// lease is lost), logged once here for the keeper and the task alike.
pub(super) fn next_renewal(
    renewed: Result<(), Error>,
    token: FencingToken,
    lease: Duration,
) -> Option<Duration> {
    match renewed {
        Ok(()) => {
            tracing::trace!(token = token.0, "lease renewed");
            Some(interval(lease))
        }
        Err(Error::LeaseLost) => {
            tracing::error!(
                token = token.0,
                "lease lost while the claim is held; its outcome will not be recorded"
            );
            None
        }
        Err(err) => {
            // Two more tries fit in the lease at this pace.
            tracing::warn!(token = token.0, error = %err, "lease renewal failed; retrying");
            Some(interval(lease) / 2)
        }
    }
}

/// A watchdog that runs already, or the lease to start one with when needed.
pub(crate) enum Lazy {
    /// Renewing already.
    Running(Watchdog),
    /// Not started (the body finished without waiting): start one, for this
    /// lease, only if the completion has to go on in the background.
    Start(Duration),
}

impl From<Watchdog> for Lazy {
    fn from(watchdog: Watchdog) -> Self {
        Lazy::Running(watchdog)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Watchdog::Task(task) = self {
            task.abort();
        }
    }
}

/// What one completion attempt decided.
enum Attempted {
    /// Recorded (now, or by an earlier attempt whose reply was lost).
    Done(Result<(), Error>),
    /// A transient store failure: try again.
    Retry(Error),
}

async fn attempt(
    store: &dyn Store,
    key: &Key,
    token: FencingToken,
    outcome: &[u8],
    ttl: Duration,
) -> Attempted {
    match store.complete(key.as_str(), token, outcome, ttl).await {
        Ok(()) => Attempted::Done(Ok(())),
        // The write may have landed with its reply lost (a cut connection; a
        // client that resends on its own): then the record is completed with this
        // very token, which no other caller ever holds.
        Err(Error::LeaseLost) => match store.get(key.as_str()).await {
            Ok(Some(record)) if record.token == token && record.state == RecordState::Completed => {
                tracing::debug!(
                    token = token.0,
                    "completion already recorded (an earlier reply was lost)"
                );
                Attempted::Done(Ok(()))
            }
            Ok(_) => Attempted::Done(Err(Error::LeaseLost)),
            Err(err @ Error::Store(_)) => Attempted::Retry(err),
            Err(err) => Attempted::Done(Err(err)),
        },
        Err(err @ Error::Store(_)) => Attempted::Retry(err),
        Err(err) => Attempted::Done(Err(err)),
    }
}

/// How a completion ended, for the caller.
pub(crate) enum Completion {
    /// The outcome is recorded.
    Recorded,
    /// Another caller took the key over (or the record vanished): nothing was written.
    Lost,
    /// The store kept failing (the last error); a background task holds the
    /// claim and keeps trying.
    Deferred(Error),
    /// The store refused the outcome for another reason (a codec error, say).
    Failed(Error),
}

/// Completes in place (three tries), then, if the store is still failing, hands
/// the claim and its watchdog to a background task that keeps trying.
pub(crate) async fn complete(
    store: Arc<dyn Store>,
    key: Key,
    token: FencingToken,
    watchdog: Lazy,
    outcome: &[u8],
    ttl: Duration,
) -> Completion {
    let mut pending = Pending {
        store,
        key,
        token,
        watchdog: Some(watchdog),
        outcome,
        ttl,
        settled: false,
    };
    let mut last = None;
    for retry in 0..3u32 {
        if retry > 0 {
            tokio::time::sleep(Duration::from_millis(10 << retry)).await;
        }
        let done = match attempt(&*pending.store, &pending.key, token, outcome, ttl).await {
            Attempted::Done(Ok(())) => Completion::Recorded,
            Attempted::Done(Err(Error::LeaseLost)) => Completion::Lost,
            Attempted::Done(Err(err)) => Completion::Failed(err),
            Attempted::Retry(err) => {
                tracing::warn!(error = %err, attempt = retry + 1, "completion failed; retrying");
                last = Some(err);
                continue;
            }
        };
        pending.settled = true;
        return done;
    }
    let err = last.unwrap_or_else(|| Error::store("the completion kept failing"));
    tracing::warn!(
        token = token.0, error = %err,
        "the store keeps failing; the outcome is kept and recorded in the background \
         (the claim stays held, so duplicates wait instead of running again)"
    );
    pending.defer(BACKGROUND_FIRST_PAUSE);
    Completion::Deferred(err)
}

/// The background task's first pause after the in-place tries failed; it
/// doubles up to [`BACKGROUND_MAX_PAUSE`].
const BACKGROUND_FIRST_PAUSE: Duration = Duration::from_millis(50);

/// The longest pause between background tries: short, because once a store
/// that was unreachable for longer than the lease is back, a duplicate may take
/// the lapsed claim over before the next try lands.
const BACKGROUND_MAX_PAUSE: Duration = Duration::from_millis(200);

/// A completion in progress. If the caller's future is dropped before it
/// settles (a timeout around the call fires during a retry), the outcome is
/// still in hand: it is recorded in the background instead of being lost with
/// the claim left held.
struct Pending<'a> {
    store: Arc<dyn Store>,
    key: Key,
    token: FencingToken,
    watchdog: Option<Lazy>,
    outcome: &'a [u8],
    ttl: Duration,
    settled: bool,
}

impl Pending<'_> {
    /// Hands the completion to a background task that keeps the lease renewed
    /// and retries until it lands, is refused, or [`COMPLETION_RETRY_LIMIT`] passes.
    fn defer(&mut self, first_pause: Duration) {
        self.settled = true;
        let (store, key, token, ttl) = (
            Arc::clone(&self.store),
            self.key.clone(),
            self.token,
            self.ttl,
        );
        let outcome = self.outcome.to_vec();
        let watchdog = match self.watchdog.take() {
            Some(Lazy::Running(watchdog)) => Some(watchdog),
            Some(Lazy::Start(lease)) => Some(Watchdog::start(
                Arc::clone(&store),
                key.clone(),
                token,
                lease,
            )),
            None => None,
        };
        tokio::spawn(
            async move {
                let _watchdog = watchdog;
                let deadline = tokio::time::Instant::now() + COMPLETION_RETRY_LIMIT;
                let mut pause = first_pause;
                loop {
                    tokio::time::sleep(pause).await;
                    match attempt(&*store, &key, token, &outcome, ttl).await {
                        Attempted::Done(Ok(())) => {
                            tracing::info!(token = token.0, "completed in the background");
                            return;
                        }
                        Attempted::Done(Err(err @ Error::NotReplicated { .. })) => {
                            tracing::warn!(token = token.0, error = %err, "completed in the background; the next call with the key waits for the replicas");
                            return;
                        }
                        Attempted::Done(Err(err)) => {
                            tracing::error!(token = token.0, error = %err, "background completion refused; the outcome was not recorded");
                            return;
                        }
                        Attempted::Retry(err) if tokio::time::Instant::now() >= deadline => {
                            tracing::error!(
                                token = token.0, error = %err,
                                "background completion gave up; the claim lapses with its lease"
                            );
                            return;
                        }
                        Attempted::Retry(_) => {
                            pause = (pause * 2).clamp(BACKGROUND_FIRST_PAUSE, BACKGROUND_MAX_PAUSE)
                        }
                    }
                }
            }
            .in_current_span(),
        );
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            tracing::warn!(
                token = self.token.0,
                "the caller went away while its outcome was being recorded; \
                 recording it in the background"
            );
            self.defer(Duration::ZERO);
        } else {
            tracing::warn!(
                token = self.token.0,
                "dropped outside a Tokio runtime while recording the outcome; \
                 the claim lapses with its lease"
            );
        }
    }
}
