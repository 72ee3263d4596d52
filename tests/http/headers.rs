//! Stored-response header hygiene (CONTRACT §6.1): what a record keeps of a
//! response's headers, on a SQLite file store. The first client gets every
//! header; a replay gets what was stored.

use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use idem_runtime::key::KeyBuilder;
use idem_runtime::{SqliteStore, Store};
use idem_tests::unique;

use crate::app::{replayed, scoped, serve, Server};

async fn sqlite() -> SqliteStore {
    let path = std::env::temp_dir().join(format!("{}.db", unique("http_headers")));
    SqliteStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap()
}

/// The record ann's `key` is stored under, as JSON.
async fn record(store: &SqliteStore, key: &str) -> serde_json::Value {
    let key = KeyBuilder::new("idem::http")
        .part(&("scope", Some("Bearer ann")))
        .part(key)
        .finish()
        .unwrap();
    let record = store.get(key.as_str()).await.unwrap().expect("a record");
    serde_json::from_slice(&record.outcome.expect("completed")).unwrap()
}

/// The stored header names, in order.
fn stored_names(record: &serde_json::Value) -> Vec<String> {
    record["ok"]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| pair[0].as_str().unwrap().to_owned())
        .collect()
}

async fn twice(s: &Server, key: &str) -> (HeaderMap, reqwest::Response) {
    let first = s.post("/session", Some(key), "").await;
    assert_eq!(first.status(), 201);
    assert!(!replayed(&first));
    let headers = first.headers().clone();
    assert_eq!(first.text().await.unwrap(), "session 1");
    let second = s.post("/session", Some(key), "").await;
    assert_eq!(second.status(), 201);
    assert!(replayed(&second));
    (headers, second)
}

fn all(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn set_cookie_and_authentication_info_reach_the_first_client_only() {
    let store = sqlite().await;
    let s = serve(scoped(store.clone())).await;
    let (first, second) = twice(&s, "k").await;
    assert_eq!(
        all(&first, "set-cookie"),
        ["sid=secret-1; HttpOnly", "theme=dark"]
    );
    assert_eq!(first["authentication-info"], "nextnonce=\"n1\"");

    let replay = second.headers().clone();
    assert!(replay.get("set-cookie").is_none());
    assert!(replay.get("authentication-info").is_none());
    // Everything else replays exactly.
    for name in [
        "x-run",
        "etag",
        "location",
        "x-internal-host",
        "content-type",
    ] {
        assert_eq!(all(&replay, name), all(&first, name), "{name}");
    }
    assert_eq!(second.text().await.unwrap(), "session 1");
    assert_eq!(s.runs(), 1);

    let record = record(&store, "k").await;
    let names = stored_names(&record);
    assert!(!names.iter().any(|n| n == "set-cookie"), "{record}");
    assert!(
        !names.iter().any(|n| n == "authentication-info"),
        "{record}"
    );
    assert!(!record.to_string().contains("secret-1"), "{record}");
    for name in [
        "x-run",
        "etag",
        "location",
        "x-internal-host",
        "content-type",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} in {record}");
    }
}

#[tokio::test]
async fn more_headers_can_be_dropped_and_set_cookie_kept_on_purpose() {
    let store = sqlite().await;
    let layer = scoped(store.clone())
        .drop_stored_header(HeaderName::from_static("x-internal-host"))
        .keep_stored_header(header::SET_COOKIE);
    let s = serve(layer).await;
    let (first, second) = twice(&s, "k").await;
    assert_eq!(first["x-internal-host"], "db-7.internal");
    let replay = second.headers();
    assert!(replay.get("x-internal-host").is_none());
    assert_eq!(
        all(replay, "set-cookie"),
        ["sid=secret-1; HttpOnly", "theme=dark"]
    );
    // Still a default: not kept.
    assert!(replay.get("authentication-info").is_none());
    let names = stored_names(&record(&store, "k").await);
    assert!(!names.iter().any(|n| n == "x-internal-host"));
    assert_eq!(names.iter().filter(|n| *n == "set-cookie").count(), 2);
}

#[tokio::test]
async fn a_rewrite_edits_the_stored_copy_and_not_the_live_response() {
    let store = sqlite().await;
    let layer = scoped(store.clone()).rewrite_stored_headers(|headers| {
        assert!(
            headers.get("set-cookie").is_none(),
            "dropped before the hook"
        );
        headers.insert("etag", HeaderValue::from_static("W/\"v1\""));
        headers.remove("x-internal-host");
        headers.insert("x-served-from", HeaderValue::from_static("replay"));
        // Hop-by-hop headers are never stored, even from the hook.
        headers.insert("connection", HeaderValue::from_static("close"));
    });
    let s = serve(layer).await;
    let (first, second) = twice(&s, "k").await;
    assert_eq!(first["etag"], "\"v1\"");
    assert_eq!(first["x-internal-host"], "db-7.internal");
    assert!(first.get("x-served-from").is_none());
    assert_eq!(all(&first, "set-cookie").len(), 2);

    let replay = second.headers();
    assert_eq!(replay["etag"], "W/\"v1\"");
    assert_eq!(replay["x-served-from"], "replay");
    assert!(replay.get("x-internal-host").is_none());
    assert!(replay.get("set-cookie").is_none());
    assert_eq!(replay["x-run"], first["x-run"]);

    let record = record(&store, "k").await;
    let names = stored_names(&record);
    assert!(!names.iter().any(|n| n == "connection"), "{record}");
    assert!(names.iter().any(|n| n == "x-served-from"), "{record}");
    assert_eq!(s.runs(), 1);
}

/// A rewrite hook that panics runs after the handler did its work: the key
/// must not be released (a retry would run the handler a second time), and
/// nothing unrewritten may be stored either. The request is recorded as done
/// without a replayable response.
#[tokio::test]
async fn a_rewrite_hook_that_panics_never_lets_the_handler_run_twice() {
    let store = sqlite().await;
    let layer = scoped(store.clone()).rewrite_stored_headers(|_headers| {
        panic!("a bug in the redaction hook");
    });
    let s = serve(layer).await;
    // The first client gets the handler's response, after the request was
    // recorded as done.
    let first = s.post("/session", Some("k"), "").await;
    assert!(first.status().is_success(), "{}", first.status());
    assert_eq!(s.runs(), 1);
    let retry = s.post("/session", Some("k"), "").await;
    assert_eq!(s.runs(), 1, "the retry ran the handler again");
    assert_eq!(retry.status(), 410);
    assert!(replayed(&retry));
    // Nothing of the unrewritten response reached the record.
    let record = record(&store, "k").await;
    assert!(!record.to_string().contains("secret-1"), "{record}");
}

/// A `store_status` predicate that panics is asked after the handler ran: the
/// claim must not be dropped with the unwinding (a retry would run the handler
/// again). It counts as "store": the retry replays.
#[tokio::test]
async fn a_store_status_predicate_that_panics_never_lets_the_handler_run_twice() {
    let store = sqlite().await;
    let layer = scoped(store.clone()).store_status(|_| panic!("a bug in the predicate"));
    let s = serve(layer).await;
    let first = s.post("/session", Some("p"), "").await;
    assert!(first.status().is_success(), "{}", first.status());
    let retry = s.post("/session", Some("p"), "").await;
    assert_eq!(s.runs(), 1, "the retry ran the handler again");
    assert_eq!(retry.status(), first.status());
    assert!(replayed(&retry));
}
