//! Responses recorded without their body, and layers without a scope: an axum
//! app on a real socket, a real HTTP client. Written by the break-it review of
//! issue 11 (the first and the last test failed on the change as first
//! proposed).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use idem_runtime::http::IdempotencyLayer;
use idem_runtime::MemoryStore;

/// A body of known length (exactly 16 bytes, says its size hint) that fails
/// when read — a file read that hits an I/O error, a proxied upstream that
/// resets. (`Limited` over a 32-byte `Full`: the hint is exact, the read errs.)
fn fails_when_read() -> axum::body::Body {
    let body = http_body_util::Limited::new(
        http_body_util::Full::new(Bytes::from_static(b"receipt receipt receipt receipt!")),
        16,
    );
    assert_eq!(axum::body::HttpBody::size_hint(&body).exact(), Some(16));
    axum::body::Body::new(body)
}

struct App {
    runs: AtomicUsize,
}

/// Charges a card (the side effect), then answers 201 with a receipt body
/// whose length is known but which fails while it is read.
async fn charge_then_fail(State(app): State<Arc<App>>) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    (StatusCode::CREATED, fails_when_read()).into_response()
}

/// Same side effect, a streamed body (no length) that fails the same way.
async fn charge_then_stream_fail(State(app): State<Arc<App>>) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    let stream = futures::stream::iter([
        Ok::<_, std::io::Error>(Bytes::from_static(b"receipt part 1; ")),
        Err(std::io::Error::other("disk read failed")),
    ]);
    (StatusCode::CREATED, axum::body::Body::from_stream(stream)).into_response()
}

async fn streamed(State(app): State<Arc<App>>, body: Bytes) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    let stream = futures::stream::iter([Ok::<_, std::io::Error>(body)]);
    (StatusCode::CREATED, axum::body::Body::from_stream(stream)).into_response()
}

async fn serve(layer: IdempotencyLayer) -> (String, Arc<App>) {
    let app = Arc::new(App {
        runs: AtomicUsize::new(0),
    });
    let router = Router::new()
        .route("/charge", post(charge_then_fail))
        .route("/charge-stream", post(charge_then_stream_fail))
        .route("/streamed", post(streamed))
        .layer(layer)
        .with_state(Arc::clone(&app));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (base, app)
}

/// The handler ran (the card was charged) and answered 201; its body then
/// failed while the layer read it to store it. The client gets a 500, which
/// clients retry — and the retry must not charge again, whether or not the
/// body declared its length (as for a stream cut midway).
#[tokio::test]
async fn a_response_body_that_fails_after_the_handler_ran_is_not_a_rerun() {
    let (base, app) = serve(IdempotencyLayer::new(MemoryStore::new()).global_scope()).await;
    let http = reqwest::Client::new();
    let send = |path: &'static str| {
        http.post(format!("{base}{path}"))
            .header("idempotency-key", format!("k-{path}"))
            .send()
    };

    // Unknown length: recorded as done, the retry is not run.
    let _ = send("/charge-stream").await.map(|r| r.status());
    let retry = send("/charge-stream").await.unwrap();
    assert_eq!(retry.status(), 410);
    assert_eq!(app.runs.load(Ordering::SeqCst), 1);

    // Known length: the same.
    let first = send("/charge").await.unwrap();
    assert_eq!(first.status(), 500, "the layer's response-failed problem");
    let retry = send("/charge").await.unwrap();
    assert_eq!(
        app.runs.load(Ordering::SeqCst),
        2,
        "the charge ran once: a retry must not run it again (retry got {})",
        retry.status()
    );
    assert_eq!(retry.status(), 410);
}

/// A different request under a key whose response was withheld is still a
/// different request: 422, not the 410 of the first one.
#[tokio::test]
async fn another_request_under_a_withheld_key_is_422() {
    let (base, app) = serve(IdempotencyLayer::new(MemoryStore::new()).global_scope()).await;
    let http = reqwest::Client::new();
    let send = |body: &'static str| {
        http.post(format!("{base}/streamed"))
            .header("idempotency-key", "w")
            .body(body)
            .send()
    };
    assert_eq!(send("a").await.unwrap().status(), 201);
    assert_eq!(send("a").await.unwrap().status(), 410);
    assert_eq!(send("b").await.unwrap().status(), 422);
    assert_eq!(app.runs.load(Ordering::SeqCst), 1);
    // And a retry in flight does not wait for nothing: the stream is recorded at once.
    tokio::time::timeout(Duration::from_secs(5), send("a"))
        .await
        .expect("answered at once")
        .unwrap();
}

async fn echo(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        format!("run {n}: {}", String::from_utf8_lossy(&body)),
    )
        .into_response()
}

/// Issue 11: "the layer refuses such a request (401 or 400 problem+json)
/// unless it was explicitly configured with a global scope." A layer built
/// the plain way — `IdempotencyLayer::new(store)`, no `scope`, no
/// `global_scope()` — cannot tell ann from bob, so it refuses: bob never gets
/// ann's stored response.
#[tokio::test]
async fn without_an_explicit_global_scope_one_client_never_gets_anothers_response() {
    let app = Arc::new(App {
        runs: AtomicUsize::new(0),
    });
    let router = Router::new()
        .route("/echo", post(echo))
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .with_state(Arc::clone(&app));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let http = reqwest::Client::new();
    let as_user = |token: &'static str| {
        http.post(format!("{base}/echo"))
            .header("authorization", token)
            .header("idempotency-key", "order-1")
            .body("same")
            .send()
    };
    let ann = as_user("Bearer ann-secret").await.unwrap();
    assert_eq!(ann.status(), 401, "refused, not run in a shared scope");
    let bob = as_user("Bearer bob-secret").await.unwrap();
    let replayed = bob.headers().contains_key("idempotent-replayed");
    let status = bob.status();
    let text = bob.text().await.unwrap();
    assert!(
        !replayed && status == 401 && text.contains("scope-unknown"),
        "bob got ann's stored response ({status}, replayed: {replayed}): {text}"
    );
    assert_eq!(app.runs.load(Ordering::SeqCst), 0);
}
