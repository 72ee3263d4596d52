//! gRPC over the same layer: which requests are gRPC calls, the layer's own
//! answers in gRPC's shape (trailers-only: HTTP 200, `grpc-status`,
//! `grpc-message`, `grpc-status-details-bin`), and a response's final
//! `grpc-status` (docs/CONTRACT.md §6.2).
//!
//! Needs nothing but `http`: the status details (`google.rpc.Status` with an
//! `ErrorInfo` and, where the client should come back, a `RetryInfo`) are a few
//! protobuf fields, encoded here by hand rather than through `prost`.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use super::Body;

/// How the layer speaks to a request's client: which shape its own answers
/// take, and what decides whether a response is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Protocol {
    /// gRPC for requests whose `Content-Type` is `application/grpc` (or
    /// `application/grpc+proto`, `application/grpc;…`), plain HTTP for the rest
    /// (the default). gRPC-Web (`application/grpc-web…`) is not gRPC here: put
    /// a gRPC-Web translation layer outside this one.
    #[default]
    Auto,
    /// Plain HTTP for every request: `application/problem+json` answers,
    /// storage decided by [`store_status`](super::IdempotencyLayer::store_status).
    Http,
    /// gRPC for every request, whatever its `Content-Type`.
    Grpc,
}

impl Protocol {
    /// The dialect a request with these headers is answered in.
    pub(crate) fn dialect(self, headers: &HeaderMap) -> Dialect {
        match self {
            Protocol::Http => Dialect::Http,
            Protocol::Grpc => Dialect::Grpc,
            Protocol::Auto if is_grpc(headers) => Dialect::Grpc,
            Protocol::Auto => Dialect::Http,
        }
    }
}

impl Protocol {
    /// Whether the handler's reply to a request answered in `dialect` is
    /// judged by gRPC's rules (stored by its final `grpc-status`): with
    /// [`Protocol::Grpc`] always; with [`Protocol::Auto`] only if the reply
    /// says it is gRPC (`Content-Type: application/grpc…`, or a `grpc-status`
    /// in its headers). A plain HTTP handler that a client reached with a
    /// gRPC `Content-Type` is stored by HTTP's rules, not released for want of
    /// a `grpc-status` (which would let every retry run it again).
    pub(crate) fn grpc_reply(self, dialect: Dialect, reply: &HeaderMap) -> bool {
        dialect == Dialect::Grpc
            && (self == Protocol::Grpc || is_grpc(reply) || status_in(reply).is_some())
    }
}

/// The shape of one request's answers (a [`Protocol`] applied to a request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Http,
    Grpc,
}

/// Whether the request is a gRPC call: `Content-Type: application/grpc`, alone
/// or followed by `+codec` or parameters (not `application/grpc-web`).
fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let value = value.as_bytes();
    const GRPC: &[u8] = b"application/grpc";
    value.len() >= GRPC.len()
        && value[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(value.get(GRPC.len()), None | Some(b'+' | b';' | b' '))
}

/// Which final `grpc-status` codes are stored and replayed by default: only 0
/// (`OK`). A call that ends in an error status is not stored — its key is
/// released and a retry runs again — as an HTTP 5xx or a validation refusal
/// is. Replace it with
/// [`IdempotencyLayer::store_grpc_status`](super::IdempotencyLayer::store_grpc_status)
/// (say, to store `FAILED_PRECONDITION`, 9, when it reports a decision such
/// as a declined card).
pub fn default_store_grpc_status(code: i32) -> bool {
    code == 0
}

/// `grpc-status`: where a gRPC response says how the call ended.
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const GRPC_STATUS_DETAILS: HeaderName = HeaderName::from_static("grpc-status-details-bin");
/// gRPC's own retry pushback (gRFC A6): a client whose retry policy covers
/// the status waits this many milliseconds before retrying.
const GRPC_RETRY_PUSHBACK: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// The `grpc-status` in `headers`, if there is one and it is a number.
pub(crate) fn status_in(headers: &HeaderMap) -> Option<i32> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}

/// The gRPC status codes the layer answers with (the numbers of
/// `google.rpc.Code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    InvalidArgument = 3,
    FailedPrecondition = 9,
    Aborted = 10,
    ResourceExhausted = 8,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

/// A trailers-only gRPC answer: HTTP 200 with `content-type:
/// application/grpc`, `grpc-status`, `grpc-message`, and in
/// `grpc-status-details-bin` a `google.rpc.Status` carrying an `ErrorInfo`
/// (`reason` the case, domain `idem`) and, with `retry`, a `RetryInfo`; with
/// `retry`, `grpc-retry-pushback-ms` too.
pub(crate) fn response<B>(
    code: Code,
    reason: &str,
    message: &str,
    retry: Option<Duration>,
) -> Response<Body<B>> {
    let mut response = Response::new(Body::buffered(Bytes::new(), None));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(GRPC_STATUS, HeaderValue::from(code as i32));
    if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert(GRPC_MESSAGE, value);
    }
    let details = status_details(code as i32, message, reason, retry);
    let details = base64::engine::general_purpose::STANDARD_NO_PAD.encode(details);
    if let Ok(value) = HeaderValue::from_str(&details) {
        headers.insert(GRPC_STATUS_DETAILS, value);
    }
    if let Some(retry) = retry {
        let ms = u64::try_from(retry.as_millis()).unwrap_or(u64::MAX);
        headers.insert(GRPC_RETRY_PUSHBACK, HeaderValue::from(ms));
    }
    response
}

/// `grpc-message` is percent-encoded: every byte outside `0x20..=0x7E`, and `%`.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `google.rpc.Status { code, message, details: [Any(ErrorInfo), Any(RetryInfo)?] }`,
/// protobuf-encoded.
fn status_details(code: i32, message: &str, reason: &str, retry: Option<Duration>) -> Vec<u8> {
    let mut error_info = Vec::new();
    field_bytes(&mut error_info, 1, reason.as_bytes());
    field_bytes(&mut error_info, 2, b"idem");
    let mut details = vec![any("type.googleapis.com/google.rpc.ErrorInfo", &error_info)];
    if let Some(retry) = retry {
        let mut duration = Vec::new();
        field_varint(&mut duration, 1, retry.as_secs());
        field_varint(&mut duration, 2, u64::from(retry.subsec_nanos()));
        let mut retry_info = Vec::new();
        field_bytes(&mut retry_info, 1, &duration);
        details.push(any("type.googleapis.com/google.rpc.RetryInfo", &retry_info));
    }
    let mut status = Vec::new();
    // proto3 int32: a negative value would be 10 bytes; codes are 0..=16.
    field_varint(&mut status, 1, u64::from(code.unsigned_abs()));
    field_bytes(&mut status, 2, message.as_bytes());
    for detail in details {
        field_bytes(&mut status, 3, &detail);
    }
    status
}

/// `google.protobuf.Any { type_url, value }`.
fn any(type_url: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    field_bytes(&mut out, 1, type_url.as_bytes());
    field_bytes(&mut out, 2, value);
    out
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A varint field; zero is the default and is left out, as proto3 does.
fn field_varint(out: &mut Vec<u8>, field: u64, value: u64) {
    if value != 0 {
        varint(out, field << 3);
        varint(out, value);
    }
}

/// A length-delimited field (string, bytes, message); empty ones are left out.
fn field_bytes(out: &mut Vec<u8>, field: u64, value: &[u8]) {
    if !value.is_empty() {
        varint(out, (field << 3) | 2);
        varint(out, value.len() as u64);
        out.extend_from_slice(value);
    }
}

/// Counts the gRPC messages in a body as it is read: each message is a 5-byte
/// prefix (compressed flag, big-endian length) and that many bytes.
#[derive(Debug, Default)]
pub(crate) struct Framing {
    /// Bytes of the current message (prefix included) still to come.
    left: u64,
    /// The prefix read so far, while it is incomplete.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Messages begun.
    begun: usize,
}

impl Framing {
    /// Reads `chunk`; returns how many messages have begun so far.
    pub(crate) fn feed(&mut self, mut chunk: &[u8]) -> usize {
        while !chunk.is_empty() {
            if self.left > 0 {
                let take = self.left.min(chunk.len() as u64);
                self.left -= take;
                chunk = &chunk[take as usize..];
                continue;
            }
            if self.prefix_len == 0 {
                self.begun += 1;
            }
            let take = (5 - self.prefix_len).min(chunk.len());
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&chunk[..take]);
            self.prefix_len += take;
            chunk = &chunk[take..];
            if self.prefix_len == 5 {
                let [_, a, b, c, d] = self.prefix;
                self.left = u64::from(u32::from_be_bytes([a, b, c, d]));
                self.prefix_len = 0;
            }
        }
        self.begun
    }

    /// How many messages `data` holds (the last one possibly cut short).
    pub(crate) fn count(data: &[u8]) -> usize {
        Framing::default().feed(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_are_told_from_others() {
        for (value, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC+json", true),
            ("application/grpc; charset=utf-8", true),
            ("application/grpc-web", false),
            ("application/grpc-web+proto", false),
            ("application/json", false),
            ("application/grp", false),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            assert_eq!(is_grpc(&headers), grpc, "{value}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
        assert_eq!(Protocol::Grpc.dialect(&HeaderMap::new()), Dialect::Grpc);
    }

    #[test]
    fn a_reply_is_judged_as_grpc_only_if_it_says_so_under_auto() {
        let mut grpc = HeaderMap::new();
        grpc.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let mut status_only = HeaderMap::new();
        status_only.insert(GRPC_STATUS, HeaderValue::from_static("14"));
        let mut json = HeaderMap::new();
        json.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert!(Protocol::Auto.grpc_reply(Dialect::Grpc, &grpc));
        assert!(Protocol::Auto.grpc_reply(Dialect::Grpc, &status_only));
        assert!(!Protocol::Auto.grpc_reply(Dialect::Grpc, &json));
        assert!(!Protocol::Auto.grpc_reply(Dialect::Http, &grpc));
        assert!(Protocol::Grpc.grpc_reply(Dialect::Grpc, &json));
        assert!(!Protocol::Http.grpc_reply(Dialect::Http, &grpc));
    }

    #[test]
    fn messages_are_counted_across_chunk_boundaries() {
        let mut two = vec![0, 0, 0, 0, 3, b'a', b'b', b'c'];
        two.extend_from_slice(&[0, 0, 0, 0, 0]); // an empty message
        assert_eq!(Framing::count(&two), 2);
        assert_eq!(Framing::count(&two[..8]), 1);
        assert_eq!(Framing::count(&[]), 0);
        for split in 0..two.len() {
            let mut framing = Framing::default();
            framing.feed(&two[..split]);
            assert_eq!(framing.feed(&two[split..]), 2, "split at {split}");
        }
        let mut one_by_one = Framing::default();
        let counts: Vec<usize> = two.iter().map(|b| one_by_one.feed(&[*b])).collect();
        assert_eq!(counts[7], 1);
        assert_eq!(counts[8], 2);
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("plain text: ok"), "plain text: ok");
        assert_eq!(percent_encode("100%\ncafé"), "100%25%0Acaf%C3%A9");
    }

    #[test]
    fn status_details_are_google_rpc_status() {
        // Encoded by hand from the .proto definitions; decoded here field by field.
        let bytes = status_details(10, "busy", "IN_PROGRESS", Some(Duration::from_millis(1500)));
        let mut expected = vec![0x08, 10, 0x12, 4];
        expected.extend_from_slice(b"busy");
        let info = any("type.googleapis.com/google.rpc.ErrorInfo", &{
            let mut v = vec![0x0a, 11];
            v.extend_from_slice(b"IN_PROGRESS");
            v.extend_from_slice(&[0x12, 4]);
            v.extend_from_slice(b"idem");
            v
        });
        expected.push(0x1a);
        expected.push(info.len() as u8);
        expected.extend_from_slice(&info);
        // RetryInfo { retry_delay: Duration { seconds: 1, nanos: 500_000_000 } }
        let retry = any(
            "type.googleapis.com/google.rpc.RetryInfo",
            &[0x0a, 8, 0x08, 1, 0x10, 0x80, 0xca, 0xb5, 0xee, 0x01],
        );
        expected.push(0x1a);
        expected.push(retry.len() as u8);
        expected.extend_from_slice(&retry);
        assert_eq!(bytes, expected);
    }
}
