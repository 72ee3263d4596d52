//! The order service over HTTP: axum routes behind idem's `IdempotencyLayer`.
//!
//! | route | what it does |
//! |---|---|
//! | `POST /orders` | `{"user_id","product_id","quantity"}` → 201 with the order |
//! | `GET /orders/{id}` | 200 with the order, or 404 |
//! | `POST /payments` | `{"order_id","amount_cents","card"}` → 201 charged, 402 declined, 500 provider error |
//! | `GET /healthz` | 200 `ok` |
//!
//! Both `POST` routes require an `Idempotency-Key` header; keys are scoped by the
//! user the `Authorization` bearer token speaks for (see `subject`), so one user
//! can never replay another's response, and a request with no token gets 401. `POST /orders` is
//! protected twice: by the client's key at the HTTP layer, and by
//! `create_order`'s own key on the order's business fields, written in the same
//! transaction as the order.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use idem_runtime::http::IdempotencyLayer;
use idem_runtime::{MemoryStore, PostgresStore, RedisStore, SqliteStore, Store};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::payments::{PaymentError, PaymentRequest};
use crate::{CreateOrderRequest, Db, OrderError, OrderService};

/// Where the HTTP layer keeps its records, from `--key-store`: `memory`,
/// `sqlite` (the `--db` file when that is SQLite, else `sqlite://idem-keys.db`),
/// an `sqlite://` path, a `postgres://` URL or a `redis://` URL. `None` uses
/// the orders' own database.
pub async fn key_store(spec: Option<&str>, db: &Db) -> Result<Arc<dyn Store>, idem_runtime::Error> {
    let same_db = || match db {
        Db::Sqlite(s) => s.handle(),
        Db::Postgres(s) => s.handle(),
    };
    Ok(match spec {
        None => same_db(),
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
/// user. No token, no subject: the layer answers 401.
fn subject(parts: &axum::http::request::Parts) -> Option<String> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    let user = token.split('.').next().unwrap_or_default();
    (!user.is_empty()).then(|| user.to_owned())
}

fn routes() -> Router<OrderService> {
    Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(get_order))
        .route("/payments", post(pay))
        .route("/healthz", get(|| async { "ok" }))
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
fn problem(status: StatusCode, kind: &str, detail: impl std::fmt::Display) -> Response {
    let body = serde_json::json!({
        "type": format!("urn:order-service:{kind}"),
        "title": status.canonical_reason().unwrap_or(""),
        "status": status.as_u16(),
        "detail": detail.to_string(),
    });
    let mut response = (status, Json(body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

async fn create_order(
    State(service): State<OrderService>,
    Json(req): Json<CreateOrderRequest>,
) -> Response {
    use idem_runtime::Error as Idem;
    match service.create_order(req).await {
        Ok(order) => (StatusCode::CREATED, Json(order)).into_response(),
        Err(OrderError::InvalidQuantity) => problem(
            StatusCode::BAD_REQUEST,
            "invalid-quantity",
            OrderError::InvalidQuantity,
        ),
        // Not stored by the layer (409): a retry after a restock may succeed.
        Err(e @ OrderError::OutOfStock { .. }) => problem(StatusCode::CONFLICT, "out-of-stock", e),
        Err(OrderError::Idempotency(e @ Idem::KeyReused)) => {
            problem(StatusCode::UNPROCESSABLE_ENTITY, "order-key-reused", e)
        }
        Err(OrderError::Idempotency(e @ Idem::InProgress { .. })) => {
            problem(StatusCode::CONFLICT, "order-in-progress", e)
        }
        Err(OrderError::Idempotency(e @ Idem::Store(_))) => {
            problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", e)
        }
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, "internal", e),
    }
}

async fn get_order(State(service): State<OrderService>, Path(id): Path<i64>) -> Response {
    match service.order(id).await {
        Ok(Some(order)) => Json(order).into_response(),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "order-not-found",
            format!("order {id} does not exist"),
        ),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, "internal", e),
    }
}

async fn pay(State(service): State<OrderService>, Json(req): Json<PaymentRequest>) -> Response {
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
            problem(StatusCode::BAD_REQUEST, "invalid-amount", e)
        }
        Err(e @ PaymentError::Database(_)) => {
            problem(StatusCode::INTERNAL_SERVER_ERROR, "internal", e)
        }
    }
}

/// A server running in this process.
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting connections, lets requests in flight finish, and waits.
    pub async fn stop(self) -> std::io::Result<()> {
        let _ = self.shutdown.send(());
        self.task.await.map_err(std::io::Error::other)?
    }
}

/// Starts the service on `addr` (`127.0.0.1:0` picks a free port).
pub async fn start(
    addr: &str,
    service: OrderService,
    keys: Arc<dyn Store>,
) -> std::io::Result<Running> {
    start_router(addr, router(service, keys)).await
}

/// Starts any router on `addr`, with graceful shutdown through [`Running::stop`].
pub async fn start_router(addr: &str, app: Router) -> std::io::Result<Running> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (shutdown, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    Ok(Running {
        addr,
        shutdown,
        task,
    })
}
