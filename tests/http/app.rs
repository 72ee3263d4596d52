//! The app every HTTP test serves: handlers that count their runs, behind the
//! layer under test, on a real socket; and what the tests read off answers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use idem_runtime::http::IdempotencyLayer;
use idem_runtime::Store;
use reqwest::Method;
use tokio::sync::{Notify, Semaphore};

/// What the handlers did.
pub struct App {
    pub runs: AtomicUsize,
    /// `/slow` waits for a permit before it answers.
    pub gate: Semaphore,
    /// `/slow` signals here once it has started.
    pub started: Notify,
}

async fn echo(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let mut headers = HeaderMap::new();
    headers.insert("x-run", n.into());
    headers.append("set-cookie", "a=1".parse().unwrap());
    headers.append("set-cookie", "b=2".parse().unwrap());
    (StatusCode::CREATED, headers, body).into_response()
}

/// A response with per-client headers (a session cookie, authentication
/// state) beside ordinary ones.
async fn session(State(app): State<Arc<App>>) -> Response {
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let mut headers = HeaderMap::new();
    headers.insert("x-run", n.into());
    headers.append(
        "set-cookie",
        format!("sid=secret-{n}; HttpOnly").parse().unwrap(),
    );
    headers.append("set-cookie", "theme=dark".parse().unwrap());
    headers.insert("authentication-info", "nextnonce=\"n1\"".parse().unwrap());
    headers.insert("etag", "\"v1\"".parse().unwrap());
    headers.insert("location", "/orders/1".parse().unwrap());
    headers.insert("x-internal-host", "db-7.internal".parse().unwrap());
    (StatusCode::CREATED, headers, format!("session {n}")).into_response()
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

/// A body of known length (exactly 16 bytes, says its size hint) that fails
/// when read — a file read that hits an I/O error, a proxied upstream that
/// resets. (`Limited` over a 32-byte `Full`: the hint is exact, the read errs.)
fn fails_when_read() -> axum::body::Body {
    let body = http_body_util::Limited::new(
        http_body_util::Full::new(axum::body::Bytes::from_static(
            b"receipt receipt receipt receipt!",
        )),
        16,
    );
    assert_eq!(axum::body::HttpBody::size_hint(&body).exact(), Some(16));
    axum::body::Body::new(body)
}

/// Charges a card (the side effect), then answers 201 with a receipt body
/// whose length is known but which fails while it is read.
async fn charge_then_fail(State(app): State<Arc<App>>) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    (StatusCode::CREATED, fails_when_read()).into_response()
}

/// Same side effect, a streamed body (no length) that fails the same way.
async fn charge_then_stream_fail(State(app): State<Arc<App>>) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    let stream = futures::stream::iter([
        Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"receipt part 1; ")),
        Err(std::io::Error::other("disk read failed")),
    ]);
    (StatusCode::CREATED, axum::body::Body::from_stream(stream)).into_response()
}

async fn streamed(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    let stream = futures::stream::iter([Ok::<_, std::io::Error>(body)]);
    (StatusCode::CREATED, axum::body::Body::from_stream(stream)).into_response()
}

/// A served app: its address, its handlers' counters, a client.
pub struct Server {
    pub base: String,
    pub app: Arc<App>,
    pub http: reqwest::Client,
}

/// Serves the app behind `layer` on a free port.
pub async fn serve(layer: IdempotencyLayer) -> Server {
    let app = Arc::new(App {
        runs: AtomicUsize::new(0),
        gate: Semaphore::new(0),
        started: Notify::new(),
    });
    let router = Router::new()
        .route("/echo", post(echo).get(echo).put(echo).patch(echo))
        .route("/status/{code}", post(status))
        .route("/session", post(session))
        .route("/slow/{code}", post(slow))
        .route("/big", post(big))
        .route("/events", post(events))
        .route("/sse", post(sse))
        .route("/attempt", post(attempt))
        .route("/charge", post(charge_then_fail))
        .route("/charge-stream", post(charge_then_stream_fail))
        .route("/streamed", post(streamed))
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

/// A layer over `store` whose scope is the `Authorization` header.
pub fn scoped(store: impl Store + 'static) -> IdempotencyLayer {
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
    /// How many times a handler ran.
    pub fn runs(&self) -> usize {
        self.app.runs.load(Ordering::SeqCst)
    }

    /// A request as ann, with `key` if given.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("authorization", "Bearer ann");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request
    }

    /// POSTs `body` to `/echo` under `key`, as the client `authorization` names.
    pub async fn echo_as(&self, authorization: &str, key: &str, body: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/echo", self.base))
            .header("authorization", authorization)
            .header("idempotency-key", key)
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    /// Sends a POST as ann.
    pub async fn post(&self, path: &str, key: Option<&str>, body: &str) -> reqwest::Response {
        self.request(Method::POST, path, key)
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }
}

/// Whether the layer marked the response a replay.
pub fn replayed(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

/// Checks a problem+json answer and returns its `type`.
pub async fn problem(response: reqwest::Response, status: u16) -> String {
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

/// Checks the 410 a retry gets for a response recorded without its body (too
/// large to store, or streamed): the handler is not run again.
pub async fn not_stored(response: reqwest::Response) {
    assert_eq!(
        problem(response, 410).await,
        "urn:idem:problem:response-not-stored"
    );
}
