//! [`ReplayCache`]: an in-process cache of completed records in front of any store.
//!
//! A completed record never changes until it expires, so a process that has
//! seen one can replay it again without asking the store. The cache keeps the
//! outcome, the fingerprint and the record's own expiry (the store's remaining
//! ttl, counted on this process's monotonic clock from when the claim was
//! sent, so a slow reply never makes the cache outlive the record), and holds
//! at most `capacity` records, evicting the oldest first.
//!
//! Trade-offs, to choose it knowingly:
//! - a record deleted or evicted in the store behind the cache's back (by hand,
//!   or by a Redis `maxmemory` policy) is still replayed from the cache until
//!   its ttl runs out — which is what an idempotency record promises anyway;
//! - only replays are served from memory: claims of new keys, in-progress
//!   checks, completion, release and renewal always go to the store, so
//!   exactly-once does not depend on the cache;
//! - each process has its own cache; a replay is cached by the first duplicate
//!   this process sees, not by the completion (which may happen elsewhere).

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use foldhash::fast::RandomState;
use tokio::time::Instant;

use super::sync::{Mutex, MutexGuard, ShardHasher};
use super::{Claim, ClaimRequest, FencingToken, Record, Step, Store};
use crate::error::Error;
use crate::key::Digest;

const SHARDS: usize = 16;

/// Any store, with hot replays served from an in-process cache.
///
/// ```
/// use idem_runtime::{MemoryStore, ReplayCache};
/// let store = ReplayCache::new(MemoryStore::new(), 10_000);
/// # drop(store);
/// ```
#[derive(Clone)]
pub struct ReplayCache<S> {
    inner: S,
    cache: Arc<Cache>,
}

impl<S> std::fmt::Debug for ReplayCache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayCache")
            .field(
                "capacity",
                &(self.cache.per_shard * self.cache.shards.len()),
            )
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

struct Cache {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    hasher: ShardHasher,
}

/// One shard: the entries, and their insertion order for eviction.
///
/// Each insertion gets a sequence number, kept in the entry and beside the key
/// in `order`; an `order` slot whose number is not its entry's (the entry
/// expired, or expired and was inserted again) is stale and skipped. Stale
/// slots are compacted away once `order` holds twice the shard's capacity, so
/// its length stays below that however the keys churn.
#[derive(Default)]
struct Shard {
    entries: HashMap<String, Entry, RandomState>,
    order: VecDeque<(String, u64)>,
    next_seq: u64,
}

struct Entry {
    seq: u64,
    outcome: Vec<u8>,
    fingerprint: Option<Digest>,
    expires_at: Instant,
}

impl<S> ReplayCache<S> {
    /// Wraps `inner`, caching up to `capacity` completed records.
    pub fn new(inner: S, capacity: usize) -> Self {
        // Fewer shards for a small cache, and each shard's share rounded
        // down, so that the cache never holds more than `capacity` (at least
        // one record).
        let shards = capacity.clamp(1, SHARDS);
        let per_shard = (capacity / shards).max(1);
        ReplayCache {
            inner,
            cache: Arc::new(Cache {
                shards: (0..shards).map(|_| Mutex::default()).collect(),
                per_shard,
                hasher: ShardHasher::default(),
            }),
        }
    }

    /// The store behind the cache.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// How many records the cache holds now (some may have expired).
    pub fn len(&self) -> usize {
        self.cache
            .shards
            .iter()
            .map(|s| lock(s).entries.len())
            .sum()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cache {
    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        lock(&self.shards[(self.hasher.hash_one(key) >> 32) as usize % self.shards.len()])
    }

    /// The claim decision for a cached, unexpired record, if there is one.
    fn lookup(&self, request: &ClaimRequest<'_>) -> Option<Claim> {
        let mut shard = self.shard(request.key);
        // Read under the lock, so an entry inserted while this lookup waited
        // is judged by a time no older than the entry (CONTRACT §3.2: an
        // expired record is never replayed).
        let now = Instant::now();
        let entry = shard.entries.get(request.key)?;
        if entry.expires_at <= now {
            shard.entries.remove(request.key);
            return None;
        }
        if let (Some(stored), Some(given)) = (&entry.fingerprint, request.fingerprint) {
            if stored != given {
                return Some(Claim::FingerprintMismatch);
            }
        }
        Some(Claim::Completed {
            outcome: entry.outcome.clone(),
            fingerprint: entry.fingerprint,
            expires_in: entry.expires_at - now,
        })
    }

    /// Caches a record for `expires_in` from now (the tests' entry point).
    #[cfg(test)]
    fn insert(&self, key: &str, outcome: &[u8], fingerprint: Option<Digest>, expires_in: Duration) {
        if let Some(expires_at) = Instant::now().checked_add(expires_in) {
            self.insert_until(key, outcome, fingerprint, expires_at);
        }
    }

    /// Caches a record until `expires_at`, unless the key is cached already.
    fn insert_until(
        &self,
        key: &str,
        outcome: &[u8],
        fingerprint: Option<Digest>,
        expires_at: Instant,
    ) {
        let mut shard = self.shard(key);
        if shard.entries.contains_key(key) {
            return;
        }
        let Shard {
            entries,
            order,
            next_seq,
        } = &mut *shard;
        while entries.len() >= self.per_shard {
            let Some((oldest, seq)) = order.pop_front() else {
                break;
            };
            if entries.get(&oldest).is_some_and(|e| e.seq == seq) {
                entries.remove(&oldest);
            }
        }
        let seq = *next_seq;
        *next_seq += 1;
        order.push_back((key.to_owned(), seq));
        entries.insert(
            key.to_owned(),
            Entry {
                seq,
                outcome: outcome.to_vec(),
                fingerprint,
                expires_at,
            },
        );
        if order.len() > 2 * self.per_shard {
            order.retain(|(k, seq)| entries.get(k).is_some_and(|e| e.seq == *seq));
        }
    }
}

#[async_trait]
impl<S: Store + Clone + 'static> Store for ReplayCache<S> {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim, Error> {
        if let Some(hit) = self.cache.lookup(&request) {
            return Ok(hit);
        }
        let asked = Instant::now();
        let claim = self.inner.claim(request).await?;
        if let Claim::Completed {
            outcome,
            fingerprint,
            expires_in,
        } = &claim
        {
            // The store counted `expires_in` at some point after `asked`;
            // counting it from `asked` never outlives the record, however long
            // the reply took. A deadline, not a remaining time: a remainder
            // read off the clock and added to a later reading of it would
            // stretch the entry by whatever ran (or was preempted) between
            // the two readings. A reply slower than the ttl is not cached: it
            // would only evict a live entry.
            if let Some(expires_at) = asked.checked_add(*expires_in) {
                if expires_at > Instant::now() {
                    self.cache
                        .insert_until(request.key, outcome, *fingerprint, expires_at);
                }
            }
        }
        Ok(claim)
    }

    async fn complete(
        &self,
        key: &str,
        token: FencingToken,
        outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        self.inner.complete(key, token, outcome, ttl).await
    }

    async fn release(&self, key: &str, token: FencingToken) -> Result<(), Error> {
        self.inner.release(key, token).await
    }

    async fn renew(&self, key: &str, token: FencingToken, lease: Duration) -> Result<(), Error> {
        self.inner.renew(key, token, lease).await
    }

    async fn get(&self, key: &str) -> Result<Option<Record>, Error> {
        self.inner.get(key).await
    }

    async fn purge_expired(&self, batch: usize) -> Result<u64, Error> {
        let now = Instant::now();
        for shard in self.cache.shards.iter() {
            lock(shard).entries.retain(|_, e| e.expires_at > now);
        }
        self.inner.purge_expired(batch).await
    }

    async fn record_step(
        &self,
        key: &str,
        token: FencingToken,
        step: &Step,
        keep: Duration,
    ) -> Result<(), Error> {
        self.inner.record_step(key, token, step, keep).await
    }

    async fn steps(&self, key: &str, held: Option<FencingToken>) -> Result<Vec<Step>, Error> {
        self.inner.steps(key, held).await
    }

    fn keeps_steps(&self) -> bool {
        self.inner.keeps_steps()
    }

    fn handle(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }

    fn release_now(&self, key: &str, token: FencingToken) -> Option<Result<(), Error>> {
        self.inner.release_now(key, token)
    }

    fn answers_before_recorded(&self) -> bool {
        self.inner.answers_before_recorded()
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

#[cfg(test)]
impl Cache {
    /// Panics unless every shard is within its capacity and each entry has
    /// exactly one live slot in the eviction queue.
    fn assert_consistent(&self) {
        for shard in self.shards.iter() {
            let shard = lock(shard);
            assert!(shard.entries.len() <= self.per_shard, "over capacity");
            let live = shard
                .order
                .iter()
                .filter(|(k, seq)| shard.entries.get(k).is_some_and(|e| e.seq == *seq))
                .count();
            assert_eq!(
                live,
                shard.entries.len(),
                "each entry has exactly one live slot"
            );
        }
    }
}

#[cfg(all(test, idem_loom))]
mod loom_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn request(key: &str) -> ClaimRequest<'_> {
        ClaimRequest {
            key,
            fingerprint: None,
            lease: Duration::from_secs(1),
        }
    }

    fn queued(cache: &Cache) -> usize {
        cache.shards.iter().map(|s| lock(s).order.len()).sum()
    }

    /// Keys that expire and complete again, over and over: the eviction queue
    /// stays bounded by twice the capacity and holds no duplicate of a live key.
    #[test]
    fn churn_keeps_the_eviction_queue_bounded() {
        let store = ReplayCache::new((), 64);
        let cache = &store.cache;
        let bound = 2 * cache.per_shard * cache.shards.len() + cache.shards.len();
        for round in 0..20_000u32 {
            // The same few keys, each found expired and cached again (so the
            // key is in the cache again when the queue is compacted).
            let key = format!("ns:{}", round % 5);
            assert!(cache.lookup(&request(&key)).is_none());
            cache.insert(&key, b"1", None, Duration::ZERO);
            // And a stream of live keys, evicting one another.
            let live = format!("ns:live:{round}");
            cache.insert(&live, b"2", None, Duration::from_secs(60));
            assert!(queued(cache) <= bound, "queue grew to {}", queued(cache));
        }
        assert!(store.len() <= cache.per_shard * cache.shards.len());
        cache.assert_consistent();
    }

    /// A key inserted again after expiring is evicted by its own age, not by
    /// its earlier, stale slot.
    #[test]
    fn a_reinserted_key_is_evicted_by_its_new_age() {
        let store = ReplayCache::new((), 1);
        let cache = &store.cache;
        assert_eq!(cache.per_shard, 1);
        // Find two keys in the same shard.
        let shard_of = |k: &str| (cache.hasher.hash_one(k) >> 32) as usize % cache.shards.len();
        let a = "ns:a".to_owned();
        let b = (0..)
            .map(|i| format!("ns:b{i}"))
            .find(|k| shard_of(k) == shard_of(&a))
            .unwrap();
        cache.insert(&a, b"old", None, Duration::ZERO);
        assert!(cache.lookup(&request(&a)).is_none());
        cache.insert(&a, b"new", None, Duration::from_secs(60));
        assert!(
            matches!(cache.lookup(&request(&a)), Some(Claim::Completed { outcome, .. }) if outcome == b"new")
        );
        cache.insert(&b, b"b", None, Duration::from_secs(60));
        assert!(
            cache.lookup(&request(&a)).is_none(),
            "capacity 1: the older key went"
        );
        assert!(cache.lookup(&request(&b)).is_some());
    }
}

/// How the cache counts a record's expiry when the store's reply is slow.
#[cfg(test)]
mod slow_replies {
    use super::*;
    use crate::store::memory::MemoryStore;

    /// A store whose claim replies arrive `delay` after the store decided them
    /// (a slow network, a busy executor).
    #[derive(Clone)]
    struct SlowReplies {
        inner: MemoryStore,
        delay: Duration,
    }

    #[async_trait]
    impl Store for SlowReplies {
        async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim, Error> {
            let claim = self.inner.claim(request).await;
            tokio::time::sleep(self.delay).await;
            claim
        }
        async fn complete(
            &self,
            key: &str,
            token: FencingToken,
            outcome: &[u8],
            ttl: Duration,
        ) -> Result<(), Error> {
            self.inner.complete(key, token, outcome, ttl).await
        }
        async fn release(&self, key: &str, token: FencingToken) -> Result<(), Error> {
            self.inner.release(key, token).await
        }
        async fn renew(
            &self,
            key: &str,
            token: FencingToken,
            lease: Duration,
        ) -> Result<(), Error> {
            self.inner.renew(key, token, lease).await
        }
        async fn get(&self, key: &str) -> Result<Option<Record>, Error> {
            self.inner.get(key).await
        }
        async fn purge_expired(&self, batch: usize) -> Result<u64, Error> {
            self.inner.purge_expired(batch).await
        }
        fn handle(&self) -> Arc<dyn Store> {
            Arc::new(self.clone())
        }
    }

    /// The store says "3 s left" and the reply takes 2 s to arrive: the cache
    /// must stop replaying when the store's record expires (1 s after the
    /// reply), not 3 s after the reply, when the key may have run again.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reply_does_not_stretch_the_ttl() {
        let request = ClaimRequest {
            key: "ns:k",
            fingerprint: None,
            lease: Duration::from_secs(1),
        };
        let store = ReplayCache::new(
            SlowReplies {
                inner: MemoryStore::new(),
                delay: Duration::from_secs(2),
            },
            16,
        );
        let Claim::Acquired { token, .. } = store.inner.inner.claim(request).await.unwrap() else {
            panic!("a free key");
        };
        let ttl = Duration::from_secs(3);
        store.complete("ns:k", token, b"first", ttl).await.unwrap();
        // Answered "completed, 3 s left" at t = 0; the reply lands at t = 2.
        assert!(matches!(
            store.claim(request).await.unwrap(),
            Claim::Completed { .. }
        ));
        tokio::time::advance(Duration::from_millis(1500)).await;
        // t = 3.5: the store's record expired at t = 3, so the key is free.
        assert!(
            store.cache.lookup(&request).is_none(),
            "replayed from the cache after the record expired in the store"
        );
        assert!(matches!(
            store.claim(request).await.unwrap(),
            Claim::Acquired { .. }
        ));
    }
}
