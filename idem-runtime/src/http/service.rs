//! [`IdempotencyService`]: claim the key, run the handler once, store its
//! response, replay it to duplicates.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, Request, Response};
use tower_service::Service;
use tracing::Instrument as _;

use super::body::{drain, read_limited, Read};
use super::grpc::{self, Dialect, Framing};
use super::layer::{Config, Scope};
use super::problem::{Problem, Withheld};
use super::{stored, Body, ResponseFuture};
use crate::engine::{claim, Claimed, Held};
use crate::error::BoxError;
use crate::key::{FingerprintBuilder, KeyBuilder};
use crate::{ClientKey, Error};

/// The service [`IdempotencyLayer`](super::IdempotencyLayer) wraps around `S`.
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> IdempotencyService<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        IdempotencyService { inner, config }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S> std::fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("namespace", &self.config.namespace)
            .finish_non_exhaustive()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for IdempotencyService<S>
where
    S: Service<Request<Body<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: http_body::Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<Body<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let config = &self.config;
        if !config.methods.contains(request.method()) {
            return ResponseFuture::passthrough(self.inner.call(request.map(Body::passthrough)));
        }
        let dialect = config.protocol.dialect(request.headers());
        let mut values = request.headers().get_all(&config.header).iter();
        let key = match (values.next(), values.next()) {
            (None, _) if !config.key_required => {
                return ResponseFuture::passthrough(self.inner.call(request.map(Body::passthrough)))
            }
            (None, _) => return ResponseFuture::ready(Problem::KeyMissing.answer(dialect)),
            (Some(_), Some(_)) => {
                return ResponseFuture::ready(Problem::KeyMalformed.response(
                    dialect,
                    &format!("send one {} header, not several", config.header),
                ))
            }
            (Some(value), None) => match parse_key(value) {
                Ok(key) => key,
                Err(detail) => {
                    return ResponseFuture::ready(Problem::KeyMalformed.response(dialect, &detail))
                }
            },
        };
        // The service that was made ready goes with this request; the clone stays.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let span = tracing::debug_span!(
            "idempotency_key",
            method = %request.method(),
            path = request.uri().path(),
            digest = tracing::field::Empty,
        );
        let config = Arc::clone(config);
        ResponseFuture::protected(Box::pin(
            handle(config, inner, request, key, dialect).instrument(span),
        ))
    }
}

/// The request's `Content-Type`, trimmed and lowercased (`""` without one): part
/// of the fingerprint, since the same bytes under another type are another
/// request.
fn content_type(headers: &http::HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

/// The client's key, or why it is malformed.
fn parse_key(value: &http::HeaderValue) -> Result<ClientKey, String> {
    ClientKey::from_header(value.as_bytes()).map_err(|err| match err {
        Error::InvalidKey(why) => why.to_string(),
        other => other.to_string(),
    })
}

/// A refused request body up to this size (or four times the limit) is read and
/// discarded, so the client sees the 413 rather than a broken connection.
const DRAIN_AT_LEAST: u64 = 8 << 20;

/// Handles one protected request: read the body, claim, run or replay, record.
async fn handle<S, ReqB, ResB>(
    config: Arc<Config>,
    mut inner: S,
    request: Request<ReqB>,
    key: ClientKey,
    dialect: Dialect,
) -> Result<Response<Body<ResB>>, S::Error>
where
    S: Service<Request<Body<ReqB>>, Response = Response<ResB>>,
    ReqB: http_body::Body<Data = Bytes>,
    ReqB::Error: Into<BoxError>,
    ResB: http_body::Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();
    let scope = match &config.scope {
        // An empty subject (`unwrap_or_default()` on a header that did not
        // parse) names no one: refused like `None`, never a shared scope.
        Scope::By(scope) => match scope(&parts).filter(|s| !s.is_empty()) {
            Some(scope) => Some(scope),
            None => {
                let problem = Problem::ScopeUnknown;
                return Ok(problem.answer(dialect));
            }
        },
        Scope::Global => None,
        Scope::Unset => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::error!(
                    "an IdempotencyLayer has no scope, so keyed requests are refused with 401: \
                     set .scope(..) to the authenticated subject, or .global_scope() for one key \
                     space shared by every client"
                )
            });
            let problem = Problem::ScopeUnset;
            return Ok(problem.answer(dialect));
        }
    };
    let limit = config.max_request_body;
    let too_large = Problem::RequestTooLarge { limit };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    // Refuse what is too large to drain without reading it at all; and a
    // client that waits for `100 Continue` before uploading is told at once
    // (reading the body is what would invite the upload).
    let drain_cap = (limit as u64).saturating_mul(4).max(DRAIN_AT_LEAST);
    let expects_continue = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let refuse_unread = if expects_continue {
        limit as u64
    } else {
        drain_cap
    };
    if declared.is_some_and(|len| len > refuse_unread) {
        return Ok(too_large.answer(dialect));
    }
    let read = read_limited(Box::pin(body), limit, None)
        .await
        .map_err(Into::<BoxError>::into);
    let (data, trailers) = match read {
        Ok(Read::Whole { data, trailers }) => (data, trailers),
        Ok(Read::TooLarge { rest, .. } | Read::Streamed { rest, .. }) => {
            drain(rest, drain_cap).await;
            return Ok(too_large.answer(dialect));
        }
        Err(err) => {
            tracing::debug!(error = %err, "request body could not be read");
            let problem = Problem::RequestUnreadable;
            return Ok(problem.answer(dialect));
        }
    };

    // A client- or bidirectional-streaming call: its messages would all be
    // read before the handler runs, and none of them could be told apart.
    if dialect == Dialect::Grpc && Framing::count(&data) > 1 {
        let problem = Problem::StreamingRequest;
        return Ok(problem.answer(dialect));
    }

    let fingerprint = FingerprintBuilder::new()
        .bytes(parts.method.as_str().as_bytes())
        .bytes(parts.uri.path().as_bytes())
        .bytes(parts.uri.query().unwrap_or("").as_bytes())
        .bytes(content_type(&parts.headers).as_bytes())
        .bytes(&data)
        .finish_bytes();
    // A tuple, so the unnamed scope (`None`) is a key part like any other.
    let key = match KeyBuilder::new(&config.namespace)
        .part(&("scope", scope.as_deref()))
        .part(key.as_str())
        .finish()
    {
        Ok(key) => key,
        Err(err) => {
            tracing::error!(error = %err, "the key could not be built");
            return Ok(Problem::Internal.answer(dialect));
        }
    };

    tracing::Span::current().record("digest", tracing::field::display(key.digest()));

    let held = match claim(
        Arc::clone(&config.store),
        &config.options,
        key,
        Some(&fingerprint),
    )
    .await
    {
        Ok(Claimed::Run(held)) => held,
        Ok(Claimed::Replay(bytes)) => {
            return Ok(match stored::decode(&bytes, dialect) {
                Ok(response) => response,
                Err(err) => {
                    tracing::error!(error = %err, "the stored response could not be decoded");
                    let problem = Problem::StoredResponseCorrupt;
                    problem.answer(dialect)
                }
            })
        }
        Err(err) => {
            let problem = Problem::from_claim_error(&err);
            // The store's own words (hosts, SQL) are for the log, not the client.
            if let Error::Store(_) = err {
                tracing::warn!(error = %err, "the store failed at claim; request not processed");
            }
            return Ok(problem.answer(dialect));
        }
    };

    let request = Request::from_parts(parts, Body::buffered(data, trailers));
    let max = config.max_response_body;
    let ran = held
        .run(async {
            let response = match inner.call(request).await {
                Ok(response) => response,
                Err(err) => return Err(err),
            };
            let (head, body) = response.into_parts();
            let body = Box::pin(body);
            let grpc_reply = config.protocol.grpc_reply(dialect, &head.headers);
            let reading = if !stores(config.store_status, head.status) {
                Reading::Unstored(body)
            } else if grpc_reply {
                // A gRPC reply's length is never known up front: read it, up
                // to the limit and to its first message, and judge it by its
                // final `grpc-status` (in its trailers, or in its headers
                // for a trailers-only reply, known at once).
                match grpc::status_in(&head.headers) {
                    Some(code) if !stores(config.store_grpc_status, code) => {
                        Reading::Unstored(body)
                    }
                    _ => Reading::Read(
                        read_limited(body, max, Some(Framing::default()))
                            .await
                            .map_err(Into::<BoxError>::into),
                    ),
                }
            } else if streamed(&head.headers, &body.size_hint()) {
                Reading::Withheld(Withheld::Streamed, body)
            } else if body.size_hint().lower() > max as u64 {
                Reading::Withheld(Withheld::TooLarge, body)
            } else {
                Reading::Read(
                    read_limited(body, max, None)
                        .await
                        .map_err(Into::<BoxError>::into),
                )
            };
            Ok((head, grpc_reply, reading))
        })
        .await;
    let (head, grpc_reply, reading) = match ran {
        Ok(done) => done,
        Err(err) => {
            held.release().await;
            return Err(err);
        }
    };
    match reading {
        Reading::Unstored(body) => {
            tracing::debug!(status = %head.status, "status not stored; key released");
            held.release().await;
            Ok(Response::from_parts(
                head,
                Body::partial(Bytes::new(), body),
            ))
        }
        Reading::Read(Ok(Read::Whole { data, trailers })) => {
            if grpc_reply {
                let code = trailers
                    .as_ref()
                    .and_then(grpc::status_in)
                    .or_else(|| grpc::status_in(&head.headers));
                match code {
                    // No `grpc-status` at all: a broken reply, which some
                    // clients (tonic) take for `OK` when it holds a message.
                    // The handler ran: recorded as done without a replay,
                    // never run again.
                    None => {
                        tracing::error!(
                            "gRPC reply without a grpc-status; recorded as done, not stored"
                        );
                        withhold(held, &config, head.status, Withheld::Failed).await;
                        return Ok(Response::from_parts(head, Body::buffered(data, trailers)));
                    }
                    Some(code) if !stores(config.store_grpc_status, code) => {
                        tracing::debug!(grpc_status = code, "gRPC status not stored; key released");
                        held.release().await;
                        return Ok(Response::from_parts(head, Body::buffered(data, trailers)));
                    }
                    Some(_) => {}
                }
            }
            match stored::encode(
                head.status,
                &head.headers,
                &data,
                trailers.as_ref(),
                &config.stored_headers,
            ) {
                Ok(bytes) => {
                    // A failure is logged by `complete`; the client still gets the
                    // response the handler produced, unless the store answers only
                    // once the response is safely stored (replicas): then the
                    // client retries to get it.
                    match held.complete(&bytes, config.options.ttl).await {
                        Err(err @ (Error::NotReplicated { .. } | Error::Store(_))) => {
                            tracing::warn!(error = %err, "the response is not safely stored yet; answering 503");
                            let problem = Problem::NotReplicated;
                            return Ok(problem.answer(dialect));
                        }
                        // Not stored (the claim is released, its steps kept): the
                        // handler diverged from a recorded attempt.
                        Err(err @ Error::StepMismatch { .. }) => {
                            tracing::error!(error = %err, "the handler's steps differ from the recorded ones; answering 500");
                            let problem = Problem::Internal;
                            return Ok(problem.answer(dialect));
                        }
                        _ => {}
                    }
                }
                // The handler ran: a record that cannot be written (a
                // rewrite hook that panicked) must not free the key for a
                // second run; it is recorded as done without a replay.
                Err(err) => {
                    tracing::error!(error = %err, "the response could not be encoded; recorded as done without it");
                    withhold(held, &config, head.status, Withheld::Failed).await;
                }
            }
            Ok(Response::from_parts(head, Body::buffered(data, trailers)))
        }
        Reading::Withheld(why, body) => {
            withhold(held, &config, head.status, why).await;
            Ok(Response::from_parts(
                head,
                Body::partial(Bytes::new(), body),
            ))
        }
        Reading::Read(Ok(Read::TooLarge { prefix, rest })) => {
            withhold(held, &config, head.status, Withheld::TooLarge).await;
            Ok(Response::from_parts(head, Body::partial(prefix, rest)))
        }
        Reading::Read(Ok(Read::Streamed { prefix, rest })) => {
            withhold(held, &config, head.status, Withheld::Streamed).await;
            Ok(Response::from_parts(head, Body::partial(prefix, rest)))
        }
        Reading::Read(Err(err)) => {
            // The handler ran and chose a stored status: its work is done, so a
            // retry must not run it again (as for a stream cut midway).
            tracing::error!(error = %err, "the response body failed; recorded as done without it");
            withhold(held, &config, head.status, Withheld::Failed).await;
            let problem = Problem::HandlerBodyFailed;
            Ok(problem.answer(dialect))
        }
    }
}

/// What became of a response with a stored status, before it is answered.
enum Reading<B> {
    /// A status that is not stored: the body flows at once, the key is released.
    Unstored(Pin<Box<B>>),
    /// A body that is not stored (streamed, or declared too large): it flows
    /// at once, and the request is recorded as done without it.
    Withheld(Withheld, Pin<Box<B>>),
    /// The body read up to the limit.
    Read(Result<Read<B>, BoxError>),
}

/// Whether a response is a stream, passed on as it comes rather than buffered
/// to be stored: an event stream, or a body whose length is not known up front
/// (no `Content-Length`: chunked, generated).
fn streamed(headers: &http::HeaderMap, size: &http_body::SizeHint) -> bool {
    let event_stream = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .get(..17)
                .is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream"))
        });
    event_stream || size.exact().is_none()
}

/// Records the request as done without a replayable response (see
/// [`Withheld`]): the work ran, so a retry must not run it again.
async fn withhold(held: Held, config: &Config, status: http::StatusCode, why: Withheld) {
    tracing::warn!(
        limit = config.max_response_body,
        reason = why.as_str(),
        "response passed through without being stored; retries get 410"
    );
    match stored::encode_withheld(status, why) {
        Ok(bytes) => {
            let _ = held.complete(&bytes, config.options.ttl).await;
        }
        Err(err) => {
            tracing::error!(error = %err, "the record could not be encoded; releasing");
            held.release().await;
        }
    }
}

/// Asks a `store_status` / `store_grpc_status` predicate. The handler has
/// run by then: a predicate that panics must not unwind through the layer and
/// drop the claim (a retry would run the handler again), so it counts as
/// "store" — the conservative answer, the reply replayed.
fn stores<T: Copy + std::fmt::Debug>(predicate: fn(T) -> bool, status: T) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| predicate(status))).unwrap_or_else(
        |_| {
            tracing::error!(
                ?status,
                "the store_status (or store_grpc_status) predicate panicked; the reply is stored"
            );
            true
        },
    )
}
