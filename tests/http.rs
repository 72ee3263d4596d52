//! `IdempotencyLayer` end to end: an axum app on a real socket, a real HTTP
//! client, and every answer of CONTRACT §6.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use idem_runtime::http::IdempotencyLayer;
use idem_runtime::{InProgress, MemoryStore, Store};
use idem_tests::FaultyStore;
use reqwest::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore};
use tower::Layer as _;

/// What the handlers did.
struct App {
    runs: AtomicUsize,
    /// `/slow` waits for a permit before it answers.
    gate: Semaphore,
    /// `/slow` signals here once it has started.
    started: Notify,
}

async fn echo(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let mut headers = HeaderMap::new();
    headers.insert("x-run", n.into());
    headers.append("set-cookie", "a=1".parse().unwrap());
    headers.append("set-cookie", "b=2".parse().unwrap());
    (StatusCode::CREATED, headers, body).into_response()
}

async fn status(State(app): State<Arc<App>>, Path(code): Path<u16>) -> Response {
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::from_u16(code).unwrap(), format!("run {n}")).into_response()
}

async fn slow(State(app): State<Arc<App>>, Path(code): Path<u16>) -> Response {
    app.started.notify_one();
    app.gate.acquire().await.unwrap().forget();
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::from_u16(code).unwrap(), format!("run {n}")).into_response()
}

async fn big(State(app): State<Arc<App>>) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    (StatusCode::OK, body).into_response()
}

/// An event stream: one event, then (once the gate opens) another. With
/// `?fail=1`, a 503 stream that ends at once.
async fn events(State(app): State<Arc<App>>, query: axum::extract::RawQuery) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(4);
    let status = if query.0.is_some() {
        tx.send(Ok("data: down\n\n".into())).await.unwrap();
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        tx.send(Ok("data: one\n\n".into())).await.unwrap();
        tokio::spawn(async move {
            app.gate.acquire().await.unwrap().forget();
            let _ = tx.send(Ok("data: two\n\n".into())).await;
        });
        StatusCode::OK
    };
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        status,
        [("content-type", "text/event-stream")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// axum's own `Sse` response: one event now, another once the gate opens.
async fn sse(State(app): State<Arc<App>>) -> Response {
    use axum::response::sse::{Event, Sse};
    app.runs.fetch_add(1, Ordering::SeqCst);
    let events = futures::stream::unfold(0u8, move |n| {
        let app = Arc::clone(&app);
        async move {
            match n {
                0 => Some((
                    Ok::<_, std::convert::Infallible>(Event::default().data("one")),
                    1,
                )),
                1 => {
                    app.gate.acquire().await.unwrap().forget();
                    Some((Ok(Event::default().data("two")), 2))
                }
                _ => None,
            }
        }
    });
    Sse::new(events).into_response()
}

async fn attempt(State(app): State<Arc<App>>) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    let key = idem_runtime::current().map(|a| a.derive_key("downstream"));
    (StatusCode::OK, key.unwrap_or_default()).into_response()
}

struct Server {
    base: String,
    app: Arc<App>,
    http: reqwest::Client,
}

async fn serve(layer: IdempotencyLayer) -> Server {
    let app = Arc::new(App {
        runs: AtomicUsize::new(0),
        gate: Semaphore::new(0),
        started: Notify::new(),
    });
    let router = Router::new()
        .route("/echo", post(echo).get(echo).put(echo).patch(echo))
        .route("/status/{code}", post(status))
        .route("/slow/{code}", post(slow))
        .route("/big", post(big))
        .route("/events", post(events))
        .route("/sse", post(sse))
        .route("/attempt", post(attempt))
        .layer(layer)
        .with_state(Arc::clone(&app));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    Server {
        base,
        app,
        http: reqwest::Client::new(),
    }
}

fn scoped(store: impl Store + 'static) -> IdempotencyLayer {
    IdempotencyLayer::new(store).scope(|parts| {
        Some(
            parts
                .headers
                .get("authorization")?
                .to_str()
                .ok()?
                .to_owned(),
        )
    })
}

impl Server {
    fn runs(&self) -> usize {
        self.app.runs.load(Ordering::SeqCst)
    }

    fn request(&self, method: Method, path: &str, key: Option<&str>) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("authorization", "Bearer ann");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request
    }

    async fn post(&self, path: &str, key: Option<&str>, body: &str) -> reqwest::Response {
        self.request(Method::POST, path, key)
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }
}

fn replayed(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

/// Checks a problem+json answer and returns its `type`.
async fn problem(response: reqwest::Response, status: u16) -> String {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], status);
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(body["detail"].as_str().is_some_and(|t| !t.is_empty()));
    body["type"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_repeat_replays_status_headers_and_body_byte_for_byte() {
    let s = serve(scoped(MemoryStore::new())).await;
    let body = "{\"amount\": 10, \"note\": \"caf\u{e9}\"}";
    let first = s.post("/echo", Some("k1"), body).await;
    assert_eq!(first.status(), 201);
    assert!(!replayed(&first));
    let first_headers = first.headers().clone();
    let first_body = first.bytes().await.unwrap();

    let second = s.post("/echo", Some("k1"), body).await;
    assert_eq!(second.status(), 201);
    assert!(replayed(&second));
    assert_eq!(second.headers()["x-run"], first_headers["x-run"]);
    let cookies: Vec<_> = second.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(
        second.headers()["content-type"],
        first_headers["content-type"]
    );
    assert_eq!(second.bytes().await.unwrap(), first_body);
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn binary_bodies_replay_exactly() {
    let s = serve(scoped(MemoryStore::new())).await;
    let bytes: Vec<u8> = (0..=255u8).rev().collect();
    let send = || {
        s.request(Method::POST, "/echo", Some("bin"))
            .body(bytes.clone())
            .send()
    };
    let first = send().await.unwrap().bytes().await.unwrap();
    let again = send().await.unwrap();
    assert!(replayed(&again));
    assert_eq!(again.bytes().await.unwrap(), first);
    assert_eq!(first.as_ref(), bytes.as_slice());
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn a_missing_key_is_refused_where_required_and_passed_through_otherwise() {
    let required = serve(scoped(MemoryStore::new()).require_key(true)).await;
    let ty = problem(required.post("/echo", None, "x").await, 400).await;
    assert_eq!(ty, "urn:idem:problem:key-missing");
    assert_eq!(required.runs(), 0);

    let optional = serve(scoped(MemoryStore::new())).await;
    for _ in 0..2 {
        let r = optional.post("/echo", None, "x").await;
        assert_eq!(r.status(), 201);
        assert!(!replayed(&r));
    }
    assert_eq!(optional.runs(), 2, "without a key nothing is deduplicated");
}

#[tokio::test]
async fn malformed_keys_are_refused_with_400() {
    let s = serve(scoped(MemoryStore::new()).require_key(true)).await;
    let long = "k".repeat(256);
    for bad in ["has space", "", long.as_str(), "tab\there"] {
        let ty = problem(s.post("/echo", Some(bad), "x").await, 400).await;
        assert_eq!(ty, "urn:idem:problem:key-malformed", "{bad:?}");
    }
    let non_ascii = s
        .request(Method::POST, "/echo", None)
        .header(
            "idempotency-key",
            reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        )
        .send()
        .await
        .unwrap();
    problem(non_ascii, 400).await;
    let two = s
        .request(Method::POST, "/echo", Some("one"))
        .header("idempotency-key", "two")
        .send()
        .await
        .unwrap();
    problem(two, 400).await;
    assert_eq!(s.runs(), 0);
    // The longest valid key is accepted.
    let ok = "k".repeat(255);
    assert_eq!(s.post("/echo", Some(&ok), "x").await.status(), 201);
}

#[tokio::test]
async fn a_duplicate_in_flight_gets_409_with_retry_after_then_the_replay() {
    let s = Arc::new(serve(scoped(MemoryStore::new())).await);
    let first = {
        let s = Arc::clone(&s);
        tokio::spawn(async move { s.post("/slow/201", Some("k"), "x").await.status() })
    };
    s.app.started.notified().await;
    let dup = s.post("/slow/201", Some("k"), "x").await;
    let retry_after: u64 = dup.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert_eq!(problem(dup, 409).await, "urn:idem:problem:in-progress");
    s.app.gate.add_permits(1);
    assert_eq!(first.await.unwrap(), 201);
    let after = s.post("/slow/201", Some("k"), "x").await;
    assert!(replayed(&after));
    assert_eq!(after.text().await.unwrap(), "run 1");
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn with_wait_a_duplicate_in_flight_gets_the_first_response() {
    let layer = scoped(MemoryStore::new()).in_progress(InProgress::Wait(Duration::from_secs(30)));
    let s = Arc::new(serve(layer).await);
    let first = {
        let s = Arc::clone(&s);
        tokio::spawn(async move { s.post("/slow/201", Some("k"), "x").await.text().await })
    };
    s.app.started.notified().await;
    let dup = {
        let s = Arc::clone(&s);
        tokio::spawn(async move {
            let r = s.post("/slow/201", Some("k"), "x").await;
            (replayed(&r), r.text().await.unwrap())
        })
    };
    s.app.gate.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap(), "run 1");
    assert_eq!(dup.await.unwrap(), (true, "run 1".to_owned()));
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn the_same_key_with_a_different_request_gets_422() {
    let s = serve(scoped(MemoryStore::new())).await;
    assert_eq!(s.post("/echo?x=1", Some("k"), "body").await.status(), 201);
    let changes = [
        (Method::POST, "/echo?x=1", "other body"),
        (Method::POST, "/echo?x=2", "body"),
        (Method::PATCH, "/echo?x=1", "body"),
        (Method::POST, "/status/201?x=1", "body"),
    ];
    for (method, path, body) in changes {
        let r = s
            .request(method.clone(), path, Some("k"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            problem(r, 422).await,
            "urn:idem:problem:key-reused",
            "{method} {path} {body}"
        );
    }
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn a_store_that_is_down_gives_503_and_the_handler_does_not_run() {
    let store = FaultyStore::default();
    store.claims_fail.store(true, Ordering::SeqCst);
    let s = serve(scoped(store.clone())).await;
    let r = s.post("/echo", Some("k"), "x").await;
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(problem(r, 503).await, "urn:idem:problem:store-unavailable");
    assert_eq!(s.runs(), 0);
    store.claims_fail.store(false, Ordering::SeqCst);
    assert_eq!(s.post("/echo", Some("k"), "x").await.status(), 201);
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn a_corrupt_stored_response_is_a_500_problem_never_a_rerun() {
    let store = FaultyStore::default();
    store.completions_corrupt.store(true, Ordering::SeqCst);
    let s = serve(scoped(store)).await;
    assert_eq!(s.post("/echo", Some("k"), "x").await.status(), 201);
    let r = s.post("/echo", Some("k"), "x").await;
    assert_eq!(
        problem(r, 500).await,
        "urn:idem:problem:stored-response-corrupt"
    );
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn decisions_are_stored_but_5xx_try_again_and_validation_refusals_release_the_key() {
    let s = serve(scoped(MemoryStore::new())).await;
    for code in [200, 201, 202, 302, 402, 410, 412] {
        let path = format!("/status/{code}");
        let key = format!("stored-{code}");
        let before = s.runs();
        assert_eq!(s.post(&path, Some(&key), "").await.status(), code);
        let again = s.post(&path, Some(&key), "").await;
        assert_eq!(again.status(), code);
        assert!(replayed(&again), "{code} is replayed");
        assert_eq!(s.runs(), before + 1, "{code} ran once");
    }
    for code in [
        500, 502, 503, 408, 409, 429, 400, 401, 403, 404, 405, 415, 422,
    ] {
        let path = format!("/status/{code}");
        let key = format!("released-{code}");
        let before = s.runs();
        assert_eq!(s.post(&path, Some(&key), "").await.status(), code);
        let again = s.post(&path, Some(&key), "").await;
        assert_eq!(again.status(), code);
        assert!(!replayed(&again), "{code} is not replayed");
        assert_eq!(s.runs(), before + 2, "{code} ran again");
    }
}

#[tokio::test]
async fn which_statuses_are_stored_is_configurable() {
    let s = serve(scoped(MemoryStore::new()).store_status(|status| status.is_success())).await;
    s.post("/status/402", Some("k402"), "").await;
    assert!(!replayed(&s.post("/status/402", Some("k402"), "").await));
    assert_eq!(s.runs(), 2);
    // And back to storing a validation refusal, as earlier releases did.
    let s = serve(scoped(MemoryStore::new()).store_status(|status| status.as_u16() != 500)).await;
    s.post("/status/422", Some("k422"), "").await;
    assert!(replayed(&s.post("/status/422", Some("k422"), "").await));
    assert_eq!(s.runs(), 1);
}

/// A framework rejection (axum's `Json` extractor without a JSON
/// `Content-Type`: 415; an unknown route: 404; a wrong method: 405) is not
/// stored, and `Content-Type` is part of the fingerprint: a client that
/// corrects its `Content-Type` gets its request run, not the old 415 for the
/// whole ttl (issue 11, item 2).
#[tokio::test]
async fn a_corrected_retry_after_a_framework_rejection_runs() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let router = Router::new()
        .route(
            "/orders",
            post(move |axum::Json(v): axum::Json<serde_json::Value>| {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                async move { (StatusCode::CREATED, format!("order {n} for {v}")) }
            }),
        )
        .layer(scoped(MemoryStore::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let http = reqwest::Client::new();
    let send = |path: &'static str, method: Method, content_type: Option<&'static str>| {
        // One key per route and method; the fingerprint holds them too.
        let key = format!("fix-me{path}-{method}");
        let mut request = http
            .request(method, format!("{base}{path}"))
            .header("authorization", "Bearer ann")
            .header("idempotency-key", key)
            .body(r#"{"sku":1}"#);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send()
    };
    let first = send("/orders", Method::POST, Some("text/plain"))
        .await
        .unwrap();
    assert_eq!(first.status(), 415);
    let again = send("/orders", Method::POST, Some("text/plain"))
        .await
        .unwrap();
    assert_eq!(again.status(), 415);
    assert!(!replayed(&again), "a rejection is not replayed");
    let fixed = send("/orders", Method::POST, Some("application/json"))
        .await
        .unwrap();
    assert_eq!(fixed.status(), 201, "the corrected request runs");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let retry = send("/orders", Method::POST, Some("application/json"))
        .await
        .unwrap();
    assert!(replayed(&retry), "its retry is a replay");
    // Now that the key holds a JSON request, the same bytes as text are another request.
    let other = send("/orders", Method::POST, Some("text/plain"))
        .await
        .unwrap();
    assert_eq!(other.status(), 422);
    for (path, method, status) in [
        ("/nowhere", Method::POST, 404),
        ("/orders", Method::PATCH, 405),
    ] {
        for _ in 0..2 {
            let response = send(path, method.clone(), Some("application/json"))
                .await
                .unwrap();
            assert_eq!(response.status(), status, "{path}");
            assert!(!replayed(&response), "{path} {status} is not stored");
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_request_body_over_the_limit_gets_413_and_the_handler_does_not_run() {
    let s = serve(scoped(MemoryStore::new()).max_request_body(1024)).await;
    let r = s.post("/echo", Some("k"), &"x".repeat(1025)).await;
    assert_eq!(problem(r, 413).await, "urn:idem:problem:request-too-large");
    // Chunked, with no Content-Length to check up front.
    let addr = s.base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let chunk = "y".repeat(800);
    let raw = format!(
        "POST /echo HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer ann\r\nidempotency-key: chunked\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n\
         320\r\n{chunk}\r\n320\r\n{chunk}\r\n0\r\n\r\n"
    );
    tcp.write_all(raw.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(s.runs(), 0);
    // At the limit is fine.
    assert_eq!(
        s.post("/echo", Some("k"), &"x".repeat(1024)).await.status(),
        201
    );
}

/// `Expect: 100-continue` with a declared length over the limit: the 413
/// comes before the client uploads anything, not after (issue 11, item 2).
#[tokio::test]
async fn an_expect_continue_request_over_the_limit_gets_413_before_the_upload() {
    let s = serve(scoped(MemoryStore::new()).max_request_body(1024)).await;
    let addr = s.base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /echo HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer ann\r\nidempotency-key: expect\r\n\
         content-length: 2000\r\nexpect: 100-continue\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    // No body is sent: the server must answer from the head alone.
    let mut answer = vec![0u8; 4096];
    let n = tcp.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(s.runs(), 0);
    // Within the limit, the upload is invited and the handler runs.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /echo HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer ann\r\nidempotency-key: expect-ok\r\n\
         content-length: 5\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut first = vec![0u8; 64];
    let n = tcp.read(&mut first).await.unwrap();
    assert!(
        first[..n].starts_with(b"HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&first[..n])
    );
    tcp.write_all(b"hello").await.unwrap();
    let mut rest = String::new();
    tcp.read_to_string(&mut rest).await.unwrap();
    assert!(rest.contains("201 Created"), "{rest}");
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn a_response_over_the_limit_is_passed_through_whole_and_a_retry_gets_410_not_a_rerun() {
    let s = serve(scoped(MemoryStore::new()).max_response_body(64 * 1024)).await;
    let expected: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let r = s.post("/big", Some("k"), "").await;
    assert_eq!(r.status(), 200);
    assert!(!replayed(&r));
    assert_eq!(r.bytes().await.unwrap(), expected, "never truncated");
    for _ in 0..3 {
        let r = s.post("/big", Some("k"), "").await;
        assert!(replayed(&r));
        assert_eq!(
            problem(r, 410).await,
            "urn:idem:problem:response-not-stored"
        );
    }
    assert_eq!(
        s.runs(),
        1,
        "the work ran once: a retry never runs it again"
    );
    // A response just over the limit, found only while reading (the length
    // was not declared as too large): the same.
    let s = serve(scoped(MemoryStore::new()).max_response_body(3_000_000 - 1)).await;
    let r = s.post("/big", Some("k"), "").await;
    assert_eq!(r.bytes().await.unwrap(), expected);
    let again = s.post("/big", Some("k"), "").await;
    assert_eq!(
        problem(again, 410).await,
        "urn:idem:problem:response-not-stored"
    );
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn a_streamed_response_flows_at_once_and_a_retry_gets_410_not_a_rerun() {
    let s = serve(scoped(MemoryStore::new())).await;
    let mut first = s.post("/events", Some("sse"), "").await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["content-type"], "text/event-stream");
    // The first event arrives while the handler is still producing the stream
    // (it waits on the gate): nothing is buffered.
    // (A generous bound only so that a buffering layer fails instead of hanging.)
    let chunk = tokio::time::timeout(Duration::from_secs(30), first.chunk())
        .await
        .expect("the first event is not held back until the stream ends")
        .unwrap()
        .unwrap();
    assert_eq!(&chunk[..], b"data: one\n\n");
    // A retry meanwhile, and after, gets the 410 problem; the stream's work is
    // not run twice.
    let during = s.post("/events", Some("sse"), "").await;
    assert_eq!(
        problem(during, 410).await,
        "urn:idem:problem:response-not-stored"
    );
    s.app.gate.add_permits(1);
    let mut rest = Vec::new();
    while let Some(chunk) = first.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"data: two\n\n");
    let after = s.post("/events", Some("sse"), "").await;
    assert!(replayed(&after));
    assert_eq!(
        problem(after, 410).await,
        "urn:idem:problem:response-not-stored"
    );
    assert_eq!(s.runs(), 1);
    // A streamed response whose status is not stored releases the key at once.
    let failing = s.post("/events?fail=1", Some("sse-5xx"), "").await;
    assert_eq!(failing.status(), 503);
    assert_eq!(failing.text().await.unwrap(), "data: down\n\n");
    let retried = s.post("/events?fail=1", Some("sse-5xx"), "").await;
    assert_eq!(retried.status(), 503);
    assert!(!replayed(&retried));
    assert_eq!(s.runs(), 3);
}

#[tokio::test]
async fn an_axum_sse_response_flows_at_once_and_runs_once() {
    let s = serve(scoped(MemoryStore::new())).await;
    let mut first = s.post("/sse", Some("sse"), "").await;
    assert_eq!(first.headers()["content-type"], "text/event-stream");
    let chunk = tokio::time::timeout(Duration::from_secs(30), first.chunk())
        .await
        .expect("the first event is not held back until the stream ends")
        .unwrap()
        .unwrap();
    assert_eq!(&chunk[..], b"data: one\n\n");
    s.app.gate.add_permits(1);
    while first.chunk().await.unwrap().is_some() {}
    let again = s.post("/sse", Some("sse"), "").await;
    assert_eq!(
        problem(again, 410).await,
        "urn:idem:problem:response-not-stored"
    );
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn trailers_are_stored_and_replayed() {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = Arc::clone(&runs);
        tower::service_fn(move |_req: axum::http::Request<_>| {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                let body = http_body_util::Full::new(axum::body::Bytes::from_static(b"done"))
                    .with_trailers(async move { Some(Ok(trailers)) });
                Ok::<_, std::convert::Infallible>(axum::http::Response::new(body))
            }
        })
    };
    let service = IdempotencyLayer::new(MemoryStore::new())
        .global_scope()
        .layer(handler);
    for round in 0..2 {
        let request = axum::http::Request::post("/rpc")
            .header("idempotency-key", "t")
            .body(http_body_util::Empty::<axum::body::Bytes>::new())
            .unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        assert_eq!(
            response.headers().contains_key("idempotent-replayed"),
            round == 1
        );
        let body = response.into_body().collect().await.unwrap();
        assert_eq!(body.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(&body.to_bytes()[..], b"done");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_request_whose_client_is_unknown_gets_401_and_never_a_shared_scope() {
    let s = serve(scoped(MemoryStore::new())).await;
    let anonymous = || {
        s.http
            .post(format!("{}/echo", s.base))
            .header("idempotency-key", "shared")
            .body("same")
            .send()
    };
    for _ in 0..2 {
        let r = anonymous().await.unwrap();
        assert_eq!(problem(r, 401).await, "urn:idem:problem:scope-unknown");
    }
    assert_eq!(
        s.runs(),
        0,
        "the handler does not run for an unknown client"
    );
    // An empty subject names no one either (found by the second break-it pass).
    let s = serve(IdempotencyLayer::new(MemoryStore::new()).scope(|_| Some(String::new()))).await;
    for _ in 0..2 {
        let r = anonymous_to(&s).await;
        assert_eq!(problem(r, 401).await, "urn:idem:problem:scope-unknown");
    }
    assert_eq!(s.runs(), 0);
    // A global scope, chosen on purpose, serves them all from one key space.
    let s = serve(IdempotencyLayer::new(MemoryStore::new()).global_scope()).await;
    let first = anonymous_to(&s).await;
    let second = anonymous_to(&s).await;
    assert!(!replayed(&first) && replayed(&second));
    assert_eq!(s.runs(), 1);
}

async fn anonymous_to(s: &Server) -> reqwest::Response {
    s.http
        .post(format!("{}/echo", s.base))
        .header("idempotency-key", "shared")
        .body("same")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn keys_are_per_scope() {
    let s = serve(scoped(MemoryStore::new())).await;
    let as_user = |user: &'static str| {
        s.http
            .post(format!("{}/echo", s.base))
            .header("authorization", user)
            .header("idempotency-key", "shared")
            .body("same")
            .send()
    };
    let ann = as_user("Bearer ann").await.unwrap();
    let bob = as_user("Bearer bob").await.unwrap();
    assert!(
        !replayed(&ann) && !replayed(&bob),
        "bob never gets ann's response"
    );
    assert_eq!(ann.headers()["x-run"], "1");
    assert_eq!(bob.headers()["x-run"], "2");
    let ann_again = as_user("Bearer ann").await.unwrap();
    assert!(replayed(&ann_again));
    assert_eq!(ann_again.headers()["x-run"], "1");
    assert_eq!(s.runs(), 2);
}

#[tokio::test]
async fn methods_outside_the_list_pass_through() {
    let s = serve(scoped(MemoryStore::new())).await;
    for _ in 0..2 {
        let r = s
            .request(Method::GET, "/echo", Some("k"))
            .send()
            .await
            .unwrap();
        assert!(!replayed(&r));
        let r = s
            .request(Method::PUT, "/echo", Some("k"))
            .send()
            .await
            .unwrap();
        assert!(!replayed(&r));
    }
    assert_eq!(s.runs(), 4);
    let put = serve(scoped(MemoryStore::new()).methods([Method::PUT])).await;
    put.request(Method::PUT, "/echo", Some("k"))
        .send()
        .await
        .unwrap();
    let again = put
        .request(Method::PUT, "/echo", Some("k"))
        .send()
        .await
        .unwrap();
    assert!(replayed(&again));
    assert_eq!(put.runs(), 1);
}

#[tokio::test]
async fn a_custom_header_name() {
    let s = serve(
        scoped(MemoryStore::new())
            .header_name(axum::http::HeaderName::from_static("x-request-key"))
            .require_key(true),
    )
    .await;
    let send = || {
        s.http
            .post(format!("{}/echo", s.base))
            .header("authorization", "Bearer ann")
            .header("x-request-key", "k")
            .body("b")
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 201, "{:?}", first.text().await);
    assert!(replayed(&send().await.unwrap()));
    problem(s.post("/echo", Some("k"), "b").await, 400).await;
}

#[tokio::test]
async fn the_handler_sees_the_attempt_and_derives_a_stable_downstream_key() {
    let s = serve(scoped(MemoryStore::new()).store_status(|_| false)).await;
    let a = s
        .post("/attempt", Some("k"), "")
        .await
        .text()
        .await
        .unwrap();
    let b = s
        .post("/attempt", Some("k"), "")
        .await
        .text()
        .await
        .unwrap();
    let other = s
        .post("/attempt", Some("k2"), "")
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(a.len(), 64);
    assert_eq!(a, b, "every attempt of one request derives the same key");
    assert_ne!(a, other);
    assert_eq!(s.runs(), 3);
}

#[tokio::test]
async fn a_client_that_disconnects_does_not_leave_the_key_stuck() {
    let layer = scoped(MemoryStore::new()).in_progress(InProgress::Wait(Duration::from_secs(30)));
    let s = Arc::new(serve(layer).await);
    for (code, runs_after_retry, replays) in [(201, 1, true), (500, 2, false)] {
        let before = s.runs();
        let key = format!("gone-{code}");
        let path = format!("/slow/{code}");
        let client = {
            let (s, key, path) = (Arc::clone(&s), key.clone(), path.clone());
            tokio::spawn(async move { s.post(&path, Some(&key), "x").await })
        };
        s.app.started.notified().await;
        client.abort(); // the client hangs up while the handler runs
        let _ = client.await;
        s.app.gate.add_permits(runs_after_retry); // one per execution
                                                  // The retry waits for the abandoned handler, then gets its stored
                                                  // response (201), or runs again because a 500 released the key.
        let retry = s.post(&path, Some(&key), "x").await;
        assert_eq!(retry.status(), code);
        assert_eq!(replayed(&retry), replays);
        assert_eq!(s.runs(), before + runs_after_retry, "status {code}");
    }
}

#[tokio::test]
async fn one_hundred_concurrent_duplicates_run_the_handler_once() {
    let layer = scoped(MemoryStore::new()).in_progress(InProgress::Wait(Duration::from_secs(30)));
    let s = Arc::new(serve(layer).await);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let r = s.post("/echo", Some("rush"), "same").await;
                (
                    r.status(),
                    r.headers()["x-run"].to_str().unwrap().to_owned(),
                )
            })
        })
        .collect();
    for task in tasks {
        let (status, run) = task.await.unwrap();
        assert_eq!(status, 201);
        assert_eq!(run, "1", "every caller got the one execution's response");
    }
    assert_eq!(s.runs(), 1);
}
