//! The layer's own answers: `application/problem+json` bodies (RFC 9457).

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::grpc::{self, Code, Dialect};
use super::Body;
use crate::Error;

/// One of the layer's own refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Problem {
    KeyMissing,
    KeyMalformed,
    ScopeUnknown,
    /// The layer has neither a scope function nor a global scope.
    ScopeUnset,
    InProgress {
        retry_after: Duration,
    },
    KeyReused,
    RequestTooLarge {
        limit: usize,
    },
    RequestUnreadable,
    /// A keyed gRPC call whose request holds more than one message (client or
    /// bidirectional streaming): only unary calls are protected.
    StreamingRequest,
    StoreUnavailable,
    /// The request ran (now or earlier); its response is stored but not yet on
    /// as many replicas as the store requires.
    NotReplicated,
    StoredResponseCorrupt,
    HandlerBodyFailed,
    /// An earlier request with this key did not finish, and the layer's
    /// `on_takeover` policy is to fail.
    TakenOver,
    /// The request ran; its response (status `status`) was not stored.
    ResponseNotStored {
        status: u16,
        why: Withheld,
    },
    Internal,
}

/// Why a response was passed through without being stored, though the request
/// with its key is recorded as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Withheld {
    /// Streamed (`text/event-stream`, or a body of unknown length).
    Streamed,
    /// Larger than the layer's `max_response_body`.
    TooLarge,
    /// The body failed while the layer read it to store it.
    Failed,
}

impl Withheld {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Withheld::Streamed => "streamed",
            Withheld::TooLarge => "too-large",
            Withheld::Failed => "failed",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Withheld> {
        match s {
            "streamed" => Some(Withheld::Streamed),
            "too-large" => Some(Withheld::TooLarge),
            "failed" => Some(Withheld::Failed),
            _ => None,
        }
    }
}

impl Problem {
    /// The answer to an error from claiming a key.
    pub(crate) fn from_claim_error(err: &Error) -> Problem {
        match err {
            Error::InProgress { retry_after } => Problem::InProgress {
                retry_after: *retry_after,
            },
            Error::KeyReused => Problem::KeyReused,
            Error::Store(_) => Problem::StoreUnavailable,
            Error::NotReplicated { .. } => Problem::NotReplicated,
            Error::Codec(_) => Problem::StoredResponseCorrupt,
            Error::TakenOver => Problem::TakenOver,
            _ => Problem::Internal,
        }
    }

    fn parts(self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Problem::KeyMissing => (
                StatusCode::BAD_REQUEST,
                "key-missing",
                "This request requires an Idempotency-Key header",
            ),
            Problem::KeyMalformed => (
                StatusCode::BAD_REQUEST,
                "key-malformed",
                "The Idempotency-Key header is malformed",
            ),
            Problem::ScopeUnknown | Problem::ScopeUnset => (
                StatusCode::UNAUTHORIZED,
                "scope-unknown",
                "The request's client could not be identified",
            ),
            Problem::InProgress { .. } => (
                StatusCode::CONFLICT,
                "in-progress",
                "A request with this Idempotency-Key is still being processed",
            ),
            Problem::KeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "key-reused",
                "This Idempotency-Key was already used with a different request",
            ),
            Problem::RequestTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request-too-large",
                "The request body is larger than this endpoint accepts",
            ),
            Problem::RequestUnreadable => (
                StatusCode::BAD_REQUEST,
                "request-unreadable",
                "The request body could not be read",
            ),
            Problem::StreamingRequest => (
                StatusCode::BAD_REQUEST,
                "streaming-request",
                "Idempotency keys are accepted on unary calls only",
            ),
            Problem::StoreUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "The idempotency store is unavailable; the request was not processed",
            ),
            Problem::NotReplicated => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not-replicated",
                "The request with this Idempotency-Key was processed, but its response is not yet safely stored",
            ),
            Problem::StoredResponseCorrupt => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "stored-response-corrupt",
                "The stored response for this Idempotency-Key could not be read",
            ),
            Problem::HandlerBodyFailed => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "response-failed",
                "The response body failed while it was being produced",
            ),
            Problem::ResponseNotStored { .. } => (
                StatusCode::GONE,
                "response-not-stored",
                "The request with this Idempotency-Key was processed, but its response cannot be replayed",
            ),
            Problem::TakenOver => (
                StatusCode::CONFLICT,
                "takeover-refused",
                "An earlier request with this Idempotency-Key did not finish",
            ),
            Problem::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "The request could not be processed",
            ),
        }
    }

    /// The gRPC status a gRPC client is answered with (docs/CONTRACT.md §6.2).
    fn grpc_code(self) -> Code {
        match self {
            Problem::KeyMissing
            | Problem::KeyMalformed
            | Problem::KeyReused
            | Problem::StreamingRequest => Code::InvalidArgument,
            Problem::ScopeUnknown | Problem::ScopeUnset => Code::Unauthenticated,
            Problem::InProgress { .. } => Code::Aborted,
            Problem::RequestTooLarge { .. } => Code::ResourceExhausted,
            Problem::StoreUnavailable | Problem::NotReplicated => Code::Unavailable,
            Problem::StoredResponseCorrupt => Code::DataLoss,
            Problem::ResponseNotStored { .. } | Problem::TakenOver => Code::FailedPrecondition,
            Problem::RequestUnreadable | Problem::HandlerBodyFailed | Problem::Internal => {
                Code::Internal
            }
        }
    }

    /// When the client should come back, if it should.
    fn retry_after(self) -> Option<Duration> {
        match self {
            Problem::InProgress { retry_after } => Some(retry_after),
            Problem::StoreUnavailable | Problem::NotReplicated => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The answer in the request's dialect: a problem+json response, or a
    /// trailers-only gRPC one whose `grpc-message` is the detail and whose
    /// `ErrorInfo` reason names the case (`IN_PROGRESS`, `KEY_REUSED`, …).
    pub(crate) fn response<B>(self, dialect: Dialect, detail: &str) -> Response<Body<B>> {
        match dialect {
            Dialect::Http => self.problem_json(detail),
            Dialect::Grpc => {
                let reason = self.parts().1.replace('-', "_").to_ascii_uppercase();
                // Retry hints in whole milliseconds, at least 1 s as for HTTP:
                // a zero pushback would invite a hot loop.
                let retry = self.retry_after().map(|d| d.max(Duration::from_secs(1)));
                grpc::response(self.grpc_code(), &reason, detail, retry)
            }
        }
    }

    /// The response: status, `application/problem+json` body, and `Retry-After`
    /// where the client should come back.
    fn problem_json<B>(self, detail: &str) -> Response<Body<B>> {
        let (status, kind, title) = self.parts();
        let body = serde_json::json!({
            "type": format!("urn:idem:problem:{kind}"),
            "title": title,
            "status": status.as_u16(),
            "detail": detail,
        });
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = Response::new(Body::buffered(Bytes::from(bytes), None));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(retry) = self.retry_after() {
            // Whole seconds, rounded up: "Retry-After: 0" would invite a hot loop.
            let secs = retry.as_millis().div_ceil(1000).max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
        }
        response
    }

    /// [`response`](Self::response) with the [default detail](Self::default_detail).
    pub(crate) fn answer<B>(self, dialect: Dialect) -> Response<Body<B>> {
        self.response(dialect, &self.default_detail(dialect))
    }

    /// The detail for this problem when nothing more specific is known, in
    /// the caller's terms (a gRPC caller sends metadata and messages).
    pub(crate) fn default_detail(self, dialect: Dialect) -> String {
        let grpc = dialect == Dialect::Grpc;
        match self {
            Problem::KeyMissing => format!(
                "send a unique {} (1 to 255 visible ASCII characters) \
                 with this request, and the same one when retrying it",
                if grpc {
                    "idempotency-key metadata entry"
                } else {
                    "Idempotency-Key header"
                }
            ),
            Problem::InProgress { retry_after } => format!(
                "the first request with this key has not finished; retry after {} s to get its response",
                retry_after.as_millis().div_ceil(1000).max(1)
            ),
            Problem::KeyReused => format!(
                "{} differ from the first request that used this key; use a new key for a new request",
                if grpc {
                    "the method or the message"
                } else {
                    "the method, path, query or body"
                }
            ),
            Problem::RequestTooLarge { limit } => {
                format!("request bodies on this endpoint are limited to {limit} bytes")
            }
            Problem::StoreUnavailable => "the idempotency store could not be reached; \
                 the request was not processed, retry it later"
                .into(),
            Problem::ScopeUnknown => "idempotency keys are kept per client, and this request \
                 carries no credentials this endpoint recognises; authenticate and retry"
                .into(),
            Problem::ScopeUnset => "idempotency keys are kept per client, and this endpoint \
                 is not configured to tell clients apart; the request was not processed"
                .into(),
            Problem::ResponseNotStored { status, why } => format!(
                "the first request with this key was processed (status {status}), but its \
                 response was {}, so it was not stored; the request is not run again \
                 (look its result up instead)",
                match why {
                    Withheld::Streamed => "streamed",
                    Withheld::TooLarge => "too large to store",
                    Withheld::Failed => "cut off by an error while it was produced",
                }
            ),
            Problem::NotReplicated => "the request with this key was processed and its \
                 response stored, but not yet acknowledged by the store's replicas; it is not \
                 run again: retry with the same key to get the response"
                .into(),
            Problem::TakenOver => "an earlier request with this key did not finish (the \
                 server crashed, stalled or gave up on it), and this endpoint does not run it \
                 again on its own: what it did must be reconciled first; the request was not \
                 processed"
                .into(),
            Problem::StoredResponseCorrupt => "the response stored for this key could not be \
                 read; the request was not run again"
                .into(),
            Problem::StreamingRequest => "this call sent more than one request message; \
                 idempotency keys are accepted on unary calls only, so send streaming calls \
                 without one"
                .into(),
            _ => self.parts().2.to_owned(),
        }
    }
}
