//! [`IdempotencyLayer`] and its settings.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{request::Parts, HeaderMap, HeaderName, Method, StatusCode};
use tower_layer::Layer;

use super::grpc::{default_store_grpc_status, Protocol};
use super::{default_store_status, IdempotencyService, DEFAULT_UNSTORED_HEADERS, IDEMPOTENCY_KEY};
use crate::engine::{InProgress, OnTakeover, Options};
use crate::Store;

/// The scope of a request's key (e.g. the authenticated subject).
pub(crate) type ScopeFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

/// A hook that rewrites the headers of a response before they are stored.
pub(crate) type RewriteFn = dyn Fn(&mut HeaderMap) + Send + Sync;

/// What of a response's headers goes into its record (the response the
/// client gets first is never changed).
#[derive(Clone)]
pub(crate) struct StoredHeaders {
    /// Left out of the record, headers and trailers alike.
    pub(crate) dropped: Vec<HeaderName>,
    /// Runs on the remaining headers, last.
    pub(crate) rewrite: Option<Arc<RewriteFn>>,
}

/// Whose keys a request's key is looked up among.
#[derive(Clone)]
pub(crate) enum Scope {
    /// Nothing configured: keyed requests are refused (401), said once in the log.
    Unset,
    /// [`IdempotencyLayer::global_scope`]: one key space, chosen on purpose.
    Global,
    /// [`IdempotencyLayer::scope`]: the function's answer; `None` is refused.
    By(Arc<ScopeFn>),
}

/// Everything the service needs, shared by every clone.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) options: Options,
    pub(crate) namespace: String,
    pub(crate) header: HeaderName,
    pub(crate) methods: Vec<Method>,
    pub(crate) key_required: bool,
    pub(crate) scope: Scope,
    pub(crate) max_request_body: usize,
    pub(crate) max_response_body: usize,
    pub(crate) store_status: fn(StatusCode) -> bool,
    pub(crate) protocol: Protocol,
    pub(crate) store_grpc_status: fn(i32) -> bool,
    pub(crate) stored_headers: StoredHeaders,
}

/// A tower [`Layer`] that makes `POST` and `PATCH` requests carrying an
/// `Idempotency-Key` header safe to retry (see the [module docs](super)).
///
/// Defaults: ttl 24 h, lease 30 s, header `Idempotency-Key`, methods `POST` and
/// `PATCH`, key optional, **no scope** — set [`scope`](Self::scope) (or
/// [`global_scope`](Self::global_scope)), or keyed requests get 401 —
/// request and response bodies up to 1 MiB, duplicates in flight rejected with 409, statuses stored per
/// [`default_store_status`] (gRPC calls: per [`default_store_grpc_status`]),
/// gRPC answers for gRPC requests ([`Protocol::Auto`]), and the
/// [`DEFAULT_UNSTORED_HEADERS`] (`Set-Cookie`, …) left out of stored responses.
///
/// [`default_store_grpc_status`]: super::default_store_grpc_status
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

/// 1 MiB: the default limit on request and response bodies.
const DEFAULT_BODY_LIMIT: usize = 1 << 20;

impl IdempotencyLayer {
    /// A layer keeping its records in `store` (any [`Store`]: `MemoryStore`,
    /// `SqliteStore`, `RedisStore`, `Arc<dyn Store>`, …).
    pub fn new<S: Store>(store: S) -> Self {
        Self::with_store(store.handle())
    }

    /// A layer on an already shared store.
    pub fn with_store(store: Arc<dyn Store>) -> Self {
        IdempotencyLayer {
            config: Arc::new(Config {
                store,
                options: Options::new(),
                namespace: "idem::http".to_owned(),
                header: IDEMPOTENCY_KEY,
                methods: vec![Method::POST, Method::PATCH],
                key_required: false,
                scope: Scope::Unset,
                max_request_body: DEFAULT_BODY_LIMIT,
                max_response_body: DEFAULT_BODY_LIMIT,
                store_status: default_store_status,
                protocol: Protocol::Auto,
                store_grpc_status: default_store_grpc_status,
                stored_headers: StoredHeaders {
                    dropped: DEFAULT_UNSTORED_HEADERS.to_vec(),
                    rewrite: None,
                },
            }),
        }
    }

    fn config(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// How long a stored response is replayed (default 24 h; capped to 1 ms – 100 years).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        let options = &mut self.config().options;
        *options = options.ttl(ttl);
        self
    }

    /// How long a claim is held without renewal while the handler runs (default
    /// 30 s; renewed every third of it). A server that dies mid-request frees the
    /// key after this.
    pub fn lease(mut self, lease: Duration) -> Self {
        let options = &mut self.config().options;
        *options = options.lease(lease);
        self
    }

    /// The request header that carries the key (default `Idempotency-Key`).
    pub fn header_name(mut self, header: HeaderName) -> Self {
        self.config().header = header;
        self
    }

    /// The methods the layer applies to (default `POST` and `PATCH`); other
    /// requests pass straight through.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config().methods = methods.into_iter().collect();
        self
    }

    /// Whether a request without a key is refused with 400 (`true`) or passed
    /// through unprotected (`false`, the default).
    pub fn require_key(mut self, required: bool) -> Self {
        self.config().key_required = required;
        self
    }

    /// Whose key it is: keys are looked up per scope, so one client can never
    /// replay another's response. `scope` gets the request head and returns the
    /// **authenticated subject** (a user or account id), never the raw
    /// credential: a client whose token is refreshed between two retries must
    /// land in the same scope, or its retry runs again.
    ///
    /// A request for which `scope` returns `None` or `Some("")` (no
    /// credentials, a header that does not parse) is refused with 401 `urn:idem:problem:scope-unknown`
    /// and the handler does not run: it never falls into a scope shared with
    /// other anonymous clients. To serve anonymous clients, return a scope for
    /// them on purpose (say, from a session id).
    pub fn scope<F>(mut self, scope: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.config().scope = Scope::By(Arc::new(scope));
        self
    }

    /// One key space for every client, on purpose: for a service whose callers
    /// all trust each other (one internal client, keys that are globally unique
    /// UUIDs from one system). A layer with neither this nor
    /// [`scope`](Self::scope) refuses keyed requests with 401: it cannot tell
    /// one client's key from another's, and does not guess.
    pub fn global_scope(mut self) -> Self {
        self.config().scope = Scope::Global;
        self
    }

    /// The largest request body accepted on a protected request (default 1 MiB);
    /// larger ones get 413 and the handler does not run.
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.config().max_request_body = bytes;
        self
    }

    /// The largest response body stored (default 1 MiB). A larger response is
    /// passed through whole and not stored, but the request is recorded as done:
    /// a retry gets 410 `urn:idem:problem:response-not-stored`, never a second run.
    /// Size it above the largest response a route that must be replayed gives.
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.config().max_response_body = bytes;
        self
    }

    /// What a duplicate does while the first request runs: 409 at once
    /// ([`InProgress::Reject`], the default) or wait for its response.
    pub fn in_progress(mut self, policy: InProgress) -> Self {
        let options = &mut self.config().options;
        *options = options.in_progress(policy);
        self
    }

    /// What a request does that continues an earlier one with its key that did
    /// not finish: run the handler ([`OnTakeover::Run`], the default; a
    /// handler's recorded steps replay), or answer 409 `takeover-refused`
    /// without running it, then and on every retry, until reconciled
    /// ([`OnTakeover::Fail`]).
    pub fn on_takeover(mut self, policy: OnTakeover) -> Self {
        let options = &mut self.config().options;
        *options = options.on_takeover(policy);
        self
    }

    /// Which response statuses are stored and replayed (default
    /// [`default_store_status`]); any other status releases the key. It is
    /// asked after the handler ran: if it panics, the response is stored.
    pub fn store_status(mut self, store: fn(StatusCode) -> bool) -> Self {
        self.config().store_status = store;
        self
    }

    /// Whether requests are answered as gRPC calls or plain HTTP (default
    /// [`Protocol::Auto`]: gRPC for a `Content-Type: application/grpc…`).
    ///
    /// For a gRPC call the layer's own answers are trailers-only gRPC
    /// responses (HTTP 200, `grpc-status`, `grpc-message`; the mapping is in
    /// docs/CONTRACT.md §6.2) instead of problem+json, and its response is
    /// stored only if it ends with a `grpc-status` that
    /// [`store_grpc_status`](Self::store_grpc_status) accepts (its trailers are
    /// read first: a gRPC response's length is never known up front). Only
    /// unary calls are protected: a keyed call with more than one request
    /// message is refused, and a response with more than one message flows
    /// through unstored, the call recorded as done (see the
    /// [module docs](super#grpc)).
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.config().protocol = protocol;
        self
    }

    /// Which final `grpc-status` codes of a gRPC call are stored and replayed
    /// (default [`default_store_grpc_status`](super::default_store_grpc_status):
    /// only `OK`); a call that ends with any other code releases its key, so a
    /// retry runs again. The code is the number of `tonic::Code` (`code as i32`).
    pub fn store_grpc_status(mut self, store: fn(i32) -> bool) -> Self {
        self.config().store_grpc_status = store;
        self
    }

    /// Leaves the header `name` out of stored responses (and their trailers):
    /// the client that made the request still gets it, a replay does not.
    /// Added to the [`DEFAULT_UNSTORED_HEADERS`].
    pub fn drop_stored_header(mut self, name: HeaderName) -> Self {
        let dropped = &mut self.config().stored_headers.dropped;
        if !dropped.contains(&name) {
            dropped.push(name);
        }
        self
    }

    /// Stores the header `name` after all, if it is one the layer leaves out
    /// (one of the [`DEFAULT_UNSTORED_HEADERS`], say `Set-Cookie` on a service
    /// whose cookies are not per session). Hop-by-hop headers (`Connection`,
    /// …) are never stored.
    pub fn keep_stored_header(mut self, name: HeaderName) -> Self {
        self.config().stored_headers.dropped.retain(|n| *n != name);
        self
    }

    /// Rewrites the headers of a response before they are stored (after the
    /// dropped ones are taken out): redact a value, replace a per-client one,
    /// remove a header by a rule of your own. The live response is not
    /// touched; a replay answers with what the hook left, plus
    /// `Idempotent-Replayed: true`. Hop-by-hop headers it adds are not stored.
    /// It sees the headers only, not the trailers. If it panics, nothing is
    /// stored and the request is recorded as done without a replayable
    /// response (retries get 410), never run again.
    pub fn rewrite_stored_headers<F>(mut self, rewrite: F) -> Self
    where
        F: Fn(&mut HeaderMap) + Send + Sync + 'static,
    {
        self.config().stored_headers.rewrite = Some(Arc::new(rewrite));
        self
    }

    /// The namespace of this layer's keys (default `idem::http`): two layers on
    /// one store share keys only if they share a namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.config().namespace = namespace.into();
        self
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("IdempotencyLayer")
            .field("namespace", &c.namespace)
            .field("ttl", &c.options.ttl)
            .field("lease", &c.options.lease)
            .field("in_progress", &c.options.in_progress)
            .field("header", &c.header)
            .field("methods", &c.methods)
            .field("key_required", &c.key_required)
            .field(
                "scope",
                &match c.scope {
                    Scope::Unset => "unset (keyed requests refused)",
                    Scope::Global => "global",
                    Scope::By(_) => "per client",
                },
            )
            .field("max_request_body", &c.max_request_body)
            .field("max_response_body", &c.max_response_body)
            .field("protocol", &c.protocol)
            .field("unstored_headers", &c.stored_headers.dropped)
            .field(
                "rewrites_stored_headers",
                &c.stored_headers.rewrite.is_some(),
            )
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService::new(inner, Arc::clone(&self.config))
    }
}
