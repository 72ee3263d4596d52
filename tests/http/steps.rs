//! Steps inside a handler behind the layer: a response that is not stored (a
//! 503: the key is released) keeps the handler's recorded steps, and the
//! client's retry with the same key resumes after them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use idem_runtime::http::IdempotencyLayer;
use idem_runtime::{current, step, MemoryStore};

#[derive(Default)]
struct Shop {
    charges: AtomicUsize,
    shipments: AtomicUsize,
    /// The shipping service is down for this many more calls.
    down: AtomicUsize,
}

#[derive(Debug)]
enum Failed {
    Idem(idem_runtime::Error),
    ShippingDown,
}

impl From<idem_runtime::Error> for Failed {
    fn from(e: idem_runtime::Error) -> Self {
        Failed::Idem(e)
    }
}

async fn checkout(State(shop): State<Arc<Shop>>) -> Response {
    let resumed = current().is_some_and(|a| a.took_over());
    let done = async {
        let charge = step("charge", async {
            Ok::<_, Failed>(shop.charges.fetch_add(1, Ordering::SeqCst) + 1)
        })
        .await?;
        let shipment = step("ship", async {
            if shop
                .down
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(Failed::ShippingDown);
            }
            Ok(shop.shipments.fetch_add(1, Ordering::SeqCst) + 1)
        })
        .await?;
        Ok::<_, Failed>(format!(
            "charge {charge}, shipment {shipment}, resumed {resumed}"
        ))
    };
    match done.await {
        Ok(receipt) => (StatusCode::CREATED, receipt).into_response(),
        Err(Failed::ShippingDown) => (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response(),
        Err(Failed::Idem(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The shop behind `layer` on a free port, its shipping down for one call.
async fn serve(layer: IdempotencyLayer) -> (Arc<Shop>, String) {
    let shop = Arc::new(Shop::default());
    shop.down.store(1, Ordering::SeqCst);
    let router = Router::new()
        .route("/checkout", post(checkout))
        .layer(layer)
        .with_state(Arc::clone(&shop));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/checkout", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (shop, url)
}

#[tokio::test]
async fn a_retried_request_resumes_after_the_steps_its_first_attempt_recorded() {
    let (shop, url) = serve(IdempotencyLayer::new(MemoryStore::new()).global_scope()).await;
    let http = reqwest::Client::new();
    let send = || {
        http.post(&url)
            .header("idempotency-key", "order-1")
            .body("cart")
            .send()
    };

    let first = send().await.unwrap();
    assert_eq!(
        first.status(),
        503,
        "shipping was down: not stored, key released"
    );
    let second = send().await.unwrap();
    assert_eq!(second.status(), 201);
    assert_eq!(
        second.text().await.unwrap(),
        "charge 1, shipment 1, resumed true"
    );
    let third = send().await.unwrap();
    assert_eq!(third.headers()["idempotent-replayed"], "true");
    assert_eq!(
        third.text().await.unwrap(),
        "charge 1, shipment 1, resumed true"
    );
    assert_eq!(shop.charges.load(Ordering::SeqCst), 1, "charged once");
    assert_eq!(shop.shipments.load(Ordering::SeqCst), 1);
}

/// `on_takeover(OnTakeover::Fail)`: a request that continues one with its key
/// that did not finish gets 409 `takeover-refused`, on every retry, and the
/// handler does not run again.
#[tokio::test]
async fn with_on_takeover_fail_a_retry_of_an_unfinished_request_is_refused() {
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .global_scope()
        .on_takeover(idem_runtime::OnTakeover::Fail);
    let (shop, url) = serve(layer).await;
    let http = reqwest::Client::new();
    let send = || {
        http.post(&url)
            .header("idempotency-key", "order-2")
            .body("cart")
            .send()
    };
    assert_eq!(send().await.unwrap().status(), 503);
    for _ in 0..2 {
        let refused = send().await.unwrap();
        assert_eq!(refused.status(), 409);
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["type"], "urn:idem:problem:takeover-refused");
    }
    assert_eq!(shop.charges.load(Ordering::SeqCst), 1, "charged once");
    assert_eq!(shop.shipments.load(Ordering::SeqCst), 0, "not run again");
}
