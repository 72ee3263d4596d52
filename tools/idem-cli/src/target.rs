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
///
/// What plain JSON cannot say is spelled as an object with one `$` field
/// (see [`TAGS`]): `{"$some": v}`, `{"$set": [..]}`, `{"$map": [[k, v], ..]}`,
/// `{"$int": "digits"}`, `{"$f32": x}`, `{"$f64": x}`, `{"$bytes": "hex"}`, `{"$unit": null}`,
/// `{"$variant": "Name"}` and `{"$variant": "Name", "$value": v}`.
struct Part<'a>(&'a Value);

/// The typed spellings: an object whose fields all start with `$`.
pub(crate) const TAGS: &str =
    "$some, $set, $map, $int, $f32, $f64, $bytes, $unit, $variant (+ $value)";

/// The elements of a `{"$set": [..]}`: a type whose name ends in `Set`, so the
/// canonical encoding sorts them as it sorts a `HashSet`'s or `BTreeSet`'s.
struct PartSet<'a>(&'a [Value]);

impl<'a> IntoIterator for PartSet<'a> {
    type Item = Part<'a>;
    type IntoIter = std::iter::Map<std::slice::Iter<'a, Value>, fn(&'a Value) -> Part<'a>>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(Part as fn(&'a Value) -> Part<'a>)
    }
}

fn tagged<S: Serializer>(fields: &serde_json::Map<String, Value>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::Error as _;
    let bad = |what: String| S::Error::custom(format!("{what} (typed spellings: {TAGS})"));
    let one = |tag: &str| (fields.len() == 1).then(|| fields.get(tag)).flatten();
    if let Some(v) = one("$some") {
        return s.serialize_some(&Part(v));
    }
    if let Some(v) = one("$set") {
        let Value::Array(items) = v else {
            return Err(bad("$set takes an array".into()));
        };
        return s.collect_seq(PartSet(items));
    }
    if let Some(v) = one("$map") {
        let Some(entries) = v.as_array().filter(|e| {
            e.iter()
                .all(|pair| pair.as_array().is_some_and(|kv| kv.len() == 2))
        }) else {
            return Err(bad("$map takes an array of [key, value] pairs".into()));
        };
        let mut map = s.serialize_map(Some(entries.len()))?;
        for pair in entries {
            map.serialize_entry(&Part(&pair[0]), &Part(&pair[1]))?;
        }
        return map.end();
    }
    if let Some(v) = one("$int") {
        let text = match v {
            Value::String(text) => text.clone(),
            Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
            _ => return Err(bad("$int takes the integer as a string of digits".into())),
        };
        return match (text.parse::<i128>(), text.parse::<u128>()) {
            (Ok(i), _) => s.serialize_i128(i),
            (_, Ok(u)) => s.serialize_u128(u),
            _ => Err(bad(format!(
                "$int: {text:?} is not an integer of up to 128 bits"
            ))),
        };
    }
    if let Some(v) = one("$f32") {
        // Rounded once, from the decimal text, as the compiler rounds an
        // `f32` literal (through `f64` a value near a midpoint can land one
        // step off).
        let text = match v {
            Value::Number(n) => n.to_string(),
            Value::String(text) => text.clone(),
            _ => return Err(bad("$f32 takes a number".into())),
        };
        let Ok(x) = text.parse::<f32>() else {
            return Err(bad(format!("$f32: {text:?} is not a number")));
        };
        return s.serialize_f32(x);
    }
    if let Some(v) = one("$f64") {
        // A float JSON cannot say: whole and beyond 2^63 (read as an integer
        // would be refused), NaN, infinities ("NaN", "inf", "-inf").
        let text = match v {
            Value::Number(n) => n.to_string(),
            Value::String(text) => text.clone(),
            _ => {
                return Err(bad(
                    "$f64 takes a number, or \"NaN\", \"inf\", \"-inf\"".into()
                ))
            }
        };
        let Ok(x) = text.parse::<f64>() else {
            return Err(bad(format!("$f64: {text:?} is not a number")));
        };
        return s.serialize_f64(x);
    }
    if let Some(v) = one("$bytes") {
        let Some(bytes) = v.as_str().and_then(from_hex) else {
            return Err(bad("$bytes takes hex digits, two a byte".into()));
        };
        return s.serialize_bytes(&bytes);
    }
    if let Some(Value::Null) = one("$unit") {
        return s.serialize_unit();
    }
    if let Some(Value::String(name)) = fields.get("$variant") {
        // serde names variants with `&'static str`; the CLI runs one command.
        let name: &'static str = Box::leak(name.clone().into_boxed_str());
        return match (fields.len(), fields.get("$value")) {
            (1, None) => s.serialize_unit_variant("", 0, name),
            (2, Some(payload)) => s.serialize_newtype_variant("", 0, name, &Part(payload)),
            _ => Err(bad("$variant takes a name and, for data, one $value".into())),
        };
    }
    let names: Vec<&str> = fields.keys().map(String::as_str).collect();
    Err(bad(format!(
        "{{{}}} is not a typed spelling; a map or struct with keys that start with `$` is \
         spelled {{\"$map\": [[\"$key\", value], ..]}}",
        names.join(", ")
    )))
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

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
                (None, None, Some(f))
                    if f.fract() == 0.0 && f.abs() >= 9.223_372_036_854_776e18 =>
                {
                    Err(serde::ser::Error::custom(format!(
                        "{n} is beyond 64-bit integers, where JSON cannot tell an integer \
                         (u128, i128) from a float: spell it {{\"$int\": \"{n}\"}}, or a float \
                         {{\"$f64\": {n}}}"
                    )))
                }
                // `-0` reads as the float -0.0, which the encoding folds to
                // 0.0: not the key of the integer 0. Ambiguous, so refused.
                (None, None, Some(f)) if f == 0.0 && f.is_sign_negative() => {
                    Err(serde::ser::Error::custom(
                        "-0 is ambiguous in JSON: write 0 for an integer zero, 0.0 for a float",
                    ))
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
            Value::Object(fields) if fields.keys().any(|k| k.starts_with('$')) => tagged(fields, s),
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
    fn typed_spellings_give_the_macros_key() {
        use std::collections::{BTreeMap, BTreeSet, HashSet};
        #[derive(serde::Serialize)]
        struct Req {
            coupon: Option<String>,
            tags: HashSet<String>,
        }
        #[derive(serde::Serialize)]
        enum Kind {
            Card,
            Transfer(u32),
            Wallet { id: u64 },
            Split(u8, u8),
        }
        let tags: HashSet<String> = ["b", "a", "c"].map(String::from).into();
        let expected = KeyBuilder::new("n")
            .part(&Req {
                coupon: Some("SPRING".into()),
                tags: tags.clone(),
            })
            .part(&BTreeSet::from([3u8, 1, 2]))
            .part(&BTreeMap::from([(1u32, 2u32), (7, 9)]))
            .part(&u128::MAX)
            .part(&i128::MIN)
            .part(&0.1f32)
            .part(&Kind::Card)
            .part(&Kind::Transfer(5))
            .part(&Kind::Wallet { id: 3 })
            .part(&Kind::Split(1, 2))
            .part(&Some(Some(4u8)))
            .finish()
            .unwrap();
        let parts = format!(
            r#"[{{"coupon": {{"$some": "SPRING"}}, "tags": {{"$set": ["c", "a", "b"]}}}},
                {{"$set": [2, 3, 1]}},
                {{"$map": [[7, 9], [1, 2]]}},
                {{"$int": "{}"}},
                {{"$int": "{}"}},
                {{"$f32": 0.1}},
                {{"$variant": "Card"}},
                {{"$variant": "Transfer", "$value": 5}},
                {{"$variant": "Wallet", "$value": {{"id": 3}}}},
                {{"$variant": "Split", "$value": [1, 2]}},
                {{"$some": {{"$some": 4}}}}]"#,
            u128::MAX,
            i128::MIN
        );
        assert_eq!(key(resolve(&spec("n", &parts)).unwrap()), expected.as_str());
        // `serde_bytes`-style bytes, and a unit.
        struct Bytes;
        impl serde::Serialize for Bytes {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&[0xde, 0xad])
            }
        }
        let expected = KeyBuilder::new("n")
            .part(&Bytes)
            .part(&[()])
            .finish()
            .unwrap();
        let got = resolve(&spec("n", r#"[{"$bytes": "dead"}, [{"$unit": null}]]"#)).unwrap();
        assert_eq!(key(got), expected.as_str());
    }

    #[test]
    fn a_negative_zero_is_refused_and_f32_rounds_once() {
        let err = resolve(&spec("n", "[-0]")).unwrap_err();
        assert!(err.contains("-0 is ambiguous"), "{err}");
        // 16777217 is halfway between two f32s: straight to f32 it rounds to
        // even (16777216), as `16777217f32` does.
        let expected = KeyBuilder::new("n").part(&16_777_217f32).finish().unwrap();
        let got = resolve(&spec("n", r#"[{"$f32": 16777217}]"#)).unwrap();
        assert_eq!(key(got), expected.as_str());
        let got = resolve(&spec("n", r#"[{"$f32": "0.1"}]"#)).unwrap();
        let expected = KeyBuilder::new("n").part(&0.1f32).finish().unwrap();
        assert_eq!(key(got), expected.as_str());
    }

    #[test]
    fn unknown_or_malformed_typed_spellings_are_refused() {
        for parts in [
            r#"[{"$sum": 1}]"#,
            r#"[{"$set": 1}]"#,
            r#"[{"$map": [[1]]}]"#,
            r#"[{"$int": "12x"}]"#,
            r#"[{"$bytes": "abc"}]"#,
            r#"[{"$variant": "A", "$value": 1, "x": 2}]"#,
            r#"[{"$some": 1, "other": 2}]"#,
        ] {
            let err = resolve(&spec("n", parts)).unwrap_err();
            assert!(err.contains("typed spellings"), "{parts}: {err}");
        }
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
