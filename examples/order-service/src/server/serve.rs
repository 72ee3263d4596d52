//! Serving a router as a service people run would: request headers must
//! arrive within a limit (which also closes idle keep-alive connections),
//! bodies within another and up to a size, answers must be read within a
//! third, connections are capped, and shutdown lets the requests in flight
//! finish.

use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use idem_runtime::Reaper;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::problem;

/// What one server accepts, and how often it purges expired records.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How long a client may take to send a request's headers, and how long
    /// an idle keep-alive connection stays open.
    pub header_read: Duration,
    /// How long a client may take to send a request's body (408 after it).
    pub body_read: Duration,
    /// How long a write of the answer may wait for the client to read (the
    /// connection is closed after it): a client that sends and never reads
    /// does not keep its connection, and its place under the cap, forever.
    pub write_stall: Duration,
    /// The largest request body (413 above it, before it is read when the
    /// length is declared).
    pub max_body: usize,
    /// How many connections are served at once; more wait to be accepted.
    pub max_connections: usize,
    /// How often [`start`](super::start) purges expired records (1,000 at a time).
    pub reap_every: Duration,
}

impl Default for Settings {
    /// Headers in 10 s, bodies of up to 1 MiB in 10 s, answers read within
    /// 10 s, 1,024 connections;
    /// expired records purged every minute.
    fn default() -> Self {
        Settings {
            header_read: Duration::from_secs(10),
            body_read: Duration::from_secs(10),
            write_stall: Duration::from_secs(10),
            max_body: 1 << 20,
            max_connections: 1_024,
            reap_every: Duration::from_secs(60),
        }
    }
}

/// A server running in this process.
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
    reapers: Vec<Reaper>,
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

    /// Purges expired records in `reaper`'s store until the server stops.
    pub fn with_reaper(mut self, reaper: Reaper) -> Self {
        self.reapers.push(reaper);
        self
    }

    /// Stops accepting connections, lets requests in flight finish, closes
    /// idle connections, stops the reapers, and waits.
    pub async fn stop(self) -> std::io::Result<()> {
        let _ = self.stop.send(true);
        let served = self.task.await.map_err(std::io::Error::other)?;
        for reaper in self.reapers {
            if let Err(e) = reaper.shutdown().await {
                tracing::warn!(error = %e, "the record reaper failed");
            }
        }
        served
    }
}

/// Starts `app` on `addr` (`127.0.0.1:0` picks a free port) within `settings`.
pub async fn start_with(addr: &str, app: Router, settings: Settings) -> std::io::Result<Running> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let app = app.layer(axum::middleware::from_fn_with_state(settings, read_body));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(accept(listener, app, settings, stopped));
    Ok(Running {
        addr,
        stop,
        task,
        reapers: Vec::new(),
    })
}

async fn accept(
    listener: TcpListener,
    app: Router,
    settings: Settings,
    mut stopped: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit.map_err(std::io::Error::other)?,
            () = stop_requested(&mut stopped) => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: wait, then go on.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop_requested(&mut stopped) => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let mut stopped = stopped.clone();
        connections.spawn(async move {
            let _permit = permit;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(settings.header_read)
                .serve_connection(
                    TokioIo::new(WriteDeadline::new(stream, settings.write_stall)),
                    service,
                )
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop_requested(&mut stopped) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// How much of a refused body is read and discarded, so that a client still
/// sending it reads the 413 rather than a broken connection (as the
/// idempotency layer does): `max(4 × limit, 8 MiB)`.
fn drain_cap(settings: &Settings) -> u64 {
    (settings.max_body as u64).saturating_mul(4).max(8 << 20)
}

/// Reads the whole body within the limits before the routes (and the
/// idempotency layer) see the request. A body over the limit gets 413: at
/// once when its declared length is beyond what is worth draining or the
/// client waits for `100 Continue`; otherwise after reading and discarding the
/// rest. A body that does not arrive within `body_read` gets 408. Both close
/// the connection.
async fn read_body(State(settings): State<Settings>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let expects_continue = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let limit = settings.max_body as u64;
    let too_large = || {
        closing(problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            format!("request bodies are limited to {} bytes", settings.max_body),
        ))
    };
    if declared.is_some_and(|n| n > limit && (expects_continue || n > drain_cap(&settings))) {
        return too_large();
    }
    match tokio::time::timeout(settings.body_read, read(body, limit, drain_cap(&settings))).await {
        Ok(Read::Whole(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Read::TooLarge) => too_large(),
        Ok(Read::Failed) => closing(problem(
            StatusCode::BAD_REQUEST,
            "body-unreadable",
            "the request body could not be read",
        )),
        Err(_) => closing(problem(
            StatusCode::REQUEST_TIMEOUT,
            "body-timeout",
            format!(
                "the request body did not arrive within {} s",
                settings.body_read.as_secs_f64()
            ),
        )),
    }
}

/// What reading a request body came to.
enum Read {
    Whole(Bytes),
    /// Over the limit (the rest read and discarded, up to the drain cap).
    TooLarge,
    Failed,
}

async fn read(mut body: Body, limit: u64, drain_cap: u64) -> Read {
    let mut kept = BytesMut::new();
    let mut seen: u64 = 0;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return if seen > limit {
                Read::TooLarge
            } else {
                Read::Failed
            };
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        seen += data.len() as u64;
        if seen > drain_cap {
            return Read::TooLarge;
        }
        if seen <= limit {
            kept.extend_from_slice(&data);
        }
    }
    if seen > limit {
        Read::TooLarge
    } else {
        Read::Whole(kept.freeze())
    }
}

/// Returns once the server is asked to stop (or its handle is gone).
async fn stop_requested(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A connection whose writes must make progress within `limit`: a write that
/// stays blocked that long (the client stopped reading) fails, and the
/// connection is closed.
struct WriteDeadline<T> {
    io: T,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteDeadline<T> {
    fn new(io: T, limit: Duration) -> Self {
        WriteDeadline {
            io,
            limit,
            stalled: None,
        }
    }

    /// After the inner write returned `Pending`: still waiting, or the error
    /// once the wait has lasted `limit`.
    fn wait<R>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<R>> {
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client did not read its answer in time",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed<R>(&mut self, ready: std::io::Result<R>) -> Poll<std::io::Result<R>> {
        self.stalled = None;
        Poll::Ready(ready)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(ready) => this.progressed(ready),
            Poll::Pending => this.wait(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(ready) => this.progressed(ready),
            Poll::Pending => this.wait(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Ready(ready) => this.progressed(ready),
            Poll::Pending => this.wait(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
