//! Claiming a key on the store's own connection: one request at a time, a
//! duplicate waited for (or refused) by the in-progress policy, and a request
//! cancelled on the wire finished and released.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument as _;

use super::attempt::check_reentrant;
use super::{Claimed, Held, InProgress, OnTakeover, Options};
use crate::error::Error;
use crate::key::{Digest, Key};
use crate::metrics::{self, Outcome};
use crate::store::{cap_duration, Claim, ClaimRequest, FencingToken, Store};

/// The longest `retry_after` suggested by [`Error::InProgress`]: a running call
/// usually finishes well before its lease lapses, so hint a short retry.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(1);

fn retry_after(lease_remaining: Duration) -> Duration {
    lease_remaining.clamp(Duration::from_millis(1), MAX_RETRY_AFTER)
}

/// Claims `key` on `store` (waiting for a running duplicate if `options` say
/// so): the raw step under [`execute`](super::execute), for callers that store
/// something other than a `Result<T, E>` (the HTTP layer stores whole
/// responses; a message consumer stores a mark).
///
/// Errors are [`Error::InProgress`], [`Error::KeyReused`], [`Error::Reentrant`]
/// and [`Error::Store`]; the work must not run after any of them.
pub async fn claim(
    store: Arc<dyn Store>,
    options: &Options,
    key: Key,
    fingerprint: Option<&Digest>,
) -> Result<Claimed<Held>, Error> {
    check_reentrant(&key)?;
    let options = options.bounded();
    // The claim's events carry the key's own namespace (a consumer's, a
    // layer's), like the attribute's.
    let span = tracing::debug_span!(
        "idempotent",
        namespace = key.namespace(),
        digest = %key.digest(),
    );
    let mut waiter = Waiter::new(&options, &key, store.kind());
    let claimed = async {
        loop {
            let request = InFlight::send(&store, &key, fingerprint.copied(), options.lease);
            let timer = metrics::Timer::start();
            let reply = request.await;
            waiter.timed(timer);
            if let Some(claimed) = waiter.decide(reply).await? {
                return Ok::<_, Error>(claimed);
            }
        }
    }
    .instrument(span)
    .await?;
    Ok(match claimed {
        Claimed::Run((token, took_over)) => {
            let held = Held::new(
                store,
                key,
                token,
                took_over,
                options.lease,
                // Steps are kept for the call's ttl, and never less than its lease:
                // a holder that dies keeps them at least until its claim lapses.
                options.ttl.max(options.lease),
                waiter.into_labels(),
            );
            if took_over && options.on_takeover == OnTakeover::Fail {
                held.refuse_takeover().await;
                return Err(Error::TakenOver);
            }
            Claimed::Run(held)
        }
        Claimed::Replay(outcome) => Claimed::Replay(outcome),
    })
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
pub(super) struct Waiter {
    deadline: Option<tokio::time::Instant>,
    backoff: Duration,
    /// Whether a running duplicate was seen: from then on this caller is waiting,
    /// and a transient store error is retried within the wait instead of ending it.
    waiting: bool,
    /// The metrics' labels (the key's namespace, the store's kind).
    labels: metrics::Labels,
}

impl Waiter {
    pub(super) fn new(options: &Options, key: &Key, store: &'static str) -> Self {
        let now = tokio::time::Instant::now();
        Waiter {
            deadline: match options.in_progress {
                InProgress::Wait(d) => Some(now.checked_add(cap_duration(d)).unwrap_or(now)),
                InProgress::Reject => None,
            },
            backoff: Duration::from_millis(2),
            waiting: false,
            labels: metrics::Labels::new(key.namespace(), store),
        }
    }

    /// The metrics' labels, for the claim this waiter won.
    pub(super) fn into_labels(self) -> metrics::Labels {
        self.labels
    }

    /// Records how long one claim round trip took.
    pub(super) fn timed(&self, timer: metrics::Timer) {
        self.labels.claim_duration(timer.elapsed());
    }

    fn count(&self, outcome: Outcome) {
        self.labels.outcome(outcome);
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
    pub(super) async fn decide(
        &mut self,
        result: Result<Claim, Error>,
    ) -> Result<Option<Claimed<(FencingToken, bool)>>, Error> {
        match result {
            Ok(Claim::Acquired { token, took_over }) => {
                if took_over {
                    tracing::warn!(
                        token = token.0,
                        "took over: an earlier attempt did not finish (its lease lapsed, \
                         or it recorded steps and was released)"
                    );
                } else {
                    tracing::debug!(token = token.0, "claimed");
                }
                self.count(if took_over {
                    Outcome::TakenOver
                } else {
                    Outcome::Claimed
                });
                Ok(Some(Claimed::Run((token, took_over))))
            }
            Ok(Claim::Completed { outcome, .. }) => {
                self.count(Outcome::Replayed);
                Ok(Some(Claimed::Replay(outcome)))
            }
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
                        self.count(Outcome::InProgress);
                        Err(Error::InProgress {
                            retry_after: retry_after(lease_remaining),
                        })
                    }
                }
            }
            Ok(Claim::FingerprintMismatch) => {
                tracing::warn!("key reused with a different fingerprint");
                self.count(Outcome::KeyReused);
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
                self.count(Outcome::StoreError);
                Err(err)
            }
        }
    }
}
