//! The attempt running now: what [`current`] returns inside a body, and the
//! re-entrancy check that uses it.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::steps::StepLog;
use crate::error::Error;
use crate::key::{Digest, Key};
use crate::store::{FencingToken, Store};

/// The attempt that is running now: what [`current`] returns inside the body.
pub struct Attempt {
    key: Key,
    token: FencingToken,
    took_over: bool,
    /// Where this attempt's steps are recorded: `None` where they cannot be
    /// (a `tx =` call), with why.
    steps: Result<StepsAt, &'static str>,
    /// The step log, made by the first step (a call without steps makes none).
    log: OnceLock<Arc<StepLog>>,
    /// The attempt this one runs inside of (an idempotent call made from another's body).
    outer: Option<Arc<Attempt>>,
    /// Set when the call's outcome must not be recorded whatever it is (a
    /// `reconcile` that refused): the claim is released instead.
    withheld: AtomicBool,
}

impl Clone for Attempt {
    fn clone(&self) -> Self {
        Attempt {
            key: self.key.clone(),
            token: self.token,
            took_over: self.took_over,
            steps: self.steps.clone(),
            log: self.log.clone(),
            outer: self.outer.clone(),
            withheld: AtomicBool::new(self.withheld.load(Ordering::Relaxed)),
        }
    }
}

/// What a step log needs: the store holding the claim, and how long steps are kept.
#[derive(Clone)]
pub(super) struct StepsAt {
    pub(super) store: Arc<dyn Store>,
    pub(super) keep: Duration,
}

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempt")
            .field("key", &self.key)
            .field("token", &self.token)
            .field("took_over", &self.took_over)
            .field("outer", &self.outer)
            .finish_non_exhaustive()
    }
}

impl Attempt {
    /// The attempt for a claim taken now, inside whatever attempt is running.
    fn new(
        key: Key,
        token: FencingToken,
        took_over: bool,
        steps: Result<StepsAt, &'static str>,
    ) -> Self {
        Attempt {
            key,
            token,
            took_over,
            steps,
            log: OnceLock::new(),
            outer: current().map(Arc::new),
            withheld: AtomicBool::new(false),
        }
    }

    /// Whether the outcome must not be recorded ([`withhold_outcome`]).
    pub(super) fn withheld(&self) -> bool {
        self.withheld.load(Ordering::Relaxed)
    }

    /// This attempt's step log, made on first use.
    pub(super) fn step_log(&self) -> Result<Arc<StepLog>, Error> {
        let at = self
            .steps
            .as_ref()
            .map_err(|why| Error::StepMisuse((*why).into()))?;
        Ok(Arc::clone(self.log.get_or_init(|| {
            Arc::new(StepLog::new(
                Arc::clone(&at.store),
                self.key.clone(),
                self.token,
                at.keep,
                self.took_over,
            ))
        })))
    }

    /// The step log, if a step made one.
    pub(super) fn made_log(&self) -> Option<Arc<StepLog>> {
        self.log.get().cloned()
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

    /// Whether this attempt continues an earlier one of the same call that did
    /// not finish: it took over a claim whose lease lapsed (its holder crashed
    /// or stalled), or an earlier attempt recorded [steps](crate::step) and was
    /// then released (an error, a cancellation) or lapsed. Recorded steps are
    /// replayed, not run again; work done outside a step by the earlier
    /// attempt may have happened, or not: see `on_takeover` in the README.
    pub fn took_over(&self) -> bool {
        self.took_over
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

/// Marks the running attempt's outcome as not to be recorded, whatever it is
/// (even an error `cache_errors` would keep): the claim is released, its
/// steps kept. `on_takeover = reconcile(f)` calls it when `f` refuses.
#[doc(hidden)]
pub fn withhold_outcome() {
    let _ = CURRENT.try_with(|attempt| attempt.withheld.store(true, Ordering::Relaxed));
}

/// The running attempt's step log (made now if this is its first step).
pub(super) fn current_step_log() -> Result<Arc<StepLog>, Error> {
    CURRENT.try_with(Attempt::step_log).unwrap_or_else(|_| {
        Err(Error::StepMisuse(
            "a step runs only inside an idempotent call (an `#[idempotent]` body, \
                 an `IdempotencyLayer` handler or a `Deduplicator` handler)"
                .into(),
        ))
    })
}

/// Refuses a call whose key the running attempt (or one it runs inside of) holds:
/// it would wait for itself.
pub(super) fn check_reentrant(key: &Key) -> Result<(), Error> {
    match CURRENT.try_with(|attempt| attempt.holds(key)) {
        Ok(true) => {
            tracing::error!(digest = %key.digest(), "re-entrant call with the key its own caller holds");
            Err(Error::Reentrant)
        }
        _ => Ok(()),
    }
}

/// Runs `work` as the attempt holding `key` with `token` (inside whatever
/// attempt runs now), so [`current`] sees it; its steps go to `steps`.
pub(super) fn run_as<F: Future>(
    key: &Key,
    token: FencingToken,
    took_over: bool,
    steps: Result<StepsAt, &'static str>,
    work: F,
) -> tokio::task::futures::TaskLocalFuture<Attempt, F> {
    CURRENT.scope(Attempt::new(key.clone(), token, took_over, steps), work)
}
