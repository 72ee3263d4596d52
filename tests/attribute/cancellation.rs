//! A dropped future or a panicking body releases its claim at once: the next
//! call runs immediately instead of waiting for the lease to lapse.

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{idempotent, MemoryStore};

use crate::{AppError, Runs};

struct Svc {
    store: MemoryStore,
    runs: Runs,
}

impl Svc {
    // A long lease: if release depended on the lease lapsing, these tests would fail.
    #[idempotent(key = id, lease = "1h", store = self.store)]
    async fn slow(&self, id: u32) -> Result<usize, AppError> {
        let n = self.runs.hit();
        if n == 1 {
            std::future::pending::<()>().await;
        }
        Ok(n)
    }

    #[idempotent(key = id, lease = "1h", store = self.store)]
    async fn panicky(self: Arc<Self>, id: u32) -> Result<usize, AppError> {
        let n = self.runs.hit();
        if n == 1 {
            panic!("the body panicked");
        }
        Ok(n)
    }
}

fn svc() -> Arc<Svc> {
    Arc::new(Svc {
        store: MemoryStore::new(),
        runs: Runs::default(),
    })
}

#[tokio::test]
async fn a_dropped_future_releases_the_claim() {
    let svc = svc();
    let timed_out = tokio::time::timeout(Duration::from_millis(20), svc.slow(1)).await;
    assert!(
        timed_out.is_err(),
        "the first call was cancelled while running"
    );
    assert_eq!(svc.runs.get(), 1);
    assert!(svc.store.is_empty(), "the claim was released on drop");
    assert_eq!(svc.slow(1).await.unwrap(), 2, "the next call runs at once");
}

#[tokio::test]
async fn a_panicking_body_releases_the_claim() {
    let svc = svc();
    let joined = tokio::spawn(svc.clone().panicky(7)).await;
    assert!(joined.unwrap_err().is_panic());
    assert!(
        svc.store.is_empty(),
        "the claim was released after the panic"
    );
    assert_eq!(
        svc.clone().panicky(7).await.unwrap(),
        2,
        "the next call runs at once"
    );
    assert_eq!(
        svc.clone().panicky(7).await.unwrap(),
        2,
        "and is then replayed"
    );
}

/// A memory store whose first `release` never answers (a slow store), and
/// says when it was entered.
#[derive(Clone)]
struct StuckRelease {
    inner: MemoryStore,
    stuck: Arc<std::sync::atomic::AtomicBool>,
    entered: Arc<tokio::sync::Notify>,
}

#[idem_runtime::async_trait]
impl idem_runtime::Store for StuckRelease {
    async fn claim(
        &self,
        request: idem_runtime::ClaimRequest<'_>,
    ) -> Result<idem_runtime::Claim, idem_runtime::Error> {
        self.inner.claim(request).await
    }
    async fn complete(
        &self,
        key: &str,
        token: idem_runtime::FencingToken,
        outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), idem_runtime::Error> {
        self.inner.complete(key, token, outcome, ttl).await
    }
    async fn release(
        &self,
        key: &str,
        token: idem_runtime::FencingToken,
    ) -> Result<(), idem_runtime::Error> {
        if self.stuck.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.entered.notify_one();
            std::future::pending::<()>().await;
        }
        self.inner.release(key, token).await
    }
    async fn renew(
        &self,
        key: &str,
        token: idem_runtime::FencingToken,
        lease: Duration,
    ) -> Result<(), idem_runtime::Error> {
        self.inner.renew(key, token, lease).await
    }
    async fn get(&self, key: &str) -> Result<Option<idem_runtime::Record>, idem_runtime::Error> {
        self.inner.get(key).await
    }
    async fn purge_expired(&self, batch: usize) -> Result<u64, idem_runtime::Error> {
        self.inner.purge_expired(batch).await
    }
    fn handle(&self) -> Arc<dyn idem_runtime::Store> {
        Arc::new(self.clone())
    }
}

/// A call whose body failed is dropped while its release is on the wire (a
/// timeout around the call): the drop releases the claim, so the retry runs at
/// once instead of after the lease. Found by the break-it review of issue 12
/// (the claim was disarmed before the release was sent).
#[tokio::test]
async fn a_call_dropped_while_releasing_after_an_error_still_releases() {
    use idem_runtime::codec::Codec;
    use idem_runtime::engine::{execute, Options};
    use idem_runtime::key::KeyBuilder;
    use idem_runtime::{Error, Store as _};

    let store = StuckRelease {
        inner: MemoryStore::new(),
        stuck: Arc::default(),
        entered: Arc::default(),
    };
    store.stuck.store(true, std::sync::atomic::Ordering::SeqCst);
    let options = Options::new().lease(Duration::from_secs(3600));
    let key = || KeyBuilder::new("cancel-release").part("k").finish();
    let mut first = Box::pin(execute(
        store.handle(),
        &options,
        key(),
        None,
        Codec::<u32, Error>::release_errors(),
        async { Err::<u32, Error>(Error::store("the card network timed out")) },
    ));
    tokio::select! {
        out = &mut first => panic!("the release was to hang: {out:?}"),
        () = store.entered.notified() => {}
    }
    drop(first); // the caller's timeout fires while the release is in flight
                 // The drop hands the release to a task; on this current-thread runtime it
                 // runs at the next yield.
    tokio::task::yield_now().await;
    let retry = execute(
        store.handle(),
        &options,
        key(),
        None,
        Codec::<u32, Error>::release_errors(),
        async { Ok::<u32, Error>(7) },
    )
    .await;
    assert!(matches!(retry, Ok(7)), "the retry runs at once: {retry:?}");
}
