//! How a response is kept in a record: JSON that `psql` or `redis-cli` can read,
//! exact to the byte (text as text, anything else as base64).

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::grpc::Dialect;
use super::layer::StoredHeaders;
use super::problem::{Problem, Withheld};
use super::{Body, IDEMPOTENT_REPLAYED};
use crate::Error;

/// A stored response: `{"ok": {"status": 201, "headers": [["content-type", "…"]], "body": "…"}}`,
/// with `"trailers": [[name, value], …]` when it had trailers; or, for a
/// response that was passed through without being stored (streamed, too large),
/// `{"ok": {"status": 201, "withheld": "streamed"}}`.
#[derive(Debug, Deserialize)]
struct StoredResponse {
    status: u16,
    #[serde(default)]
    headers: Vec<(String, Octets)>,
    body: Option<Octets>,
    trailers: Option<Vec<(String, Octets)>>,
    withheld: Option<String>,
}

/// The same shape, borrowed from the response being stored (no copies).
#[derive(Serialize)]
struct StoredResponseRef<'a> {
    status: u16,
    headers: Headers<'a>,
    body: OctetsRef<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trailers: Option<Headers<'a>>,
}

/// A response recorded without its body.
#[derive(Serialize)]
struct WithheldRef {
    status: u16,
    withheld: &'static str,
}

/// Bytes as a JSON string when they are UTF-8, else `{"base64": "…"}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Octets {
    Text(String),
    Binary { base64: String },
}

#[derive(Serialize)]
#[serde(untagged)]
enum OctetsRef<'a> {
    Text(&'a str),
    Binary { base64: String },
}

impl<'a> OctetsRef<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => OctetsRef::Text(text),
            Err(_) => OctetsRef::Binary {
                base64: base64::engine::general_purpose::STANDARD.encode(bytes),
            },
        }
    }
}

/// The stored headers, serialized straight from the `HeaderMap`, without the
/// hop-by-hop ones and those in `dropped`.
struct Headers<'a> {
    map: &'a HeaderMap,
    dropped: &'a [HeaderName],
}

impl Serialize for Headers<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            self.map
                .iter()
                .filter(|(name, _)| !hop_by_hop(name) && !self.dropped.contains(name))
                .map(|(name, value)| (name.as_str(), OctetsRef::new(value.as_bytes()))),
        )
    }
}

impl Octets {
    fn into_bytes(self) -> Result<Vec<u8>, Error> {
        match self {
            Octets::Text(text) => Ok(text.into_bytes()),
            Octets::Binary { base64 } => base64::engine::general_purpose::STANDARD
                .decode(base64)
                .map_err(|e| Error::codec(format!("stored response: bad base64: {e}"))),
        }
    }
}

/// Headers that describe one connection, not the response: never stored.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
    )
}

/// Encodes a response head, its whole body and its trailers for the store,
/// its headers cleaned as `policy` says (the response itself is not changed).
pub(crate) fn encode(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    trailers: Option<&HeaderMap>,
    policy: &StoredHeaders,
) -> Result<Vec<u8>, Error> {
    let rewritten;
    let headers = match &policy.rewrite {
        // The hook gets a copy without the dropped headers, and has the last
        // word (only hop-by-hop headers are left out after it).
        Some(rewrite) => {
            let mut copy = headers.clone();
            for name in &policy.dropped {
                copy.remove(name);
            }
            // A hook that panics must not unwind through the layer: the
            // handler has run, and its claim must be settled, not dropped.
            let rewrote =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rewrite(&mut copy)));
            if rewrote.is_err() {
                return Err(Error::codec("the stored-headers rewrite hook panicked"));
            }
            rewritten = copy;
            Headers {
                map: &rewritten,
                dropped: &[],
            }
        }
        None => Headers {
            map: headers,
            dropped: &policy.dropped,
        },
    };
    let stored = StoredResponseRef {
        status: status.as_u16(),
        headers,
        body: OctetsRef::new(body),
        trailers: trailers.map(|map| Headers {
            map,
            dropped: &policy.dropped,
        }),
    };
    crate::codec::encode_ok(&stored)
}

/// Encodes the record of a response that was passed through without being
/// stored: its status and why.
pub(crate) fn encode_withheld(status: StatusCode, why: Withheld) -> Result<Vec<u8>, Error> {
    crate::codec::encode_ok(&WithheldRef {
        status: status.as_u16(),
        withheld: why.as_str(),
    })
}

/// Rebuilds a stored response, marked `Idempotent-Replayed: true`; for a
/// withheld one, the problem that says so (410, or `FAILED_PRECONDITION` to a
/// gRPC client).
pub(crate) fn decode<B>(bytes: &[u8], dialect: Dialect) -> Result<Response<Body<B>>, Error> {
    let stored: StoredResponse = crate::codec::decode_ok(bytes)?;
    let status = StatusCode::from_u16(stored.status)
        .map_err(|e| Error::codec(format!("stored response: bad status: {e}")))?;
    let mut response = match (stored.withheld, stored.body) {
        (Some(why), None) => {
            let why = Withheld::parse(&why)
                .ok_or_else(|| Error::codec("stored response: unknown withheld reason"))?;
            let problem = Problem::ResponseNotStored {
                status: status.as_u16(),
                why,
            };
            problem.answer(dialect)
        }
        (None, Some(body)) => {
            let trailers = match stored.trailers {
                Some(list) => Some(header_map(list)?),
                None => None,
            };
            let mut response =
                Response::new(Body::buffered(Bytes::from(body.into_bytes()?), trailers));
            *response.status_mut() = status;
            *response.headers_mut() = header_map(stored.headers)?;
            response
        }
        _ => return Err(Error::codec("stored response: neither a body nor withheld")),
    };
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    Ok(response)
}

fn header_map(list: Vec<(String, Octets)>) -> Result<HeaderMap, Error> {
    let mut headers = HeaderMap::with_capacity(list.len());
    for (name, value) in list {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| Error::codec(format!("stored response: bad header name: {e}")))?;
        let value = HeaderValue::from_bytes(&value.into_bytes()?)
            .map_err(|e| Error::codec(format!("stored response: bad header value: {e}")))?;
        headers.append(name, value);
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_text_and_binary_exactly() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        headers.insert("x-raw", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        headers.insert("connection", HeaderValue::from_static("close"));
        let body = b"\x00\xffbinary";
        let keep_all = StoredHeaders {
            dropped: Vec::new(),
            rewrite: None,
        };
        let bytes = encode(StatusCode::CREATED, &headers, body, None, &keep_all).unwrap();
        let response: Response<Body<http_body_util::Empty<Bytes>>> =
            decode(&bytes, Dialect::Http).unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let h = response.headers();
        assert_eq!(h.get_all("set-cookie").iter().count(), 2);
        assert_eq!(h.get("x-raw").unwrap().as_bytes(), b"caf\xe9");
        assert!(h.get("connection").is_none());
        assert_eq!(h.get(IDEMPOTENT_REPLAYED).unwrap(), "true");
        let text = String::from_utf8(
            encode(
                StatusCode::OK,
                &HeaderMap::new(),
                b"{\"id\":1}",
                None,
                &keep_all,
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            text,
            r#"{"ok":{"status":200,"headers":[],"body":"{\"id\":1}"}}"#
        );
    }

    #[tokio::test]
    async fn trailers_and_withheld_responses_round_trip() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let policy = StoredHeaders {
            dropped: crate::http::DEFAULT_UNSTORED_HEADERS.to_vec(),
            rewrite: None,
        };
        let bytes = encode(
            StatusCode::OK,
            &HeaderMap::new(),
            b"x",
            Some(&trailers),
            &policy,
        )
        .unwrap();
        let response: Response<Body<http_body_util::Empty<Bytes>>> =
            decode(&bytes, Dialect::Http).unwrap();
        let collected = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));

        let bytes = encode_withheld(StatusCode::CREATED, Withheld::TooLarge).unwrap();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            r#"{"ok":{"status":201,"withheld":"too-large"}}"#
        );
        let response: Response<Body<http_body_util::Empty<Bytes>>> =
            decode(&bytes, Dialect::Http).unwrap();
        assert_eq!(response.status(), StatusCode::GONE);
        assert_eq!(response.headers().get(IDEMPOTENT_REPLAYED).unwrap(), "true");
        let response: Response<Body<http_body_util::Empty<Bytes>>> =
            decode(&bytes, Dialect::Grpc).unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "9");
        assert_eq!(response.headers().get(IDEMPOTENT_REPLAYED).unwrap(), "true");
    }

    #[test]
    fn dropped_and_rewritten_headers_stay_out_of_the_record() {
        let mut headers = HeaderMap::new();
        headers.append("set-cookie", HeaderValue::from_static("sid=ann"));
        headers.append("Set-Cookie2", HeaderValue::from_static("old=1"));
        headers.insert("x-secret", HeaderValue::from_static("s3"));
        headers.insert("etag", HeaderValue::from_static("\"v1\""));
        let mut trailers = HeaderMap::new();
        trailers.insert("x-secret", HeaderValue::from_static("t"));
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let mut dropped = crate::http::DEFAULT_UNSTORED_HEADERS.to_vec();
        dropped.push(HeaderName::from_static("x-secret"));
        let plain = StoredHeaders {
            dropped: dropped.clone(),
            rewrite: None,
        };
        let text = String::from_utf8(
            encode(StatusCode::OK, &headers, b"", Some(&trailers), &plain).unwrap(),
        )
        .unwrap();
        assert_eq!(
            text,
            r#"{"ok":{"status":200,"headers":[["etag","\"v1\""]],"body":"","trailers":[["grpc-status","0"]]}}"#
        );
        let rewriting = StoredHeaders {
            dropped,
            rewrite: Some(std::sync::Arc::new(|h: &mut HeaderMap| {
                assert!(h.get("set-cookie").is_none(), "dropped before the hook");
                h.insert("etag", HeaderValue::from_static("\"v2\""));
                h.insert("connection", HeaderValue::from_static("close"));
            })),
        };
        let text =
            String::from_utf8(encode(StatusCode::OK, &headers, b"", None, &rewriting).unwrap())
                .unwrap();
        assert_eq!(
            text,
            r#"{"ok":{"status":200,"headers":[["etag","\"v2\""]],"body":""}}"#
        );
        // The response itself is untouched.
        assert_eq!(headers.get_all("set-cookie").iter().count(), 1);
    }

    #[test]
    fn corrupt_records_are_codec_errors() {
        for bad in [
            &b"garbage"[..],
            br#"{"ok":{"status":99999,"headers":[],"body":""}}"#,
            br#"{"ok":{"status":200,"headers":[["bad name","x"]],"body":""}}"#,
            br#"{"ok":{"status":200,"headers":[],"body":{"base64":"!!"}}}"#,
            br#"{"ok":{"status":200,"headers":[]}}"#,
            br#"{"ok":{"status":200,"withheld":"lost"}}"#,
            br#"{"ok":{"status":200,"body":"","withheld":"streamed"}}"#,
        ] {
            let out: Result<Response<Body<http_body_util::Empty<Bytes>>>, _> =
                decode(bad, Dialect::Http);
            assert!(
                matches!(out, Err(Error::Codec(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
