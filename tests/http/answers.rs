//! What a keyed request is answered: replays byte for byte, the problems of
//! CONTRACT §6 (400, 409, 422, 500, 503), and which statuses are stored.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use idem_runtime::{InProgress, MemoryStore};
use idem_tests::FaultyStore;
use reqwest::Method;

use crate::app::{problem, replayed, scoped, serve};

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
    // Set-Cookie reaches the first client only (tests/http/headers.rs).
    let cookies: Vec<_> = first_headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert!(second.headers().get("set-cookie").is_none());
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
