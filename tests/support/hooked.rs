//! A store that forwards every call to another, except that claims go through
//! a hook: count them, hold a reply, fail one. The tests' one forwarding
//! wrapper, so each test writes only what it changes.

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::async_trait;
use idem_runtime::store::{Claim, ClaimRequest, FencingToken, Record};
use idem_runtime::{Error, Store};

/// What a [`Hooked`] store does with each claim; `inner` is the wrapped store.
#[async_trait]
pub trait ClaimHook: Clone + Send + Sync + 'static {
    /// Answers one claim, usually by passing it to `inner`.
    async fn claim(&self, inner: &dyn Store, request: ClaimRequest<'_>) -> Result<Claim, Error>;
}

/// `inner` with its claims answered by `hook`.
#[derive(Clone)]
pub struct Hooked<H> {
    /// The store every other call goes to.
    pub inner: Arc<dyn Store>,
    /// What claims go through.
    pub hook: H,
}

impl<H> Hooked<H> {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>, hook: H) -> Self {
        Hooked { inner, hook }
    }
}

#[async_trait]
impl<H: ClaimHook> Store for Hooked<H> {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim, Error> {
        self.hook.claim(&*self.inner, request).await
    }
    async fn complete(
        &self,
        key: &str,
        token: FencingToken,
        outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        self.inner.complete(key, token, outcome, ttl).await
    }
    async fn release(&self, key: &str, token: FencingToken) -> Result<(), Error> {
        self.inner.release(key, token).await
    }
    async fn renew(&self, key: &str, token: FencingToken, lease: Duration) -> Result<(), Error> {
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
    fn answers_before_recorded(&self) -> bool {
        self.inner.answers_before_recorded()
    }
}
