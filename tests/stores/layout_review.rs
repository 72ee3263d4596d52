//! What the break-it review of `RedisStore`'s string record layout (issue
//! 15) tried: records written raw into Redis, then claimed and read through
//! the store. The first two tests are what it found (fixed); the rest held.

use std::time::Duration;

use idem_runtime::{
    Claim, ClaimRequest, Digest, Error, FencingToken, RecordState, RedisStore, Store,
};
use idem_tests::{redis_url, unique};

const PREFIX: &str = "review-layout:";

async fn store() -> RedisStore {
    RedisStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix(PREFIX)
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The layout: state, replica count, touch byte, 20 token digits, 15 grace
/// digits, fingerprint flag, rest.
fn record(state: u8, token: &str, grace: &str, rest: &[u8]) -> Vec<u8> {
    assert_eq!(token.len(), 20);
    assert_eq!(grace.len(), 15);
    let mut v = vec![state, 0, 0];
    v.extend_from_slice(token.as_bytes());
    v.extend_from_slice(grace.as_bytes());
    v.extend_from_slice(rest);
    v
}

async fn put(conn: &mut redis::aio::MultiplexedConnection, key: &str, value: &[u8], px: u64) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("PX")
        .arg(px)
        .query_async(conn)
        .await
        .unwrap();
}

async fn raw_get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
}

fn req(key: &str) -> ClaimRequest<'_> {
    ClaimRequest {
        key,
        fingerprint: None,
        lease: Duration::from_secs(30),
    }
}

const GRACE_60S: &str = "000000000060000";
const ZERO: &str = "000000000000000";

/// 2^53: Lua numbers are doubles, so `prev + 1` == `prev` from here on.
const TWO_POW_53: u64 = 9_007_199_254_740_992;

/// Found by the break-it review of issue 15: a token at or above 2^53 (Lua
/// counts in doubles, so `prev + 1` was `prev`: a takeover handed out the
/// stale holder's token again, a claim after 2^53 + 1 went backwards, one
/// after `u64::MAX` wrote a 21-digit token that shifted the header; and a
/// token the client could not read was still overwritten by the script).
/// Such a record is corrupt to the scripts and the client alike: claim and
/// `get` answer `Codec`, the record stays as it was.
#[tokio::test]
async fn tokens_at_or_above_2_pow_53_are_corrupt_records_left_alone() {
    let store = store().await;
    let mut conn = raw().await;
    let cases: [(&str, u8, String, &str, u64); 5] = [
        (
            "2^53, lapsed lease",
            b'p',
            format!("{TWO_POW_53:020}"),
            GRACE_60S,
            1_000,
        ),
        (
            "2^53 + 1, released",
            b'r',
            format!("{:020}", TWO_POW_53 + 1),
            ZERO,
            60_000,
        ),
        (
            "u64::MAX, released",
            b'r',
            format!("{:020}", u64::MAX),
            ZERO,
            60_000,
        ),
        (
            "20 nines, released",
            b'r',
            "99999999999999999999".to_owned(),
            ZERO,
            60_000,
        ),
        (
            "20 nines, lapsed lease",
            b'p',
            "99999999999999999999".to_owned(),
            GRACE_60S,
            1_000,
        ),
    ];
    for (what, state, token, grace, px) in cases {
        let key = unique("tok53");
        let rkey = store.redis_key(&key);
        let before = record(state, &token, grace, b"-");
        put(&mut conn, &rkey, &before, px).await;
        let read = store.get(&key).await;
        assert!(matches!(read, Err(Error::Codec(_))), "{what}: get {read:?}");
        let claim = store.claim(req(&key)).await;
        assert!(
            matches!(claim, Err(Error::Codec(_))),
            "{what}: claim {claim:?}"
        );
        let after = raw_get(&mut conn, &rkey).await.unwrap();
        assert_eq!(after, before, "{what}: the record changed");
    }
    // The largest token a record may hold: the next is one above it.
    let key = unique("tokmax");
    let largest = TWO_POW_53 - 2;
    put(
        &mut conn,
        &store.redis_key(&key),
        &record(b'r', &format!("{largest:020}"), ZERO, b"-"),
        60_000,
    )
    .await;
    match store.claim(req(&key)).await.unwrap() {
        Claim::Acquired { token, .. } => assert_eq!(token.0, largest + 1),
        other => panic!("expected a claim, got {other:?}"),
    }
}

/// Found by the same review (new with the string layout, which judges a
/// lease by its key's expiry): a processing record whose key lost its expiry
/// (`PERSIST`, a copy restored without its TTL) was taken over at once while
/// its holder still ran. Its lease is unknowable: it is a corrupt record
/// (`Codec`), not a lapsed one; the holder can still complete it.
#[tokio::test]
async fn a_persisted_processing_record_is_not_taken_over() {
    let store = store().await;
    let mut conn = raw().await;
    let key = unique("persist");
    let rkey = store.redis_key(&key);
    let Claim::Acquired { token, .. } = store.claim(req(&key)).await.unwrap() else {
        panic!("a fresh key")
    };
    let _: () = redis::cmd("PERSIST")
        .arg(&rkey)
        .query_async(&mut conn)
        .await
        .unwrap();
    let second = store.claim(req(&key)).await;
    assert!(matches!(second, Err(Error::Codec(_))), "{second:?}");
    let read = store.get(&key).await;
    assert!(matches!(read, Err(Error::Codec(_))), "{read:?}");
    store
        .complete(&key, token, b"{\"ok\":1}", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(matches!(
        store.claim(req(&key)).await.unwrap(),
        Claim::Completed { .. }
    ));
}

// ---- things that held -------------------------------------------------

/// Tokens strictly increase across claim → release → claim with a grace of
/// 1 ms (the released record expires between claims), and across lapses.
#[tokio::test]
async fn held_tokens_increase_across_release_and_expiry() {
    let store = store().await.with_grace(Duration::ZERO);
    let key = unique("seq");
    let mut last = 0;
    for i in 0..200 {
        let Claim::Acquired { token, .. } = store.claim(req(&key)).await.unwrap() else {
            panic!()
        };
        assert!(token.0 > last, "round {i}: {} after {last}", token.0);
        last = token.0;
        store.release(&key, token).await.unwrap();
        if i % 3 == 0 {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    // Released within the same µs: prev + 1.
    let store = store.with_grace(Duration::from_secs(60));
    for _ in 0..50 {
        let Claim::Acquired { token, .. } = store.claim(req(&key)).await.unwrap() else {
            panic!()
        };
        assert!(token.0 > last);
        last = token.0;
        store.release(&key, token).await.unwrap();
        assert!(matches!(
            store
                .complete(&key, token, b"x", Duration::from_secs(1))
                .await,
            Err(Error::LeaseLost)
        ));
    }
}

/// Fingerprints with spaces, NULs and leading digits, outcomes empty or
/// full of spaces: the replay reply is parsed at the first space of its
/// first 21 bytes, which is always the time left's.
#[tokio::test]
async fn held_odd_fingerprints_and_outcomes_replay() {
    let store = store().await;
    let fps = [
        [b' '; 32],
        [0u8; 32],
        *b"12345 6789 abcdefghijklmnopqrstu",
        [b'a'; 32],
        [b't'; 32],
    ];
    for fp in fps {
        for outcome in [&b""[..], b" ", b"1 2 3 ", b"a1", b"t1", b"-1 c"] {
            let key = unique("fp");
            let d = Digest(fp);
            let r = ClaimRequest {
                key: &key,
                fingerprint: Some(&d),
                lease: Duration::from_secs(5),
            };
            let Claim::Acquired { token, .. } = store.claim(r).await.unwrap() else {
                panic!()
            };
            store
                .complete(&key, token, outcome, Duration::from_secs(60))
                .await
                .unwrap();
            match store.claim(r).await.unwrap() {
                Claim::Completed {
                    outcome: o,
                    fingerprint,
                    expires_in,
                } => {
                    assert_eq!(o, outcome);
                    assert_eq!(fingerprint, Some(d));
                    assert!(expires_in > Duration::from_secs(50));
                }
                other => panic!("{other:?}"),
            }
            let rec = store.get(&key).await.unwrap().unwrap();
            assert_eq!(rec.outcome.as_deref(), Some(outcome));
            let other = Digest([9; 32]);
            let r2 = ClaimRequest {
                fingerprint: Some(&other),
                ..r
            };
            assert_eq!(store.claim(r2).await.unwrap(), Claim::FingerprintMismatch);
        }
    }
}

/// A processing record whose lease lapsed reads with 0 left (not negative,
/// not its grace); a live one with its lease left; with stores of different
/// graces.
#[tokio::test]
async fn held_times_of_processing_records() {
    let short = store().await.with_grace(Duration::from_millis(1));
    let long = store().await.with_grace(Duration::from_secs(3600));
    let key = unique("times");
    let r = ClaimRequest {
        key: &key,
        fingerprint: None,
        lease: Duration::from_millis(300),
    };
    let Claim::Acquired { token, .. } = long.claim(r).await.unwrap() else {
        panic!()
    };
    let rec = short.get(&key).await.unwrap().unwrap();
    assert_eq!(rec.state, RecordState::Processing);
    assert!(
        rec.expires_in <= Duration::from_millis(300),
        "{:?}",
        rec.expires_in
    );
    match short.claim(r).await.unwrap() {
        Claim::InProgress { lease_remaining } => {
            assert!(lease_remaining <= Duration::from_millis(300))
        }
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let rec = short.get(&key).await.unwrap().unwrap();
    assert_eq!(rec.expires_in, Duration::ZERO);
    // Renew by the short-grace store keeps the record's (long) grace.
    short
        .renew(&key, token, Duration::from_millis(500))
        .await
        .unwrap();
    let rec = short.get(&key).await.unwrap().unwrap();
    assert!(
        rec.expires_in > Duration::from_millis(300) && rec.expires_in <= Duration::from_millis(500),
        "{:?}",
        rec.expires_in
    );
    let Claim::InProgress { .. } = short.claim(r).await.unwrap() else {
        panic!()
    };
    // Longest lease and grace.
    let huge = store().await.with_grace(Duration::MAX);
    let key2 = unique("huge");
    let r2 = ClaimRequest {
        key: &key2,
        fingerprint: None,
        lease: Duration::MAX,
    };
    let Claim::Acquired { token, .. } = huge.claim(r2).await.unwrap() else {
        panic!()
    };
    huge.renew(&key2, token, Duration::MAX).await.unwrap();
    let Claim::InProgress { lease_remaining } = huge.claim(r2).await.unwrap() else {
        panic!()
    };
    assert!(lease_remaining > Duration::from_secs(99 * 365 * 86400));
    huge.complete(&key2, token, b"1", Duration::MAX)
        .await
        .unwrap();
    let Claim::Completed { expires_in, .. } = huge.claim(r2).await.unwrap() else {
        panic!()
    };
    assert!(expires_in > Duration::from_secs(99 * 365 * 86400));
    huge.release(&key, FencingToken(0)).await.unwrap_err();
    let mut conn = raw().await;
    let _: () = redis::cmd("DEL")
        .arg(huge.redis_key(&key2))
        .query_async(&mut conn)
        .await
        .unwrap();
}

use crate::redis_faults::AppError;

struct Svc {
    store: RedisStore,
    runs: std::sync::atomic::AtomicUsize,
}

impl Svc {
    #[idem_runtime::idempotent(key = id, name = "review-layout", store = self.store)]
    async fn run(&self, id: String) -> Result<usize, AppError> {
        Ok(self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1)
    }
}

/// A completed record with an empty outcome, or an outcome that is not
/// JSON, is a Codec error through the engine and the body does not run.
#[tokio::test]
async fn held_empty_or_garbage_outcomes_are_codec_not_reruns() {
    let svc = Svc {
        store: store().await,
        runs: Default::default(),
    };
    let mut conn = raw().await;
    for outcome in [&b""[..], b" ", b"\0"] {
        let id = unique("empty");
        let key = idem_runtime::Key::derive("review-layout", &id).unwrap();
        let rkey = svc.store.redis_key(key.as_str());
        put(
            &mut conn,
            &rkey,
            &record(
                b'c',
                "00000000000000000005",
                ZERO,
                &[b"-", outcome].concat(),
            ),
            60_000,
        )
        .await;
        let r = svc.run(id).await;
        assert!(matches!(r, Err(AppError::Idem(Error::Codec(_)))), "{r:?}");
    }
    assert_eq!(svc.runs.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// Replica bytes: 255 marks satisfy a store asking for more than 255 (capped);
/// a mark below the need is not replayed without a WAIT (no replicas here).
#[tokio::test]
async fn held_replica_bytes() {
    let mut conn = raw().await;
    let s300 = store()
        .await
        .with_replica_ack(300, Duration::from_millis(50));
    let s1 = store().await.with_replica_ack(1, Duration::from_millis(50));
    for (count, touch) in [(255u8, 255u8), (1, 0), (0, 255)] {
        let key = unique("rep");
        let rkey = s1.redis_key(&key);
        let mut v = record(b'c', "00000000000000000005", ZERO, b"-{\"ok\":1}");
        v[1] = count;
        v[2] = touch;
        put(&mut conn, &rkey, &v, 60_000).await;
        let a = s300.claim(req(&key)).await;
        let b = s1.claim(req(&key)).await;
        let g = s1.get(&key).await;
        let after = raw_get(&mut conn, &rkey).await.unwrap();
        match count {
            255 => {
                assert!(matches!(a, Ok(Claim::Completed { .. })), "{a:?}");
                assert!(matches!(b, Ok(Claim::Completed { .. })), "{b:?}");
                assert!(g.is_ok());
                assert_eq!(after, v);
            }
            1 => {
                assert!(matches!(a, Err(Error::NotReplicated { .. })), "{a:?}");
                assert!(matches!(b, Ok(Claim::Completed { .. })), "{b:?}");
                assert_eq!(after[1], 1);
                assert_eq!(after[3..], v[3..]);
            }
            _ => {
                assert!(matches!(a, Err(Error::NotReplicated { .. })), "{a:?}");
                assert!(matches!(b, Err(Error::NotReplicated { .. })), "{b:?}");
                assert!(matches!(g, Err(Error::NotReplicated { .. })), "{g:?}");
                assert_eq!(after[1], 0);
                assert_eq!(after[2], 2, "touched three times, wrapping");
                assert_eq!(after[3..], v[3..]);
            }
        }
    }
}
