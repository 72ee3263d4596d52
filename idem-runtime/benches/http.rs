//! What `IdempotencyLayer` adds to a request, in process (no sockets): an axum
//! router with a JSON handler, called directly (`bare`), behind the layer with a
//! fresh key per request (`fresh`), and replaying one key (`replay`).
//!
//! Run with `cargo bench -p idem-runtime --bench http --features http`; the
//! loopback figures with `wrk` come from `scripts/bench-http.sh`.

#![allow(missing_docs)] // criterion_group! emits undocumented items

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::BodyExt as _;
use idem_runtime::http::IdempotencyLayer;
use idem_runtime::MemoryStore;
use serde::{Deserialize, Serialize};
use tower_service::Service;

#[derive(Serialize, Deserialize)]
struct Order {
    user_id: u64,
    product_id: u64,
    quantity: u32,
}

async fn handler(Json(order): Json<Order>) -> (StatusCode, Json<Order>) {
    (StatusCode::CREATED, Json(order))
}

fn request(key: &str) -> Request<Body> {
    Request::post("/orders")
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Body::from(r#"{"user_id":7,"product_id":42,"quantity":1}"#))
        .unwrap()
}

async fn call(router: &Router, key: &str) -> usize {
    let mut svc = router.clone();
    std::future::poll_fn(|cx| <Router as Service<Request<Body>>>::poll_ready(&mut svc, cx))
        .await
        .unwrap();
    let response = Service::call(&mut svc, request(key)).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .len()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bare: Router = Router::new().route("/orders", post(handler));
    // A short ttl keeps the map from growing without bound over millions of keys.
    let layered = bare.clone().layer(
        IdempotencyLayer::new(MemoryStore::new())
            .global_scope()
            .ttl(Duration::from_secs(1)),
    );
    let next = AtomicU64::new(0);
    let mut group = c.benchmark_group("http");
    group.bench_function("bare", |b| b.to_async(&rt).iter(|| call(&bare, "k")));
    group.bench_function("fresh", |b| {
        b.to_async(&rt).iter(|| {
            let key = format!("fresh-{}", next.fetch_add(1, Ordering::Relaxed));
            let layered = &layered;
            async move { call(layered, &key).await }
        })
    });
    group.bench_function("replay", |b| {
        b.to_async(&rt).iter(|| call(&layered, "replay"))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
