//! The canonical encoding, property-tested (issue 10, item 2): it is
//! injective across shapes. An independent parser reads every encoding back
//! into a model of the value, and two values share an encoding exactly when
//! their models are equal (the model spells out the documented foldings: every
//! integer type is one integer, `f32` widens to `f64`, `-0.0` is `0.0`, a
//! `char` is a one-character string, newtypes are transparent, sets and maps
//! are unordered).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use idem_runtime::key::canonical_bytes;
use proptest::prelude::*;
use serde::{Serialize, Serializer};

/// Byte strings that serialize through `serialize_bytes`.
#[derive(Debug, Clone)]
struct Bytes(Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

#[derive(Debug, Clone, Serialize)]
struct Pair {
    a: Box<K>,
    b: Option<Box<K>>,
}

#[derive(Debug, Clone, Serialize)]
struct Wrapper(Box<K>);

#[derive(Debug, Clone, Serialize)]
struct Marker;

#[derive(Debug, Clone, Serialize)]
enum Tagged {
    A,
    B(i32),
    C(Box<K>, u8),
    D { x: Box<K>, y: Option<String> },
}

/// A value of many shapes; `untagged`, so each variant serializes as its content.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
enum K {
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
    Bytes(Bytes),
    Unit(()),
    Marker(Marker),
    Opt(Option<Box<K>>),
    List(Vec<K>),
    Tuple((Box<K>, Box<K>)),
    HashSet(HashSet<String>),
    BTreeSet(BTreeSet<i64>),
    HashMap(HashMap<String, K>),
    BTreeMap(BTreeMap<i64, K>),
    Pair(Pair),
    Tagged(Tagged),
    Wrapper(Wrapper),
}

/// What the encoding promises to keep apart, and nothing more.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum M {
    Bool(bool),
    Int(i128),
    BigU(u128),
    Float(u64),
    Str(String),
    Bytes(Vec<u8>),
    None,
    Some(Box<M>),
    Unit,
    Seq(Vec<M>),
    Set(Vec<M>),
    Map(Vec<(M, M)>),
    UnitVariant(String),
    Variant(String, Box<M>),
}

fn float(v: f64) -> M {
    let v = if v == 0.0 {
        0.0
    } else if v.is_nan() {
        f64::NAN
    } else {
        v
    };
    M::Float(v.to_bits())
}

fn str(s: &str) -> M {
    M::Str(s.to_owned())
}

fn opt(v: &Option<Box<K>>) -> M {
    match v {
        None => M::None,
        Some(k) => M::Some(Box::new(model(k))),
    }
}

fn model(k: &K) -> M {
    match k {
        K::Bool(b) => M::Bool(*b),
        K::I8(v) => M::Int((*v).into()),
        K::I64(v) => M::Int((*v).into()),
        K::U64(v) => M::Int((*v).into()),
        K::I128(v) => M::Int(*v),
        K::U128(v) => match i128::try_from(*v) {
            Ok(v) => M::Int(v),
            Err(_) => M::BigU(*v),
        },
        K::F32(v) => float((*v).into()),
        K::F64(v) => float(*v),
        K::Char(c) => M::Str(c.to_string()),
        K::Str(s) => str(s),
        K::Bytes(b) => M::Bytes(b.0.clone()),
        K::Unit(()) | K::Marker(Marker) => M::Unit,
        K::Opt(v) => opt(v),
        K::List(v) => M::Seq(v.iter().map(model).collect()),
        K::Tuple((a, b)) => M::Seq(vec![model(a), model(b)]),
        K::HashSet(s) => M::Set(s.iter().map(|s| str(s)).collect()),
        K::BTreeSet(s) => M::Set(s.iter().map(|v| M::Int((*v).into())).collect()),
        K::HashMap(m) => M::Map(m.iter().map(|(k, v)| (str(k), model(v))).collect()),
        K::BTreeMap(m) => M::Map(
            m.iter()
                .map(|(k, v)| (M::Int((*k).into()), model(v)))
                .collect(),
        ),
        K::Pair(p) => M::Map(vec![(str("a"), model(&p.a)), (str("b"), opt(&p.b))]),
        K::Tagged(Tagged::A) => M::UnitVariant("A".into()),
        K::Tagged(Tagged::B(v)) => M::Variant("B".into(), Box::new(M::Int((*v).into()))),
        K::Tagged(Tagged::C(k, v)) => M::Variant(
            "C".into(),
            Box::new(M::Seq(vec![model(k), M::Int((*v).into())])),
        ),
        K::Tagged(Tagged::D { x, y }) => M::Variant(
            "D".into(),
            Box::new(M::Map(vec![
                (str("x"), model(x)),
                (
                    str("y"),
                    match y {
                        None => M::None,
                        Some(s) => M::Some(Box::new(str(s))),
                    },
                ),
            ])),
        ),
        K::Wrapper(Wrapper(k)) => model(k),
    }
}

/// Sorts every set and map, so two models compare as unordered collections.
fn normalize(m: M) -> M {
    match m {
        M::Some(v) => M::Some(Box::new(normalize(*v))),
        M::Seq(v) => M::Seq(v.into_iter().map(normalize).collect()),
        M::Set(v) => {
            let mut v: Vec<M> = v.into_iter().map(normalize).collect();
            v.sort();
            M::Set(v)
        }
        M::Map(v) => {
            let mut v: Vec<(M, M)> = v
                .into_iter()
                .map(|(k, v)| (normalize(k), normalize(v)))
                .collect();
            v.sort();
            M::Map(v)
        }
        M::Variant(name, v) => M::Variant(name, Box::new(normalize(*v))),
        other => other,
    }
}

/// An independent reader of the documented encoding (see `idem_runtime::key`).
struct Parser<'a> {
    rest: &'a [u8],
}

impl<'a> Parser<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        assert!(self.rest.len() >= n, "truncated encoding");
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        head
    }

    fn u64(&mut self) -> usize {
        u64::from_be_bytes(self.take(8).try_into().unwrap()) as usize
    }

    fn string(&mut self) -> String {
        let n = self.u64();
        String::from_utf8(self.take(n).to_vec()).expect("strings are UTF-8")
    }

    /// One value, and the bytes it was read from.
    fn value(&mut self) -> (M, &'a [u8]) {
        let start = self.rest;
        let m = match self.take(1)[0] {
            b'b' => match self.take(1)[0] {
                0 => M::Bool(false),
                1 => M::Bool(true),
                other => panic!("bool byte {other}"),
            },
            b'i' => M::Int(i128::from_be_bytes(self.take(16).try_into().unwrap())),
            b'U' => {
                let v = u128::from_be_bytes(self.take(16).try_into().unwrap());
                assert!(
                    v > i128::MAX as u128,
                    "U is only for integers above i128::MAX"
                );
                M::BigU(v)
            }
            b'f' => {
                let bits = u64::from_be_bytes(self.take(8).try_into().unwrap());
                let v = f64::from_bits(bits);
                assert!(v.to_bits() != (-0.0f64).to_bits(), "-0.0 is folded");
                assert!(!v.is_nan() || bits == f64::NAN.to_bits(), "one NaN");
                M::Float(bits)
            }
            b's' => M::Str(self.string()),
            b'y' => {
                let n = self.u64();
                M::Bytes(self.take(n).to_vec())
            }
            b'n' => M::None,
            b'o' => M::Some(Box::new(self.value().0)),
            b'u' => M::Unit,
            b'l' => {
                let n = self.u64();
                M::Seq((0..n).map(|_| self.value().0).collect())
            }
            b'S' => {
                let n = self.u64();
                let elements: Vec<_> = (0..n).map(|_| self.value()).collect();
                assert!(
                    elements.windows(2).all(|w| w[0].1 <= w[1].1),
                    "set elements are sorted by their encoding"
                );
                M::Set(elements.into_iter().map(|(m, _)| m).collect())
            }
            b'm' => {
                let n = self.u64();
                let entries: Vec<_> = (0..n).map(|_| (self.value(), self.value().0)).collect();
                assert!(
                    entries.windows(2).all(|w| (w[0].0).1 < (w[1].0).1),
                    "map entries are sorted by their encoded key, keys distinct"
                );
                M::Map(entries.into_iter().map(|((k, _), v)| (k, v)).collect())
            }
            b'e' => M::UnitVariant(self.string()),
            b'E' => {
                let name = self.string();
                M::Variant(name, Box::new(self.value().0))
            }
            tag => panic!("unknown tag {:?}", tag as char),
        };
        let used = start.len() - self.rest.len();
        (m, &start[..used])
    }
}

fn parse(bytes: &[u8]) -> M {
    let mut parser = Parser { rest: bytes };
    let (m, _) = parser.value();
    assert!(parser.rest.is_empty(), "trailing bytes after one value");
    m
}

fn leaf() -> impl Strategy<Value = K> {
    prop_oneof![
        any::<bool>().prop_map(K::Bool),
        prop_oneof![Just(i8::MIN), Just(i8::MAX), any::<i8>()].prop_map(K::I8),
        prop_oneof![Just(i64::MIN), Just(-1), any::<i64>()].prop_map(K::I64),
        prop_oneof![Just(u64::MAX), Just(0), any::<u64>()].prop_map(K::U64),
        prop_oneof![Just(i128::MIN), Just(i128::MAX), any::<i128>()].prop_map(K::I128),
        prop_oneof![
            Just(u128::MAX),
            Just(i128::MAX as u128),
            Just(i128::MAX as u128 + 1),
            any::<u128>()
        ]
        .prop_map(K::U128),
        prop_oneof![
            Just(-0.0f32),
            Just(f32::NAN),
            Just(f32::MIN_POSITIVE / 2.0),
            any::<f32>()
        ]
        .prop_map(K::F32),
        prop_oneof![
            Just(-0.0f64),
            Just(f64::NAN),
            Just(-f64::NAN),
            Just(f64::INFINITY),
            Just(5e-324),
            any::<f64>()
        ]
        .prop_map(K::F64),
        any::<char>().prop_map(K::Char),
        any::<String>().prop_map(K::Str),
        prop::collection::vec(any::<u8>(), 0..8).prop_map(|b| K::Bytes(Bytes(b))),
        Just(K::Unit(())),
        Just(K::Marker(Marker)),
        Just(K::Opt(None)),
        Just(K::Tagged(Tagged::A)),
        any::<i32>().prop_map(|v| K::Tagged(Tagged::B(v))),
        prop::collection::hash_set("[a-c]{0,2}", 0..4).prop_map(K::HashSet),
        prop::collection::btree_set(-3i64..3, 0..4).prop_map(K::BTreeSet),
    ]
}

fn shapes(leaf: impl Strategy<Value = K> + 'static) -> impl Strategy<Value = K> {
    leaf.prop_recursive(4, 48, 4, |inner| {
        prop_oneof![
            inner.clone().prop_map(|k| K::Opt(Some(Box::new(k)))),
            prop::collection::vec(inner.clone(), 0..4).prop_map(K::List),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| K::Tuple((Box::new(a), Box::new(b)))),
            prop::collection::hash_map("[a-c]{0,2}", inner.clone(), 0..4).prop_map(K::HashMap),
            prop::collection::btree_map(-3i64..3, inner.clone(), 0..4).prop_map(K::BTreeMap),
            (inner.clone(), prop::option::of(inner.clone())).prop_map(|(a, b)| K::Pair(Pair {
                a: Box::new(a),
                b: b.map(Box::new)
            })),
            (inner.clone(), any::<u8>()).prop_map(|(k, v)| K::Tagged(Tagged::C(Box::new(k), v))),
            (inner.clone(), prop::option::of("[a-c]{0,2}"))
                .prop_map(|(x, y)| K::Tagged(Tagged::D { x: Box::new(x), y })),
            inner.prop_map(|k| K::Wrapper(Wrapper(Box::new(k)))),
        ]
    })
}

/// Leaves from tiny domains, so generated pairs often collide — also across
/// types (`1u64` and `1i128`, `1.0f32` and `1.0f64`, `'a'` and `"a"`).
fn small_leaf() -> impl Strategy<Value = K> {
    prop_oneof![
        any::<bool>().prop_map(K::Bool),
        (0i8..2).prop_map(K::I8),
        (0u64..2).prop_map(K::U64),
        (0i128..2).prop_map(K::I128),
        prop_oneof![Just(0.0f32), Just(-0.0f32), Just(1.0f32)].prop_map(K::F32),
        prop_oneof![Just(0.0f64), Just(-0.0f64), Just(1.0f64)].prop_map(K::F64),
        Just(K::Char('a')),
        prop_oneof![Just(String::new()), Just("a".to_owned())].prop_map(K::Str),
        Just(K::Bytes(Bytes(b"a".to_vec()))),
        Just(K::Unit(())),
        Just(K::Marker(Marker)),
        Just(K::Opt(None)),
        Just(K::Tagged(Tagged::A)),
        (0i32..2).prop_map(|v| K::Tagged(Tagged::B(v))),
        prop::collection::hash_set("[ab]", 0..3).prop_map(K::HashSet),
        prop::collection::btree_set(0i64..2, 0..3).prop_map(K::BTreeSet),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// Every encoding reads back into the value's model, so the encoding is a
    /// function of the model alone and no two different models share bytes.
    #[test]
    fn every_encoding_reads_back_into_its_value(k in shapes(leaf())) {
        let bytes = canonical_bytes(&k).unwrap();
        prop_assert_eq!(normalize(parse(&bytes)), normalize(model(&k)));
    }

    /// Two values share an encoding exactly when their models are equal.
    #[test]
    fn equal_encodings_mean_equal_values(a in shapes(small_leaf()), b in shapes(small_leaf())) {
        let same_bytes = canonical_bytes(&a).unwrap() == canonical_bytes(&b).unwrap();
        let same_value = normalize(model(&a)) == normalize(model(&b));
        prop_assert_eq!(same_bytes, same_value, "{:?} vs {:?}", a, b);
    }

    /// Sets and maps built in different orders, with different hashers, encode
    /// alike; reversing a list does not (unless it reads the same both ways).
    #[test]
    fn insertion_order_and_hasher_never_reach_the_encoding(
        items in prop::collection::vec("[a-z]{0,4}", 0..12),
        values in prop::collection::vec(any::<i64>(), 0..12),
    ) {
        let forward: HashSet<&String, RandomState> = items.iter().collect();
        let mut backward = HashSet::with_hasher(RandomState::new());
        backward.extend(items.iter().rev());
        prop_assert_eq!(canonical_bytes(&forward).unwrap(), canonical_bytes(&backward).unwrap());
        let ordered: BTreeSet<&String> = items.iter().collect();
        prop_assert_eq!(canonical_bytes(&forward).unwrap(), canonical_bytes(&ordered).unwrap());

        let map: HashMap<&String, &i64> = items.iter().zip(&values).collect();
        let mut other = HashMap::with_hasher(RandomState::new());
        other.extend(items.iter().zip(&values).rev());
        // Later duplicates win in `collect`, earlier ones in the reversed
        // extend; compare only when the keys are distinct.
        if map.len() == items.len().min(values.len()) {
            prop_assert_eq!(canonical_bytes(&map).unwrap(), canonical_bytes(&other).unwrap());
        }

        let reversed: Vec<&String> = items.iter().rev().collect();
        let same = items.iter().eq(reversed.iter().copied());
        prop_assert_eq!(canonical_bytes(&items).unwrap() == canonical_bytes(&reversed).unwrap(), same);
    }
}

/// Two `HashSet`s with the same elements in different iteration orders.
fn two_orders() -> (HashSet<u32>, HashSet<u32>) {
    let a: HashSet<u32> = (0..64).collect();
    for _ in 0..200 {
        let b: HashSet<u32> = (0..64).rev().collect();
        if a.iter().ne(b.iter()) {
            return (a, b);
        }
    }
    panic!("could not get two iteration orders");
}

/// Found by the break-it review of issue 10: a slice whose element type is a
/// set was taken for a set itself, so `[{1}, {2}]` and `[{2}, {1}]` collided
/// and a slice keyed differently from the same `Vec`.
#[test]
fn a_slice_of_sets_keeps_its_order_and_equals_its_vec() {
    let ab: Vec<BTreeSet<u32>> = vec![[1].into(), [2].into()];
    let ba: Vec<BTreeSet<u32>> = vec![[2].into(), [1].into()];
    let (sa, sb): (&[BTreeSet<u32>], &[BTreeSet<u32>]) = (&ab, &ba);
    assert_ne!(canonical_bytes(sa).unwrap(), canonical_bytes(sb).unwrap());
    assert_eq!(canonical_bytes(&ab).unwrap(), canonical_bytes(sa).unwrap());
    let boxed: Box<[(u8, HashSet<u8>)]> = vec![(1, [1].into()), (2, [2].into())].into();
    let reversed: Box<[(u8, HashSet<u8>)]> = vec![(2, [2].into()), (1, [1].into())].into();
    assert_ne!(
        canonical_bytes(&boxed).unwrap(),
        canonical_bytes(&reversed).unwrap()
    );
}

/// Found by the break-it review: a hand-written `Serialize` passing the set's
/// `iter()` to `collect_seq` (what the docs advise) kept iteration order.
#[test]
fn collect_seq_over_a_sets_iterator_is_unordered() {
    struct Tags(HashSet<u32>);
    impl Serialize for Tags {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter())
        }
    }
    struct Sorted(BTreeSet<u32>);
    impl Serialize for Sorted {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter())
        }
    }
    let (a, b) = two_orders();
    let sorted = Sorted(a.iter().copied().collect());
    assert_eq!(
        canonical_bytes(&Tags(a.clone())).unwrap(),
        canonical_bytes(&Tags(b)).unwrap()
    );
    assert_eq!(
        canonical_bytes(&Tags(a.clone())).unwrap(),
        canonical_bytes(&sorted).unwrap()
    );
    assert_eq!(
        canonical_bytes(&Tags(a.clone())).unwrap(),
        canonical_bytes(&a).unwrap()
    );
}
