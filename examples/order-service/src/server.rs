//! The order service over HTTP: axum routes behind idem's `IdempotencyLayer`.
//!
//! | route | what it does |
//! |---|---|
//! | `POST /orders` | `{"user_id": "...", "product_id": "...", "quantity": n}` → 201 with the order |
//! | `GET /orders/{id}` | 200 with the order, or 404 |
//! | `POST /payments` | `{"order_id": n, "amount_cents": n, "card": "..."}` → 201 charged, 402 declined, 500 provider error |
//! | `POST /checkout` | reserve, charge, ship and email, one step each (see `checkout`) |
//! | `GET /healthz` | 200 `ok` |
//! | `GET /metrics` | idem's metrics in the Prometheus text format (see `metrics`) |
//!
//! Both `POST` routes require an `Idempotency-Key` header; keys are scoped by the
//! user the `Authorization` bearer token speaks for (see `subject`), so one user
//! can never replay another's response, and a request with no token gets 401. `POST /orders` is
//! protected twice: by the client's key at the HTTP layer, and by
//! `create_order`'s own key on the order's business fields, written in the same
//! transaction as the order.
//!
//! Every error is `application/problem+json` (RFC 9457), including unknown
//! routes (404), wrong methods (405), bodies that are not JSON (400) or break a
//! rule (422), and the service's own 503s, which carry `Retry-After`. Problem
//! details never quote what the client sent.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use idem_runtime::http::IdempotencyLayer;
use idem_runtime::{MemoryStore, PostgresStore, Reaper, RedisStore, SqliteStore, Store};

use crate::payments::PaymentError;
use crate::request::{self, Refusal};
use crate::{Db, OrderError, OrderService};

mod serve;
pub use serve::{start_with, Running, Settings};

/// How many expired records a reaper purges at a time.
const REAP_BATCH: usize = 1_000;

/// Where the HTTP layer keeps its records, from `--key-store`: `memory`,
/// `sqlite` (the `--db` file when that is SQLite, else `sqlite://idem-keys.db`),
/// an `sqlite://` path, a `postgres://` URL or a `redis://` URL. `None` uses
/// the orders' own database.
pub async fn key_store(spec: Option<&str>, db: &Db) -> Result<Arc<dyn Store>, idem_runtime::Error> {
    Ok(match spec {
        None => db.store(),
        Some("memory") => MemoryStore::new().handle(),
        Some("sqlite") => match db {
            Db::Sqlite(s) => s.handle(),
            Db::Postgres(_) => SqliteStore::connect("sqlite://idem-keys.db").await?.handle(),
        },
        Some(url) if url.starts_with("sqlite:") => SqliteStore::connect(url).await?.handle(),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            PostgresStore::connect(url).await?.handle()
        }
        Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
            RedisStore::connect(url).await?.handle()
        }
        Some(other) => {
            return Err(idem_runtime::Error::store(format!(
                "unknown key store `{other}`: use memory, sqlite, sqlite://FILE, postgres://… or redis://…"
            )))
        }
    })
}

/// Whose keys these are: the subject the `Authorization` bearer token speaks
/// for. A real service verifies the token here and returns its subject (a
/// JWT's `sub`), never the token itself, so a token refreshed between two
/// retries keeps its scope. This demo's stand-in for that: the token names its
/// user, `Bearer ann`, or `Bearer ann.<anything>` for another token of the same
/// user. The scheme is case-insensitive, as HTTP says (`bearer ann` and
/// `BEARER ann` are ann too). No token, no subject: the layer answers 401.
pub fn subject(parts: &axum::http::request::Parts) -> Option<String> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let user = token.trim().split('.').next().unwrap_or_default();
    (!user.is_empty()).then(|| user.to_owned())
}

fn routes() -> Router<OrderService> {
    Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(get_order))
        .route("/payments", post(pay))
        .route("/checkout", post(checkout))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(crate::metrics::serve))
        .fallback(|| async { problem(StatusCode::NOT_FOUND, "not-found", "no such route") })
        .method_not_allowed_fallback(|| async {
            problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "this route does not take that method",
            )
        })
}

/// The service's routes, with `Idempotency-Key` required on both `POST` routes
/// and records kept in `keys`.
pub fn router(service: OrderService, keys: Arc<dyn Store>) -> Router {
    routes()
        .layer(
            IdempotencyLayer::with_store(keys)
                .require_key(true)
                .scope(subject),
        )
        .with_state(service)
}

/// The same routes without the HTTP layer (`create_order` keeps its own
/// business-key protection): the floor the layer's cost is measured against.
pub fn router_without_layer(service: OrderService) -> Router {
    routes().with_state(service)
}

/// An `application/problem+json` response (RFC 9457).
pub fn problem(status: StatusCode, kind: &str, detail: impl std::fmt::Display) -> Response {
    let body = serde_json::json!({
        "type": format!("urn:order-service:{kind}"),
        "title": status.canonical_reason().unwrap_or(""),
        "status": status.as_u16(),
        "detail": detail.to_string(),
    });
    let mut response = (status, Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// 503 with `Retry-After`: the database (or the key store) cannot be reached.
fn unavailable(what: &str) -> Response {
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "store-unavailable",
        format!("the database is unavailable; {what}"),
    )
}

/// A database error: unreachable (pool, I/O, TLS) is 503 and worth a retry;
/// an error the database reported about the statement is 500, since a retry
/// would meet it again. Neither quotes the database.
fn database(e: &sqlx::Error, what: &str) -> Response {
    match e {
        sqlx::Error::Database(_) | sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            tracing::error!(error = %e, "database error");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the database refused the request; {what}"),
            )
        }
        _ => unavailable(what),
    }
}

fn refused(r: Refusal) -> Response {
    problem(r.status, r.kind, r.detail)
}

async fn create_order(State(service): State<OrderService>, body: Bytes) -> Response {
    use idem_runtime::Error as Idem;
    let req = match request::order(&body) {
        Ok(req) => req,
        Err(r) => return refused(r),
    };
    match service.create_order(req).await {
        Ok(order) => (StatusCode::CREATED, Json(order)).into_response(),
        Err(e @ OrderError::Invalid(_)) => {
            problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid-field", e)
        }
        Err(e @ OrderError::UnknownProduct { .. }) => {
            problem(StatusCode::NOT_FOUND, "product-not-found", e)
        }
        // Not stored by the layer (409): a retry after a restock may succeed.
        Err(e @ OrderError::OutOfStock { .. }) => problem(StatusCode::CONFLICT, "out-of-stock", e),
        Err(OrderError::Idempotency(e @ Idem::KeyReused)) => {
            problem(StatusCode::UNPROCESSABLE_ENTITY, "order-key-reused", e)
        }
        Err(OrderError::Idempotency(e @ Idem::InProgress { .. })) => {
            problem(StatusCode::CONFLICT, "order-in-progress", e)
        }
        Err(OrderError::Idempotency(Idem::Store(_))) => unavailable("the order was not created"),
        Err(OrderError::Database(e)) => database(&e, "the order was not created"),
        Err(OrderError::Idempotency(_)) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the order could not be created",
        ),
    }
}

async fn get_order(
    State(service): State<OrderService>,
    id: Result<Path<i64>, PathRejection>,
) -> Response {
    let Ok(Path(id)) = id else {
        return problem(
            StatusCode::NOT_FOUND,
            "order-not-found",
            "order ids are whole numbers",
        );
    };
    match service.order(id).await {
        Ok(Some(order)) => Json(order).into_response(),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "order-not-found",
            format!("order {id} does not exist"),
        ),
        Err(e) => database(&e, "the order could not be read"),
    }
}

async fn pay(State(service): State<OrderService>, body: Bytes) -> Response {
    let req = match request::payment(&body) {
        Ok(req) => req,
        Err(r) => return refused(r),
    };
    // The provider gets a key derived from this request's idempotency key: the
    // same for every attempt, so a rerun after a crash cannot charge twice.
    let Some(attempt) = idem_runtime::current() else {
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no-idempotency-key",
            "payments must run under the idempotency layer",
        );
    };
    let provider_key = attempt.derive_key("card-provider");
    match service.pay(&req, &provider_key).await {
        Ok(charge) => (StatusCode::CREATED, Json(charge)).into_response(),
        Err(e @ PaymentError::Declined) => {
            problem(StatusCode::PAYMENT_REQUIRED, "card-declined", e)
        }
        // 500: the layer releases the key, so the client's retry runs again.
        Err(e @ PaymentError::ProcessingError) => {
            problem(StatusCode::INTERNAL_SERVER_ERROR, "processing-error", e)
        }
        Err(e @ PaymentError::OrderNotFound(_)) => {
            problem(StatusCode::NOT_FOUND, "order-not-found", e)
        }
        Err(e @ PaymentError::InvalidAmount) => {
            problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid-field", e)
        }
        Err(PaymentError::Database(e)) => database(&e, "the card was not charged"),
    }
}

/// The request header the demo alone sends to make a checkout stop after a
/// step, as a crash there would (`charge`, say).
pub const CRASH_AFTER: &str = "x-demo-crash-after";

async fn checkout(
    State(service): State<OrderService>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    use crate::checkout::CheckoutError as E;
    use idem_runtime::Error as Idem;
    let req = match request::checkout(&body) {
        Ok(req) => req,
        Err(r) => return refused(r),
    };
    let stop_after = headers.get(CRASH_AFTER).and_then(|v| v.to_str().ok());
    match service.checkout(req, stop_after).await {
        Ok(receipt) => (StatusCode::CREATED, Json(receipt)).into_response(),
        // 5xx: not stored, the key released with its steps kept: the client's
        // retry resumes after the last step that finished.
        Err(e @ E::Injected(_)) => {
            problem(StatusCode::SERVICE_UNAVAILABLE, "checkout-interrupted", e)
        }
        Err(E::Order(e @ OrderError::Invalid(_))) => {
            problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid-field", e)
        }
        Err(E::Order(e @ OrderError::UnknownProduct { .. })) => {
            problem(StatusCode::NOT_FOUND, "product-not-found", e)
        }
        Err(E::Order(e @ OrderError::OutOfStock { .. })) => {
            problem(StatusCode::CONFLICT, "out-of-stock", e)
        }
        Err(E::Payment(e @ PaymentError::Declined)) => {
            problem(StatusCode::PAYMENT_REQUIRED, "card-declined", e)
        }
        Err(E::Payment(e @ PaymentError::ProcessingError)) => {
            problem(StatusCode::INTERNAL_SERVER_ERROR, "processing-error", e)
        }
        Err(E::Order(OrderError::Idempotency(Idem::Store(_))) | E::Idempotency(Idem::Store(_))) => {
            unavailable("the checkout did not finish")
        }
        Err(
            E::Database(e)
            | E::Order(OrderError::Database(e))
            | E::Payment(PaymentError::Database(e)),
        ) => database(&e, "the checkout did not finish"),
        Err(e) => {
            tracing::error!(error = %e, "checkout failed");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the checkout did not finish",
            )
        }
    }
}

/// Starts the service on `addr` (`127.0.0.1:0` picks a free port) with the
/// default [`Settings`].
pub async fn start(
    addr: &str,
    service: OrderService,
    keys: Arc<dyn Store>,
) -> std::io::Result<Running> {
    start_service(addr, service, keys, Settings::default()).await
}

/// Starts the service on `addr` within `settings`, purging expired records
/// from `keys` and from the orders' database every `settings.reap_every`
/// while it runs.
pub async fn start_service(
    addr: &str,
    service: OrderService,
    keys: Arc<dyn Store>,
    settings: Settings,
) -> std::io::Result<Running> {
    let orders = service.db().store();
    crate::metrics::install();
    let running = start_with(addr, router(service, Arc::clone(&keys)), settings).await?;
    let reaper = |store| Reaper::spawn(store, settings.reap_every, REAP_BATCH);
    Ok(running
        .with_reaper(reaper(keys))
        .with_reaper(reaper(orders)))
}

/// Starts any router on `addr` with the default [`Settings`], with graceful
/// shutdown through [`Running::stop`].
pub async fn start_router(addr: &str, app: Router) -> std::io::Result<Running> {
    start_with(addr, app, Settings::default()).await
}
