//! `Protocol::Auto` (the default) on a plain HTTP app: a request's
//! `Content-Type` chooses the shape of the layer's own answers, but must not
//! take exactly-once away from a handler that is not a gRPC service.

use idem_runtime::SqliteStore;
use idem_tests::unique;

use crate::app::{replayed, scoped, serve};

async fn sqlite() -> SqliteStore {
    let path = std::env::temp_dir().join(format!("{}.db", unique("http_protocol")));
    SqliteStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap()
}

/// A client that labels its body `application/grpc` (by mistake, or a
/// generic client library's default) on a plain HTTP route whose handler
/// does not look at the type: the handler's 201 has no `grpc-status`, and
/// must still be stored, so the retry replays it instead of running again.
#[tokio::test]
async fn a_grpc_content_type_on_a_plain_http_handler_still_runs_once() {
    let s = serve(scoped(sqlite().await)).await;
    for content_type in ["application/grpc", "application/grpc+json"] {
        let key = format!("k-{content_type}");
        let send = || {
            s.request(reqwest::Method::POST, "/echo", Some(&key))
                .header("content-type", content_type)
                .body("charge 5 EUR")
                .send()
        };
        let before = s.runs();
        let first = send().await.unwrap();
        assert_eq!(first.status(), 201);
        assert!(!replayed(&first));
        assert_eq!(first.text().await.unwrap(), "charge 5 EUR");
        let second = send().await.unwrap();
        assert_eq!(second.status(), 201, "{content_type}");
        assert!(replayed(&second), "{content_type}: not replayed");
        assert_eq!(second.text().await.unwrap(), "charge 5 EUR");
        assert_eq!(
            s.runs(),
            before + 1,
            "{content_type}: the handler ran twice"
        );
    }
}
