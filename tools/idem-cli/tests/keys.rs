//! The CLI's key derivation (`idem inspect NAMESPACE KEY_PARTS_JSON`) against
//! the key `#[idempotent]` stored, for the key shapes the README says JSON
//! spells: "an integer is any integer type, `null` a `None`, an object a
//! struct or map". A part the CLI cannot spell must be refused (exit 2), never
//! derived to another key (exit 1, "no record", when the record is there).

use std::collections::{BTreeMap, BTreeSet};

use idem_runtime::{idempotent, Error, MemoryStore, Store};
use serde::Serialize;
use serde_json::Value;

const NS: &str = "cli::keys";

#[derive(Debug, Serialize)]
struct Order {
    user: u64,
    coupon: Option<String>,
}

#[idempotent(name = "cli::keys", key = (order), store = store)]
async fn by_struct(store: &dyn Store, order: Order) -> Result<u32, Error> {
    Ok(1)
}

#[idempotent(name = "cli::keys", key = (id), store = store)]
async fn by_u128(store: &dyn Store, id: u128) -> Result<u32, Error> {
    Ok(1)
}

#[idempotent(name = "cli::keys", key = (tags), store = store)]
async fn by_set(store: &dyn Store, tags: BTreeSet<String>) -> Result<u32, Error> {
    Ok(1)
}

#[idempotent(name = "cli::keys", key = (qty), store = store)]
async fn by_map(store: &dyn Store, qty: BTreeMap<u32, u32>) -> Result<u32, Error> {
    Ok(1)
}

/// `idem inspect NS PARTS --json` on `store`: the exit and the document.
async fn inspect(store: &MemoryStore, parts: &str) -> (idem_cli::Exit, Value) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let exit = idem_cli::run_on(
        store,
        ["idem", "inspect", NS, parts, "--json"],
        &mut out,
        &mut err,
    )
    .await;
    let doc = serde_json::from_slice(&out).unwrap_or(Value::Null);
    (exit, doc)
}

/// The record is found, or the CLI says it cannot spell the part (usage):
/// never "no record" for a record that is there.
fn found_or_refused(exit: idem_cli::Exit, doc: &Value, what: &str) {
    assert!(
        matches!(exit, idem_cli::Exit::Ok | idem_cli::Exit::Usage),
        "{what}: the CLI derived another key than the macro's and reports {exit:?}: {doc}"
    );
}

#[tokio::test]
async fn a_struct_with_an_option_that_is_some() {
    let store = MemoryStore::new();
    let order = Order {
        user: 7,
        coupon: Some("SPRING".into()),
    };
    by_struct(&store, order).await.unwrap();
    let (exit, doc) = inspect(&store, r#"[{"user": 7, "coupon": {"$some": "SPRING"}}]"#).await;
    assert_eq!(exit, idem_cli::Exit::Ok, "{doc}");
    // Spelled as a plain string it is another value (a `String` field): the
    // miss says which parts need a typed spelling.
    let (exit, doc) = inspect(&store, r#"[{"user": 7, "coupon": "SPRING"}]"#).await;
    assert_eq!(exit, idem_cli::Exit::NotFound, "{doc}");
    assert!(doc.to_string().contains("$some"), "{doc}");
}

#[tokio::test]
async fn a_struct_with_an_option_that_is_none() {
    let store = MemoryStore::new();
    let order = Order {
        user: 8,
        coupon: None,
    };
    by_struct(&store, order).await.unwrap();
    let (exit, doc) = inspect(&store, r#"[{"user": 8, "coupon": null}]"#).await;
    assert_eq!(exit, idem_cli::Exit::Ok, "{doc}");
}

#[tokio::test]
async fn an_integer_beyond_64_bits() {
    let store = MemoryStore::new();
    let id = u128::from(u64::MAX) + 2;
    by_u128(&store, id).await.unwrap();
    let (exit, doc) = inspect(&store, &format!("[{id}]")).await;
    found_or_refused(exit, &doc, "u128 above u64::MAX");
    assert_eq!(exit, idem_cli::Exit::Usage, "{doc}");
    let (exit, doc) = inspect(&store, &format!(r#"[{{"$int": "{id}"}}]"#)).await;
    assert_eq!(exit, idem_cli::Exit::Ok, "{doc}");
}

#[tokio::test]
async fn a_set() {
    let store = MemoryStore::new();
    by_set(&store, BTreeSet::from(["a".to_owned(), "b".to_owned()]))
        .await
        .unwrap();
    let (exit, doc) = inspect(&store, r#"[{"$set": ["b", "a"]}]"#).await;
    assert_eq!(exit, idem_cli::Exit::Ok, "{doc}");
}

#[tokio::test]
async fn a_map_with_integer_keys() {
    let store = MemoryStore::new();
    by_map(&store, BTreeMap::from([(1, 2)])).await.unwrap();
    let (exit, doc) = inspect(&store, r#"[{"$map": [[1, 2]]}]"#).await;
    assert_eq!(exit, idem_cli::Exit::Ok, "{doc}");
}

// ---------------------------------------------------------------------------
// Property: for any value of a request type holding every shape serde gives a
// key part, its typed JSON spelling derives the key the macro stored.

mod generated {
    use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

    use proptest::prelude::*;
    use serde::{Serialize, Serializer};
    use serde_json::{json, Map, Value};

    /// Bytes serialized as bytes (what `serde_bytes` does).
    #[derive(Debug, Clone)]
    pub struct Blob(pub Vec<u8>);

    impl Serialize for Blob {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }

    #[derive(Debug, Clone, Serialize)]
    pub enum Kind {
        Plain,
        Amount(i64),
        Pair(u8, String),
        Named { x: u16, note: Option<String> },
    }

    #[derive(Debug, Clone, Serialize)]
    pub struct Inner {
        pub flag: bool,
        pub ratio: f64,
        /// A field whose name starts with `$`: the struct is spelled `$map`.
        #[serde(rename = "$ref")]
        pub reference: u8,
    }

    #[derive(Debug, Clone, Serialize)]
    pub struct Req {
        pub small: u8,
        pub signed: i64,
        pub big: u128,
        pub neg_big: i128,
        pub text: String,
        pub ch: char,
        pub maybe: Option<Option<String>>,
        pub list: Vec<i32>,
        pub tags: HashSet<String>,
        pub ids: BTreeSet<i64>,
        pub qty: HashMap<u32, String>,
        pub named: BTreeMap<String, Option<u16>>,
        pub ratio: f64,
        pub wide: f64,
        pub narrow: f32,
        pub kind: Kind,
        pub unit: (),
        pub tuple: (u8, String),
        pub inner: Inner,
        pub blob: Blob,
    }

    /// Any `f64` but NaN and the infinities (`wide` has those).
    fn finite() -> impl Strategy<Value = f64> {
        prop_oneof![
            proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL | proptest::num::f64::ZERO,
            (-1_000_000i64..1_000_000).prop_map(|n| n as f64),
            (-1e22f64..1e22).prop_map(f64::trunc),
        ]
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Plain),
            any::<i64>().prop_map(Kind::Amount),
            (any::<u8>(), ".{0,3}").prop_map(|(a, s)| Kind::Pair(a, s)),
            (any::<u16>(), proptest::option::of(".{0,3}"))
                .prop_map(|(x, note)| Kind::Named { x, note }),
        ]
    }

    pub fn req() -> impl Strategy<Value = Req> {
        let numbers = (
            any::<u8>(),
            any::<i64>(),
            prop_oneof![any::<u128>(), (0u128..1000)],
            prop_oneof![any::<i128>(), (-1000i128..1000)],
            finite(),
            prop_oneof![
                finite(),
                Just(f64::NAN),
                Just(f64::INFINITY),
                Just(f64::NEG_INFINITY)
            ],
            proptest::num::f32::NORMAL | proptest::num::f32::SUBNORMAL | proptest::num::f32::ZERO,
        );
        let texts = (
            ".{0,6}",
            any::<char>(),
            proptest::option::of(proptest::option::of(".{0,4}")),
            proptest::collection::vec(any::<i32>(), 0..4),
            proptest::collection::hash_set(".{0,3}", 0..4),
            proptest::collection::btree_set(any::<i64>(), 0..4),
            proptest::collection::hash_map(any::<u32>(), ".{0,3}", 0..4),
            // Keys that start with `$` (some a spelling's tag) are spelled
            // as `$map` pairs.
            proptest::collection::btree_map(
                prop_oneof![
                    "[$a-z]{0,3}",
                    Just("$some".to_owned()),
                    Just("$variant".to_owned()),
                    Just("$int".to_owned()),
                ],
                proptest::option::of(any::<u16>()),
                0..4,
            ),
        );
        let rest = (
            kind(),
            (any::<u8>(), ".{0,3}"),
            (any::<bool>(), finite(), any::<u8>()),
            proptest::collection::vec(any::<u8>(), 0..6),
        );
        (numbers, texts, rest).prop_map(
            |(
                (small, signed, big, neg_big, ratio, wide, narrow),
                (text, ch, maybe, list, tags, ids, qty, named),
                (kind, tuple, (flag, inner_ratio, reference), blob),
            )| Req {
                small,
                signed,
                big,
                neg_big,
                text,
                ch,
                maybe,
                list,
                tags,
                ids,
                qty,
                named,
                ratio,
                wide,
                narrow,
                kind,
                unit: (),
                tuple,
                inner: Inner {
                    flag,
                    ratio: inner_ratio,
                    reference,
                },
                blob: Blob(blob),
            },
        )
    }

    /// An integer as JSON: a number within 64 bits, else `$int`.
    fn int(n: i128) -> Value {
        match i64::try_from(n) {
            Ok(n) => json!(n),
            Err(_) => json!({ "$int": n.to_string() }),
        }
    }

    /// A `u128` as JSON: a number within 64 bits, else `$int`.
    pub fn uint(n: u128) -> Value {
        match u64::try_from(n) {
            Ok(n) => json!(n),
            Err(_) => json!({ "$int": n.to_string() }),
        }
    }

    /// A float as plain JSON where JSON can say it (`-0.0` is keyed as
    /// `0.0`, and JSON's `-0` is refused as ambiguous), else `$f64`: as a
    /// number where JSON has one, else as text.
    pub fn float(x: f64) -> Value {
        if x == 0.0 {
            json!(0.0)
        } else if x.is_finite() && !(x.fract() == 0.0 && x.abs() >= 9.2e18) {
            json!(x)
        } else if x.is_finite() {
            json!({ "$f64": x })
        } else {
            json!({ "$f64": x.to_string() })
        }
    }

    /// The items in the reverse of the order they come.
    fn reversed<T>(items: impl Iterator<Item = T>) -> Vec<T> {
        let mut items: Vec<T> = items.collect();
        items.reverse();
        items
    }

    fn some_text(s: &Option<String>) -> Value {
        s.as_ref().map_or(Value::Null, |s| json!({ "$some": s }))
    }

    /// The typed JSON spelling of `req`, as the README's table spells it:
    /// `$f32` as a number or as text (`f32_text`); sets and maps in the
    /// reverse of the order the value iterates.
    pub fn spell(req: &Req, f32_text: bool) -> Value {
        let maybe = match &req.maybe {
            None => Value::Null,
            Some(inner) => json!({ "$some": some_text(inner) }),
        };
        let named_values = |v: &Option<u16>| v.map_or(Value::Null, |v| json!({ "$some": v }));
        let named = if req.named.keys().any(|k| k.starts_with('$')) {
            let pairs: Vec<Value> = req
                .named
                .iter()
                .map(|(k, v)| json!([k, named_values(v)]))
                .collect();
            json!({ "$map": pairs })
        } else {
            Value::Object(
                req.named
                    .iter()
                    .map(|(k, v)| (k.clone(), named_values(v)))
                    .collect::<Map<String, Value>>(),
            )
        };
        let kind = match &req.kind {
            Kind::Plain => json!({ "$variant": "Plain" }),
            Kind::Amount(n) => json!({ "$variant": "Amount", "$value": n }),
            Kind::Pair(a, s) => json!({ "$variant": "Pair", "$value": [a, s] }),
            Kind::Named { x, note } => {
                json!({ "$variant": "Named", "$value": { "x": x, "note": some_text(note) } })
            }
        };
        let hex: String = req.blob.0.iter().map(|b| format!("{b:02x}")).collect();
        json!({
            "small": req.small,
            "signed": req.signed,
            "big": uint(req.big),
            "neg_big": int(req.neg_big),
            "text": req.text,
            "ch": req.ch.to_string(),
            "maybe": maybe,
            "list": req.list,
            "tags": { "$set": reversed(req.tags.iter()) },
            "ids": { "$set": req.ids.iter().rev().collect::<Vec<_>>() },
            "qty": { "$map": reversed(req.qty.iter().map(|(k, v)| json!([k, v]))) },
            "named": named,
            "ratio": float(req.ratio),
            "wide": float(req.wide),
            "narrow": if f32_text {
                json!({ "$f32": req.narrow.to_string() })
            } else {
                json!({ "$f32": req.narrow })
            },
            "kind": kind,
            "unit": { "$unit": null },
            "tuple": [req.tuple.0, req.tuple.1],
            "inner": { "$map": [
                ["flag", req.inner.flag],
                ["ratio", float(req.inner.ratio)],
                ["$ref", req.inner.reference],
            ] },
            "blob": { "$bytes": hex },
        })
    }
}

#[idempotent(name = "cli::keys", key = (req.signed, req.big, req.ratio, req), store = store)]
async fn by_generated(store: &dyn Store, req: generated::Req) -> Result<u32, Error> {
    Ok(1)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Any request, spelled: `inspect` finds the record the macro stored.
    #[test]
    fn any_request_spelled_finds_its_record(req in generated::req(), f32_text in proptest::bool::ANY) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let spelled = serde_json::json!([
            req.signed,
            generated::uint(req.big),
            generated::float(req.ratio),
            generated::spell(&req, f32_text),
        ])
        .to_string();
        let (exit, doc) = rt.block_on(async {
            let store = MemoryStore::new();
            by_generated(&store, req.clone()).await.unwrap();
            inspect(&store, &spelled).await
        });
        proptest::prop_assert_eq!(exit, idem_cli::Exit::Ok, "{:?} spelled {}: {}", req, spelled, doc);
    }
}
