//! Every interleaving of a few threads on one `MemoryStore` key, explored by
//! loom (`--cfg idem_loom`, see store/sync.rs): the shard lock and the token
//! counter are loom's, the store's async methods are driven with
//! `loom::future::block_on` (they take their lock synchronously, so each is
//! one step between two awaits that never wait).
//!
//! Time is Tokio's clock, read outside any runtime: the real monotonic clock.
//! No decision below depends on how it moves: live claims hold an hour-long
//! lease, and a lapsed claim is made with a zero lease (it is lapsed from the
//! moment it is written, whatever the clock reads next). How time moves
//! leases and ttls is the protocol model's part (tests/protocol_model.rs).

use std::time::Duration;

use loom::future::block_on;
use loom::thread;

use super::MemoryStore;
use crate::store::sync::explore;
use crate::store::{Claim, ClaimRequest, FencingToken, RecordState, Store};

const KEY: &str = "ns:k";
const HOUR: Duration = Duration::from_secs(3600);

/// One shard: the fewest loom objects, and every key contends for the one lock.
fn store() -> MemoryStore {
    MemoryStore::with_shards(1)
}

fn claim(store: &MemoryStore, key: &str, lease: Duration) -> Claim {
    let request = ClaimRequest {
        key,
        fingerprint: None,
        lease,
    };
    block_on(store.claim(request)).expect("the memory store does not fail")
}

fn acquired(claim: &Claim) -> Option<FencingToken> {
    match claim {
        Claim::Acquired { token, .. } => Some(*token),
        _ => None,
    }
}

/// Three callers claim one free key at once: exactly one runs.
#[test]
fn loom_one_of_three_claims_acquires() {
    explore("one of three claims acquires", || {
        let store = store();
        let others: Vec<_> = (0..2)
            .map(|_| {
                let store = store.clone();
                thread::spawn(move || claim(&store, KEY, HOUR))
            })
            .collect();
        let mut claims = vec![claim(&store, KEY, HOUR)];
        claims.extend(others.into_iter().map(|t| t.join().unwrap()));
        let winners: Vec<_> = claims.iter().filter_map(acquired).collect();
        assert_eq!(winners.len(), 1, "{claims:?}");
        for claim in &claims {
            assert!(
                matches!(
                    claim,
                    Claim::Acquired {
                        took_over: false,
                        ..
                    } | Claim::InProgress { .. }
                ),
                "{claim:?}"
            );
        }
        let record = block_on(store.get(KEY))
            .unwrap()
            .expect("the winner's record");
        assert_eq!(record.token, winners[0]);
        assert_eq!(record.state, RecordState::Processing);
    });
}

/// A duplicate claims while the holder completes: it sees the claim in
/// progress or the outcome, never a free key, and the outcome is kept.
#[test]
fn loom_a_claim_racing_a_completion_sees_processing_or_completed() {
    explore("a claim racing a completion", || {
        let store = store();
        let token = acquired(&claim(&store, KEY, HOUR)).expect("a free key");
        let holder = {
            let store = store.clone();
            thread::spawn(move || block_on(store.complete(KEY, token, b"42", HOUR)))
        };
        let other = {
            let store = store.clone();
            thread::spawn(move || claim(&store, KEY, HOUR))
        };
        let duplicates = [claim(&store, KEY, HOUR), other.join().unwrap()];
        holder
            .join()
            .unwrap()
            .expect("the holder's token is current");
        for duplicate in &duplicates {
            match duplicate {
                Claim::InProgress { .. } => {}
                Claim::Completed { outcome, .. } => assert_eq!(outcome, b"42"),
                other => panic!("a duplicate saw {other:?}"),
            }
        }
        let record = block_on(store.get(KEY))
            .unwrap()
            .expect("the completed record");
        assert_eq!(record.state, RecordState::Completed);
        assert_eq!(
            (record.token, record.outcome.as_deref()),
            (token, Some(&b"42"[..]))
        );
    });
}

/// A holder whose lease lapsed completes while another caller takes the key
/// over: one of them wins, never both (fencing), and nothing is lost.
#[test]
fn loom_a_lapsed_holder_completing_races_a_takeover() {
    explore("a lapsed holder completing races a takeover", || {
        let store = store();
        let stale = acquired(&claim(&store, KEY, Duration::ZERO)).expect("a free key");
        let holder = {
            let store = store.clone();
            thread::spawn(move || block_on(store.complete(KEY, stale, b"old", HOUR)))
        };
        let takeover = claim(&store, KEY, HOUR);
        let completed = holder.join().unwrap();
        let record = block_on(store.get(KEY)).unwrap().expect("a record");
        match (&completed, &takeover) {
            // The completion came first: the record is done, the newcomer replays it.
            (Ok(()), Claim::Completed { outcome, .. }) => {
                assert_eq!(outcome, b"old");
                assert_eq!(
                    (record.state, record.token),
                    (RecordState::Completed, stale)
                );
            }
            // The takeover came first: the stale completion is refused.
            (
                Err(crate::Error::LeaseLost),
                Claim::Acquired {
                    token,
                    took_over: true,
                },
            ) => {
                assert!(*token > stale);
                assert_eq!(
                    (record.state, record.token),
                    (RecordState::Processing, *token)
                );
            }
            other => panic!("completion and takeover both or neither won: {other:?}"),
        }
    });
}

/// A release and a renewal with a stale token race a takeover: the release
/// deletes the lapsed claim or is refused, and neither touches the new one.
#[test]
fn loom_a_stale_release_never_deletes_the_new_claim() {
    explore("a stale release and renewal race a takeover", || {
        let store = store();
        let stale = acquired(&claim(&store, KEY, Duration::ZERO)).expect("a free key");
        let releaser = {
            let store = store.clone();
            thread::spawn(move || block_on(store.release(KEY, stale)))
        };
        // A zero lease: a renewal that landed would leave the claim lapsed.
        let renewer = {
            let store = store.clone();
            thread::spawn(move || block_on(store.renew(KEY, stale, Duration::ZERO)))
        };
        let takeover = claim(&store, KEY, HOUR);
        let released = releaser.join().unwrap();
        let _ = renewer.join().unwrap();
        let Claim::Acquired { token, took_over } = takeover else {
            panic!("a lapsed or released key is free: {takeover:?}");
        };
        assert!(token > stale);
        // Released first: a free key, not a takeover. Taken over first: refused.
        assert_eq!(
            released.is_ok(),
            !took_over,
            "{released:?}, took_over {took_over}"
        );
        let record = block_on(store.get(KEY)).unwrap().expect("the new claim");
        assert_eq!(
            (record.state, record.token),
            (RecordState::Processing, token)
        );
        assert!(
            record.expires_in > Duration::from_secs(60),
            "its lease is whole"
        );
        // The new holder's own release still works.
        block_on(store.release(KEY, token)).expect("the current token");
    });
}

/// The token counter hands out no token twice, and the claims of one key
/// get increasing tokens in the order they win the key.
#[test]
fn loom_tokens_are_unique_and_increase_per_key() {
    explore("tokens are unique and increase per key", || {
        let store = store();
        // Two takeovers of the same key (zero leases) and a claim of another.
        let threads: Vec<_> = [KEY, KEY, "ns:other"]
            .into_iter()
            .map(|key| {
                let store = store.clone();
                thread::spawn(move || claim(&store, key, Duration::ZERO))
            })
            .collect();
        let tokens: Vec<FencingToken> = threads
            .into_iter()
            .map(|t| acquired(&t.join().unwrap()).expect("every claim acquires"))
            .collect();
        let mut unique = tokens.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), tokens.len(), "a token twice: {tokens:?}");
        // The later claim of KEY replaced the earlier one: it holds the larger token.
        let record = block_on(store.get(KEY)).unwrap().expect("the later claim");
        assert_eq!(record.token, tokens[0].max(tokens[1]));
    });
}
