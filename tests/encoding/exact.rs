//! Replays are exact: property tests over generated values of many shapes.
//!
//! For every generated value the codec either stores it faithfully — the
//! replay equals the first result, floats compared bit for bit — or refuses it
//! on the first call with `Error::Codec`, leaving no record behind. Which
//! values must be refused is stated independently below (`faithful`): NaN and
//! infinities, and `Some(x)` where `x` is written as JSON `null`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use idem_runtime::codec::Codec;
use idem_runtime::engine::{execute, Options};
use idem_runtime::key::KeyBuilder;
use idem_runtime::{Error, MemoryStore, PostgresStore, RedisStore, SqliteStore, Store};
use idem_tests::{postgres_url, redis_url, unique};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde::{Deserialize, Serialize};

/// A value of many shapes.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum V {
    Unit,
    Bool(bool),
    I8(i8),
    I64(i64),
    U64(u64),
    I128(i128),
    U128(u128),
    F32(f32),
    F64(f64),
    Char(char),
    Str(String),
    Bytes(Vec<u8>),
    Opt(Option<Box<V>>),
    OptOpt(Option<Option<i32>>),
    OptUnit(Option<()>),
    List(Vec<V>),
    Map(BTreeMap<String, V>),
    IntMap(BTreeMap<i64, f64>),
    Tuple(u8, Box<V>),
    Record {
        a: Option<f64>,
        b: Vec<V>,
        c: String,
    },
}

/// The error type of the generated calls; `Declined` is cached.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum AppError {
    #[serde(skip)]
    Idem(String),
    Declined(V),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idem(format!("{e:?}"))
    }
}

/// Whether JSON can give `v` back as it was.
fn faithful(v: &V) -> bool {
    match v {
        V::F32(x) => x.is_finite(),
        V::F64(x) => x.is_finite(),
        V::Opt(Some(b)) | V::Tuple(_, b) => faithful(b),
        V::OptOpt(Some(None)) | V::OptUnit(Some(())) => false,
        V::List(items) => items.iter().all(faithful),
        V::Map(m) => m.values().all(faithful),
        V::IntMap(m) => m.values().all(|x| x.is_finite()),
        V::Record { a, b, .. } => a.is_none_or(|x| x.is_finite()) && b.iter().all(faithful),
        _ => true,
    }
}

/// Equality with floats compared bit for bit.
fn same(a: &V, b: &V) -> bool {
    match (a, b) {
        (V::F32(x), V::F32(y)) => x.to_bits() == y.to_bits(),
        (V::F64(x), V::F64(y)) => x.to_bits() == y.to_bits(),
        (V::Opt(x), V::Opt(y)) => match (x, y) {
            (None, None) => true,
            (Some(x), Some(y)) => same(x, y),
            _ => false,
        },
        (V::List(x), V::List(y)) => all_same(x, y),
        (V::Map(x), V::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, va), (kb, vb))| ka == kb && same(va, vb))
        }
        (V::IntMap(x), V::IntMap(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, va), (kb, vb))| ka == kb && va.to_bits() == vb.to_bits())
        }
        (V::Tuple(n, x), V::Tuple(m, y)) => n == m && same(x, y),
        (
            V::Record { a, b, c },
            V::Record {
                a: a2,
                b: b2,
                c: c2,
            },
        ) => a.map(f64::to_bits) == a2.map(f64::to_bits) && all_same(b, b2) && c == c2,
        // The remaining variants hold no floats: their Debug text is exact.
        _ => format!("{a:?}") == format!("{b:?}"),
    }
}

fn all_same(x: &[V], y: &[V]) -> bool {
    x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
}

fn f64s() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<u64>().prop_map(f64::from_bits),
        (1u64..(1 << 52)).prop_map(f64::from_bits),
        any::<f64>(),
        Just(-0.0),
        Just(f64::MIN_POSITIVE),
        Just(f64::MAX),
        Just(f64::MIN),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
    ]
}

fn f32s() -> impl Strategy<Value = f32> {
    prop_oneof![
        any::<u32>().prop_map(f32::from_bits),
        (1u32..(1 << 23)).prop_map(f32::from_bits),
        Just(-0.0f32),
        Just(f32::MAX),
        Just(f32::NAN),
        Just(f32::NEG_INFINITY),
    ]
}

fn values() -> impl Strategy<Value = V> {
    let leaf = prop_oneof![
        Just(V::Unit),
        any::<bool>().prop_map(V::Bool),
        prop_oneof![Just(i8::MIN), Just(i8::MAX), any::<i8>()].prop_map(V::I8),
        prop_oneof![Just(i64::MIN), Just(i64::MAX), any::<i64>()].prop_map(V::I64),
        prop_oneof![Just(u64::MAX), any::<u64>()].prop_map(V::U64),
        prop_oneof![Just(i128::MIN), Just(i128::MAX), any::<i128>()].prop_map(V::I128),
        prop_oneof![Just(u128::MAX), any::<u128>()].prop_map(V::U128),
        f32s().prop_map(V::F32),
        f64s().prop_map(V::F64),
        any::<char>().prop_map(V::Char),
        any::<String>().prop_map(V::Str),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(V::Bytes),
        proptest::option::of(proptest::option::of(any::<i32>())).prop_map(V::OptOpt),
        proptest::option::of(Just(())).prop_map(V::OptUnit),
        proptest::collection::btree_map(any::<i64>(), f64s(), 0..4).prop_map(V::IntMap),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::option::of(inner.clone().prop_map(Box::new)).prop_map(V::Opt),
            proptest::collection::vec(inner.clone(), 0..6).prop_map(V::List),
            proptest::collection::btree_map(any::<String>(), inner.clone(), 0..4).prop_map(V::Map),
            (any::<u8>(), inner.clone().prop_map(Box::new)).prop_map(|(n, v)| V::Tuple(n, v)),
            (
                proptest::option::of(f64s()),
                proptest::collection::vec(inner, 0..3),
                any::<String>()
            )
                .prop_map(|(a, b, c)| V::Record { a, b, c }),
        ]
    })
}

/// Ok outcomes and cached errors, through the codec alone.
#[test]
fn the_codec_replays_every_value_exactly_or_refuses_it() {
    let codec: Codec<V, AppError> = Codec::cache_errors();
    let mut runner = TestRunner::new(Config::with_cases(4096));
    runner
        .run(&(values(), any::<bool>()), |(v, as_error)| {
            let outcome = if as_error {
                Err(AppError::Declined(v.clone()))
            } else {
                Ok(v.clone())
            };
            let encoded = codec.encode(&outcome).expect("ok and declines are stored");
            if !faithful(&v) {
                prop_assert!(
                    matches!(encoded, Err(Error::Codec(_))),
                    "{v:?} must be refused, got {encoded:?}"
                );
                return Ok(());
            }
            let bytes = encoded.map_err(|e| TestCaseError::fail(format!("{v:?}: {e}")))?;
            match codec.decode(&bytes).expect("decodes") {
                Ok(back) | Err(AppError::Declined(back)) => {
                    prop_assert!(same(&v, &back), "{v:?} replayed as {back:?}");
                }
                Err(other) => prop_assert!(false, "{other:?}"),
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn every_double_and_float_round_trips_bit_for_bit() {
    let codec: Codec<(f64, f32), Error> = Codec::release_errors();
    let mut runner = TestRunner::new(Config::with_cases(100_000));
    runner
        .run(&(f64s(), f32s()), |(d, f)| {
            let Some(Ok(bytes)) = codec.encode(&Ok((d, f))) else {
                prop_assert!(!d.is_finite() || !f.is_finite(), "{d:e} {f:e} refused");
                return Ok(());
            };
            let (d2, f2) = codec.decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(d.to_bits(), d2.to_bits(), "{:e} came back as {:e}", d, d2);
            prop_assert_eq!(f.to_bits(), f2.to_bits(), "{:e} came back as {:e}", f, f2);
            Ok(())
        })
        .unwrap();
}

async fn stores() -> Vec<(&'static str, Arc<dyn Store>, u32)> {
    let dir = std::env::temp_dir().join(unique("idem-exact"));
    std::fs::create_dir_all(&dir).unwrap();
    let sqlite = SqliteStore::connect(&format!("sqlite://{}/e.db", dir.display()))
        .await
        .unwrap();
    vec![
        ("memory", Arc::new(MemoryStore::new()), 512),
        ("sqlite", Arc::new(sqlite), 128),
        (
            "postgres",
            Arc::new(PostgresStore::connect(&postgres_url()).await.unwrap()),
            128,
        ),
        (
            "redis",
            Arc::new(RedisStore::connect(&redis_url()).await.unwrap()),
            128,
        ),
    ]
}

/// Through the engine on every store: the first call's result, then a replay.
#[test]
fn every_store_replays_the_first_result_exactly_or_refuses_it_on_the_first_call() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let namespace: &'static str = Box::leak(unique("exact").into_boxed_str());
    let options = Options::new();
    for (name, store, cases) in rt.block_on(stores()) {
        let mut runner = TestRunner::new(Config::with_cases(cases));
        let case = AtomicUsize::new(0);
        runner
            .run(&(values(), any::<bool>()), |(v, as_error)| {
                let id = format!("{name}-{}", case.fetch_add(1, Ordering::SeqCst));
                let runs = AtomicUsize::new(0);
                let call = || {
                    let store = Arc::clone(&store);
                    let key = KeyBuilder::new(namespace).part(&id).finish();
                    let (v, runs) = (v.clone(), &runs);
                    let options = &options;
                    async move {
                        execute(store, options, key, None, Codec::cache_errors(), async {
                            runs.fetch_add(1, Ordering::SeqCst);
                            if as_error {
                                Err(AppError::Declined(v))
                            } else {
                                Ok(v)
                            }
                        })
                        .await
                    }
                };
                let unwrap = |r: Result<V, AppError>| match r {
                    Ok(v) | Err(AppError::Declined(v)) => Ok(v),
                    Err(AppError::Idem(e)) => Err(e),
                };
                let first = rt.block_on(call());
                let second = rt.block_on(call());
                if !faithful(&v) {
                    prop_assert!(
                        matches!(&first, Err(AppError::Idem(e)) if e.starts_with("Codec")),
                        "{name}: {v:?} must be refused on the first call, got {first:?}"
                    );
                    let key = KeyBuilder::new(namespace).part(&id).finish().unwrap();
                    let record = rt.block_on(store.get(key.as_str())).unwrap();
                    prop_assert!(record.is_none(), "{name}: the claim was released");
                    prop_assert_eq!(runs.load(Ordering::SeqCst), 2, "a retry runs again");
                    return Ok(());
                }
                let first = unwrap(first).map_err(TestCaseError::fail)?;
                let second = unwrap(second).map_err(TestCaseError::fail)?;
                prop_assert!(same(&v, &first), "{name}: {v:?} returned as {first:?}");
                prop_assert!(same(&v, &second), "{name}: {v:?} replayed as {second:?}");
                prop_assert_eq!(runs.load(Ordering::SeqCst), 1, "{}: ran once", name);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// Found by the break-it review of issue 10: serde reads untagged and
/// internally tagged enums and flattened fields through an `f64` buffer, so an
/// `f32` written as its own shortest decimal could round twice (`0x15ae43fd`
/// came back as `0x15ae43fe`).
#[test]
fn an_f32_in_buffered_shapes_round_trips_bit_for_bit() {
    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Untagged {
        F(f32),
    }
    #[derive(Serialize, Deserialize)]
    #[serde(tag = "t")]
    enum Internal {
        A { v: f32 },
    }
    #[derive(Serialize, Deserialize)]
    struct Inner {
        v: f32,
    }
    #[derive(Serialize, Deserialize)]
    struct Flat {
        #[serde(flatten)]
        inner: Inner,
    }
    fn check(x: f32) -> Result<(), TestCaseError> {
        let untagged: Codec<Untagged, Error> = Codec::release_errors();
        let bytes = untagged.encode(&Ok(Untagged::F(x))).unwrap().unwrap();
        let Untagged::F(y) = untagged.decode(&bytes).unwrap().unwrap();
        prop_assert_eq!(x.to_bits(), y.to_bits(), "untagged");
        let internal: Codec<Internal, Error> = Codec::release_errors();
        let bytes = internal.encode(&Ok(Internal::A { v: x })).unwrap().unwrap();
        let Internal::A { v: y } = internal.decode(&bytes).unwrap().unwrap();
        prop_assert_eq!(x.to_bits(), y.to_bits(), "internally tagged");
        let flat: Codec<Flat, Error> = Codec::release_errors();
        let bytes = flat
            .encode(&Ok(Flat {
                inner: Inner { v: x },
            }))
            .unwrap()
            .unwrap();
        let y = flat.decode(&bytes).unwrap().unwrap().inner.v;
        prop_assert_eq!(x.to_bits(), y.to_bits(), "flattened");
        Ok(())
    }
    check(f32::from_bits(0x15AE_43FD)).unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 5_000,
        ..Config::default()
    });
    runner
        .run(
            &any::<f32>().prop_filter("finite", |x| x.is_finite()),
            check,
        )
        .unwrap();
}

/// Found by the break-it review: `Some(RawValue "null")` is written as `null`
/// and replayed as `None`; it is refused on the first call, while other raw
/// JSON inside `Some` is stored and replayed as it was.
#[test]
fn some_raw_json_null_is_refused_and_other_raw_json_replays() {
    use serde_json::value::RawValue;
    let codec: Codec<Option<Box<RawValue>>, Error> = Codec::release_errors();
    for null in ["null", " null "] {
        let raw = RawValue::from_string(null.into()).unwrap();
        assert!(
            matches!(codec.encode(&Ok(Some(raw))), Some(Err(Error::Codec(_)))),
            "Some(raw {null:?}) must be refused"
        );
    }
    let raw = RawValue::from_string(r#"{"a":[1,null]}"#.into()).unwrap();
    let bytes = codec.encode(&Ok(Some(raw))).unwrap().unwrap();
    let back = codec.decode(&bytes).unwrap().unwrap().expect("Some");
    assert_eq!(back.get(), r#"{"a":[1,null]}"#);
    let bytes = codec.encode(&Ok(None)).unwrap().unwrap();
    assert!(codec.decode(&bytes).unwrap().unwrap().is_none());
}
