//! Stress tests of the in-process stores on a multi-threaded runtime, with the
//! real clock: many tasks race claims, renewals, completions, releases and
//! purges on a few keys with leases and ttls of microseconds to milliseconds,
//! and every answer is checked against what the store's contract allows
//! (CONTRACT §3.2, §5.1). Complements the loom tests (every interleaving, no
//! time) and the protocol model (abstract time): here the clock moves while
//! callers wait for shard locks.
//!
//! `IDEM_STRESS_SECS` sets how long each test runs (default 2 s).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_runtime::{
    async_trait, Claim, ClaimRequest, Error, FencingToken, MemoryStore, Record, RecordState,
    ReplayCache, Store,
};
use tokio::time::Instant;

const TASKS: u64 = 64;
const HOUR: Duration = Duration::from_secs(3600);

fn run_for() -> Duration {
    let secs = std::env::var("IDEM_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

/// xorshift: no dependency, a different stream per task.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn req(key: &str, lease: Duration) -> ClaimRequest<'_> {
    ClaimRequest {
        key,
        fingerprint: None,
        lease,
    }
}

async fn jitter(rng: &mut Rng) {
    match rng.below(4) {
        0 => {}
        1 => tokio::task::yield_now().await,
        2 => tokio::time::sleep(Duration::from_micros(rng.below(300))).await,
        _ => std::thread::sleep(Duration::from_micros(rng.below(100))), // hold the worker
    }
}

fn token_of(outcome: &[u8]) -> u64 {
    u64::from_le_bytes(outcome.try_into().expect("an outcome is a token"))
}

/// What the MemoryStore test shares between tasks.
#[derive(Default)]
struct Books {
    tokens: Mutex<HashSet<u64>>,
    /// Per key, the token whose completion (ttl one hour) landed.
    completed: Mutex<HashMap<String, u64>>,
    /// Per key, a holder with an hour-long lease, and how often that changed.
    long_holder: Mutex<HashMap<String, (Option<u64>, u64)>>,
    /// Completed replies seen: (key, outcome token).
    replays: Mutex<Vec<(String, u64)>>,
    violations: Mutex<Vec<String>>,
}

impl Books {
    fn violation(&self, v: String) {
        self.violations.lock().unwrap().push(v);
    }
    fn holder(&self, key: &str) -> (Option<u64>, u64) {
        *self
            .long_holder
            .lock()
            .unwrap()
            .get(key)
            .unwrap_or(&(None, 0))
    }
    fn set_holder(&self, key: &str, token: Option<u64>) {
        let mut map = self.long_holder.lock().unwrap();
        let e = map.entry(key.to_owned()).or_insert((None, 0));
        e.0 = token;
        e.1 += 1;
    }
}

/// 64 tasks on a 4-worker runtime, keys that move on every few milliseconds:
/// one token per claim, never repeated; at most one completion lands per key
/// (ttl one hour); a claim never acquires a key completed before it started,
/// nor one held with an hour-long lease; a holder with an hour-long lease is
/// never refused its completion; purges never remove a live record; and the
/// tokens a single reader sees for a key only go up.
#[test]
fn memory_store_under_contention() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = MemoryStore::with_shards(2); // few shards: much lock contention
        let books = Arc::new(Books::default());
        let generation = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + run_for();
        let claims = Arc::new(AtomicU64::new(0));

        let mut handles = Vec::new();
        for t in 0..TASKS {
            let (store, books, generation, claims) =
                (store.clone(), books.clone(), generation.clone(), claims.clone());
            handles.push(tokio::spawn(async move {
                let mut rng = Rng::new(t + 1);
                while Instant::now() < deadline {
                    let key = format!("k{}-{}", generation.load(Ordering::Relaxed), rng.below(4));
                    let long = rng.below(4) == 0;
                    let lease = if long { HOUR } else { Duration::from_micros(rng.below(500)) };
                    let done_before = books.completed.lock().unwrap().get(&key).copied();
                    let holder_before = books.holder(&key);
                    let claim = store.claim(req(&key, lease)).await.unwrap();
                    claims.fetch_add(1, Ordering::Relaxed);
                    let token = match claim {
                        Claim::Acquired { token, .. } => token.get(),
                        Claim::Completed { outcome, .. } => {
                            books.replays.lock().unwrap().push((key, token_of(&outcome)));
                            jitter(&mut rng).await;
                            continue;
                        }
                        Claim::InProgress { .. } => {
                            jitter(&mut rng).await;
                            continue;
                        }
                        Claim::FingerprintMismatch => {
                            books.violation(format!("{key}: fingerprint mismatch without fingerprints"));
                            continue;
                        }
                        _ => unreachable!(),
                    };
                    if !books.tokens.lock().unwrap().insert(token) {
                        books.violation(format!("token {token} handed out twice"));
                    }
                    if let Some(done) = done_before {
                        books.violation(format!(
                            "{key}: acquired with token {token} after token {done} completed it"
                        ));
                    }
                    if let (Some(holder), epoch) = holder_before {
                        if books.holder(&key).1 == epoch {
                            books.violation(format!(
                                "{key}: acquired with token {token} while {holder} held an hour-long lease"
                            ));
                        }
                    }
                    let mut long_held = long;
                    if long {
                        books.set_holder(&key, Some(token));
                    }
                    jitter(&mut rng).await;
                    if rng.below(3) == 0 {
                        let renew_long = rng.below(3) == 0;
                        let lease = if renew_long { HOUR } else { Duration::from_micros(rng.below(500)) };
                        // The books never claim more than the store holds: a
                        // lease is marked short before the renewal that shortens
                        // it lands (it may lapse at once), long only after.
                        if !renew_long && long_held {
                            books.set_holder(&key, None);
                        }
                        match store.renew(&key, FencingToken(token), lease).await {
                            Ok(()) => {
                                if renew_long && !long_held {
                                    books.set_holder(&key, Some(token));
                                }
                                long_held = renew_long;
                            }
                            Err(Error::LeaseLost) if long_held => books.violation(format!(
                                "{key}: renewal of {token}'s hour-long lease refused"
                            )),
                            Err(Error::LeaseLost) => {}
                            Err(e) => panic!("{e}"),
                        }
                        jitter(&mut rng).await;
                    }
                    match rng.below(3) {
                        0 => {
                            if long_held {
                                books.set_holder(&key, None);
                            }
                            match store.release(&key, FencingToken(token)).await {
                                Ok(()) => {}
                                Err(Error::LeaseLost) if long_held => books.violation(format!(
                                    "{key}: release of {token}'s hour-long lease refused"
                                )),
                                Err(Error::LeaseLost) => {}
                                Err(e) => panic!("{e}"),
                            }
                        }
                        1 => {
                            let landed = store
                                .complete(&key, FencingToken(token), &token.to_le_bytes(), HOUR)
                                .await;
                            match landed {
                                Ok(()) => {
                                    let mut done = books.completed.lock().unwrap();
                                    if let Some(other) = done.insert(key.clone(), token) {
                                        books.violation(format!(
                                            "{key}: completions of {other} and {token} both landed"
                                        ));
                                    }
                                }
                                Err(Error::LeaseLost) if long_held => books.violation(format!(
                                    "{key}: completion of {token}'s hour-long lease refused"
                                )),
                                Err(Error::LeaseLost) => {}
                                Err(e) => panic!("{e}"),
                            }
                        }
                        _ => {} // abandoned (a crash): lapses with its lease
                    }
                }
            }));
        }
        // Keys move on, so each one sees a few rounds of contention and is then left.
        let mover = {
            let generation = generation.clone();
            let start = Instant::now();
            // By the clock, not a timer: hot tasks must not starve it.
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                    generation.store((start.elapsed().as_millis() / 5) as u64, Ordering::Relaxed);
                }
            })
        };
        // The reaper, all the time.
        let purger = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut rng = Rng::new(999);
                while Instant::now() < deadline {
                    store.purge_expired(1 + rng.below(64) as usize).await.unwrap();
                    tokio::task::yield_now().await;
                }
            })
        };
        // One reader: the tokens it sees per key only go up, and a completed
        // record (ttl one hour) stays completed with the same token.
        let reader = {
            let (store, generation, books) = (store.clone(), generation.clone(), books.clone());
            tokio::spawn(async move {
                let mut seen: HashMap<String, (u64, bool)> = HashMap::new();
                while Instant::now() < deadline {
                    let g = generation.load(Ordering::Relaxed);
                    for g in g.saturating_sub(1)..=g {
                        for k in 0..4 {
                            let key = format!("k{g}-{k}");
                            let Some(Record { token, state, .. }) = store.get(&key).await.unwrap()
                            else {
                                if seen.get(&key).is_some_and(|s| s.1) {
                                    books.violation(format!("{key}: a completed record vanished"));
                                }
                                continue;
                            };
                            let (token, completed) = (token.get(), state == RecordState::Completed);
                            if let Some(&(before, was_completed)) = seen.get(&key) {
                                if token < before {
                                    books.violation(format!("{key}: token went from {before} to {token}"));
                                }
                                if was_completed && (!completed || token != before) {
                                    books.violation(format!("{key}: completed record {before} replaced by {token}"));
                                }
                            }
                            seen.insert(key, (token, completed));
                        }
                    }
                    tokio::task::yield_now().await;
                }
            })
        };
        for h in handles {
            h.await.unwrap();
        }
        mover.join().unwrap();
        purger.await.unwrap();
        reader.await.unwrap();

        let done = books.completed.lock().unwrap();
        for (key, replayed) in books.replays.lock().unwrap().iter() {
            if done.get(key) != Some(replayed) {
                books.violation(format!(
                    "{key}: replayed {replayed}, but the completion that landed is {:?}",
                    done.get(key)
                ));
            }
        }
        let violations = books.violations.lock().unwrap();
        println!(
            "{} claims, {} tokens, {} completions, {} replays, {} violations",
            claims.load(Ordering::Relaxed),
            books.tokens.lock().unwrap().len(),
            done.len(),
            books.replays.lock().unwrap().len(),
            violations.len()
        );
        assert!(violations.is_empty(), "{:#?}", &violations[..violations.len().min(20)]);
        assert!(done.len() > 10, "the test completed too little to mean anything");
    });
}

/// A store whose claim replies arrive late, by a random delay per reply.
#[derive(Clone)]
struct SlowReplies {
    inner: MemoryStore,
    max_delay_us: u64,
    seed: Arc<AtomicU64>,
}

#[async_trait]
impl Store for SlowReplies {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim, Error> {
        let claim = self.inner.claim(request).await;
        let mut rng = Rng::new(self.seed.fetch_add(1, Ordering::Relaxed));
        if self.max_delay_us > 0 {
            tokio::time::sleep(Duration::from_micros(rng.below(self.max_delay_us))).await;
        }
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
    async fn renew(&self, key: &str, token: FencingToken, lease: Duration) -> Result<(), Error> {
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

/// A completion that landed: its ttl ran from no later than `returned`.
struct Landed {
    returned: Instant,
    ttl: Duration,
}

/// The replay cache over a store with slow claim replies, ttls of a few
/// milliseconds, and a capacity below the number of keys: a replay is never
/// served for a claim that started after the replayed record had surely
/// expired in the store (its completion returned more than its ttl before).
fn replay_cache_never_outlives_the_store(max_delay_us: u64, capacity: usize) -> (u64, u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = ReplayCache::new(
            SlowReplies {
                inner: MemoryStore::with_shards(2),
                max_delay_us,
                seed: Arc::new(AtomicU64::new(1)),
            },
            capacity,
        );
        let landed: Arc<Mutex<HashMap<u64, Landed>>> = Arc::default();
        // (key, outcome token, when the claim was sent)
        let replays: Arc<Mutex<Vec<(String, u64, Instant)>>> = Arc::default();
        let deadline = Instant::now() + run_for();
        let mut handles = Vec::new();
        for t in 0..TASKS {
            let (store, landed, replays) = (store.clone(), landed.clone(), replays.clone());
            handles.push(tokio::spawn(async move {
                let mut rng = Rng::new(t + 1000);
                while Instant::now() < deadline {
                    let key = format!("k{}", rng.below(24));
                    let sent = Instant::now();
                    let claim = store
                        .claim(req(&key, Duration::from_millis(1 + rng.below(3))))
                        .await
                        .unwrap();
                    match claim {
                        Claim::Acquired { token, .. } => {
                            jitter(&mut rng).await;
                            let ttl = Duration::from_micros(500 + rng.below(4000));
                            let out = token.get().to_le_bytes();
                            if store.complete(&key, token, &out, ttl).await.is_ok() {
                                landed.lock().unwrap().insert(
                                    token.get(),
                                    Landed {
                                        returned: Instant::now(),
                                        ttl,
                                    },
                                );
                            }
                        }
                        Claim::Completed { outcome, .. } => {
                            replays
                                .lock()
                                .unwrap()
                                .push((key, token_of(&outcome), sent));
                        }
                        _ => jitter(&mut rng).await,
                    }
                }
            }));
        }
        let purger = {
            let store = store.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    store.purge_expired(16).await.unwrap();
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            })
        };
        for h in handles {
            h.await.unwrap();
        }
        purger.await.unwrap();
        let landed = landed.lock().unwrap();
        let replays = replays.lock().unwrap();
        let mut late = Vec::new();
        for (key, token, sent) in replays.iter() {
            let Some(l) = landed.get(token) else {
                late.push(format!(
                    "{key}: replayed {token}, whose completion never landed"
                ));
                continue;
            };
            if *sent > l.returned + l.ttl {
                late.push(format!(
                    "{key}: replayed {token} {:?} after its record expired in the store",
                    *sent - (l.returned + l.ttl)
                ));
            }
        }
        assert!(store.len() <= capacity);
        assert!(
            late.is_empty(),
            "{} of {} replays: {:#?}",
            late.len(),
            replays.len(),
            &late[..late.len().min(10)]
        );
        (landed.len() as u64, replays.len() as u64)
    })
}

#[test]
fn replay_cache_with_prompt_replies() {
    let (landed, replays) = replay_cache_never_outlives_the_store(0, 8);
    println!("{landed} completions, {replays} replays");
    assert!(replays > 100);
}

#[test]
fn replay_cache_with_slow_replies() {
    let (landed, replays) = replay_cache_never_outlives_the_store(3000, 8);
    println!("{landed} completions, {replays} replays");
    assert!(replays > 100);
}

#[test]
fn replay_cache_with_slow_replies_and_room_for_all() {
    let (landed, replays) = replay_cache_never_outlives_the_store(3000, 1024);
    println!("{landed} completions, {replays} replays");
    assert!(replays > 100);
}

/// A third-party store that answers every claim "completed, `expires_in` left".
#[derive(Clone)]
struct FixedReply {
    expires_in: Duration,
}

#[async_trait]
impl Store for FixedReply {
    async fn claim(&self, _: ClaimRequest<'_>) -> Result<Claim, Error> {
        Ok(Claim::Completed {
            outcome: b"1".to_vec(),
            fingerprint: None,
            expires_in: self.expires_in,
        })
    }
    async fn complete(&self, _: &str, _: FencingToken, _: &[u8], _: Duration) -> Result<(), Error> {
        Err(Error::LeaseLost)
    }
    async fn release(&self, _: &str, _: FencingToken) -> Result<(), Error> {
        Err(Error::LeaseLost)
    }
    async fn renew(&self, _: &str, _: FencingToken, _: Duration) -> Result<(), Error> {
        Err(Error::LeaseLost)
    }
    async fn get(&self, _: &str) -> Result<Option<Record>, Error> {
        Ok(None)
    }
    async fn purge_expired(&self, _: usize) -> Result<u64, Error> {
        Ok(0)
    }
    fn handle(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }
}

/// Extreme ttls in a store's answer neither panic nor overflow the cache's
/// arithmetic, on the real clock and on a paused one that auto-advances;
/// a zero ttl is not cached.
#[tokio::test(start_paused = true)]
async fn extreme_ttls_in_replies() {
    for expires_in in [
        Duration::ZERO,
        Duration::from_nanos(1),
        idem_runtime::store::MAX_DURATION,
        Duration::from_secs(u64::MAX / 2),
        Duration::MAX,
    ] {
        let cache = ReplayCache::new(FixedReply { expires_in }, 16);
        for _ in 0..3 {
            let claim = cache.claim(req("ns:k", HOUR)).await.unwrap();
            assert!(matches!(claim, Claim::Completed { .. }), "{claim:?}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if expires_in.is_zero() {
            assert!(cache.is_empty(), "a record with no ttl left was cached");
        }
        assert!(cache.len() <= 1);
        cache.purge_expired(10).await.unwrap();
    }
}

/// The cache through the conformance suite (feature `testing`).
#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_cache_passes_conformance() {
    idem_runtime::testing::conformance(&ReplayCache::new(MemoryStore::new(), 64)).await;
    idem_runtime::testing::conformance(&ReplayCache::new(MemoryStore::with_shards(1), 1)).await;
    idem_runtime::testing::conformance(&MemoryStore::with_shards(1)).await;
}

/// Documented: "holds at most `capacity` records".
#[tokio::test]
async fn capacity_is_an_upper_bound() {
    for capacity in [1usize, 2, 8, 17, 100, 1000] {
        let store = MemoryStore::new();
        let cache = ReplayCache::new(store.clone(), capacity);
        for i in 0..1000 {
            let key = format!("ns:{i}");
            let Claim::Acquired { token, .. } = store.claim(req(&key, HOUR)).await.unwrap() else {
                panic!("a free key");
            };
            store.complete(&key, token, b"1", HOUR).await.unwrap();
            cache.claim(req(&key, HOUR)).await.unwrap();
        }
        println!("capacity {capacity}: holds {}", cache.len());
        assert!(
            cache.len() <= capacity,
            "capacity {capacity}: holds {}",
            cache.len()
        );
    }
}
