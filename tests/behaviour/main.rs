//! Behaviour tests for `#[idempotent]` with `MemoryStore`, one module per topic.
//! Each test asserts how many times the body ran and what every caller got.

mod cancellation;
mod concurrency;
mod corrupt;
mod current;
mod errors;
mod faults;
mod fingerprint;
mod lease;
mod missing_key;
mod namespaces;
mod replay;
mod signatures;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{
    async_trait, Claim, ClaimRequest, Error, FencingToken, MemoryStore, Record, Store,
};
use serde::{Deserialize, Serialize};

/// The error type the test services return.
#[derive(Debug, Serialize, Deserialize)]
pub enum AppError {
    /// idem's own error (never stored).
    #[serde(skip)]
    Idem(idem_runtime::Error),
    /// A business failure that may be cached.
    Declined(String),
    /// A transient business failure.
    Unavailable,
}

impl From<idem_runtime::Error> for AppError {
    fn from(e: idem_runtime::Error) -> Self {
        AppError::Idem(e)
    }
}

impl AppError {
    /// Whether this is idem's `InProgress`.
    pub fn is_in_progress(&self) -> bool {
        matches!(self, AppError::Idem(idem_runtime::Error::InProgress { .. }))
    }

    /// Only declines are final and worth caching.
    pub fn is_final(&self) -> bool {
        matches!(self, AppError::Declined(_))
    }
}

/// A counter of body executions.
#[derive(Default)]
pub struct Runs(AtomicUsize);

impl Runs {
    /// Records one execution and returns its number (1-based).
    pub fn hit(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// How many times the body ran.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A real `MemoryStore` behind a switch that makes chosen operations fail,
/// as a store that went away (or a partitioned connection) would. Shared by
/// the fault and lease tests.
#[derive(Clone, Default)]
pub struct FaultyStore {
    /// The real store underneath.
    pub inner: MemoryStore,
    /// Claims fail while set.
    pub claims_fail: Arc<AtomicBool>,
    /// Completions fail while set.
    pub completions_fail: Arc<AtomicBool>,
    /// Lease renewals fail while set (a partition of the renewing connection).
    pub renewals_fail: Arc<AtomicBool>,
}

fn down() -> Error {
    Error::store(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        "store unreachable",
    ))
}

#[async_trait]
impl Store for FaultyStore {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim, Error> {
        if self.claims_fail.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner.claim(request).await
    }
    async fn complete(
        &self,
        key: &str,
        token: FencingToken,
        outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        if self.completions_fail.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner.complete(key, token, outcome, ttl).await
    }
    async fn release(&self, key: &str, token: FencingToken) -> Result<(), Error> {
        self.inner.release(key, token).await
    }
    async fn renew(&self, key: &str, token: FencingToken, lease: Duration) -> Result<(), Error> {
        if self.renewals_fail.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner.renew(key, token, lease).await
    }
    async fn get(&self, key: &str) -> Result<Option<Record>, Error> {
        self.inner.get(key).await
    }
    async fn purge_expired(&self, batch: usize) -> Result<u64, Error> {
        self.inner.purge_expired(batch).await
    }
    fn handle(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }
}
