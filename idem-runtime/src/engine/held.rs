//! A claim held on the store's own connection: its lease renewed by a watchdog
//! while the work runs, then completed or released — or released when dropped.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::attempt::{run_as, StepsAt};
use super::lease::{self, Completion, Watchdog};
use super::steps::StepLog;
use super::Settle;
use crate::error::Error;
use crate::key::Key;
use crate::metrics::{self, Outcome};
use crate::store::{cap_duration, FencingToken, Store};

/// A claim this caller holds. Its lease is renewed by a watchdog task for as long
/// as the claim is held, however rarely the caller polls. Dropping it without
/// [`complete`](Self::complete) or [`release`](Self::release) (a cancelled future,
/// a panic) releases the claim, so a retry runs at once instead of waiting for the
/// lease to lapse.
pub struct Held {
    store: Arc<dyn Store>,
    key: Key,
    token: FencingToken,
    took_over: bool,
    lease: Duration,
    /// How long recorded steps are kept: the call's ttl.
    keep: Duration,
    /// Renews the lease until the claim is completed, released or dropped.
    watchdog: OnceLock<Watchdog>,
    /// The steps the work called, if it called any.
    steps: OnceLock<Arc<StepLog>>,
    /// Whether the work withheld its outcome ([`withhold_outcome`](super::withhold_outcome)).
    withheld: std::sync::atomic::AtomicBool,
    armed: bool,
    /// Whether how the claim ended is already counted (a release after an
    /// error, a refused takeover): a drop that releases again while that
    /// release is on the wire does not count it a second time.
    counted: bool,
    /// The metrics' labels.
    labels: metrics::Labels,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("key", &self.key)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl Held {
    /// A claim just won: on a multi-threaded runtime its lease is registered
    /// with the keeper thread at once (no task), so even a body that blocks its
    /// thread before its first await keeps its lease. On a current-thread
    /// runtime such a body would block a watchdog task too, so one starts when
    /// the body first waits: a body that finishes at once costs no task.
    pub(super) fn new(
        store: Arc<dyn Store>,
        key: Key,
        token: FencingToken,
        took_over: bool,
        lease: Duration,
        keep: Duration,
        labels: metrics::Labels,
    ) -> Self {
        let watchdog = OnceLock::new();
        if let Some(kept) = Watchdog::kept(Arc::clone(&store), key.clone(), token, lease) {
            let _ = watchdog.set(kept);
        }
        Held {
            labels,
            store,
            key,
            token,
            took_over,
            lease,
            keep,
            watchdog,
            steps: OnceLock::new(),
            withheld: std::sync::atomic::AtomicBool::new(false),
            armed: true,
            counted: false,
        }
    }

    /// The key held.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The claim's fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// Whether this claim continues an earlier attempt that did not finish
    /// (see [`Attempt::took_over`](super::Attempt::took_over)).
    pub fn took_over(&self) -> bool {
        self.took_over
    }

    /// Runs `work` as this attempt ([`current`](super::current) sees it, and
    /// [`step`](super::step) records under this claim). The lease is renewed
    /// by the claim's watchdog meanwhile, whether or not `work` is polled.
    pub async fn run<F: Future>(&self, work: F) -> F::Output {
        let steps = Ok(StepsAt {
            store: Arc::clone(&self.store),
            keep: self.keep,
        });
        let mut work = std::pin::pin!(run_as(&self.key, self.token, self.took_over, steps, work));
        let output = if self.watchdog.get().is_some() {
            work.as_mut().await
        } else {
            std::future::poll_fn(|cx| {
                let polled = work.as_mut().poll(cx);
                if polled.is_pending() {
                    self.watchdog.get_or_init(|| self.start_watchdog());
                }
                polled
            })
            .await
        };
        if let Some(attempt) = work.as_mut().take_value() {
            if attempt.withheld() {
                self.withheld
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if let Some(log) = attempt.made_log() {
                let _ = self.steps.set(log);
            }
        }
        output
    }

    /// Whether the work reached every step an earlier attempt recorded
    /// ([`Error::StepMismatch`] if not). A store that cannot say is logged and
    /// trusted: the outcome is not thrown away for a check.
    async fn check_steps(&self) -> Result<(), Error> {
        let made;
        let log = match self.steps.get() {
            Some(log) => log,
            None if self.took_over => {
                made = StepLog::new(
                    Arc::clone(&self.store),
                    self.key.clone(),
                    self.token,
                    self.keep,
                    true,
                );
                &made
            }
            None => return Ok(()),
        };
        match log.check_finished().await {
            Err(Error::Store(err)) => {
                tracing::warn!(error = %err, "could not read the recorded steps to check them");
                Ok(())
            }
            checked => checked,
        }
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
    /// store still fails, `Ok` is returned (the store's error instead, for a store
    /// that does not [answer before recording](Store::answers_before_recorded))
    /// and the completion goes on in the
    /// background for up to [`COMPLETION_RETRY_LIMIT`](super::COMPLETION_RETRY_LIMIT), the lease renewed
    /// meanwhile, so duplicates wait and then replay instead of running the work
    /// again. A completion whose reply was lost but whose write landed is `Ok`.
    /// [`Error::LeaseLost`] means another caller took the key over meanwhile and
    /// nothing was written.
    ///
    /// If an earlier attempt recorded steps this attempt did not reach, nothing
    /// is recorded: the claim is released (its steps kept) and the answer is
    /// [`Error::StepMismatch`].
    pub async fn complete(mut self, outcome: &[u8], ttl: Duration) -> Result<(), Error> {
        if let Err(err) = self.check_steps().await {
            self.release_because("released: the body skipped a recorded step")
                .await;
            return Err(err);
        }
        self.armed = false;
        let token = self.token;
        let (store, key) = (Arc::clone(&self.store), self.key.clone());
        let watchdog = match self.watchdog.take() {
            Some(watchdog) => watchdog.into(),
            None => lease::Lazy::Start(self.lease),
        };
        let answer_early = store.answers_before_recorded();
        // Counted once however it ends: a caller that goes away while the
        // completion is on the wire (it goes on in the background) is
        // `cancelled`.
        let mut ending = Ending {
            labels: &self.labels,
            outcome: Outcome::Cancelled,
        };
        let timer = metrics::Timer::start();
        let completion =
            lease::complete(store, key, token, watchdog, outcome, cap_duration(ttl)).await;
        self.labels.complete_duration(timer.elapsed());
        ending.outcome = match completion {
            Completion::Recorded => Outcome::Completed,
            Completion::Lost => Outcome::LeaseLost,
            Completion::Deferred(_) | Completion::Failed(_) => Outcome::StoreError,
        };
        drop(ending);
        match completion {
            Completion::Recorded => {
                tracing::debug!(token = token.0, "completed");
                Ok(())
            }
            Completion::Deferred(_) if answer_early => Ok(()),
            Completion::Deferred(err) => Err(err),
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

    /// `on_takeover = fail`: leaves a kept mark (a reserved step) so that every
    /// retry of the call meets the takeover too, then releases the claim.
    /// Until the mark is written the claim is not released, not even if this
    /// future is dropped: it lapses with its lease instead, and the next
    /// attempt takes it over and is refused again.
    pub(super) async fn refuse_takeover(mut self) {
        tracing::error!(
            token = self.token.0,
            "an earlier attempt did not finish, and this one does not go on (on_takeover)"
        );
        self.armed = false;
        drop(self.watchdog.take());
        let (key, token) = (self.key.as_str(), self.token);
        let marked = if !self.store.keeps_steps() {
            false
        } else if let Ok(steps) = self.store.steps(key, Some(token)).await {
            // Marked once: a refusal does not keep the call refused longer.
            let mark = super::steps::takeover_mark();
            steps.iter().any(|s| s.id == mark.id)
                || self
                    .store
                    .record_step(key, token, &mark, self.keep)
                    .await
                    .inspect_err(
                        |err| tracing::warn!(error = %err, "could not mark the refused takeover"),
                    )
                    .is_ok()
        } else {
            false
        };
        if marked {
            self.armed = true;
            // Counted as `taken_over` only (CONTRACT §9.1), even if dropped
            // while the release is on the wire.
            self.counted = true;
            self.release_claim("released: on_takeover = fail").await
        } else {
            tracing::warn!(
                token = token.0,
                "the refused takeover is not marked; the claim lapses with its lease instead"
            );
        }
    }

    /// Deletes the claim so the next call runs at once. A failure is logged, not
    /// returned: the claim then lapses with its lease.
    pub async fn release(self) {
        self.release_because("released").await
    }

    /// [`release`](Self::release), logged as `what` ("released after error", …).
    ///
    /// The claim stays armed while the release is on the wire: a caller that
    /// gives up meanwhile (a timeout around the call) drops it, and the drop
    /// releases it again, so the release is never lost with the caller.
    pub(crate) async fn release_because(mut self, what: &'static str) {
        self.labels.outcome(Outcome::ReleasedAfterError);
        self.counted = true;
        self.release_claim(what).await
    }

    /// Releases the claim (not counted: the caller counted why).
    async fn release_claim(mut self, what: &'static str) {
        drop(self.watchdog.take());
        let token = self.token;
        let released = self.store.release(self.key.as_str(), token).await;
        self.armed = false;
        match released {
            Ok(()) => tracing::debug!(token = token.0, "{what}"),
            Err(err) => tracing::warn!(
                token = token.0, error = %err,
                "could not release the claim; it lapses with its lease"
            ),
        }
    }
}

/// How a completion ended, counted when it is dropped: at the end of
/// [`Held::complete`], or with the caller's future if it goes away first.
struct Ending<'a> {
    labels: &'a metrics::Labels,
    outcome: Outcome,
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        self.labels.outcome(self.outcome);
    }
}

impl Settle for Held {
    fn withheld(&self) -> bool {
        self.withheld.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn record(self, outcome: &[u8], ttl: Duration) -> Result<(), Error> {
        self.complete(outcome, ttl).await
    }

    async fn release(self, why: &'static str) {
        self.release_because(why).await
    }

    async fn refuse(self) {
        self.refuse_takeover().await
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        drop(self.watchdog.take());
        let token = self.token;
        if !self.counted {
            self.labels.outcome(Outcome::Cancelled);
        }
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
