//! The `Idempotency-Key` header for tower and axum services (feature `http`).
//!
//! Add [`IdempotencyLayer`] to a router and every `POST` or `PATCH` that carries an
//! `Idempotency-Key` runs once; a retry with the same key gets the first
//! response back, byte for byte, with `Idempotent-Replayed: true`:
//!
//! ```
//! use axum::{routing::post, Router};
//! use idem_runtime::http::IdempotencyLayer;
//! use idem_runtime::MemoryStore;
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(|| async { "charged" }))
//!     .layer(
//!         IdempotencyLayer::new(MemoryStore::new())
//!             .require_key(true)
//!             // Keys are per client: the subject your auth layer (in front of
//!             // this one) verified — never the raw credential. None → 401.
//!             .scope(|parts| parts.extensions.get::<User>().map(|u| u.id.clone())),
//!     );
//! # #[derive(Clone)] struct User { id: String }
//! ```
//!
//! What a request gets (docs/CONTRACT.md §6, the IETF Idempotency-Key draft, Stripe's API):
//!
//! | request | response |
//! |---|---|
//! | first with its key | the handler's response; stored if its status is (default: 2xx, 3xx, and 4xx other than "try again" and validation refusals, see [`default_store_status`]) |
//! | repeat, stored response | that response, byte for byte, plus `Idempotent-Replayed: true` |
//! | repeat while the first runs | 409 with `Retry-After` (or waits, with [`InProgress::Wait`]) |
//! | same key, different method, path, query, `Content-Type` or body | 422 |
//! | key missing (where required) or malformed | 400 |
//! | [`scope`](IdempotencyLayer::scope) finds no client (no credentials) | 401 |
//! | repeat of a request whose response was streamed or too large to store | 410 (the request is not run again) |
//! | request body over the limit | 413 |
//! | store unreachable | 503 (the handler does not run) |
//!
//! Error bodies are `application/problem+json` (RFC 9457), with a `type` naming
//! the case (`urn:idem:problem:in-progress`, …). A status that is not stored
//! (5xx, 408, 409, 429, and validation refusals such as 400, 404, 415, 422)
//! releases the key, so a retry runs the handler again.
//!
//! **Responses that are not stored.** A response is buffered (up to
//! [`max_response_body`](IdempotencyLayer::max_response_body)) to be stored only
//! when its status is stored and its length is known up front. A streamed
//! response — `text/event-stream`, or a body of unknown length (chunked,
//! generated) — flows to the client at once, unbuffered; so does one whose
//! declared length is over the limit, and the rest of one found over the limit
//! while being read. The handler ran, so the request is still recorded as done
//! (with the response's status, without its body): a retry with the same key gets
//! 410 `urn:idem:problem:response-not-stored` and is **not** run again. So is a
//! retry of a request whose response body failed while the layer read it (the
//! client got a 500 `response-failed`). Put compression layers outside this
//! one, so the bodies it stores have a length.
//!
//! **Scopes.** Keys are kept per client by [`scope`](IdempotencyLayer::scope):
//! give it the authenticated subject (the user or account id), never the raw
//! credential, so a token refreshed between retries keeps its scope. A request
//! for which it finds no subject is refused with 401, never put in a scope that
//! anonymous clients share. A layer with no scope refuses keyed requests with 401
//! (and says so once in the log); [`global_scope`](IdempotencyLayer::global_scope)
//! chooses one key space for every client on purpose.
//!
//! A protected request is handled in place; if the client disconnects
//! mid-request, the rest is moved into a task of its own rather than dropped, so
//! the handler is not cut off: its response is still stored (or the key
//! released).
//!
//! **Stored response headers.** A replay answers with the first response's
//! headers, minus those that belong to the first client alone: by default the
//! [`DEFAULT_UNSTORED_HEADERS`] — `Set-Cookie` (a replay must not hand one
//! client's session to another, or revive a session the client has since
//! ended), the obsolete `Set-Cookie2`, and `Authentication-Info` /
//! `Proxy-Authentication-Info` (per-client authentication state, such as a
//! digest nonce). The first response still carries them: only the stored copy
//! is cleaned. [`drop_stored_header`](IdempotencyLayer::drop_stored_header)
//! leaves out more, [`keep_stored_header`](IdempotencyLayer::keep_stored_header)
//! stores one after all, and
//! [`rewrite_stored_headers`](IdempotencyLayer::rewrite_stored_headers) edits
//! what is stored. Everything else — `Date`, `ETag`, `Location`, custom
//! headers — replays as it was; hop-by-hop headers are never stored.
//!
//! # gRPC
//!
//! A tonic server takes the layer as any tower layer
//! (`Server::builder().layer(IdempotencyLayer::new(store).global_scope())`);
//! the key is the `idempotency-key` metadata entry (the HTTP/2 header). A gRPC
//! call (`Content-Type: application/grpc…`, or every request with
//! [`Protocol::Grpc`]) is answered in gRPC's terms:
//!
//! | call | answer |
//! |---|---|
//! | first with its key | the handler's reply; stored if its final `grpc-status` is `OK` ([`default_store_grpc_status`]) — any other status releases the key; a reply with none is recorded as done, not stored |
//! | repeat, reply stored | the reply's headers (metadata), message and trailers, byte for byte, plus `idempotent-replayed: true` metadata |
//! | repeat while the first runs | `ABORTED`, with `grpc-retry-pushback-ms` and a `RetryInfo` |
//! | same key, other method or message | `INVALID_ARGUMENT` |
//! | key missing (where required) or malformed | `INVALID_ARGUMENT` |
//! | no scope for the client | `UNAUTHENTICATED` |
//! | request over the limit | `RESOURCE_EXHAUSTED` |
//! | store unreachable | `UNAVAILABLE`, with a 1 s pushback; the handler does not run |
//! | earlier attempt unfinished, `OnTakeover::Fail` | `FAILED_PRECONDITION` |
//! | repeat of a call whose reply was not stored (streamed, too large) | `FAILED_PRECONDITION` (the handler does not run again) |
//!
//! Each such answer is trailers-only (HTTP 200, `grpc-status` and
//! `grpc-message` in the headers) and carries `grpc-status-details-bin`: a
//! `google.rpc.Status` whose `ErrorInfo` (domain `idem`) names the case in its
//! `reason` (`IN_PROGRESS`, `KEY_REUSED`, `KEY_MISSING`, …).
//!
//! Only **unary** calls are protected. A call sent without a key passes
//! through, so streaming calls are served as usual when their clients send no
//! key; a keyed call whose request holds more than one message is refused
//! with `INVALID_ARGUMENT` (`STREAMING_REQUEST`). A keyed request is read
//! whole before the handler runs, so never send a key on a bidirectional
//! call. A reply with more than one message (server streaming) flows to the
//! client as it comes and is not stored; the call is recorded as done.
//!
//! The layer's service accepts any request body with `Bytes` chunks and hands the
//! inner service a [`Body`] (the buffered request); it answers with a [`Body`]
//! too, which axum and hyper take as they are.
//!
//! [`InProgress::Wait`]: crate::InProgress::Wait

mod body;
mod future;
mod grpc;
mod layer;
mod problem;
mod service;
mod stored;

pub use body::Body;
pub use future::ResponseFuture;
pub use grpc::{default_store_grpc_status, Protocol};
pub use layer::IdempotencyLayer;
pub use service::IdempotencyService;

/// The header a replayed response carries: `Idempotent-Replayed: true`.
pub const IDEMPOTENT_REPLAYED: http::HeaderName =
    http::HeaderName::from_static("idempotent-replayed");

/// The response headers a stored response leaves out unless configured
/// otherwise (see [`IdempotencyLayer::keep_stored_header`]): `Set-Cookie`,
/// `Set-Cookie2`, `Authentication-Info`, `Proxy-Authentication-Info` — what a
/// server hands one client's session, never to be replayed to another.
pub const DEFAULT_UNSTORED_HEADERS: [http::HeaderName; 4] = [
    http::header::SET_COOKIE,
    http::HeaderName::from_static("set-cookie2"),
    http::HeaderName::from_static("authentication-info"),
    http::HeaderName::from_static("proxy-authentication-info"),
];

/// The request header that carries the client's key, unless configured otherwise.
pub const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

/// Which response statuses are stored and replayed by default: 2xx, 3xx, and the
/// 4xx that report a decision the handler made (402 payment required, 410 gone,
/// 412, …). Not stored, so the key is released and a retry runs again:
///
/// - 408, 409, 425, 429, which say "try again";
/// - the refusals that come before a handler's work, and that a corrected retry
///   must not keep getting (Stripe saves no result for a request that failed
///   validation): 400, 401, 403, 404, 405, 406, 407, 411, 413, 414, 415, 422,
///   431 — axum's extractor rejections (`Json` without a JSON `Content-Type`:
///   415; a body that does not parse: 400/422) and router misses (404/405)
///   among them;
/// - 5xx and 1xx.
///
/// Replace it with [`IdempotencyLayer::store_status`].
pub fn default_store_status(status: http::StatusCode) -> bool {
    match status.as_u16() {
        200..=399 => true,
        408 | 409 | 425 | 429 => false,
        400 | 401 | 403..=407 | 411 | 413 | 414 | 415 | 422 | 431 => false,
        400..=499 => true,
        _ => false,
    }
}
