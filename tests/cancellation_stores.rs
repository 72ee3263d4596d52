//! A dropped future or a panicking body releases its claim on every store, not
//! just in memory: the engine spawns the release on the runtime, so the next
//! call runs right away instead of after the (hour-long) lease.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{idempotent, PostgresStore, RedisStore, SqliteStore, Store};
use idem_tests::{postgres_url, redis_url, unique};

#[derive(Debug)]
struct AppError;

impl From<idem_runtime::Error> for AppError {
    fn from(e: idem_runtime::Error) -> Self {
        panic!("unexpected idem error: {e}")
    }
}

struct Svc<S> {
    store: S,
    runs: AtomicUsize,
}

impl<S: Store> Svc<S> {
    /// The first call hangs (and is cancelled) or panics; later ones return.
    #[idempotent(key = id, name = "cancel-stores", lease = "1h", in_progress = wait("20s"), store = self.store)]
    async fn run(self: Arc<Self>, id: String, panic_first: bool) -> Result<usize, AppError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if n == 1 {
            if panic_first {
                panic!("the body panicked");
            }
            std::future::pending::<()>().await;
        }
        Ok(n)
    }
}

async fn check<S: Store + 'static>(store: S) {
    for panic_first in [false, true] {
        let svc = Arc::new(Svc {
            store: store.handle(),
            runs: AtomicUsize::new(0),
        });
        let id = unique("cancel");
        if panic_first {
            let joined = tokio::spawn(svc.clone().run(id.clone(), true)).await;
            assert!(joined.unwrap_err().is_panic());
        } else {
            let cut = tokio::time::timeout(
                Duration::from_millis(200),
                svc.clone().run(id.clone(), false),
            )
            .await;
            assert!(cut.is_err(), "the first call was cancelled while running");
        }
        // Waits (at most 20 s) for the released claim, then runs: not after the 1 h lease.
        assert_eq!(svc.clone().run(id.clone(), false).await.unwrap(), 2);
        assert_eq!(svc.clone().run(id, false).await.unwrap(), 2, "then replays");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_releases_cancelled_and_panicked_claims() {
    check(PostgresStore::connect(&postgres_url()).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_releases_cancelled_and_panicked_claims() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique("cancel"));
    std::fs::create_dir_all(&dir).unwrap();
    check(
        SqliteStore::connect(&format!("sqlite://{}/r.db", dir.display()))
            .await
            .unwrap(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_releases_cancelled_and_panicked_claims() {
    check(RedisStore::connect(&redis_url()).await.unwrap()).await;
}
