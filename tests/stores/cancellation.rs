//! A dropped future or a panicking body releases its claim on every store, not
//! just in memory: the engine spawns the release on the runtime, so the next
//! call runs right away instead of after the (hour-long) lease. And a call
//! cancelled while its claim request is on the wire, after the claim landed
//! but before the reply, releases that claim too.
//!
//! Deterministic: each cancellation happens at a point the test waits for
//! (the body started; the store wrote the claim), never after a timer.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use idem_runtime::async_trait;
use idem_runtime::store::{Claim, ClaimRequest};
use idem_runtime::{idempotent, Error, MemoryStore, PostgresStore, RedisStore, SqliteStore, Store};
use idem_tests::hooked::{ClaimHook, Hooked};
use idem_tests::{postgres_url, redis_url, unique};
use tokio::sync::Notify;

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
    /// Told when a body starts.
    started: Notify,
}

impl<S: Store> Svc<S> {
    /// The first call hangs (and is cancelled) or panics; later ones return.
    #[idempotent(key = id, name = "cancel-stores", lease = "1h", in_progress = wait("20s"), store = self.store)]
    async fn run(self: Arc<Self>, id: String, panic_first: bool) -> Result<usize, AppError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        self.started.notify_one();
        if n == 1 {
            if panic_first {
                panic!("the body panicked");
            }
            std::future::pending::<()>().await;
        }
        Ok(n)
    }
}

async fn body_cancelled_or_panicked<S: Store + 'static>(store: S) {
    for panic_first in [false, true] {
        let svc = Arc::new(Svc {
            store: store.handle(),
            runs: AtomicUsize::new(0),
            started: Notify::new(),
        });
        let id = unique("cancel");
        let first = tokio::spawn(svc.clone().run(id.clone(), panic_first));
        svc.started.notified().await;
        if !panic_first {
            first.abort();
        }
        let joined = first.await.unwrap_err();
        assert!(
            joined.is_panic() == panic_first && joined.is_cancelled() != panic_first,
            "{joined:?}"
        );
        // Waits (at most 20 s) for the released claim, then runs: not after the 1 h lease.
        assert_eq!(svc.clone().run(id.clone(), false).await.unwrap(), 2);
        assert_eq!(svc.clone().run(id, false).await.unwrap(), 2, "then replays");
    }
}

/// A claim hook: the first claim lands, then its reply is held until `reply` is told.
#[derive(Clone)]
struct HeldReply {
    landed: Arc<Notify>,
    reply: Arc<Notify>,
    hold: Arc<AtomicBool>,
}

#[async_trait]
impl ClaimHook for HeldReply {
    async fn claim(&self, inner: &dyn Store, request: ClaimRequest<'_>) -> Result<Claim, Error> {
        let claimed = inner.claim(request).await;
        if self.hold.swap(false, Ordering::SeqCst) {
            self.landed.notify_one();
            self.reply.notified().await;
        }
        claimed
    }
}

struct Counted {
    store: Hooked<HeldReply>,
    runs: AtomicUsize,
}

impl Counted {
    #[idempotent(key = id, name = "cancel-claim", lease = "1h", in_progress = wait("20s"), store = self.store)]
    async fn run(self: Arc<Self>, id: String) -> Result<usize, AppError> {
        Ok(self.runs.fetch_add(1, Ordering::SeqCst) + 1)
    }
}

async fn claim_cancelled_on_the_wire<S: Store + 'static>(store: S) {
    let held = HeldReply {
        landed: Arc::new(Notify::new()),
        reply: Arc::new(Notify::new()),
        hold: Arc::new(AtomicBool::new(true)),
    };
    let svc = Arc::new(Counted {
        store: Hooked::new(store.handle(), held.clone()),
        runs: AtomicUsize::new(0),
    });
    let id = unique("cancel-claim");
    let first = tokio::spawn(svc.clone().run(id.clone()));
    held.landed.notified().await;
    // The claim is written; its caller goes away before the reply arrives.
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    held.reply.notify_one();
    // Waits (at most 20 s) for the released claim: not after the 1 h lease.
    assert_eq!(
        svc.clone().run(id.clone()).await.unwrap(),
        1,
        "the body ran once, now"
    );
    assert_eq!(svc.clone().run(id).await.unwrap(), 1, "then replays");
}

async fn check<S: Store + 'static>(store: S) {
    body_cancelled_or_panicked(store.handle()).await;
    claim_cancelled_on_the_wire(store).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_releases_cancelled_and_panicked_claims() {
    check(MemoryStore::new()).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_claim_cancelled_on_the_wire_is_released_on_a_current_thread_runtime() {
    claim_cancelled_on_the_wire(MemoryStore::new()).await;
}
