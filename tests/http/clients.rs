//! Who is asking and how: scopes (401 for an unknown client, keys per
//! client), methods and header names, the attempt a handler sees, clients
//! that disconnect, and one hundred concurrent duplicates.

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::http::IdempotencyLayer;
use idem_runtime::{InProgress, MemoryStore};
use reqwest::Method;

use crate::app::{problem, replayed, scoped, serve, Server};

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
    let as_user = |user: &'static str| s.echo_as(user, "shared", "same");
    let ann = as_user("Bearer ann").await;
    let bob = as_user("Bearer bob").await;
    assert!(
        !replayed(&ann) && !replayed(&bob),
        "bob never gets ann's response"
    );
    assert_eq!(ann.headers()["x-run"], "1");
    assert_eq!(bob.headers()["x-run"], "2");
    let ann_again = as_user("Bearer ann").await;
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
    let s = &s;
    let derived = |key: &'static str| async move {
        s.post("/attempt", Some(key), "")
            .await
            .text()
            .await
            .unwrap()
    };
    let a = derived("k").await;
    let b = derived("k").await;
    let other = derived("k2").await;
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
