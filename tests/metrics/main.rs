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

/// A PostgreSQL store on a table of its own, and its pool.
async fn pg_store(what: &str) -> (idem_runtime::PostgresStore, sqlx::PgPool, String) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&idem_tests::postgres_url())
        .await
        .unwrap();
    let table = unique(what);
    let store = idem_runtime::PostgresStore::with_table(pool.clone(), &table).unwrap();
    store.migrate().await.unwrap();
    (store, pool, table)
}

async fn drop_table(pool: &sqlx::PgPool, table: &str) {
    let drop = format!("DROP TABLE {table}; DROP SEQUENCE {table}_token_seq");
    sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
        .execute(pool)
        .await
        .unwrap();
}

/// A call on PostgreSQL whose body ends with `outcome` while another
/// transaction holds the call's own record row: the release or completion
/// that follows waits on the row, and the caller gives up (a timeout around
/// the call) meanwhile. Then the row is let go, and `until` the record is as
/// expected (within 30 s). Returns the store's pool and table, to drop.
async fn give_up_on_a_locked_row(
    ns: &str,
    outcome: Result<u32, Error>,
    until: fn(Option<idem_runtime::RecordState>) -> bool,
) -> (sqlx::PgPool, String) {
    let (store, pool, table) = pg_store("metrics_locked").await;
    let key = KeyBuilder::new(ns).part("k").finish();
    let storage_key = KeyBuilder::new(ns).part("k").finish().unwrap();
    let mut locker = pool.begin().await.unwrap();
    let locker_ref = &mut locker;
    let lock = format!("SELECT 1 FROM {table} WHERE key = $1 FOR UPDATE");
    let call = execute(
        store.handle(),
        &OPTIONS,
        key,
        None,
        Codec::<u32, Error>::release_errors(),
        async {
            sqlx::query(sqlx::AssertSqlSafe(lock.clone()))
                .bind(storage_key.as_str())
                .fetch_one(&mut **locker_ref)
                .await
                .unwrap();
            outcome
        },
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), call)
            .await
            .is_err(),
        "the call waits on the row, and the caller gives up"
    );
    locker.commit().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !until(
        store
            .get(storage_key.as_str())
            .await
            .unwrap()
            .map(|r| r.state),
    ) {
        assert!(tokio::time::Instant::now() < deadline, "the record settles");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (pool, table)
}

/// A caller that gives up (a timeout around the call) while the release after
/// its error is on the wire: the claim ended once, released after the error.
/// The drop releases again (so the release is never lost), but the claim is
/// not counted a second time as `cancelled` (CONTRACT §9.1: every claim won is
/// counted once more by how it ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_during_the_release_is_counted_once() {
    snapshotter(); // installed before anything is recorded
    let ns = unique("metrics_release_drop");
    let failed = Err(Error::store("the provider failed"));
    let (pool, table) = give_up_on_a_locked_row(&ns, failed, |state| state.is_none()).await;
    assert_eq!(
        seen(&ns).outcomes,
        counts(&[
            ("postgres/claimed", 1),
            ("postgres/released_after_error", 1),
        ]),
        "one claim, one ending"
    );
    drop_table(&pool, &table).await;
}

/// A `tx =` call dropped while its body runs (a timeout around it): the claim
/// it won goes with the caller's transaction, which is rolled back. It is
/// counted as ended, `cancelled`, as a dropped call on the store's own
/// connection is (CONTRACT §9.1: `cancelled`, the caller went away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tx_call_dropped_mid_body_is_counted_cancelled() {
    snapshotter(); // installed before anything is recorded
    let ns = unique("metrics_tx_drop");
    let (store, pool, table) = pg_store("metrics_tx").await;
    let mut tx = pool.begin().await.unwrap();
    let key = KeyBuilder::new(&ns).part("k").finish();
    let call = idem_runtime::engine::execute_in_tx(
        &store,
        &mut tx,
        &OPTIONS,
        key,
        None,
        Codec::<u32, Error>::release_errors(),
        async |_tx: &mut sqlx::Transaction<'static, sqlx::Postgres>| {
            std::future::pending::<Result<u32, Error>>().await
        },
    );
    assert!(tokio::time::timeout(Duration::from_millis(200), call)
        .await
        .is_err());
    tx.rollback().await.unwrap();
    assert_eq!(
        seen(&ns).outcomes,
        counts(&[("postgres/cancelled", 1), ("postgres/claimed", 1)]),
        "one claim, one ending"
    );
    drop_table(&pool, &table).await;
}

/// A caller that gives up (a timeout around the call) while its outcome is
/// being recorded: the completion goes on in the background, and the claim
/// is counted as ended once — `cancelled`, the caller went away — rather
/// than not at all (CONTRACT §9.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_during_the_completion_is_counted_once() {
    snapshotter(); // installed before anything is recorded
    let ns = unique("metrics_complete_drop");
    let completed = |state| state == Some(idem_runtime::RecordState::Completed);
    let (pool, table) = give_up_on_a_locked_row(&ns, Ok(5), completed).await;
    let outcomes = seen(&ns).outcomes;
    let ended: u64 = outcomes
        .iter()
        .filter(|(k, _)| !k.ends_with("/claimed"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        (outcomes.get("postgres/claimed").copied(), ended),
        (Some(1), 1),
        "one claim, one ending: {outcomes:?}"
    );
    drop_table(&pool, &table).await;
}

/// A message consumer's deduplicator is counted by the same engine: a first
/// delivery claims and completes, a redelivery replays, a failed handler is
/// released after its error — under the consumer's namespace.
#[tokio::test]
async fn a_deduplicator_is_counted_under_its_namespace() {
    snapshotter(); // installed before anything is recorded
    let consumer = unique("metrics_consumer");
    let dedup = idem_runtime::message::Deduplicator::new(MemoryStore::new(), consumer.clone());
    let ok = || async { Ok::<_, std::io::Error>(()) };
    dedup.process("m-1", ok).await.unwrap();
    dedup.process("m-1", ok).await.unwrap();
    let failed = dedup
        .process("m-2", || async {
            Err::<(), _>(std::io::Error::other("down"))
        })
        .await;
    assert!(failed.is_err());
    assert_eq!(
        seen(&format!("idem::message::{consumer}")).outcomes,
        counts(&[
            ("memory/claimed", 2),
            ("memory/completed", 1),
            ("memory/released_after_error", 1),
            ("memory/replayed", 1),
        ])
    );
}

/// The HTTP layer is counted by the same engine, under its namespace: a
/// first request claims and completes, its retry replays, a 500 (not stored)
/// is released after its error.
#[tokio::test]
async fn the_http_layer_is_counted_under_its_namespace() {
    snapshotter(); // installed before anything is recorded
    let ns = unique("metrics_http");
    let app = axum::Router::new()
        .route("/ok", axum::routing::post(|| async { "done" }))
        .route(
            "/fail",
            axum::routing::post(|| async { axum::http::StatusCode::INTERNAL_SERVER_ERROR }),
        )
        .layer(
            idem_runtime::http::IdempotencyLayer::new(MemoryStore::new())
                .global_scope()
                .namespace(ns.clone()),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::Client::new();
    let post = |path: &str, key: &str| {
        client
            .post(format!("{base}{path}"))
            .header("Idempotency-Key", key)
            .send()
    };
    assert_eq!(post("/ok", "a").await.unwrap().status(), 200);
    let retry = post("/ok", "a").await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(post("/fail", "b").await.unwrap().status(), 500);
    assert_eq!(
        seen(&ns).outcomes,
        counts(&[
            ("memory/claimed", 2),
            ("memory/completed", 1),
            ("memory/released_after_error", 1),
            ("memory/replayed", 1),
        ])
    );
}
