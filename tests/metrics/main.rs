//! The metrics (feature `metrics`): every decision is counted once, with its
//! namespace and store kind, and claims and completions are timed. A
//! recording recorder (`metrics-util`'s debugging one) is installed for this
//! test binary; each test reads only its own namespace.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use idem_runtime::codec::Codec;
use idem_runtime::engine::{claim, execute, Claimed};
use idem_runtime::key::{fingerprint, KeyBuilder};
use idem_runtime::metrics::{CLAIM_DURATION, COMPLETE_DURATION, OUTCOMES};
use idem_runtime::{step, Error, InProgress, MemoryStore, Options, SqliteStore, Store};
use idem_tests::{unique, FaultyStore};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("no other recorder in this binary");
        snapshotter
    })
}

/// What was recorded for `namespace`: outcome counts (by `store/outcome`),
/// and how many claim and completion timings.
#[derive(Debug, Default)]
struct Seen {
    outcomes: BTreeMap<String, u64>,
    claim_timings: usize,
    complete_timings: usize,
}

/// Everything recorded so far, by namespace. A snapshot drains the
/// recorder, and the tests run in parallel: each snapshot is added to this.
fn seen(namespace: &str) -> Seen {
    static SEEN: OnceLock<Mutex<BTreeMap<String, Seen>>> = OnceLock::new();
    let mut all = SEEN.get_or_init(Default::default).lock().unwrap();
    for (key, _, _, value) in snapshotter().snapshot().into_vec() {
        let key = key.key();
        let label = |name: &str| {
            key.labels()
                .find(|l| l.key() == name)
                .map(|l| l.value().to_owned())
                .unwrap_or_default()
        };
        let seen = all.entry(label("namespace")).or_default();
        let store = label("store");
        match (key.name(), value) {
            (OUTCOMES, DebugValue::Counter(n)) if n > 0 => {
                let outcome = label("outcome");
                *seen
                    .outcomes
                    .entry(format!("{store}/{outcome}"))
                    .or_default() += n;
            }
            (CLAIM_DURATION, DebugValue::Histogram(samples)) => {
                assert!(samples.iter().all(|s| s.into_inner() >= 0.0));
                seen.claim_timings += samples.len();
            }
            (COMPLETE_DURATION, DebugValue::Histogram(samples)) => {
                seen.complete_timings += samples.len();
            }
            _ => {}
        }
    }
    let seen = all.get(namespace);
    Seen {
        outcomes: seen.map(|s| s.outcomes.clone()).unwrap_or_default(),
        claim_timings: seen.map_or(0, |s| s.claim_timings),
        complete_timings: seen.map_or(0, |s| s.complete_timings),
    }
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

static OPTIONS: Options = Options::new();

async fn call(
    store: &dyn Store,
    namespace: &str,
    part: &str,
    out: Result<u32, Error>,
) -> Result<u32, Error> {
    let key = KeyBuilder::new(namespace).part(part).finish();
    execute(
        store.handle(),
        &OPTIONS,
        key,
        None,
        Codec::release_errors(),
        async { out },
    )
    .await
}

#[tokio::test]
async fn a_call_a_replay_and_a_released_error_are_counted_and_timed() {
    snapshotter(); // installed before anything is recorded
    let ns = unique("metrics_basic");
    let store = MemoryStore::new();
    assert_eq!(call(&store, &ns, "a", Ok(1)).await.unwrap(), 1);
    assert_eq!(call(&store, &ns, "a", Ok(2)).await.unwrap(), 1);
    assert!(call(&store, &ns, "b", Err(Error::store("boom")))
        .await
        .is_err());
    assert_eq!(call(&store, &ns, "b", Ok(3)).await.unwrap(), 3);
    let seen = seen(&ns);
    assert_eq!(
        seen.outcomes,
        counts(&[
            ("memory/claimed", 3),
            ("memory/completed", 2),
            ("memory/replayed", 1),
            ("memory/released_after_error", 1),
        ])
    );
    // Four claims went to the store; two outcomes were recorded.
    assert_eq!((seen.claim_timings, seen.complete_timings), (4, 2));
}

#[tokio::test]
async fn a_running_duplicate_and_a_reused_key_are_counted() {
    snapshotter(); // installed before anything is recorded
    let ns = unique("metrics_refused");
    let store = MemoryStore::new();
    let key = || KeyBuilder::new(&ns).part("k").finish().unwrap();
    static REJECT: Options = Options::new().in_progress(InProgress::Reject);
    let first = fingerprint(&"first").unwrap();
    let Ok(Claimed::Run(held)) = claim(store.handle(), &REJECT, key(), Some(&first)).await else {
        panic!("the first claim runs");
    };
    let dup = claim(store.handle(), &REJECT, key(), Some(&first)).await;
    assert!(matches!(dup, Err(Error::InProgress { .. })), "{dup:?}");
    let other = fingerprint(&"other").unwrap();
    let reused = claim(store.handle(), &REJECT, key(), Some(&other)).await;
    assert!(matches!(reused, Err(Error::KeyReused)), "{reused:?}");
    held.complete(b"done", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        seen(&ns).outcomes,
        counts(&[
            ("memory/claimed", 1),
            ("memory/completed", 1),
            ("memory/in_progress", 1),
            ("memory/key_reused", 1),
        ])
    );
}

#[tokio::test]
async fn a_cancelled_call_and_a_lost_lease_are_counted() {
    snapshotter(); // installed before anything is recorded
    let ns = unique("metrics_lost");
    let store = MemoryStore::new();
    // Cancelled: the caller's future is dropped while the body runs.
    let key = KeyBuilder::new(&ns).part("cancel").finish();
    let running = execute(
        store.handle(),
        &OPTIONS,
        key,
        None,
        Codec::<u32, Error>::release_errors(),
        std::future::pending(),
    );
    assert!(tokio::time::timeout(Duration::from_millis(20), running)
        .await
        .is_err());

    // Lease lost: the claim is released behind the holder's back and taken by another.
    let key = || KeyBuilder::new(&ns).part("lost").finish().unwrap();
    let Ok(Claimed::Run(held)) = claim(store.handle(), &OPTIONS, key(), None).await else {
        panic!("the claim runs");
    };
    let token = store.get(key().as_str()).await.unwrap().unwrap().token;
    store.release(key().as_str(), token).await.unwrap();
    let Ok(Claimed::Run(thief)) = claim(store.handle(), &OPTIONS, key(), None).await else {
        panic!("the key is free again");
    };
    let lost = held.complete(b"late", Duration::from_secs(60)).await;
    assert!(matches!(lost, Err(Error::LeaseLost)), "{lost:?}");
    thief
        .complete(b"mine", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        seen(&ns).outcomes,
        counts(&[
            ("memory/cancelled", 1),
            ("memory/claimed", 3),
            ("memory/completed", 1),
            ("memory/lease_lost", 1),
        ])
    );
}

#[tokio::test]
async fn store_errors_are_counted_and_the_work_did_not_run() {
    snapshotter(); // installed before anything is recorded
    let ns = unique("metrics_store");
    let store = FaultyStore::default();
    store.claims_fail.store(true, Ordering::SeqCst);
    let out = call(&store, &ns, "a", Ok(1)).await;
    assert!(matches!(out, Err(Error::Store(_))), "{out:?}");
    store.claims_fail.store(false, Ordering::SeqCst);
    store.completions_fail.store(true, Ordering::SeqCst);
    store.strict.store(true, Ordering::SeqCst);
    let out = call(&store, &ns, "b", Ok(2)).await;
    assert!(matches!(out, Err(Error::Store(_))), "{out:?}");
    let seen = seen(&ns);
    let kind = store.kind();
    assert_eq!(
        seen.outcomes,
        counts(&[
            (&format!("{kind}/claimed"), 1),
            (&format!("{kind}/store_error"), 2),
        ])
    );
    assert_eq!((seen.claim_timings, seen.complete_timings), (2, 1));
}

#[tokio::test]
async fn a_resumed_call_counts_as_taken_over_on_the_stores_kind() {
    snapshotter(); // installed before anything is recorded
    let ns = unique("metrics_steps");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique("metrics"));
    std::fs::create_dir_all(&dir).unwrap();
    let store = SqliteStore::connect(&format!("sqlite://{}/m.db", dir.display()))
        .await
        .unwrap();
    let run = |fail: bool| {
        let key = KeyBuilder::new(&ns).part("order").finish();
        execute(
            store.handle(),
            &OPTIONS,
            key,
            None,
            Codec::<u32, Error>::release_errors(),
            async move {
                let charged = step("charge", async { Ok::<_, Error>(7u32) }).await?;
                if fail {
                    return Err(Error::store("the shipment failed"));
                }
                Ok(charged)
            },
        )
    };
    assert!(run(true).await.is_err());
    assert_eq!(run(false).await.unwrap(), 7);
    assert_eq!(
        seen(&ns).outcomes,
        counts(&[
            ("sqlite/claimed", 1),
            ("sqlite/completed", 1),
            ("sqlite/released_after_error", 1),
            ("sqlite/taken_over", 1),
        ])
    );
}
