//! Huge durations given to the runtime APIs (`Duration::MAX` for ttl, lease and
//! waits) are capped to idem's limit of 100 years, on every store: nothing
//! panics, the completion is recorded, and a retry replays instead of rerunning.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use idem_runtime::codec::Codec;
use idem_runtime::engine::{execute, Options};
use idem_runtime::http::IdempotencyLayer;
use idem_runtime::key::KeyBuilder;
use idem_runtime::message::{Deduplicator, Outcome};
use idem_runtime::store::MAX_DURATION;
use idem_runtime::{
    Error, InProgress, MemoryStore, PostgresStore, RecordState, RedisStore, SqliteStore, Store,
};
use idem_tests::{postgres_url, redis_url, unique};
use tower::ServiceExt as _;

async fn stores() -> Vec<(&'static str, Arc<dyn Store>)> {
    let dir = std::env::temp_dir().join(unique("idem-durations"));
    std::fs::create_dir_all(&dir).unwrap();
    let sqlite = SqliteStore::connect(&format!("sqlite://{}/d.db", dir.display()))
        .await
        .unwrap();
    vec![
        ("memory", Arc::new(MemoryStore::new())),
        ("sqlite", Arc::new(sqlite)),
        (
            "postgres",
            Arc::new(PostgresStore::connect(&postgres_url()).await.unwrap()),
        ),
        (
            "redis",
            Arc::new(RedisStore::connect(&redis_url()).await.unwrap()),
        ),
    ]
}

/// Options built field by field, past every builder cap.
fn unbounded() -> Options {
    let mut options = Options::new();
    options.ttl = Duration::MAX;
    options.lease = Duration::MAX;
    options.in_progress = InProgress::Wait(Duration::MAX);
    options
}

#[test]
fn builders_cap_durations() {
    let options = Options::new()
        .ttl(Duration::MAX)
        .lease(Duration::from_secs(u64::MAX))
        .in_progress(InProgress::Wait(Duration::MAX));
    assert_eq!(options.ttl, MAX_DURATION);
    assert_eq!(options.lease, MAX_DURATION);
    assert_eq!(options.in_progress, InProgress::Wait(MAX_DURATION));
    let zero = Options::new().ttl(Duration::ZERO).lease(Duration::ZERO);
    assert_eq!(zero.ttl, Duration::from_millis(1));
    assert_eq!(zero.lease, Duration::from_millis(1));
    assert_eq!(unbounded().bounded().ttl, MAX_DURATION);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_caps_huge_durations_on_every_store() {
    for (name, store) in stores().await {
        let namespace: &'static str = Box::leak(unique("durations").into_boxed_str());
        let options = unbounded();
        let runs = AtomicUsize::new(0);
        for _ in 0..2 {
            let key = KeyBuilder::new(namespace).part("k").finish();
            let out: Result<usize, Error> = execute(
                Arc::clone(&store),
                &options,
                key,
                None,
                Codec::release_errors(),
                async { Ok(runs.fetch_add(1, Ordering::SeqCst) + 1) },
            )
            .await;
            assert_eq!(out.unwrap(), 1, "{name}: ran once, then replayed");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{name}");
        let key = KeyBuilder::new(namespace).part("k").finish().unwrap();
        let record = store.get(key.as_str()).await.unwrap().unwrap();
        assert_eq!(record.state, RecordState::Completed, "{name}");
        assert!(
            record.expires_in > MAX_DURATION / 2,
            "{name}: kept for the capped ttl: {:?}",
            record.expires_in
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_layer_caps_huge_durations_on_every_store() {
    for (name, store) in stores().await {
        let runs = Arc::new(AtomicUsize::new(0));
        let layer = IdempotencyLayer::new(Arc::clone(&store))
            .ttl(Duration::MAX)
            .lease(Duration::MAX)
            .in_progress(InProgress::Wait(Duration::MAX))
            .namespace(unique("durations-http"))
            .global_scope();
        let app = Router::new()
            .route(
                "/pay",
                post({
                    let runs = runs.clone();
                    move || async move { format!("run {}", runs.fetch_add(1, Ordering::SeqCst) + 1) }
                }),
            )
            .layer(layer);
        for _ in 0..2 {
            let request = axum::http::Request::post("/pay")
                .header("idempotency-key", "k-1")
                .body(axum::body::Body::empty())
                .unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), 200, "{name}");
            let body = axum::body::to_bytes(response.into_body(), 1024)
                .await
                .unwrap();
            assert_eq!(&body[..], b"run 1", "{name}");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deduplicator_caps_huge_durations_on_every_store() {
    for (name, store) in stores().await {
        let dedup = Deduplicator::new(Arc::clone(&store), unique("durations-msg"))
            .ttl(Duration::MAX)
            .lease(Duration::MAX)
            .in_progress(InProgress::Wait(Duration::MAX));
        let first = dedup.process("m-1", || async { Ok::<_, ()>(7) }).await;
        assert!(
            matches!(first, Ok(Outcome::Processed(7))),
            "{name}: {first:?}"
        );
        let again = dedup.process("m-1", || async { Ok::<_, ()>(8) }).await;
        assert!(matches!(again, Ok(Outcome::Duplicate)), "{name}: {again:?}");
    }
}
