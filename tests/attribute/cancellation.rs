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
