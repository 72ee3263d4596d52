//! Which record a command is about: the storage key derived exactly as
//! `#[idempotent]` derives it (namespace, key parts, window), a storage key
//! as written (`namespace:hex`), or a digest.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_runtime::key::KeyBuilder;
use idem_runtime::Digest;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Value;

/// A record named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// One storage key.
    Key(String),
    /// A digest in any namespace: found by a search.
    Digest(Digest),
}

/// What the command line says about the record (see `args::TargetArgs`).
pub(crate) struct Spec<'a> {
    pub namespace_or_key: Option<&'a str>,
    pub parts: Option<&'a str>,
    pub digest: Option<&'a str>,
    pub window: Option<Duration>,
    pub at_ms: Option<u64>,
}

/// Resolves `spec` to a target, or says what is wrong with it (a usage error).
pub(crate) fn resolve(spec: &Spec<'_>) -> Result<Target, String> {
    if spec.window.is_none() && spec.at_ms.is_some() {
        return Err("--at needs --window".into());
    }
    let digest = spec
        .digest
        .map(|hex| {
            Digest::from_hex(&hex.to_ascii_lowercase())
                .ok_or_else(|| format!("--digest {hex:?} is not 64 hex digits"))
        })
        .transpose()?;
    match (spec.namespace_or_key, spec.parts, digest) {
        (Some(_), Some(_), Some(_)) => {
            Err("give KEY_PARTS_JSON or --digest, not both".into())
        }
        (Some(namespace), Some(parts), None) => derive(namespace, parts, spec),
        (_, None, _) if spec.window.is_some() => {
            Err("--window applies to KEY_PARTS_JSON only (a digest already holds its bucket)".into())
        }
        (Some(namespace), None, Some(digest)) => Ok(Target::Key(format!("{namespace}:{digest}"))),
        (None, None, Some(digest)) => Ok(Target::Digest(digest)),
        (Some(key), None, None) => storage_key(key).map(Target::Key),
        (None, Some(_), _) => unreachable!("clap fills positionals in order"),
        (None, None, None) => Err(
            "name the record: NAMESPACE KEY_PARTS_JSON, a storage key NAMESPACE:HEX, or --digest HEX"
                .into(),
        ),
    }
}

/// A storage key as given: `namespace:` and 64 hex digits.
fn storage_key(key: &str) -> Result<String, String> {
    let hint = "expected a storage key NAMESPACE:HEX (64 hex digits), or NAMESPACE KEY_PARTS_JSON";
    let (namespace, hex) = key
        .rsplit_once(':')
        .ok_or_else(|| format!("{key:?}: {hint}"))?;
    let digest =
        Digest::from_hex(&hex.to_ascii_lowercase()).ok_or_else(|| format!("{key:?}: {hint}"))?;
    if namespace.is_empty() {
        return Err(format!("{key:?}: the namespace is empty"));
    }
    Ok(format!("{namespace}:{digest}"))
}

/// The storage key `#[idempotent]` derives for `namespace` and the parts.
fn derive(namespace: &str, parts: &str, spec: &Spec<'_>) -> Result<Target, String> {
    let parts: Value =
        serde_json::from_str(parts).map_err(|e| format!("KEY_PARTS_JSON is not JSON: {e}"))?;
    let Value::Array(parts) = parts else {
        return Err(
            "KEY_PARTS_JSON must be a JSON array, one element per key part: [7, \"sku-1\"]".into(),
        );
    };
    let mut builder = parts
        .iter()
        .fold(KeyBuilder::new(namespace), |b, part| b.part(&Part(part)));
    if let Some(window) = spec.window {
        let at = spec
            .at_ms
            .map_or_else(SystemTime::now, |ms| UNIX_EPOCH + Duration::from_millis(ms));
        builder = builder.window_at(window, at);
    }
    builder
        .finish()
        .map(|key| Target::Key(key.as_str().to_owned()))
        .map_err(|e| match e {
            idem_runtime::Error::MissingKey => {
                "the key is missing: no parts, or a part that is null or \"\" (the macro refuses such keys too)".into()
            }
            other => format!("the key parts cannot be encoded: {other}"),
        })
}

/// A JSON value serialized as the Rust value it stands for would be: an
/// integer by value (so `7` is the key of `7u8` and `7i64` alike), a float
/// as `f64`, `null` as `None` (`Option` fields; at the top of a part, a
/// missing key), an array as a list, an object as a struct or map (sorted
/// by the encoding either way).
struct Part<'a>(&'a Value);

impl Serialize for Part<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Null => s.serialize_none(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => s.serialize_u64(u),
                (None, Some(i), _) => s.serialize_i64(i),
                // JSON reads an integer beyond 64 bits (a `u128` or `i128`
                // key) as a float: the key would silently be another. Such a
                // number (or a float as large and whole) is refused.
                (None, None, Some(f)) if f.fract() == 0.0 && f.abs() >= 9.223_372_036_854_776e18 => {
                    Err(serde::ser::Error::custom(format!(
                        "{n} is beyond 64-bit integers, where JSON cannot tell an integer \
                         (u128, i128) from a float: name the record by its storage key or --digest"
                    )))
                }
                (None, None, Some(f)) => s.serialize_f64(f),
                (None, None, None) => Err(serde::ser::Error::custom("a number out of range")),
            },
            Value::String(text) => s.serialize_str(text),
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&Part(item))?;
                }
                seq.end()
            }
            Value::Object(fields) => {
                let mut map = s.serialize_map(Some(fields.len()))?;
                for (name, value) in fields {
                    map.serialize_entry(name, &Part(value))?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_runtime::key::KeyBuilder;

    fn spec<'a>(ns: &'a str, parts: &'a str) -> Spec<'a> {
        Spec {
            namespace_or_key: Some(ns),
            parts: Some(parts),
            digest: None,
            window: None,
            at_ms: None,
        }
    }

    fn key(target: Target) -> String {
        match target {
            Target::Key(key) => key,
            Target::Digest(_) => panic!("a key was expected"),
        }
    }

    #[test]
    fn parts_give_the_macros_key() {
        #[derive(serde::Serialize)]
        struct Req {
            user: u64,
            tags: Vec<String>,
            note: Option<String>,
        }
        let expected = KeyBuilder::new("shop::create")
            .part(&7u32)
            .part("sku-1")
            .part(&Req {
                user: 9,
                tags: vec!["a".into()],
                note: None,
            })
            .part(&-3i64)
            .part(&1.5f32)
            .finish()
            .unwrap();
        let got = resolve(&spec(
            "shop::create",
            r#"[7, "sku-1", {"tags": ["a"], "user": 9, "note": null}, -3, 1.5]"#,
        ))
        .unwrap();
        assert_eq!(key(got), expected.as_str());
    }

    #[test]
    fn windows_bucket_the_given_time() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let expected = KeyBuilder::new("n")
            .part(&1)
            .window_at(Duration::from_secs(86_400), at)
            .finish()
            .unwrap();
        let mut s = spec("n", "[1]");
        s.window = Some(Duration::from_secs(86_400));
        s.at_ms = Some(1_700_000_000_000);
        assert_eq!(key(resolve(&s).unwrap()), expected.as_str());
    }

    #[test]
    fn storage_keys_and_digests_are_taken_as_written() {
        let hex = "AB".repeat(32);
        let s = Spec {
            namespace_or_key: Some("a::b"),
            parts: None,
            digest: None,
            window: None,
            at_ms: None,
        };
        assert!(resolve(&s).is_err(), "a bare namespace is not a key");
        let full = format!("a::b:{hex}");
        let s = Spec {
            namespace_or_key: Some(&full),
            ..s
        };
        assert_eq!(
            key(resolve(&s).unwrap()),
            format!("a::b:{}", hex.to_lowercase())
        );
        let s = Spec {
            namespace_or_key: None,
            digest: Some(&hex),
            ..s
        };
        assert!(matches!(resolve(&s).unwrap(), Target::Digest(_)));
    }

    #[test]
    fn bad_parts_are_usage_errors() {
        for parts in ["7", "[", "[null]", "[\"\"]", "[]"] {
            assert!(resolve(&spec("n", parts)).is_err(), "{parts}");
        }
    }
}
