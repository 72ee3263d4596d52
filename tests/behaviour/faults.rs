//! A store that fails: fail-closed at claim (the body does not run), and a
//! completion that cannot be written leaves the claim in place rather than
//! inviting a second execution.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{
    async_trait, idempotent, Claim, ClaimRequest, Error, FencingToken, MemoryStore, Record,
    RecordState, Store,
};

use crate::{AppError, Runs};

/// A real `MemoryStore` behind a switch that makes chosen operations fail,
/// as a store that went away would.
#[derive(Clone, Default)]
struct Flaky {
    inner: MemoryStore,
    claims_fail: Arc<AtomicBool>,
    completions_fail: Arc<AtomicBool>,
}

fn down() -> Error {
    Error::store(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        "store unreachable",
    ))
}

#[async_trait]
impl Store for Flaky {
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

struct Svc {
    store: Flaky,
    runs: Runs,
}

impl Svc {
    #[idempotent(key = id, name = "faults", store = self.store)]
    async fn pay(&self, id: u32) -> Result<usize, AppError> {
        Ok(self.runs.hit())
    }
}

#[tokio::test(start_paused = true)]
async fn a_store_down_at_claim_fails_closed_and_the_body_does_not_run() {
    let svc = Svc {
        store: Flaky::default(),
        runs: Runs::default(),
    };
    svc.store.claims_fail.store(true, Ordering::SeqCst);
    let result = svc.pay(1).await;
    match result {
        Err(AppError::Idem(e @ Error::Store(_))) => {
            assert!(e.is_retryable());
            assert!(e.to_string().contains("store unreachable"), "{e}");
        }
        other => panic!("expected Error::Store, got {other:?}"),
    }
    assert_eq!(svc.runs.get(), 0, "fail-closed: the body did not run");
    svc.store.claims_fail.store(false, Ordering::SeqCst);
    assert_eq!(
        svc.pay(1).await.unwrap(),
        1,
        "once the store is back, work resumes"
    );
    assert_eq!(svc.pay(1).await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_completion_that_cannot_be_written_keeps_the_claim() {
    let svc = Svc {
        store: Flaky::default(),
        runs: Runs::default(),
    };
    svc.store.completions_fail.store(true, Ordering::SeqCst);
    let result = svc.pay(2).await;
    assert!(
        matches!(result, Err(AppError::Idem(Error::Store(_)))),
        "{result:?}"
    );
    assert_eq!(svc.runs.get(), 1);
    // The claim stays (not released), so an immediate retry does not run the body again.
    let key = idem_runtime::Key::derive("faults", &2u32).unwrap();
    let record = svc.store.inner.get(key.as_str()).await.unwrap().unwrap();
    assert_eq!(record.state, RecordState::Processing);
    svc.store.completions_fail.store(false, Ordering::SeqCst);
    let retry = svc.pay(2).await;
    assert!(
        matches!(retry, Err(ref e) if e.is_in_progress()),
        "{retry:?}"
    );
    assert_eq!(svc.runs.get(), 1);
}
