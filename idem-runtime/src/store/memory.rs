//! [`MemoryStore`]: a sharded in-process store, for tests and single-process services.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use foldhash::fast::RandomState;
use tokio::time::Instant;

use super::sync::{AtomicU64, Mutex, MutexGuard, Ordering, ShardHasher};
use super::{Claim, ClaimRequest, FencingToken, Record, RecordState, Step, Store};
use crate::error::Error;
use crate::key::Digest;

const DEFAULT_SHARDS: usize = 64;
/// A shard is swept at least this often (in claims), or once it has doubled since its last sweep.
const SWEEP_EVERY: usize = 1024;

/// An in-process store: a mutex-sharded map, with expired records swept as it is used.
///
/// Records live only as long as the process; use it in tests, or where a single
/// process is the whole service. Time is Tokio's clock, so tests that pause time
/// (`tokio::time::pause`) can move leases and ttls forward without sleeping.
///
/// ```
/// use idem_runtime::MemoryStore;
/// let store = MemoryStore::new();
/// let shared = store.clone(); // clones share the same records
/// # drop(shared);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    hasher: ShardHasher,
    next_token: AtomicU64,
    me: Weak<Inner>,
}

/// Keys are hashed with foldhash: fast on the 64-hex-digit digests the engine
/// produces, and seeded per process so crafted keys cannot collide on purpose.
#[derive(Default)]
struct Shard {
    /// Boxed keys and outcomes: no capacity word, 16 bytes a record less than
    /// `String` and `Vec` (issue 15, bytes per record).
    records: HashMap<Box<str>, Entry, RandomState>,
    claims_since_sweep: usize,
    len_after_sweep: usize,
}

struct Entry {
    token: FencingToken,
    fingerprint: Option<Digest>,
    state: State,
    /// Steps recorded by this call's attempts, kept past a release or a lapse.
    steps: Option<Box<Steps>>,
}

/// A call's recorded steps, by position, and until when they are kept.
struct Steps {
    until: Instant,
    list: Vec<Step>,
}

enum State {
    Processing {
        lease_until: Instant,
    },
    Completed {
        outcome: Box<[u8]>,
        expires_at: Instant,
    },
    /// Released while it had steps: kept for them, deciding no claim.
    Released,
}

impl Entry {
    /// Whether the record still decides claims (a live lease, or an unexpired outcome).
    fn is_live(&self, now: Instant) -> bool {
        match &self.state {
            State::Processing { lease_until } => *lease_until > now,
            State::Completed { expires_at, .. } => *expires_at > now,
            State::Released => false,
        }
    }

    /// The steps, if they are still kept at `now`.
    fn kept_steps(&self, now: Instant) -> Option<&Steps> {
        self.steps.as_deref().filter(|steps| steps.until > now)
    }

    /// Whether the record must stay: it is live, or it keeps steps.
    fn is_kept(&self, now: Instant) -> bool {
        self.is_live(now) || self.kept_steps(now).is_some()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.inner.shards.len())
            .finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store with 64 shards.
    pub fn new() -> Self {
        Self::with_shards(DEFAULT_SHARDS)
    }

    /// An empty store with `shards` shards (at least one).
    pub fn with_shards(shards: usize) -> Self {
        let shards = (0..shards.max(1)).map(|_| Mutex::default()).collect();
        MemoryStore {
            inner: Arc::new_cyclic(|me| Inner {
                shards,
                hasher: ShardHasher::default(),
                next_token: AtomicU64::new(1),
                me: me.clone(),
            }),
        }
    }

    /// How many records are held (live or not yet swept).
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| lock(s).records.len())
            .sum()
    }

    /// Whether the store holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the stored outcome of a completed record, as a corrupt or
    /// incompatible writer would. For tests of how corrupt records are handled.
    #[doc(hidden)]
    pub fn overwrite_outcome(&self, key: &str, outcome: Vec<u8>) -> bool {
        let mut shard = self.inner.shard(key);
        match shard.records.get_mut(key).map(|e| &mut e.state) {
            Some(State::Completed { outcome: o, .. }) => {
                *o = outcome.into_boxed_slice();
                true
            }
            _ => false,
        }
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding a shard lock leaves the map consistent (every
    // mutation is a single insert/remove/assign), so a poisoned lock is usable.
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Inner {
    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        // The high bits pick the shard; the map inside uses its own seed.
        let index = ((self.hasher.hash_one(key) >> 32) as usize) % self.shards.len();
        lock(&self.shards[index])
    }

    fn next_token(&self) -> FencingToken {
        FencingToken(self.next_token.fetch_add(1, Ordering::Relaxed))
    }

    fn claim_now(&self, request: ClaimRequest<'_>) -> Claim {
        let mut shard = self.shard(request.key);
        // The clock is read under the lock: a record written while this claim
        // waited for the lock is judged by a time no older than the record.
        let now = Instant::now();
        shard.maybe_sweep(now);
        let (took_over, steps) = match shard.records.get_mut(request.key) {
            Some(entry) if entry.is_live(now) => {
                if let (Some(stored), Some(given)) = (&entry.fingerprint, request.fingerprint) {
                    if stored != given {
                        return Claim::FingerprintMismatch;
                    }
                }
                return match &entry.state {
                    State::Completed {
                        outcome,
                        expires_at,
                    } => Claim::Completed {
                        outcome: outcome.to_vec(),
                        fingerprint: entry.fingerprint,
                        expires_in: expires_at.saturating_duration_since(now),
                    },
                    State::Processing { lease_until } => Claim::InProgress {
                        lease_remaining: lease_until.saturating_duration_since(now),
                    },
                    State::Released => unreachable!("a released record is never live"),
                };
            }
            Some(entry) => {
                // Kept steps belong to the request that recorded them: another
                // request with this key must not resume them.
                let steps = entry.steps.take().filter(|steps| steps.until > now);
                if let (Some(_), Some(stored), Some(given)) =
                    (&steps, &entry.fingerprint, request.fingerprint)
                {
                    if stored != given {
                        entry.steps = steps;
                        return Claim::FingerprintMismatch;
                    }
                }
                let lapsed = matches!(entry.state, State::Processing { .. });
                (lapsed || steps.is_some(), steps)
            }
            None => (false, None),
        };
        let token = self.next_token();
        let entry = Entry {
            token,
            fingerprint: request.fingerprint.copied(),
            state: State::Processing {
                lease_until: now + super::cap_duration(request.lease),
            },
            steps,
        };
        shard.records.insert(request.key.into(), entry);
        Claim::Acquired { token, took_over }
    }

    /// Runs `f` on the record if `token` is its current token and it is processing.
    fn with_claim(
        &self,
        key: &str,
        token: FencingToken,
        f: impl FnOnce(&mut Entry),
    ) -> Result<(), Error> {
        let mut shard = self.shard(key);
        match shard.records.get_mut(key) {
            Some(entry)
                if entry.token == token && matches!(entry.state, State::Processing { .. }) =>
            {
                f(entry);
                Ok(())
            }
            _ => Err(Error::LeaseLost),
        }
    }

    fn release_sync(&self, key: &str, token: FencingToken) -> Result<(), Error> {
        let mut shard = self.shard(key);
        let now = Instant::now();
        let keep = match shard.records.get_mut(key) {
            Some(entry)
                if entry.token == token && matches!(entry.state, State::Processing { .. }) =>
            {
                // Recorded steps outlive the attempt: the next claim resumes them.
                let keep = entry.kept_steps(now).is_some();
                if keep {
                    entry.state = State::Released;
                }
                keep
            }
            _ => return Err(Error::LeaseLost),
        };
        if !keep {
            shard.records.remove(key);
        }
        Ok(())
    }

    fn purge(&self, batch: usize) -> u64 {
        let now = Instant::now();
        let mut purged = 0u64;
        for shard in self.shards.iter() {
            if purged as usize >= batch {
                break;
            }
            let mut shard = lock(shard);
            let budget = batch - purged as usize;
            let expired: Vec<Box<str>> = shard
                .records
                .iter()
                .filter(|(_, e)| !e.is_kept(now))
                .map(|(k, _)| k.clone())
                .take(budget)
                .collect();
            for k in &expired {
                shard.records.remove(k);
            }
            purged += expired.len() as u64;
        }
        purged
    }
}

impl Shard {
    /// Amortised sweep: a shard is scanned once per `max(1024, its size)` claims, or
    /// when it has doubled since its last sweep, so a claim pays O(1) scanning on
    /// average and memory stays within about twice the live records.
    fn maybe_sweep(&mut self, now: Instant) {
        self.claims_since_sweep += 1;
        let grown = self.records.len() >= 2 * self.len_after_sweep.max(SWEEP_EVERY / 8);
        if self.claims_since_sweep >= SWEEP_EVERY.max(self.len_after_sweep) || grown {
            self.records.retain(|_, e| e.is_kept(now));
            self.claims_since_sweep = 0;
            self.len_after_sweep = self.records.len();
        }
    }
}

#[async_trait]
impl Store for Inner {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim, Error> {
        Ok(self.claim_now(request))
    }

    async fn complete(
        &self,
        key: &str,
        token: FencingToken,
        outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        let expires_at = Instant::now() + super::cap_duration(ttl);
        self.with_claim(key, token, |entry| {
            entry.state = State::Completed {
                outcome: outcome.into(),
                expires_at,
            };
            entry.steps = None;
        })
    }

    async fn release(&self, key: &str, token: FencingToken) -> Result<(), Error> {
        self.release_sync(key, token)
    }

    async fn renew(&self, key: &str, token: FencingToken, lease: Duration) -> Result<(), Error> {
        let lease_until = Instant::now() + super::cap_duration(lease);
        self.with_claim(key, token, |entry| {
            entry.state = State::Processing { lease_until };
        })
    }

    async fn get(&self, key: &str) -> Result<Option<Record>, Error> {
        let shard = self.shard(key);
        let now = Instant::now();
        Ok(shard.records.get(key).and_then(|entry| {
            let (state, outcome, until) = match &entry.state {
                State::Processing { lease_until } => (RecordState::Processing, None, *lease_until),
                State::Completed {
                    outcome,
                    expires_at,
                } => {
                    if *expires_at <= now {
                        return None;
                    }
                    (RecordState::Completed, Some(outcome.to_vec()), *expires_at)
                }
                State::Released => return None,
            };
            Some(Record::new(
                key.to_owned(),
                state,
                entry.token,
                entry.fingerprint,
                outcome,
                until.saturating_duration_since(now),
            ))
        }))
    }

    async fn purge_expired(&self, batch: usize) -> Result<u64, Error> {
        Ok(self.purge(batch))
    }

    async fn record_step(
        &self,
        key: &str,
        token: FencingToken,
        step: &Step,
        keep: Duration,
    ) -> Result<(), Error> {
        let until = Instant::now() + super::cap_duration(keep);
        self.with_claim(key, token, |entry| {
            let steps = entry.steps.get_or_insert_with(|| {
                Box::new(Steps {
                    until,
                    list: Vec::new(),
                })
            });
            steps.until = steps.until.max(until);
            match steps.list.binary_search_by_key(&step.at, |s| s.at) {
                Ok(i) => steps.list[i] = step.clone(),
                Err(i) => steps.list.insert(i, step.clone()),
            }
        })
    }

    async fn steps(&self, key: &str, held: Option<FencingToken>) -> Result<Vec<Step>, Error> {
        let shard = self.shard(key);
        let now = Instant::now();
        let entry = shard.records.get(key);
        if let Some(token) = held {
            if !entry
                .is_some_and(|e| e.token == token && matches!(e.state, State::Processing { .. }))
            {
                return Err(Error::LeaseLost);
            }
        }
        Ok(entry
            .and_then(|entry| entry.kept_steps(now))
            .map(|steps| steps.list.clone())
            .unwrap_or_default())
    }

    fn keeps_steps(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn handle(&self) -> Arc<dyn Store> {
        // `Inner` lives only inside the `Arc` made in `with_shards`, so while `&self`
        // exists the upgrade succeeds.
        match self.me.upgrade() {
            Some(me) => me,
            None => unreachable!("a MemoryStore is always owned by its Arc"),
        }
    }

    fn release_now(&self, key: &str, token: FencingToken) -> Option<Result<(), Error>> {
        Some(self.release_sync(key, token))
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim, Error> {
        Ok(self.inner.claim_now(request))
    }

    async fn complete(
        &self,
        key: &str,
        token: FencingToken,
        outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        Store::complete(&*self.inner, key, token, outcome, ttl).await
    }

    async fn release(&self, key: &str, token: FencingToken) -> Result<(), Error> {
        self.inner.release_sync(key, token)
    }

    async fn renew(&self, key: &str, token: FencingToken, lease: Duration) -> Result<(), Error> {
        Store::renew(&*self.inner, key, token, lease).await
    }

    async fn get(&self, key: &str) -> Result<Option<Record>, Error> {
        Store::get(&*self.inner, key).await
    }

    async fn purge_expired(&self, batch: usize) -> Result<u64, Error> {
        Ok(self.inner.purge(batch))
    }

    async fn record_step(
        &self,
        key: &str,
        token: FencingToken,
        step: &Step,
        keep: Duration,
    ) -> Result<(), Error> {
        Store::record_step(&*self.inner, key, token, step, keep).await
    }

    async fn steps(&self, key: &str, held: Option<FencingToken>) -> Result<Vec<Step>, Error> {
        Store::steps(&*self.inner, key, held).await
    }

    fn keeps_steps(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn handle(&self) -> Arc<dyn Store> {
        self.inner.clone()
    }

    fn release_now(&self, key: &str, token: FencingToken) -> Option<Result<(), Error>> {
        Some(self.inner.release_sync(key, token))
    }
}

mod admin;

#[cfg(all(test, idem_loom))]
mod loom_tests;
