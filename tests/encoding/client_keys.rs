//! Client keys (CONTRACT §3.1), property-tested: `ClientKey::parse` and the
//! HTTP layer's `Idempotency-Key` parsing accept exactly 1 to 255 visible
//! ASCII characters (`!`..=`~`), bare or as an RFC 8941 quoted string, and
//! both spellings name one key.

use std::sync::Arc;

use axum::routing::post;
use axum::Router;
use idem_runtime::http::IdempotencyLayer;
use idem_runtime::{ClientKey, MemoryStore};
use proptest::prelude::*;
use tower::ServiceExt as _;

fn is_valid_client_key(bytes: &[u8]) -> bool {
    (1..=255).contains(&bytes.len()) && bytes.iter().all(|b| (b'!'..=b'~').contains(b))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn client_keys_are_exactly_1_to_255_visible_ascii(
        key in prop_oneof![
            "[!-~]{0,300}",
            "[ -~\t]{0,260}",
            any::<String>(),
            "[!-~]{250,260}",
        ]
    ) {
        let accepted = ClientKey::parse(&key).is_ok();
        prop_assert_eq!(accepted, is_valid_client_key(key.as_bytes()), "{:?}", key);
        if accepted {
            let parsed = ClientKey::parse(&key).unwrap();
            prop_assert_eq!(parsed.as_str(), key.as_str());
        }
    }
}

/// The key a header value names, by RFC 8941's string grammar for values that
/// start with `"` and as-is otherwise (surrounding spaces and tabs ignored),
/// or `None` if the value names no valid key.
fn header_key(value: &[u8]) -> Option<Vec<u8>> {
    let start = value.iter().position(|b| *b != b' ' && *b != b'\t')?;
    let end = value.iter().rposition(|b| *b != b' ' && *b != b'\t')? + 1;
    let value = &value[start..end];
    let key = if value[0] == b'"' {
        let mut key = Vec::new();
        let mut i = 1;
        loop {
            match *value.get(i)? {
                b'"' => break,
                b'\\' => {
                    let c = *value.get(i + 1)?;
                    if c != b'"' && c != b'\\' {
                        return None;
                    }
                    key.push(c);
                    i += 2;
                    continue;
                }
                c if (0x20..=0x7e).contains(&c) => key.push(c),
                _ => return None,
            }
            i += 1;
        }
        if i + 1 != value.len() {
            return None;
        }
        key
    } else {
        value.to_vec()
    };
    is_valid_client_key(&key).then_some(key)
}

/// `key` as a Structured Field string.
fn quote(key: &[u8]) -> Vec<u8> {
    let mut out = vec![b'"'];
    for &b in key {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    out
}

fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        8 => 0x21u8..=0x7e,
        1 => Just(b' '),
        1 => Just(b'\t'),
        1 => Just(b'"'),
        1 => Just(b'\\'),
        1 => 0x80u8..=0xff,
    ];
    let raw = prop_oneof![
        prop::collection::vec(byte.clone(), 0..300),
        prop::collection::vec(0x21u8..=0x7e, 250..260),
        prop::collection::vec(byte, 0..4),
    ];
    prop_oneof![
        raw.clone(),
        // Quoted, well-formed or not (a trailing parameter, a lone backslash).
        (
            raw.clone(),
            prop_oneof![Just(&b""[..]), Just(&b";a=1"[..]), Just(&b" "[..])]
        )
            .prop_map(|(key, tail)| [&quote(&key)[..], tail].concat()),
        raw.prop_map(|key| [&b"\""[..], &key].concat()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// Both spellings of a key name the same key; `from_header` accepts exactly
    /// the values that name a valid key.
    #[test]
    fn a_header_names_the_same_key_bare_or_quoted(value in header_bytes(), key in "[!-~]{1,255}") {
        let parsed = ClientKey::from_header(&value).ok().map(|k| k.into_string().into_bytes());
        prop_assert_eq!(parsed, header_key(&value), "{:?}", String::from_utf8_lossy(&value));
        let quoted = ClientKey::from_header(&quote(key.as_bytes())).unwrap();
        prop_assert_eq!(quoted.as_str(), key.as_str());
        if !key.starts_with('"') {
            prop_assert_eq!(ClientKey::from_header(key.as_bytes()).unwrap(), quoted);
        }
    }
}

#[test]
fn the_http_layer_accepts_exactly_the_client_key_set() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let app = Router::new()
        .route("/x", post(|| async { "ran" }))
        .layer(IdempotencyLayer::new(Arc::new(MemoryStore::new())).global_scope());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 1_000,
        ..ProptestConfig::default()
    });
    runner
        .run(&header_bytes(), |bytes| {
            // Values `http` itself refuses never reach a service.
            let Ok(value) = axum::http::HeaderValue::from_bytes(&bytes) else {
                return Ok(());
            };
            let request = axum::http::Request::post("/x")
                .header("idempotency-key", value)
                .body(axum::body::Body::empty())
                .unwrap();
            let response = runtime.block_on(app.clone().oneshot(request)).unwrap();
            let expected = if header_key(&bytes).is_some() {
                200
            } else {
                400
            };
            prop_assert_eq!(response.status().as_u16(), expected, "{:?}", bytes);
            Ok(())
        })
        .unwrap();
}

/// A client (or a proxy) that switches spelling between retries gets a replay:
/// `"q-1"` and `q-1` are one key (issue 11, item 3).
#[tokio::test]
async fn the_quoted_and_the_bare_spelling_are_one_key() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let app = Router::new()
        .route(
            "/x",
            post(move || {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                async move { format!("run {n}") }
            }),
        )
        .layer(IdempotencyLayer::new(Arc::new(MemoryStore::new())).global_scope());
    for (spelling, replayed) in [
        (&br"q-1"[..], false),
        (br#""q-1""#, true),
        (br#"  "q-1"	"#, true),
        (br"q-1", true),
        (br#""q\\-1""#, false),
        (br#""q\"1""#, false),
        (br#"q"1"#, true),
    ] {
        let request = axum::http::Request::post("/x")
            .header(
                "idempotency-key",
                axum::http::HeaderValue::from_bytes(spelling).unwrap(),
            )
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let what = String::from_utf8_lossy(spelling);
        assert_eq!(response.status(), 200, "{what}");
        assert_eq!(
            response.headers().contains_key("idempotent-replayed"),
            replayed,
            "{what}"
        );
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "q-1, q\\-1 and q\"1 each ran once"
    );
    for malformed in [&br#""q-1"#[..], br#""q-1";a=1"#, br#""q\n""#, br#""q-1"x"#] {
        let request = axum::http::Request::post("/x")
            .header(
                "idempotency-key",
                axum::http::HeaderValue::from_bytes(malformed).unwrap(),
            )
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(
            response.status(),
            400,
            "{}",
            String::from_utf8_lossy(malformed)
        );
    }
}
