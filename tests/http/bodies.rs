//! Bodies at their limits: requests over the limit (413, also before an
//! `Expect: 100-continue` upload), responses too large to store or streamed
//! (passed through at once, a retry gets 410, never a rerun), trailers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_runtime::http::IdempotencyLayer;
use idem_runtime::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::Layer as _;

use crate::app::{not_stored, problem, replayed, scoped, serve};

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
        not_stored(r).await;
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
    not_stored(again).await;
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
    not_stored(during).await;
    s.app.gate.add_permits(1);
    let mut rest = Vec::new();
    while let Some(chunk) = first.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"data: two\n\n");
    let after = s.post("/events", Some("sse"), "").await;
    assert!(replayed(&after));
    not_stored(after).await;
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
    not_stored(again).await;
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
                let mut trailers = axum::http::HeaderMap::new();
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
