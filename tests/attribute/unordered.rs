//! Keys and fingerprints built from unordered collections are the same for the
//! same logical value, whatever each instance's hasher and insertion order.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::BuildHasherDefault;

use idem_runtime::{idempotent, MemoryStore};
use serde::Serialize;

use crate::{AppError, Runs};

#[derive(Clone, Serialize)]
struct Basket {
    user: u64,
    items: HashSet<String>,
    quantities: HashMap<String, u32>,
    gift: Option<BTreeSet<String>>,
}

struct Shop {
    store: MemoryStore,
    runs: Runs,
}

impl Shop {
    #[idempotent(key = (user, items), store = self.store)]
    async fn order(&self, user: u64, items: HashSet<String>) -> Result<usize, AppError> {
        Ok(self.runs.hit())
    }

    #[idempotent(key = basket.user, fingerprint = basket, store = self.store)]
    async fn checkout(&self, basket: Basket) -> Result<usize, AppError> {
        Ok(self.runs.hit())
    }

    #[idempotent(key = tags, store = self.store)]
    async fn tag(
        &self,
        tags: HashSet<u32, BuildHasherDefault<std::collections::hash_map::DefaultHasher>>,
    ) -> Result<usize, AppError> {
        Ok(self.runs.hit())
    }
}

fn names(n: usize, reversed: bool) -> Vec<String> {
    let mut v: Vec<String> = (0..n).map(|i| format!("sku-{i}")).collect();
    if reversed {
        v.reverse();
    }
    v
}

#[tokio::test]
async fn a_hash_set_in_the_key_runs_the_body_once() {
    let shop = Shop {
        store: MemoryStore::new(),
        runs: Runs::default(),
    };
    for call in 0..30 {
        // A new HashSet each call: its own RandomState, its own iteration order.
        let items: HashSet<String> = names(25, call % 2 == 1).into_iter().collect();
        assert_eq!(shop.order(7, items).await.unwrap(), 1, "call {call}");
    }
    assert_eq!(shop.runs.get(), 1);
    // A different set is a different key.
    let other: HashSet<String> = names(24, false).into_iter().collect();
    assert_eq!(shop.order(7, other).await.unwrap(), 2);
}

#[tokio::test]
async fn a_custom_hasher_set_in_the_key_runs_the_body_once() {
    let shop = Shop {
        store: MemoryStore::new(),
        runs: Runs::default(),
    };
    let a = (0..200).collect();
    let b = (0..200).rev().collect();
    assert_eq!(shop.tag(a).await.unwrap(), 1);
    assert_eq!(shop.tag(b).await.unwrap(), 1);
    assert_eq!(shop.runs.get(), 1);
}

#[tokio::test]
async fn a_fingerprint_with_sets_and_maps_is_never_a_spurious_key_reused() {
    let shop = Shop {
        store: MemoryStore::new(),
        runs: Runs::default(),
    };
    for call in 0..30 {
        let reversed = call % 2 == 1;
        let basket = Basket {
            user: 9,
            items: names(20, reversed).into_iter().collect(),
            quantities: names(20, !reversed)
                .into_iter()
                .map(|n| {
                    let q = n.len() as u32;
                    (n, q)
                })
                .collect(),
            gift: Some(names(5, reversed).into_iter().collect()),
        };
        let got = shop.checkout(basket).await;
        assert!(matches!(got, Ok(1)), "call {call}: {got:?}");
    }
    assert_eq!(shop.runs.get(), 1);
    // A really different request under the same key is still refused.
    let changed = Basket {
        user: 9,
        items: names(19, false).into_iter().collect(),
        quantities: BTreeMap::<String, u32>::new().into_iter().collect(),
        gift: None,
    };
    assert!(matches!(
        shop.checkout(changed).await,
        Err(AppError::Idem(idem_runtime::Error::KeyReused))
    ));
}
