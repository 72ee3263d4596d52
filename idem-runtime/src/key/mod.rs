//! Key derivation: the canonical encoding, SHA-256 digests, time windows and
//! client-supplied keys.
//!
//! A key is made of parts (any `Serialize` values). Each part is written in a
//! canonical, type-tagged, length-prefixed encoding (see [`encoding`](self#encoding)),
//! the whole is hashed with SHA-256, and the record is stored under
//! `namespace:hex(digest)`. The raw key material never leaves this module: logs,
//! stores and errors only ever see the digest.
//!
//! # Encoding
//!
//! | value | bytes |
//! |---|---|
//! | `bool` | `b` + `0`/`1` |
//! | any integer | `i` + 16-byte big-endian `i128` (`U` + `u128` above `i128::MAX`) — so `1u8` and `1i64` are the same key |
//! | `f32`, `f64` | `f` + big-endian `f64` bits (`-0.0` folded to `0.0`, one canonical NaN) |
//! | `str`, `char` | `s` + `u64` length + UTF-8 |
//! | bytes | `y` + `u64` length + bytes |
//! | `None` / `Some(v)` | `n` / `o` + `v` |
//! | `()`, unit struct | `u` |
//! | newtype struct | the inner value |
//! | seq, tuple, tuple struct | `l` + `u64` count + elements |
//! | set (`HashSet`, `BTreeSet`, any `*Set` or `*Bag`, `BinaryHeap`) | `S` + `u64` count + elements sorted by their encoding (so the hasher and the insertion order never matter) |
//! | map, struct | `m` + `u64` count + entries sorted by their encoded key (so `HashMap` order and field order never matter) |
//! | enum variant | `e` + name (unit) or `E` + name + payload |
//!
//! Sets are recognised by the type serde hands to `Serializer::collect_seq`,
//! which is how every std collection (and `hashbrown`, `indexmap`, `im`)
//! serializes itself. A hand-written `Serialize` impl that feeds an unordered
//! collection to `serialize_seq` element by element cannot be told from a
//! list: pass the set (or its `iter()`) to `collect_seq`, or key on a
//! `BTreeSet` or a sorted `Vec`. serde also hides a set's type where it buffers
//! a value before writing it — inside `#[serde(flatten)]` fields and
//! internally, adjacently or un-tagged enums — so there a `HashSet` is written
//! in its iteration order: use a `BTreeSet` (always in one order) in such
//! positions.
//!
//! This is encoding version 2. Version 1 wrote sets as lists in iteration
//! order (so a `HashSet` key changed from call to call); version 2 differs
//! from it only by the `S` tag, which version 1 never wrote, so every key
//! without a set keeps its digest, and no version 2 digest can equal a
//! version 1 digest of different material. The domain string stays `v1`.
//!
//! A whole key is `idem:key:v1`, the number of parts, the parts, then (with a
//! window) `w` + window length in ms + bucket number. At the top level of a part
//! `Some(v)` encodes as `v`, so a key field may become optional without changing
//! digests; a part that is `None` or `""` is [`Error::MissingKey`].

mod builder;
mod client;
mod encoding;

use std::fmt;

use serde::Serialize;

use crate::error::Error;

pub use builder::{canonical_bytes, fingerprint, FingerprintBuilder, KeyBuilder};
pub use client::ClientKey;
pub use encoding::EncodeError;

/// A SHA-256 digest of canonically encoded key or fingerprint material.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest as 64 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        push_hex(&mut s, &self.0);
        s
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses 64 hex characters back into a digest.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xf) as usize] as char);
    }
}

/// A derived idempotency key: the namespace and the digest of the key material.
///
/// Its [`storage key`](Key::as_str) is `namespace:hex(digest)`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// Shared, so the engine hands the key to the running attempt without copying.
    storage: std::sync::Arc<str>,
    namespace_len: usize,
    digest: Digest,
}

impl Key {
    /// Builds the key for `namespace` from an already computed digest.
    pub fn from_digest(namespace: &str, digest: Digest) -> Self {
        let mut storage = String::with_capacity(namespace.len() + 65);
        storage.push_str(namespace);
        storage.push(':');
        push_hex(&mut storage, &digest.0);
        Key {
            storage: storage.into(),
            namespace_len: namespace.len(),
            digest,
        }
    }

    /// Derives a key from one `Serialize` value (a convenience over [`KeyBuilder`]).
    pub fn derive<T: Serialize + ?Sized>(namespace: &str, value: &T) -> Result<Self, Error> {
        KeyBuilder::new(namespace).part(value).finish()
    }

    /// The storage key, `namespace:hex(digest)`.
    pub fn as_str(&self) -> &str {
        &self.storage
    }

    /// The namespace part of the key.
    pub fn namespace(&self) -> &str {
        &self.storage[..self.namespace_len]
    }

    /// The digest of the key material.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.storage)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.storage)
    }
}

#[cfg(test)]
mod tests {
    use super::encoding::is_unordered;
    use super::*;
    use std::collections::{BTreeMap, HashMap};
    use std::time::{Duration, UNIX_EPOCH};

    fn key<T: Serialize + ?Sized>(v: &T) -> String {
        Key::derive("t", v).unwrap().as_str().to_owned()
    }

    #[test]
    fn tuples_with_shifted_boundaries_differ() {
        assert_ne!(key(&("ab", "c")), key(&("a", "bc")));
    }

    #[test]
    fn integer_widths_and_signs_agree() {
        assert_eq!(key(&1u8), key(&1i64));
        assert_eq!(key(&7u128), key(&7i32));
        assert_ne!(key(&1u64), key(&2u64));
        assert_ne!(key(&u128::MAX), key(&(i128::MAX)));
    }

    #[test]
    fn maps_are_order_independent() {
        let mut a = HashMap::new();
        let mut b = BTreeMap::new();
        for i in 0..50 {
            a.insert(format!("k{i}"), i);
            b.insert(format!("k{i}"), i);
        }
        assert_eq!(key(&a), key(&b));
    }

    #[test]
    fn sets_are_order_independent_whatever_the_hasher() {
        use std::collections::{BTreeSet, BinaryHeap, HashSet};
        use std::hash::BuildHasherDefault;
        let items: Vec<String> = (0..40).map(|i| format!("item-{i}")).collect();
        let tree: BTreeSet<String> = items.iter().cloned().collect();
        let expected = key(&tree);
        for round in 0..20 {
            // Each HashSet gets its own RandomState, so its iteration order differs.
            let set: HashSet<String> = items.iter().rev().cloned().collect();
            assert_eq!(key(&set), expected, "round {round}");
        }
        let fixed: HashSet<String, BuildHasherDefault<std::collections::hash_map::DefaultHasher>> =
            items.iter().cloned().collect();
        assert_eq!(key(&fixed), expected);
        let heap: BinaryHeap<String> = items.iter().cloned().collect();
        assert_eq!(key(&heap), expected);
        let refs: HashSet<&str> = items.iter().map(String::as_str).collect();
        assert_eq!(key(&refs), expected);
    }

    #[test]
    fn sets_nested_in_structs_options_and_enums_are_order_independent() {
        use std::collections::HashSet;
        #[derive(serde::Serialize)]
        enum Wrap {
            Tags { tags: Option<HashSet<u32>> },
            Pair(u8, Vec<HashSet<u32>>),
        }
        let a: HashSet<u32> = (0..100).collect();
        let b: HashSet<u32> = (0..100).rev().collect();
        assert_eq!(
            key(&(
                1,
                Wrap::Tags {
                    tags: Some(a.clone())
                }
            )),
            key(&(
                1,
                Wrap::Tags {
                    tags: Some(b.clone())
                }
            ))
        );
        assert_eq!(
            key(&Wrap::Pair(1, vec![a.clone(), b.clone()])),
            key(&Wrap::Pair(1, vec![b, a]))
        );
    }

    #[test]
    fn sequences_keep_their_order_and_differ_from_sets() {
        use std::collections::{BTreeSet, VecDeque};
        assert_ne!(key(&vec![1, 2]), key(&vec![2, 1]));
        assert_ne!(key(&[1, 2][..]), key(&[2, 1][..]));
        assert_ne!(key(&[1, 2]), key(&[2, 1]));
        assert_ne!(
            key(&VecDeque::from(vec![1, 2])),
            key(&VecDeque::from(vec![2, 1]))
        );
        assert_eq!(key(&vec![1, 2]), key(&[1, 2][..]));
        let set: BTreeSet<i32> = [1, 2].into();
        assert_ne!(key(&set), key(&vec![1, 2]), "a set is not a list");
    }

    #[test]
    fn collection_types_are_classified() {
        use std::collections::{BTreeSet, BinaryHeap, HashSet, LinkedList, VecDeque};
        use std::sync::Arc;
        fn of<T: ?Sized>(_: &T) -> &'static str {
            std::any::type_name::<&T>()
        }
        assert!(is_unordered(of(&HashSet::<u8>::new())));
        assert!(is_unordered(of(&BTreeSet::<Vec<u8>>::new())));
        assert!(is_unordered(of(&BinaryHeap::<u8>::new())));
        assert!(is_unordered("&&mut hashbrown::set::HashSet<u8>"));
        assert!(!is_unordered(of(&Vec::<HashSet<u8>>::new())));
        assert!(!is_unordered(of(&VecDeque::<u8>::new())));
        assert!(!is_unordered(of(&LinkedList::<u8>::new())));
        assert!(!is_unordered(of(&[0u8][..])));
        assert!(!is_unordered(of(&Arc::<[u8]>::from(vec![]))));
    }

    #[test]
    fn top_level_some_is_transparent_nested_is_not() {
        assert_eq!(key(&Some("x")), key(&"x"));
        assert_ne!(key(&vec![Some(1)]), key(&vec![1]));
    }

    #[test]
    fn none_and_empty_are_missing() {
        assert!(matches!(
            Key::derive("t", &None::<u32>),
            Err(Error::MissingKey)
        ));
        assert!(matches!(Key::derive("t", ""), Err(Error::MissingKey)));
        assert!(matches!(
            Key::derive("t", &Some("")),
            Err(Error::MissingKey)
        ));
        // nested None is an ordinary value
        assert!(Key::derive("t", &(1, None::<u32>)).is_ok());
    }

    #[test]
    fn negative_zero_and_nan_are_folded() {
        assert_eq!(key(&0.0f64), key(&-0.0f64));
        assert_eq!(key(&f64::NAN), key(&-f64::NAN));
    }

    #[test]
    fn windows_bucket_time() {
        let t0 = UNIX_EPOCH + Duration::from_secs(86_400 * 100 + 5);
        let t1 = UNIX_EPOCH + Duration::from_secs(86_400 * 100 + 80_000);
        let t2 = UNIX_EPOCH + Duration::from_secs(86_400 * 101 + 1);
        let day = Duration::from_secs(86_400);
        let k = |t| {
            KeyBuilder::new("w")
                .part(&1)
                .window_at(day, t)
                .finish()
                .unwrap()
        };
        assert_eq!(k(t0), k(t1));
        assert_ne!(k(t1), k(t2));
    }

    #[test]
    fn digest_hex_round_trips() {
        let d = fingerprint("x").unwrap();
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
    }
}
