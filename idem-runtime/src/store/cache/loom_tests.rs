//! Every interleaving of a few threads on one `ReplayCache` shard, explored by
//! loom (`--cfg idem_loom`, see store/sync.rs).
//!
//! What the cache promises (cache.rs): it serves a completed record's outcome
//! only for that key and only until the record's expiry; a shard holds at most
//! its capacity, evicting the oldest; the eviction queue keeps one live slot
//! per entry. Entries are never changed in place, only inserted (first insert
//! wins), evicted, or removed once expired, so "invalidation" is expiry and
//! eviction. Time is the real monotonic clock, and no decision depends on how
//! it moves: an entry is inserted either already expired (zero ttl) or for an
//! hour.

use std::hash::BuildHasher;
use std::time::Duration;

use loom::future::block_on;
use loom::thread;

use super::{Cache, ReplayCache, SHARDS};
use crate::store::sync::explore;
use crate::store::{Claim, ClaimRequest, Store};
use crate::MemoryStore;

const HOUR: Duration = Duration::from_secs(3600);

/// A cache of one entry per shard, in front of a one-shard memory store.
fn cache() -> ReplayCache<MemoryStore> {
    ReplayCache::new(MemoryStore::with_shards(1), SHARDS)
}

fn request(key: &str) -> ClaimRequest<'_> {
    ClaimRequest {
        key,
        fingerprint: None,
        lease: HOUR,
    }
}

/// The outcome the cache serves for `key`, if it serves one.
fn served(cache: &Cache, key: &str) -> Option<Vec<u8>> {
    match cache.lookup(&request(key))? {
        Claim::Completed { outcome, .. } => Some(outcome),
        other => panic!("the cache answered {other:?}"),
    }
}

/// Two keys that share a shard of `cache`.
fn same_shard(cache: &Cache) -> (String, String) {
    let shard = |k: &str| (cache.hasher.hash_one(k) >> 32) as usize % SHARDS;
    let a = "ns:a".to_owned();
    let b = (0..)
        .map(|i| format!("ns:b{i}"))
        .find(|k| shard(k) == shard(&a))
        .expect("some key shares the shard");
    (a, b)
}

/// Three duplicates of a completed call replay it at once through the cache
/// (`ReplayCache::claim`: a miss asks the store and caches its answer): each
/// gets the outcome, and one entry results.
#[test]
fn loom_concurrent_first_replays_cache_one_entry() {
    explore("concurrent first replays cache one entry", || {
        let store = cache();
        let token = match block_on(store.inner().claim(request("ns:k"))).unwrap() {
            Claim::Acquired { token, .. } => token,
            other => panic!("a free key: {other:?}"),
        };
        block_on(store.inner().complete("ns:k", token, b"42", HOUR)).unwrap();
        let duplicates: Vec<_> = (0..2)
            .map(|_| {
                let store = store.clone();
                thread::spawn(move || block_on(store.claim(request("ns:k"))).unwrap())
            })
            .collect();
        let mut replies = vec![block_on(store.claim(request("ns:k"))).unwrap()];
        replies.extend(duplicates.into_iter().map(|d| d.join().unwrap()));
        for reply in &replies {
            assert!(
                matches!(reply, Claim::Completed { outcome, .. } if outcome == b"42"),
                "{reply:?}"
            );
        }
        assert_eq!(store.len(), 1);
        store.cache.assert_consistent();
        assert_eq!(served(&store.cache, "ns:k").as_deref(), Some(&b"42"[..]));
    });
}

/// Two keys fight over a one-entry shard while a reader looks both up: the
/// reader gets each key's own outcome or a miss, and the later insert stays.
#[test]
fn loom_eviction_under_contention_serves_only_each_keys_own_outcome() {
    explore("eviction under contention", || {
        let store = cache();
        let (a, b) = same_shard(&store.cache);
        let writers: Vec<_> = [a.clone(), b.clone()]
            .into_iter()
            .map(|key| {
                let cache = std::sync::Arc::clone(&store.cache);
                thread::spawn(move || cache.insert(&key, key.as_bytes(), None, HOUR))
            })
            .collect();
        for key in [&a, &b] {
            let read = served(&store.cache, key);
            assert!(
                read.is_none() || read.as_deref() == Some(key.as_bytes()),
                "{key} served {read:?}"
            );
        }
        for writer in writers {
            writer.join().unwrap();
        }
        store.cache.assert_consistent();
        let kept = [&a, &b].map(|k| served(&store.cache, k).is_some());
        assert_eq!(kept.iter().filter(|k| **k).count(), 1, "one entry fits");
    });
}

/// An entry that expired (inserted with no ttl left) races the insert of a
/// live one for the same key and a lookup: the expired outcome is never
/// served, and once it is gone the live one can be cached.
#[test]
fn loom_an_expired_entry_is_never_served() {
    explore("an expired entry is never served", || {
        let store = cache();
        let writers: Vec<_> = [(&b"old"[..], Duration::ZERO), (&b"new"[..], HOUR)]
            .into_iter()
            .map(|(outcome, ttl)| {
                let cache = std::sync::Arc::clone(&store.cache);
                thread::spawn(move || cache.insert("ns:k", outcome, None, ttl))
            })
            .collect();
        let read = served(&store.cache, "ns:k");
        assert_ne!(
            read.as_deref(),
            Some(&b"old"[..]),
            "served an expired entry"
        );
        for writer in writers {
            writer.join().unwrap();
        }
        store.cache.assert_consistent();
        match served(&store.cache, "ns:k") {
            Some(outcome) => assert_eq!(outcome, b"new"),
            // The expired entry got in first and kept the live one out; the
            // lookup removed it, so the next replay is cached.
            None => {
                store.cache.insert("ns:k", b"new", None, HOUR);
                assert_eq!(served(&store.cache, "ns:k").as_deref(), Some(&b"new"[..]));
            }
        }
    });
}

/// A purge (`ReplayCache::purge_expired`) sweeps every shard while an
/// expired entry is inserted and a live one is read: the live one stays,
/// the expired one is never served.
#[test]
fn loom_a_purge_keeps_live_entries_and_serves_no_expired_one() {
    explore("a purge races inserts", || {
        // Room for both keys, even in one shard.
        let store = ReplayCache::new(MemoryStore::with_shards(1), 2 * SHARDS);
        store.cache.insert("ns:live", b"live", None, HOUR);
        let expired = {
            let cache = std::sync::Arc::clone(&store.cache);
            thread::spawn(move || cache.insert("ns:k", b"old", None, Duration::ZERO))
        };
        block_on(store.purge_expired(10)).unwrap();
        assert_eq!(
            served(&store.cache, "ns:k"),
            None,
            "served an expired entry"
        );
        expired.join().unwrap();
        store.cache.assert_consistent();
        assert_eq!(
            served(&store.cache, "ns:live").as_deref(),
            Some(&b"live"[..])
        );
        assert_eq!(served(&store.cache, "ns:k"), None);
    });
}
