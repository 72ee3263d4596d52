//! Nested and concurrent calls: the same key from a spawned task is in progress, not re-entrant; a panicking body releases its claim.

use std::sync::atomic::{AtomicUsize, Ordering};

static RUNS: AtomicUsize = AtomicUsize::new(0);
use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{idempotent, Error, MemoryStore};
use idem_tests::AppError;

struct Outer {
    store: MemoryStore,
}

impl Outer {
    #[idempotent(key = id, name = "review-outer", store = self.store)]
    async fn inner(self: Arc<Self>, id: u32) -> Result<String, AppError> {
        Ok("inner ran".into())
    }

    #[idempotent(key = id, name = "review-outer", store = self.store)]
    async fn outer(self: Arc<Self>, id: u32) -> Result<String, AppError> {
        let me = Arc::clone(&self);
        // Same key from a different task while the outer holds it: InProgress.
        let spawned = tokio::spawn(async move { me.inner(id).await })
            .await
            .unwrap();
        Ok(format!("{spawned:?}"))
    }
}

#[tokio::test]
async fn the_same_key_from_a_spawned_task_is_in_progress_not_reentrant() {
    let o = Arc::new(Outer {
        store: MemoryStore::new(),
    });
    let got = o.outer(1).await.unwrap();
    assert!(got.contains("InProgress"), "{got}");
}

#[idempotent(key = id, name = "review-panic", store = store)]
async fn panics(store: &MemoryStore, id: u32) -> Result<u32, AppError> {
    tokio::time::sleep(Duration::from_millis(1)).await;
    if RUNS.fetch_add(0, Ordering::SeqCst) < 1000 {
        panic!("boom");
    }
    Ok(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_body_releases_its_claim() {
    let store = MemoryStore::new();
    let s2 = store.clone();
    let r = tokio::spawn(async move { panics(&s2, 1).await }).await;
    assert!(r.is_err());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let again = tokio::spawn({
        let s = store.clone();
        async move { panics(&s, 1).await }
    })
    .await;
    assert!(
        again.is_err(),
        "second call should run (and panic) again, not get InProgress: {again:?}"
    );
    let _ = Error::LeaseLost;
}
