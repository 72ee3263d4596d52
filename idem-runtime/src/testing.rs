//! The store conformance suite: run it against any [`Store`] with one call.
//!
//! ```
//! # #[tokio::main] async fn main() {
//! idem_runtime::testing::conformance(&idem_runtime::MemoryStore::new()).await;
//! # }
//! ```
//!
//! Every check uses keys under a fresh random namespace, so the suite can run
//! against a persistent store that holds other data. Checks that need time to
//! pass use short leases and ttls (150 ms) and sleep well past them; checks that
//! need a record to stay live use long ones, so nothing depends on timing luck.
//! A failed check panics with a message naming the rule it broke.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::Error;
use crate::key::{fingerprint, Digest};
use crate::store::{Claim, ClaimRequest, FencingToken, RecordState, Step, Store};

const LONG: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_millis(150);
const PAST_SHORT: Duration = Duration::from_millis(400);

/// Runs every check against `store`, panicking on the first rule broken.
pub async fn conformance(store: &dyn Store) {
    let ns = Namespace::new();
    claim_absent_then_in_progress(store, &ns).await;
    complete_then_replay(store, &ns).await;
    stale_tokens_change_nothing(store, &ns).await;
    release_lets_the_next_claim_run(store, &ns).await;
    renew_extends_only_the_current_claim(store, &ns).await;
    fingerprints_guard_every_live_state(store, &ns).await;
    keys_are_isolated(store, &ns).await;
    concurrent_claims_have_one_winner(store, &ns).await;
    concurrent_replays_all_replay(store, &ns).await;
    tokens_never_repeat(store, &ns).await;
    handle_shares_records(store, &ns).await;
    release_now_if_supported(store, &ns).await;
    lapsed_lease_is_taken_over(store, &ns).await;
    ttl_expiry_allows_a_new_claim(store, &ns).await;
    purge_removes_expired_records(store, &ns).await;
    huge_durations_are_capped(store, &ns).await;
}

/// Runs every check of the [steps](crate::step) a store keeps
/// ([`Store::record_step`], [`Store::steps`]) against `store`, panicking on the
/// first rule broken. For stores that keep steps (every store idem ships).
pub async fn step_conformance(store: &dyn Store) {
    assert!(
        store.keeps_steps(),
        "a store that keeps steps says so (Store::keeps_steps)"
    );
    let ns = Namespace::new();
    steps_are_fenced_and_ordered(store, &ns).await;
    steps_survive_a_release(store, &ns).await;
    steps_survive_a_lapse(store, &ns).await;
    a_release_without_steps_is_no_takeover(store, &ns).await;
    kept_steps_guard_the_fingerprint(store, &ns).await;
    steps_expire_when_kept_no_longer(store, &ns).await;
    steps_values_round_trip(store, &ns).await;
}

/// A random namespace for one run of the suite.
pub struct Namespace(String);

impl Namespace {
    /// A namespace no other run uses.
    pub fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let salt = RandomState::new().hash_one(nanos);
        Namespace(format!("conformance-{nanos:x}-{salt:x}"))
    }

    /// The storage key for `name` in this namespace.
    pub fn key(&self, name: &str) -> String {
        crate::key::Key::derive(&self.0, name)
            .map(|k| k.as_str().to_owned())
            .unwrap_or_else(|_| format!("{}:{name}", self.0))
    }
}

impl Default for Namespace {
    fn default() -> Self {
        Self::new()
    }
}

fn req<'a>(key: &'a str, fp: Option<&'a Digest>, lease: Duration) -> ClaimRequest<'a> {
    ClaimRequest {
        key,
        fingerprint: fp,
        lease,
    }
}

async fn acquire(store: &dyn Store, key: &str, lease: Duration) -> FencingToken {
    match store.claim(req(key, None, lease)).await {
        Ok(Claim::Acquired { token, .. }) => token,
        other => panic!("claim of an absent key must be acquired, got {other:?}"),
    }
}

fn lease_lost(result: Result<(), Error>, what: &str) {
    assert!(
        matches!(result, Err(Error::LeaseLost)),
        "{what} with a stale token must fail with LeaseLost, got {result:?}"
    );
}

/// An absent key is acquired; a second claim sees it in progress with a bounded lease.
pub async fn claim_absent_then_in_progress(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("in-progress");
    acquire(store, &key, LONG).await;
    match store.claim(req(&key, None, LONG)).await {
        Ok(Claim::InProgress { lease_remaining }) => assert!(
            lease_remaining <= LONG && lease_remaining > LONG / 2,
            "lease_remaining must be the remaining lease, got {lease_remaining:?}"
        ),
        other => panic!("a live claim must be reported in progress, got {other:?}"),
    }
    let record = store.get(&key).await.unwrap().expect("claimed record");
    assert_eq!(record.state, RecordState::Processing);
}

/// A completed record replays its exact bytes; it cannot be completed twice.
pub async fn complete_then_replay(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("complete");
    let token = acquire(store, &key, LONG).await;
    let outcome = br#"{"ok":{"id":1,"note":"\u00e9"}}"#;
    store.complete(&key, token, outcome, LONG).await.unwrap();
    for _ in 0..2 {
        match store.claim(req(&key, None, LONG)).await {
            Ok(Claim::Completed { outcome: got, .. }) => assert_eq!(got, outcome),
            other => panic!("a completed record must be replayed, got {other:?}"),
        }
    }
    let record = store.get(&key).await.unwrap().expect("completed record");
    assert_eq!(record.state, RecordState::Completed);
    assert_eq!(record.token, token);
    assert_eq!(record.outcome.as_deref(), Some(&outcome[..]));
    assert!(record.expires_in <= LONG && record.expires_in > LONG / 2);
    lease_lost(
        store.complete(&key, token, b"{}", LONG).await,
        "complete of a completed record",
    );
    lease_lost(
        store.release(&key, token).await,
        "release of a completed record",
    );
    lease_lost(
        store.renew(&key, token, LONG).await,
        "renew of a completed record",
    );
    assert!(store.get(&ns.key("never-claimed")).await.unwrap().is_none());
}

/// complete, release and renew with a wrong token fail and change nothing.
pub async fn stale_tokens_change_nothing(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("stale");
    let token = acquire(store, &key, LONG).await;
    let wrong = FencingToken(token.0.wrapping_add(1_000_000));
    lease_lost(store.complete(&key, wrong, b"{}", LONG).await, "complete");
    lease_lost(store.release(&key, wrong).await, "release");
    lease_lost(store.renew(&key, wrong, LONG).await, "renew");
    let record = store.get(&key).await.unwrap().expect("record");
    assert_eq!(record.state, RecordState::Processing);
    assert_eq!(record.token, token);
    lease_lost(
        store.complete(&ns.key("absent"), token, b"{}", LONG).await,
        "complete of an absent key",
    );
}

/// After release the key is absent: the next claim runs at once with a new token.
pub async fn release_lets_the_next_claim_run(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("release");
    let first = acquire(store, &key, LONG).await;
    store.release(&key, first).await.unwrap();
    assert!(
        store.get(&key).await.unwrap().is_none(),
        "released record must be gone"
    );
    let second = acquire(store, &key, LONG).await;
    assert_ne!(first, second, "a token must never repeat for a key");
    lease_lost(store.release(&key, first).await, "release");
    store.release(&key, second).await.unwrap();
}

/// renew extends the current claim; the record stays processing with the same token.
pub async fn renew_extends_only_the_current_claim(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("renew");
    let token = acquire(store, &key, SHORT).await;
    store.renew(&key, token, LONG).await.unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    match store.claim(req(&key, None, LONG)).await {
        Ok(Claim::InProgress { .. }) => {}
        other => panic!("a renewed lease must still be live, got {other:?}"),
    }
    let record = store.get(&key).await.unwrap().expect("record");
    assert_eq!(record.token, token);
}

/// `Duration::MAX` as a lease, a renewal and a ttl is taken as
/// [`MAX_DURATION`](crate::store::MAX_DURATION): no panic, no store error, and
/// the record lives (for about a century).
pub async fn huge_durations_are_capped(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("huge");
    let token = acquire(store, &key, Duration::MAX).await;
    store
        .renew(&key, token, Duration::MAX)
        .await
        .expect("a renewal for Duration::MAX is capped, not refused");
    match store.claim(req(&key, None, LONG)).await {
        Ok(Claim::InProgress { lease_remaining }) => assert!(
            lease_remaining > Duration::from_secs(50 * 365 * 24 * 3600),
            "a Duration::MAX lease is about a century, got {lease_remaining:?}"
        ),
        other => panic!("a Duration::MAX lease must be live, got {other:?}"),
    }
    store
        .complete(&key, token, b"1", Duration::MAX)
        .await
        .expect("a completion for Duration::MAX is capped, not refused");
    let record = store.get(&key).await.unwrap().expect("record");
    assert_eq!(record.state, RecordState::Completed);
    assert!(
        record.expires_in > Duration::from_secs(50 * 365 * 24 * 3600),
        "a Duration::MAX ttl is about a century, got {:?}",
        record.expires_in
    );
}

/// Any live record with a different fingerprint is a mismatch; no fingerprint matches any.
pub async fn fingerprints_guard_every_live_state(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("fingerprint");
    let a = fingerprint("request a").unwrap();
    let b = fingerprint("request b").unwrap();
    let token = match store.claim(req(&key, Some(&a), LONG)).await {
        Ok(Claim::Acquired { token, .. }) => token,
        other => panic!("expected acquired, got {other:?}"),
    };
    assert_eq!(
        store.claim(req(&key, Some(&b), LONG)).await.unwrap(),
        Claim::FingerprintMismatch,
        "processing record, different fingerprint"
    );
    assert!(matches!(
        store.claim(req(&key, Some(&a), LONG)).await.unwrap(),
        Claim::InProgress { .. }
    ));
    store
        .complete(&key, token, b"{\"ok\":1}", LONG)
        .await
        .unwrap();
    assert_eq!(
        store.claim(req(&key, Some(&b), LONG)).await.unwrap(),
        Claim::FingerprintMismatch,
        "completed record, different fingerprint"
    );
    for fp in [Some(&a), None] {
        assert!(matches!(
            store.claim(req(&key, fp, LONG)).await.unwrap(),
            Claim::Completed { .. }
        ));
    }
    let record = store.get(&key).await.unwrap().unwrap();
    assert_eq!(record.fingerprint, Some(a));
}

/// Two keys never see each other's records.
pub async fn keys_are_isolated(store: &dyn Store, ns: &Namespace) {
    let one = ns.key("isolated-1");
    let two = ns.key("isolated-2");
    let t1 = acquire(store, &one, LONG).await;
    let t2 = acquire(store, &two, LONG).await;
    store.complete(&one, t1, b"{\"ok\":1}", LONG).await.unwrap();
    lease_lost(
        store.complete(&two, t1, b"{}", LONG).await,
        "complete with another key's token",
    );
    assert!(matches!(
        store.claim(req(&two, None, LONG)).await.unwrap(),
        Claim::InProgress { .. }
    ));
    store.release(&two, t2).await.unwrap();
}

/// Many concurrent claims on one key: exactly one is acquired.
pub async fn concurrent_claims_have_one_winner(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("race");
    let claims = (0..64).map(|_| store.claim(req(&key, None, LONG)));
    let results = join_all(claims).await;
    let won = results
        .iter()
        .filter(|r| matches!(r, Ok(Claim::Acquired { .. })))
        .count();
    let in_progress = results
        .iter()
        .filter(|r| matches!(r, Ok(Claim::InProgress { .. })))
        .count();
    assert_eq!(won, 1, "exactly one concurrent claim must win: {results:?}");
    assert_eq!(in_progress, 63);
}

/// Many concurrent claims of a completed key: every one replays it (none is
/// told the key is in progress because another replay was reading it).
pub async fn concurrent_replays_all_replay(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("replays");
    let token = acquire(store, &key, LONG).await;
    store
        .complete(&key, token, b"{\"ok\":7}", LONG)
        .await
        .unwrap();
    let results = join_all((0..64).map(|_| store.claim(req(&key, None, LONG)))).await;
    for result in &results {
        assert!(
            matches!(result, Ok(Claim::Completed { outcome, .. }) if outcome == b"{\"ok\":7}"),
            "every concurrent replay must replay: {result:?}"
        );
    }
}

/// Claim and release the same key many times: every token is new.
pub async fn tokens_never_repeat(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("tokens");
    let mut seen = HashSet::new();
    for _ in 0..50 {
        let token = acquire(store, &key, LONG).await;
        assert!(
            seen.insert(token),
            "token {token} was issued twice for one key"
        );
        store.release(&key, token).await.unwrap();
    }
}

/// Operations through `handle()` act on the same records.
pub async fn handle_shares_records(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("handle");
    let handle: Arc<dyn Store> = store.handle();
    let token = acquire(&*handle, &key, LONG).await;
    assert!(matches!(
        store.claim(req(&key, None, LONG)).await.unwrap(),
        Claim::InProgress { .. }
    ));
    store
        .complete(&key, token, b"{\"ok\":2}", LONG)
        .await
        .unwrap();
    assert!(matches!(
        handle.handle().claim(req(&key, None, LONG)).await.unwrap(),
        Claim::Completed { .. }
    ));
}

/// `release_now`, where a store offers it, releases like `release`.
pub async fn release_now_if_supported(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("release-now");
    let token = acquire(store, &key, LONG).await;
    match store.release_now(&key, token) {
        Some(result) => {
            result.unwrap();
            assert!(store.get(&key).await.unwrap().is_none());
            assert!(matches!(
                store.release_now(&key, token),
                Some(Err(Error::LeaseLost))
            ));
        }
        None => store.release(&key, token).await.unwrap(),
    }
}

/// A lapsed lease is taken over with a new token; the stale holder's
/// completion is refused and changes nothing.
pub async fn lapsed_lease_is_taken_over(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("lapse");
    let stale = acquire(store, &key, SHORT).await;
    tokio::time::sleep(PAST_SHORT).await;
    let fresh = match store.claim(req(&key, None, LONG)).await {
        Ok(Claim::Acquired { token, took_over }) => {
            assert!(took_over, "taking over a lapsed claim must say so");
            token
        }
        other => panic!("a lapsed lease must be taken over, got {other:?}"),
    };
    assert_ne!(stale, fresh);
    lease_lost(
        store.complete(&key, stale, b"{\"ok\":0}", LONG).await,
        "complete",
    );
    lease_lost(store.renew(&key, stale, LONG).await, "renew");
    lease_lost(store.release(&key, stale).await, "release");
    let record = store.get(&key).await.unwrap().expect("record");
    assert_eq!(record.state, RecordState::Processing);
    assert_eq!(record.token, fresh);
    assert_eq!(record.outcome, None);
    store
        .complete(&key, fresh, b"{\"ok\":1}", LONG)
        .await
        .unwrap();
}

/// Once the ttl elapses the record is gone and the key can be claimed again.
pub async fn ttl_expiry_allows_a_new_claim(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("ttl");
    let first = acquire(store, &key, LONG).await;
    store
        .complete(&key, first, b"{\"ok\":1}", SHORT)
        .await
        .unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    assert!(
        store.get(&key).await.unwrap().is_none(),
        "expired record must read as absent"
    );
    let second = acquire(store, &key, LONG).await;
    assert_ne!(
        first, second,
        "a token must never repeat for a key, even after expiry"
    );
}

/// `purge_expired` deletes expired records in batches of at most `batch` and
/// keeps live ones. (A store whose backend expires records by itself may
/// report 0 purged; the expired records must be gone either way.)
pub async fn purge_removes_expired_records(store: &dyn Store, ns: &Namespace) {
    let expired: Vec<String> = (0..5).map(|i| ns.key(&format!("purge-{i}"))).collect();
    for key in &expired {
        let token = acquire(store, key, LONG).await;
        store
            .complete(key, token, b"{\"ok\":1}", SHORT)
            .await
            .unwrap();
    }
    let live = ns.key("purge-live");
    let token = acquire(store, &live, LONG).await;
    store
        .complete(&live, token, b"{\"ok\":1}", LONG)
        .await
        .unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    for _ in 0..1000 {
        let n = store.purge_expired(2).await.unwrap();
        assert!(n <= 2, "purge_expired(2) deleted {n} records");
        if n == 0 {
            break;
        }
    }
    for key in &expired {
        assert!(
            store.get(key).await.unwrap().is_none(),
            "an expired record must be gone"
        );
        acquire(store, key, LONG).await;
    }
    let record = store.get(&live).await.unwrap();
    assert!(
        record.is_some_and(|r| r.state == RecordState::Completed),
        "a live record must survive a purge"
    );
}

fn step(at: u32, id: &str, value: &str) -> Step {
    Step::new(at, id.to_owned(), value.as_bytes().to_vec())
}

async fn steps_of(store: &dyn Store, key: &str) -> Vec<(u32, String, Vec<u8>)> {
    store
        .steps(key, None)
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.at, s.id, s.value))
        .collect()
}

async fn acquire_as(store: &dyn Store, key: &str, fp: Option<&Digest>) -> (FencingToken, bool) {
    match store.claim(req(key, fp, LONG)).await {
        Ok(Claim::Acquired { token, took_over }) => (token, took_over),
        other => panic!("the claim must be acquired, got {other:?}"),
    }
}

/// Steps are recorded only with the current token, listed by position, and
/// a step at a recorded position replaces it.
pub async fn steps_are_fenced_and_ordered(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("steps-fenced");
    let token = acquire(store, &key, LONG).await;
    assert!(steps_of(store, &key).await.is_empty(), "no steps yet");
    for at in [2, 0, 1] {
        let s = step(at, &format!("\"s{at}\""), &format!("{{\"ok\":{at}}}"));
        store.record_step(&key, token, &s, LONG).await.unwrap();
    }
    let s = step(1, "\"s1\"", "{\"ok\":11}");
    store.record_step(&key, token, &s, LONG).await.unwrap();
    let stale = FencingToken(token.0.wrapping_add(1_000_000));
    lease_lost(
        store
            .record_step(&key, stale, &step(3, "\"s3\"", "{}"), LONG)
            .await,
        "record_step",
    );
    let got = steps_of(store, &key).await;
    let want: Vec<_> = [(0, "{\"ok\":0}"), (1, "{\"ok\":11}"), (2, "{\"ok\":2}")]
        .into_iter()
        .map(|(at, v)| (at, format!("\"s{at}\""), v.as_bytes().to_vec()))
        .collect();
    assert_eq!(got, want, "steps by position, the replaced one replaced");
    lease_lost(
        store
            .record_step(
                &ns.key("steps-absent"),
                token,
                &step(0, "\"a\"", "{}"),
                LONG,
            )
            .await,
        "record_step on an absent key",
    );
}

/// A release keeps the steps: the next claim takes over and reads them; a
/// completion then drops them.
pub async fn steps_survive_a_release(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("steps-release");
    let token = acquire(store, &key, LONG).await;
    store
        .record_step(
            &key,
            token,
            &step(0, "\"reserve\"", "{\"ok\":\"h-1\"}"),
            LONG,
        )
        .await
        .unwrap();
    store.release(&key, token).await.unwrap();
    assert!(
        store.get(&key).await.unwrap().is_none(),
        "a released record decides no claim and reads as absent"
    );
    assert_eq!(steps_of(store, &key).await.len(), 1, "released, steps kept");
    let (next, took_over) = acquire_as(store, &key, None).await;
    assert!(
        took_over,
        "a claim that finds kept steps continues an earlier attempt"
    );
    assert_ne!(next, token);
    assert_eq!(
        steps_of(store, &key).await.len(),
        1,
        "carried over to the new claim"
    );
    assert_eq!(
        store.steps(&key, Some(next)).await.unwrap().len(),
        1,
        "read by the holder"
    );
    assert!(
        matches!(store.steps(&key, Some(token)).await, Err(Error::LeaseLost)),
        "a fenced read by a holder taken over is refused"
    );
    lease_lost(
        store
            .record_step(&key, token, &step(1, "\"charge\"", "{}"), LONG)
            .await,
        "record_step by the released attempt",
    );
    store
        .record_step(&key, next, &step(1, "\"charge\"", "{\"ok\":5}"), LONG)
        .await
        .unwrap();
    assert_eq!(steps_of(store, &key).await.len(), 2);
    store
        .complete(&key, next, b"{\"ok\":1}", LONG)
        .await
        .unwrap();
    assert!(
        steps_of(store, &key).await.is_empty(),
        "a completion drops the steps"
    );
    assert!(
        matches!(store.steps(&key, Some(next)).await, Err(Error::LeaseLost)),
        "a completed record is held by no one"
    );
    match store.claim(req(&key, None, LONG)).await {
        Ok(Claim::Completed { .. }) => {}
        other => panic!("the completed record must replay, got {other:?}"),
    }
}

/// A lapsed lease keeps the steps for the next claim, which takes over.
pub async fn steps_survive_a_lapse(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("steps-lapse");
    let stale = acquire(store, &key, SHORT).await;
    store
        .record_step(&key, stale, &step(0, "\"a\"", "{\"ok\":1}"), LONG)
        .await
        .unwrap();
    // Past the lease, and past any grace a store keeps a lapsed claim for.
    tokio::time::sleep(PAST_SHORT).await;
    let (fresh, took_over) = acquire_as(store, &key, None).await;
    assert!(took_over);
    assert_eq!(steps_of(store, &key).await.len(), 1);
    lease_lost(
        store
            .record_step(&key, stale, &step(1, "\"b\"", "{}"), LONG)
            .await,
        "record_step by the lapsed holder",
    );
    store.release(&key, fresh).await.unwrap();
}

/// A claim after a release that recorded no steps is a fresh start.
pub async fn a_release_without_steps_is_no_takeover(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("steps-none");
    let token = acquire(store, &key, LONG).await;
    store.release(&key, token).await.unwrap();
    let (_, took_over) = acquire_as(store, &key, None).await;
    assert!(!took_over, "nothing to continue");
    assert!(steps_of(store, &key).await.is_empty());
}

/// Kept steps belong to the request that recorded them: a claim with another
/// fingerprint is refused, not resumed.
pub async fn kept_steps_guard_the_fingerprint(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("steps-fingerprint");
    let (a, b) = (
        fingerprint("step a").unwrap(),
        fingerprint("step b").unwrap(),
    );
    let (token, _) = acquire_as(store, &key, Some(&a)).await;
    store
        .record_step(&key, token, &step(0, "\"a\"", "{\"ok\":1}"), LONG)
        .await
        .unwrap();
    store.release(&key, token).await.unwrap();
    match store.claim(req(&key, Some(&b), LONG)).await {
        Ok(Claim::FingerprintMismatch) => {}
        other => panic!("another request must not resume kept steps, got {other:?}"),
    }
    let (_, took_over) = acquire_as(store, &key, Some(&a)).await;
    assert!(took_over, "the same request resumes them");
}

/// Steps are kept for the `keep` they were recorded with, then forgotten:
/// the next claim starts afresh, and purging removes what is left.
pub async fn steps_expire_when_kept_no_longer(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("steps-expire");
    let token = acquire(store, &key, LONG).await;
    store
        .record_step(&key, token, &step(0, "\"a\"", "{\"ok\":1}"), SHORT)
        .await
        .unwrap();
    store.release(&key, token).await.unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    assert!(steps_of(store, &key).await.is_empty(), "kept no longer");
    while store.purge_expired(100).await.unwrap() > 0 {}
    let (_, took_over) = acquire_as(store, &key, None).await;
    assert!(!took_over, "forgotten steps continue nothing");
    // A purge keeps steps that are still kept.
    let kept = ns.key("steps-kept");
    let token = acquire(store, &kept, LONG).await;
    store
        .record_step(&kept, token, &step(0, "\"a\"", "{\"ok\":1}"), LONG)
        .await
        .unwrap();
    store.release(&kept, token).await.unwrap();
    while store.purge_expired(100).await.unwrap() > 0 {}
    assert_eq!(
        steps_of(store, &kept).await.len(),
        1,
        "a purge keeps kept steps"
    );
}

/// Step ids and values come back byte for byte, large ones included.
pub async fn steps_values_round_trip(store: &dyn Store, ns: &Namespace) {
    let key = ns.key("steps-values");
    let token = acquire(store, &key, LONG).await;
    let id = "[\"ship \\\"é\\\" \u{1F4E6}\",18446744073709551615]";
    let big = format!("{{\"ok\":\"{}\"}}", "x\u{e9}".repeat(40_000));
    store
        .record_step(&key, token, &step(0, id, &big), LONG)
        .await
        .unwrap();
    let got = steps_of(store, &key).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, id);
    assert!(got[0].2 == big.as_bytes(), "a large value comes back whole");
    // More large steps, a release, and a claim that carries them all over;
    // a duplicate meanwhile is told the claim is in progress.
    let values: Vec<String> = (1..4)
        .map(|i| format!("{{\"ok\":\"{}\"}}", i.to_string().repeat(300_000)))
        .collect();
    for (i, value) in values.iter().enumerate() {
        let s = step(i as u32 + 1, &format!("\"big-{i}\""), value);
        store.record_step(&key, token, &s, LONG).await.unwrap();
    }
    match store.claim(req(&key, None, LONG)).await {
        Ok(Claim::InProgress { .. }) => {}
        other => panic!("a live claim with large steps is in progress, got {other:?}"),
    }
    store.release(&key, token).await.unwrap();
    let (next, took_over) = acquire_as(store, &key, None).await;
    assert!(took_over);
    let got = store.steps(&key, Some(next)).await.unwrap();
    assert_eq!(got.len(), 4, "every step carried over");
    for (i, value) in values.iter().enumerate() {
        assert!(got[i + 1].value == value.as_bytes(), "step {} whole", i + 1);
    }
    store.release(&key, next).await.unwrap();
}

/// Runs futures concurrently on the current task (no extra dependency).
async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (fut, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// The [`Admin`](crate::store::admin::Admin) suite: reads see every status,
/// lists filter by namespace (exactly), digest and lapse, stats count, and
/// `invalidate` / `forget` change only the record in the state and with the
/// token they are given. Each run uses namespaces of its own.
pub async fn admin_conformance(store: &dyn crate::store::admin::Admin) {
    use crate::store::admin::{Query, Status};
    let ns = Namespace::new();
    let other = Namespace(format!("{}x", ns.0));
    let (done, running, lapsed, stepped) = (
        ns.key("done"),
        ns.key("running"),
        ns.key("lapsed"),
        ns.key("stepped"),
    );
    let long = Duration::from_secs(60);

    // One record in each status (and one in a namespace that extends this one).
    let t_done = acquire(store, &done, long).await;
    store
        .complete(&done, t_done, br#"{"ok":7}"#, Duration::from_secs(3600))
        .await
        .expect("complete");
    let t_running = acquire(store, &running, long).await;
    let t_lapsed = acquire(store, &lapsed, Duration::from_millis(50)).await;
    let t_stepped = acquire(store, &stepped, long).await;
    let step = Step::new(0, "\"charge\"".into(), br#"{"ok":1}"#.to_vec());
    let mark = Step::new(u32::MAX, "idem:takeover".into(), br#"{"ok":null}"#.to_vec());
    for s in [&step, &mark] {
        store
            .record_step(&stepped, t_stepped, s, long)
            .await
            .expect("record a step");
    }
    store.release(&stepped, t_stepped).await.expect("release");
    let t_other = acquire(store, &other.key("done"), long).await;
    tokio::time::sleep(Duration::from_millis(120)).await;

    let inspect = |key: String| async move {
        store
            .inspect(&key)
            .await
            .expect("inspect")
            .expect("a stored record")
    };
    let e = inspect(done.clone()).await;
    assert_eq!(
        (e.status, e.token, e.outcome_len),
        (Status::Completed, t_done, Some(8))
    );
    assert!(e.expires_in > Duration::from_secs(3000), "{e:?}");
    assert_eq!(e.namespace(), ns.0);
    let e = inspect(running.clone()).await;
    assert_eq!(
        (e.status, e.token, e.outcome_len),
        (Status::Running, t_running, None)
    );
    assert!(e.expires_in > Duration::from_secs(50), "{e:?}");
    let e = inspect(lapsed.clone()).await;
    assert_eq!(
        (e.status, e.token, e.expires_in),
        (Status::Lapsed, t_lapsed, Duration::ZERO)
    );
    let e = inspect(stepped.clone()).await;
    assert_eq!(
        (e.status, e.token, e.steps, e.takeover_mark),
        (Status::Released, t_stepped, 1, true),
        "a release keeps the steps and the mark"
    );
    assert!(store
        .inspect(&ns.key("absent"))
        .await
        .expect("inspect")
        .is_none());

    // Lists: exactly the namespace, sorted by key where the store promises it.
    let listed = store
        .list(&Query::new().namespace(&ns.0))
        .await
        .expect("list");
    let mut keys: Vec<&str> = listed.iter().map(|e| e.key.as_str()).collect();
    keys.sort();
    let mut expected = vec![
        done.as_str(),
        running.as_str(),
        lapsed.as_str(),
        stepped.as_str(),
    ];
    expected.sort();
    assert_eq!(
        keys, expected,
        "the namespace's records, not the longer namespace's"
    );
    let stuck = store
        .list(&Query::new().namespace(&ns.0).stuck())
        .await
        .expect("list stuck");
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    assert_eq!(
        (stuck[0].key.as_str(), stuck[0].status),
        (lapsed.as_str(), Status::Lapsed)
    );
    let one = store
        .list(&Query::new().namespace(&ns.0).limit(1))
        .await
        .expect("list with a limit");
    assert_eq!(one.len(), 1);
    let digest = crate::Digest::from_hex(&done[done.len() - 64..]).expect("a digest");
    // The digest leaves out the namespace: the same parts in another
    // namespace have the same digest.
    let by_digest = store
        .list(&Query::new().digest(digest))
        .await
        .expect("list by digest");
    let mut keys: Vec<&str> = by_digest.iter().map(|e| e.key.as_str()).collect();
    keys.sort();
    let other_done = other.key("done");
    assert_eq!(keys, [done.as_str(), other_done.as_str()]);
    let by_both = store
        .list(&Query::new().namespace(&ns.0).digest(digest))
        .await
        .expect("list by namespace and digest");
    assert_eq!(by_both.len(), 1);
    assert_eq!(by_both[0].key, done);

    // Stats count this namespace's records by status.
    let stats = store.stats().await.expect("stats");
    let count = |status| {
        stats
            .iter()
            .find(|c| c.namespace == ns.0 && c.status == status)
            .map_or(0, |c| c.records)
    };
    for status in [
        Status::Completed,
        Status::Running,
        Status::Lapsed,
        Status::Released,
    ] {
        assert_eq!(count(status), 1, "{status} in {stats:?}");
    }

    // invalidate: a completed record with its token only.
    // No store hands out this token in these tests (memory and PostgreSQL
    // count from 1, Redis uses µs since 1970, SQLite ms × 2^20).
    let stale = FencingToken(9_007_199_254_740_000);
    lease_lost(store.invalidate(&done, stale).await, "invalidate");
    lease_lost(
        store.invalidate(&running, t_running).await,
        "invalidate of a processing record",
    );
    lease_lost(
        store.invalidate(&stepped, t_stepped).await,
        "invalidate of a released record",
    );
    assert_eq!(inspect(running.clone()).await.status, Status::Running);
    store.invalidate(&done, t_done).await.expect("invalidate");
    assert!(
        store.get(&done).await.expect("get").is_none(),
        "an invalidated result reads as absent"
    );
    lease_lost(store.invalidate(&done, t_done).await, "a second invalidate");
    match store.claim(req(&done, None, long)).await.expect("claim") {
        Claim::Acquired { token, took_over } => {
            assert!(token > t_done, "tokens keep increasing");
            assert!(!took_over);
        }
        other => panic!("after invalidate the next claim runs, got {other:?}"),
    }

    // forget: a processing or released record with its token only.
    lease_lost(
        store.forget(&running, stale).await,
        "forget with another token",
    );
    store
        .forget(&running, t_running)
        .await
        .expect("forget a running claim");
    lease_lost(
        store
            .complete(&running, t_running, b"{\"ok\":1}", long)
            .await,
        "the forgotten holder's completion",
    );
    store
        .forget(&stepped, t_stepped)
        .await
        .expect("forget a released record's steps");
    match store.claim(req(&stepped, None, long)).await.expect("claim") {
        Claim::Acquired { took_over, .. } => assert!(!took_over, "nothing is left to resume"),
        other => panic!("after forget the next claim runs, got {other:?}"),
    }
    assert!(store.steps(&stepped, None).await.expect("steps").is_empty());
    store
        .forget(&lapsed, t_lapsed)
        .await
        .expect("forget a lapsed claim");
    let _ = t_other;
}
