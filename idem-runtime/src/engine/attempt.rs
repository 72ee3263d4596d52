//! The attempt running now: what [`current`] returns inside a body, and the
//! re-entrancy check that uses it.

use std::future::Future;
use std::sync::Arc;

use crate::error::Error;
use crate::key::{Digest, Key};
use crate::store::FencingToken;

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
/// attempt runs now), so [`current`] sees it.
pub(super) fn run_as<F: Future>(
    key: &Key,
    token: FencingToken,
    work: F,
) -> impl Future<Output = F::Output> {
    CURRENT.scope(Attempt::new(key.clone(), token), work)
}
