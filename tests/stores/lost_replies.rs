//! Completions against real stores through a TCP proxy: a completion whose reply
//! is lost after the write landed is still the caller's `Ok`, and a store that
//! goes away right as the body finishes (for longer than the lease) ends in a
//! replay once it is back, never in a second execution.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::proxy::Proxy;
use idem_runtime::{idempotent, PostgresStore, RecordState, RedisStore, Store};
use idem_tests::{postgres_url, redis_url, unique, AppError};

struct Svc<S> {
    store: S,
    runs: AtomicUsize,
    /// Cut this proxy for `outage` right as the body finishes.
    outage: Option<(&'static Proxy, Duration)>,
}

impl<S: Store> Svc<S> {
    #[idempotent(key = (run, id), name = "lost-replies", lease = "1s", store = self.store)]
    async fn pay(&self, run: &str, id: u32) -> Result<String, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if let Some((proxy, outage)) = self.outage {
            proxy.cut();
            tokio::spawn(async move {
                tokio::time::sleep(outage).await;
                proxy.restore();
            });
        }
        Ok(format!("charged-{run}-{id}"))
    }
}

fn key(run: &str, id: u32) -> String {
    idem_runtime::key::KeyBuilder::new("lost-replies")
        .part(run)
        .part(&id)
        .finish()
        .unwrap()
        .as_str()
        .to_owned()
}

async fn lost_reply_is_ok<S: Store>(proxy: &Proxy, store: S) {
    let run = unique("lost");
    let svc = Svc {
        store,
        runs: AtomicUsize::new(0),
        outage: None,
    };
    let expected = format!("charged-{run}-1");
    // The completion carries the outcome, so its request holds this marker.
    proxy.lose_reply_to(expected.as_bytes());
    assert_eq!(
        svc.pay(&run, 1).await.unwrap(),
        expected,
        "the write landed, so the caller gets its result"
    );
    assert_eq!(proxy.replies_lost(), 1, "the completion's reply was lost");
    assert_eq!(svc.pay(&run, 1).await.unwrap(), expected, "replayed");
    assert_eq!(svc.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_completion_with_a_lost_reply_is_ok() {
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let url = postgres_url().replace("127.0.0.1:5432", &proxy.addr().to_string());
    let store = PostgresStore::connect(&url).await.unwrap();
    lost_reply_is_ok(&proxy, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_completion_with_a_lost_reply_is_ok() {
    let proxy = Proxy::start("127.0.0.1:6379").await;
    let url = redis_url().replace("127.0.0.1:6379", &proxy.addr().to_string());
    let store = RedisStore::connect(&url).await.unwrap();
    lost_reply_is_ok(&proxy, store).await;
}

/// The store is unreachable from the moment the body finishes for three leases.
async fn outage_ends_in_a_replay<S: Store>(proxy: &'static Proxy, store: S, direct: impl Store) {
    let run = unique("outage");
    let svc = Svc {
        store,
        runs: AtomicUsize::new(0),
        outage: Some((proxy, Duration::from_secs(3))),
    };
    let expected = format!("charged-{run}-1");
    assert_eq!(
        svc.pay(&run, 1).await.unwrap(),
        expected,
        "the caller gets its result"
    );
    // Read the store directly (not through the proxy) until the background
    // completion has landed.
    let key = key(&run, 1);
    let mut state = None;
    for _ in 0..300 {
        state = direct.get(&key).await.unwrap().map(|r| r.state);
        if state == Some(RecordState::Completed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        state,
        Some(RecordState::Completed),
        "recorded once the store came back"
    );
    let mut quiet = Svc {
        store: svc.store,
        runs: AtomicUsize::new(1),
        outage: None,
    };
    assert_eq!(quiet.pay(&run, 1).await.unwrap(), expected, "replayed");
    assert_eq!(*quiet.runs.get_mut(), 1, "the body ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_after_the_body_ends_in_a_replay() {
    let proxy: &'static Proxy = Box::leak(Box::new(Proxy::start("127.0.0.1:5432").await));
    let url = postgres_url().replace("127.0.0.1:5432", &proxy.addr().to_string());
    let store = PostgresStore::connect(&url).await.unwrap();
    let direct = PostgresStore::connect(&postgres_url()).await.unwrap();
    outage_ends_in_a_replay(proxy, store, direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_after_the_body_ends_in_a_replay() {
    let proxy: &'static Proxy = Box::leak(Box::new(Proxy::start("127.0.0.1:6379").await));
    let url = redis_url().replace("127.0.0.1:6379", &proxy.addr().to_string());
    let store = RedisStore::connect(&url).await.unwrap();
    let direct = RedisStore::connect(&redis_url()).await.unwrap();
    outage_ends_in_a_replay(proxy, store, direct).await;
}
