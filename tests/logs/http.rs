//! What the HTTP layer says to clients and to its logs when things fail:
//! problem bodies say what happened without internals (no store error text,
//! no stored data), and logs carry digests — never the client's key or stored
//! data (issue 11, item 2).

use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use idem_runtime::async_trait;
use idem_runtime::http::IdempotencyLayer;
use idem_runtime::key::KeyBuilder;
use idem_runtime::{Claim, ClaimRequest, Error, FencingToken, MemoryStore, Record, Store};
use idem_tests::logs::Captured;
use tower::ServiceExt as _;

const STORE_SECRET: &str = "db-7.internal.example:5432 password=hunter2";
const STORED_SECRET: &str = "card 4111111111111111";
const CLIENT_KEY: &str = "client-key-c0ffee-secret";

/// A store whose every operation fails with an error naming its internals.
#[derive(Clone)]
struct Leaky;

fn leak() -> Error {
    Error::store(std::io::Error::other(format!(
        "connection to {STORE_SECRET} refused; SELECT * FROM idem_records"
    )))
}

#[async_trait]
impl Store for Leaky {
    async fn claim(&self, _: ClaimRequest<'_>) -> Result<Claim, Error> {
        Err(leak())
    }
    async fn complete(&self, _: &str, _: FencingToken, _: &[u8], _: Duration) -> Result<(), Error> {
        Err(leak())
    }
    async fn release(&self, _: &str, _: FencingToken) -> Result<(), Error> {
        Err(leak())
    }
    async fn renew(&self, _: &str, _: FencingToken, _: Duration) -> Result<(), Error> {
        Err(leak())
    }
    async fn get(&self, _: &str) -> Result<Option<Record>, Error> {
        Err(leak())
    }
    async fn purge_expired(&self, _: usize) -> Result<u64, Error> {
        Err(leak())
    }
    fn handle(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }
}

async fn send(app: &Router) -> (u16, String) {
    let request = axum::http::Request::post("/pay")
        .header("idempotency-key", CLIENT_KEY)
        .body(axum::body::Body::from("amount=10"))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "current_thread")]
async fn problem_bodies_and_logs_reveal_no_internals_keys_or_stored_data() {
    let captured = Captured::global();

    // The store is down: 503, and the body does not quote the store.
    let app = Router::new()
        .route("/pay", post(|| async { "paid" }))
        .layer(
            IdempotencyLayer::new(Leaky)
                .namespace("leaks")
                .global_scope(),
        );
    let (status, body) = send(&app).await;
    assert_eq!(status, 503, "{body}");
    for secret in ["hunter2", "db-7.internal", "SELECT"] {
        assert!(!body.contains(secret), "503 body leaks {secret:?}: {body}");
    }
    assert!(body.contains("store-unavailable"), "{body}");

    // A stored response that does not decode: 500, and neither the body nor
    // the log quotes what was stored.
    let store = MemoryStore::new();
    let key = KeyBuilder::new("leaks")
        .part(&("scope", None::<&str>))
        .part(CLIENT_KEY)
        .finish()
        .unwrap();
    let Claim::Acquired { token, .. } = store
        .claim(ClaimRequest {
            key: key.as_str(),
            fingerprint: None,
            lease: Duration::from_secs(30),
        })
        .await
        .unwrap()
    else {
        panic!("fresh key")
    };
    let corrupt = format!(r#"{{"ok":{{"status":"{STORED_SECRET}"}}}}"#);
    store
        .complete(
            key.as_str(),
            token,
            corrupt.as_bytes(),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let app = Router::new()
        .route("/pay", post(|| async { "paid" }))
        .layer(
            IdempotencyLayer::new(store)
                .namespace("leaks")
                .global_scope(),
        );
    let (status, body) = send(&app).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("stored-response-corrupt"), "{body}");
    assert!(!body.contains("4111"), "500 body leaks stored data: {body}");

    let logs = captured.text();
    assert!(
        logs.contains("the stored response could not be decoded"),
        "{logs}"
    );
    assert!(
        logs.contains(&key.digest().to_hex()),
        "logs name the digest: {logs}"
    );
    assert!(!logs.contains("4111"), "logs leak stored data:\n{logs}");
    assert!(
        !logs.contains(CLIENT_KEY),
        "logs leak the client's key:\n{logs}"
    );
}
