//! Golden vectors: digests of key and fingerprint material must never change
//! silently, or every stored record would stop matching after an upgrade.
//!
//! The expected values live in `tests/encoding/digests.json`. A deliberate change
//! of the encoding is a breaking release: regenerate with `IDEM_BLESS=1 cargo
//! test --test golden` and say so in the changelog.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, UNIX_EPOCH};

use idem_runtime::key::{fingerprint, FingerprintBuilder, KeyBuilder};
use idem_runtime::Key;
use serde::Serialize;

#[derive(Serialize)]
struct Order {
    user_id: u64,
    product_id: u64,
    note: Option<String>,
}

#[derive(Serialize)]
struct Reordered {
    product_id: u64,
    note: Option<String>,
    user_id: u64,
}

#[derive(Serialize)]
enum Method {
    Card,
    Bank(String),
    Wallet { provider: String, id: u32 },
    Split(u32, u32),
}

#[derive(Serialize)]
struct Newtype(String);

fn vectors() -> Vec<(&'static str, String)> {
    let key = |v: &dyn erased::Ser| v.key();
    let mut map = HashMap::new();
    map.insert("b", 2);
    map.insert("a", 1);
    let tree: BTreeMap<_, _> = map.clone().into_iter().collect();
    let set_tree: BTreeSet<&str> = ["c", "a", "b"].into();
    let set_hash: HashSet<&str> = ["b", "c", "a"].into();
    let day = Duration::from_secs(86_400);
    let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    vec![
        ("u64 42", key(&42u64)),
        ("i8 42 (same as u64 42)", key(&42i8)),
        ("i64 -1", key(&-1i64)),
        ("u128 max", key(&u128::MAX)),
        ("f64 1.5", key(&1.5f64)),
        ("bool true", key(&true)),
        ("str hello", key(&"hello")),
        ("str x", key(&"x")),
        ("char x (same as str x)", key(&'x')),
        ("unicode", key(&"zürich ✓")),
        ("bytes", key(&serde_bytes_like(&[0u8, 1, 255]))),
        ("unit", key(&())),
        ("tuple (ab, c)", key(&("ab", "c"))),
        ("tuple (a, bc)", key(&("a", "bc"))),
        ("seq [1,2,3]", key(&vec![1, 2, 3])),
        ("nested option", key(&vec![Some(1), None])),
        ("hashmap", key(&map)),
        ("btreeset {a,b,c} (encoding v2)", key(&set_tree)),
        ("hashset {a,b,c} (same as btreeset)", key(&set_hash)),
        (
            "vec of hashsets (encoding v2)",
            key(&vec![set_hash.clone(), HashSet::new()]),
        ),
        ("btreemap (same as hashmap)", key(&tree)),
        (
            "struct",
            key(&Order {
                user_id: 7,
                product_id: 42,
                note: None,
            }),
        ),
        (
            "struct, fields reordered (same as struct)",
            key(&Reordered {
                product_id: 42,
                note: None,
                user_id: 7,
            }),
        ),
        ("unit variant", key(&Method::Card)),
        ("newtype variant", key(&Method::Bank("x".into()))),
        (
            "struct variant",
            key(&Method::Wallet {
                provider: "p".into(),
                id: 1,
            }),
        ),
        ("tuple variant", key(&Method::Split(1, 2))),
        (
            "newtype struct (same as str)",
            key(&Newtype("hello".into())),
        ),
        (
            "two parts",
            KeyBuilder::new("orders")
                .part(&7u64)
                .part(&42u64)
                .finish()
                .unwrap()
                .to_string(),
        ),
        (
            "two parts, window 1d at 2023-11-14",
            KeyBuilder::new("orders")
                .part(&7u64)
                .part(&42u64)
                .window_at(day, at)
                .finish()
                .unwrap()
                .to_string(),
        ),
        ("fingerprint str", fingerprint("body").unwrap().to_hex()),
        (
            "fingerprint bytes",
            FingerprintBuilder::new()
                .bytes(b"POST")
                .bytes(b"/orders")
                .bytes(b"{}")
                .finish()
                .unwrap()
                .to_hex(),
        ),
    ]
}

fn serde_bytes_like(bytes: &[u8]) -> impl Serialize + '_ {
    struct B<'a>(&'a [u8]);
    impl Serialize for B<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }
    B(bytes)
}

mod erased {
    //! Lets the table above hold values of many types.
    pub trait Ser {
        fn key(&self) -> String;
    }
    impl<T: serde::Serialize> Ser for T {
        fn key(&self) -> String {
            super::Key::derive("golden", self).unwrap().to_string()
        }
    }
}

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/encoding/digests.json");

#[test]
fn digests_match_the_committed_vectors() {
    let actual: BTreeMap<&str, String> = vectors().into_iter().collect();
    if std::env::var_os("IDEM_BLESS").is_some() {
        let json = serde_json::to_string_pretty(&actual).unwrap();
        std::fs::write(PATH, json + "\n").unwrap();
        return;
    }
    let committed: BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(PATH).expect("golden file")).unwrap();
    assert_eq!(
        committed.len(),
        actual.len(),
        "a vector was added or removed"
    );
    for (name, digest) in &actual {
        assert_eq!(
            committed.get(*name),
            Some(digest),
            "digest of {name:?} changed: stored records would no longer match"
        );
    }
}

#[test]
fn equivalent_values_share_digests_and_others_do_not() {
    let v: BTreeMap<&str, String> = vectors().into_iter().collect();
    assert_eq!(v["u64 42"], v["i8 42 (same as u64 42)"]);
    assert_eq!(v["hashmap"], v["btreemap (same as hashmap)"]);
    assert_eq!(
        v["btreeset {a,b,c} (encoding v2)"],
        v["hashset {a,b,c} (same as btreeset)"]
    );
    assert_eq!(v["struct"], v["struct, fields reordered (same as struct)"]);
    assert_eq!(v["str hello"], v["newtype struct (same as str)"]);
    assert_eq!(v["str x"], v["char x (same as str x)"]);
    assert_ne!(v["tuple (ab, c)"], v["tuple (a, bc)"]);
    assert_ne!(v["two parts"], v["two parts, window 1d at 2023-11-14"]);
    let distinct: HashSet<&String> = v.values().collect();
    assert_eq!(
        distinct.len(),
        v.len() - 6,
        "only the listed equivalences collide"
    );
}
