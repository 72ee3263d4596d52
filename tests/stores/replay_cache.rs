//! `ReplayCache`: hot replays cost no round trip, within the record's own
//! expiry and a bounded size; everything else still goes to the store.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem_runtime::{idempotent, Error, RedisStore, ReplayCache, Store};
use idem_tests::FaultyStore;

#[derive(Debug)]
enum AppError {
    Idem(Error),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idem(e)
    }
}

struct Svc<S> {
    store: S,
    runs: AtomicUsize,
}

impl<S: Store> Svc<S> {
    #[idempotent(key = id, fingerprint = amount, ttl = "10s", name = "cache-pay", store = self.store)]
    async fn pay(&self, id: u32, amount: u32) -> Result<usize, AppError> {
        Ok(self.runs.fetch_add(1, Ordering::SeqCst) + 1)
    }
}

fn svc(capacity: usize) -> Svc<ReplayCache<FaultyStore>> {
    Svc {
        store: ReplayCache::new(FaultyStore::default(), capacity),
        runs: AtomicUsize::new(0),
    }
}

#[tokio::test(start_paused = true)]
async fn hot_replays_are_served_from_memory() {
    let s = svc(100);
    assert_eq!(s.pay(1, 10).await.unwrap(), 1);
    assert_eq!(
        s.pay(1, 10).await.unwrap(),
        1,
        "first replay: read from the store"
    );
    let before = s.store.inner().claims.load(Ordering::SeqCst);
    for _ in 0..100 {
        assert_eq!(s.pay(1, 10).await.unwrap(), 1);
    }
    assert_eq!(
        s.store.inner().claims.load(Ordering::SeqCst),
        before,
        "no replay reached the store"
    );
    // A changed request under the same key is refused from the cache too.
    assert!(matches!(
        s.pay(1, 99).await,
        Err(AppError::Idem(Error::KeyReused))
    ));
    assert_eq!(s.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn cached_records_expire_with_their_ttl() {
    let s = svc(100);
    s.pay(2, 10).await.unwrap();
    s.pay(2, 10).await.unwrap();
    tokio::time::advance(Duration::from_secs(9)).await;
    assert_eq!(
        s.pay(2, 10).await.unwrap(),
        1,
        "still within the record's ttl"
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        s.pay(2, 10).await.unwrap(),
        2,
        "expired: the body runs again"
    );
}

#[tokio::test(start_paused = true)]
async fn the_cache_is_bounded() {
    let s = svc(32);
    for id in 0..1000 {
        s.pay(id, 1).await.unwrap();
        s.pay(id, 1).await.unwrap();
    }
    assert!(s.store.len() <= 32 + 16, "{} cached", s.store.len());
    // Evicted records are read from the store again, never re-run.
    assert_eq!(s.pay(0, 1).await.unwrap(), 1);
    assert_eq!(s.runs.load(Ordering::SeqCst), 1000);
}

#[tokio::test(start_paused = true)]
async fn in_progress_and_new_keys_always_ask_the_store() {
    let s = svc(100);
    let claims = || s.store.inner().claims.load(Ordering::SeqCst);
    s.pay(3, 1).await.unwrap();
    s.pay(4, 1).await.unwrap();
    assert_eq!(claims(), 2, "each new key went to the store");
}

#[tokio::test]
async fn a_cached_replay_survives_the_record_vanishing_from_redis() {
    // The documented trade-off: the cache replays until the record's own ttl.
    let url = std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let redis = RedisStore::connect(&url)
        .await
        .unwrap()
        .with_prefix("idem-cache-test:");
    let s = Svc {
        store: ReplayCache::new(redis.clone(), 100),
        runs: AtomicUsize::new(0),
    };
    let id = std::process::id();
    s.pay(id, 5).await.unwrap();
    s.pay(id, 5).await.unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = idem_runtime::Key::derive("cache-pay", &id).unwrap();
    let deleted: i64 = redis::cmd("DEL")
        .arg(redis.redis_key(key.as_str()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(s.pay(id, 5).await.unwrap(), 1, "replayed from the cache");
    assert_eq!(s.runs.load(Ordering::SeqCst), 1);
}
