//! Responses recorded without their body, and layers without a scope. Written
//! by the break-it review of issue 11 (the first and the last test failed on
//! the change as first proposed).

use std::time::Duration;

use idem_runtime::http::IdempotencyLayer;
use idem_runtime::MemoryStore;

use crate::app::serve;

/// The handler ran (the card was charged) and answered 201; its body then
/// failed while the layer read it to store it. The client gets a 500, which
/// clients retry — and the retry must not charge again, whether or not the
/// body declared its length (as for a stream cut midway).
#[tokio::test]
async fn a_response_body_that_fails_after_the_handler_ran_is_not_a_rerun() {
    let s = serve(IdempotencyLayer::new(MemoryStore::new()).global_scope()).await;
    let send = |path: &'static str| {
        s.http
            .post(format!("{}{path}", s.base))
            .header("idempotency-key", format!("k-{path}"))
            .send()
    };

    // Unknown length: recorded as done, the retry is not run.
    let _ = send("/charge-stream").await.map(|r| r.status());
    let retry = send("/charge-stream").await.unwrap();
    assert_eq!(retry.status(), 410);
    assert_eq!(s.runs(), 1);

    // Known length: the same.
    let first = send("/charge").await.unwrap();
    assert_eq!(first.status(), 500, "the layer's response-failed problem");
    let retry = send("/charge").await.unwrap();
    assert_eq!(
        s.runs(),
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
    let s = serve(IdempotencyLayer::new(MemoryStore::new()).global_scope()).await;
    let send = |body: &'static str| {
        s.http
            .post(format!("{}/streamed", s.base))
            .header("idempotency-key", "w")
            .body(body)
            .send()
    };
    assert_eq!(send("a").await.unwrap().status(), 201);
    assert_eq!(send("a").await.unwrap().status(), 410);
    assert_eq!(send("b").await.unwrap().status(), 422);
    assert_eq!(s.runs(), 1);
    // And a retry in flight does not wait for nothing: the stream is recorded at once.
    tokio::time::timeout(Duration::from_secs(5), send("a"))
        .await
        .expect("answered at once")
        .unwrap();
}

/// Issue 11: "the layer refuses such a request (401 or 400 problem+json)
/// unless it was explicitly configured with a global scope." A layer built
/// the plain way — `IdempotencyLayer::new(store)`, no `scope`, no
/// `global_scope()` — cannot tell ann from bob, so it refuses: bob never gets
/// ann's stored response.
#[tokio::test]
async fn without_an_explicit_global_scope_one_client_never_gets_anothers_response() {
    let s = serve(IdempotencyLayer::new(MemoryStore::new())).await;
    let as_user = |token: &'static str| s.echo_as(token, "order-1", "same");
    let ann = as_user("Bearer ann-secret").await;
    assert_eq!(ann.status(), 401, "refused, not run in a shared scope");
    let bob = as_user("Bearer bob-secret").await;
    let replayed = bob.headers().contains_key("idempotent-replayed");
    let status = bob.status();
    let text = bob.text().await.unwrap();
    assert!(
        !replayed && status == 401 && text.contains("scope-unknown"),
        "bob got ann's stored response ({status}, replayed: {replayed}): {text}"
    );
    assert_eq!(s.runs(), 0);
}
