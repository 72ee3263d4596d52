//! `RedisStore::with_replica_ack` under what a review threw at it: a slow
//! replica must not hold up claims and lease renewals (a lapsed lease runs a
//! body twice); an outcome a store *without* the option wrote is not replayed
//! by one with it before the replicas have it; a flushed script cache; a
//! damaged helper field; many callers of one key while the replica is away.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_runtime::{idempotent, Claim, ClaimRequest, Error, RedisStore, Store};

use crate::redis_faults::{AppError, Server};
use crate::replica_ack::{acquire, pair, req};

struct Jobs {
    store: RedisStore,
    runs: AtomicUsize,
}

impl Jobs {
    fn new(store: RedisStore) -> Self {
        Jobs {
            store,
            runs: AtomicUsize::new(0),
        }
    }

    /// A body longer than its lease: the watchdog must keep renewing it.
    #[idempotent(key = id, name = "hol-slow", store = self.store, lease = "2s", in_progress = reject)]
    async fn slow(&self, id: String) -> Result<u32, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5000)).await;
        Ok(1)
    }

    #[idempotent(key = id, name = "hol-fast", store = self.store)]
    async fn fast(&self, id: String) -> Result<u32, AppError> {
        Ok(2)
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

/// One process (`a`) runs a long body for key K, its lease renewed by the
/// watchdog, while it also completes a few unrelated keys, each waiting up to
/// 2 s for the stopped replica. A second process (`b`, its own connection)
/// calls K meanwhile: it must see K in progress, never run it again. Returns
/// the executions of K and whether an unrelated claim on `a` was answered.
async fn run_scenario(ack: bool) -> (usize, bool) {
    let master = Server::start();
    let replica = Server::replica_of(&master);
    let mut a = RedisStore::connect(&master.url()).await.unwrap();
    if ack {
        a = a.with_replica_ack(1, Duration::from_secs(2));
    }
    let a = Arc::new(Jobs::new(a));
    let b = Jobs::new(RedisStore::connect(&master.url()).await.unwrap());
    let key = idem_tests::unique("hol");

    replica.signal("-STOP");
    let slow = {
        let (a, key) = (Arc::clone(&a), key.clone());
        tokio::spawn(async move { a.slow(key).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Unrelated completions on the same store (and connection).
    let mut fast = Vec::new();
    for i in 0..3 {
        let (a, key) = (
            Arc::clone(&a),
            idem_tests::unique(&format!("hol-other-{i}")),
        );
        fast.push(tokio::spawn(async move { a.fast(key).await }));
    }
    // A claim of a fresh, unrelated key on `a`: how long does it take?
    let probe = {
        let a = Arc::clone(&a);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let fresh = idem_tests::unique("hol-fresh");
            let claimed = a
                .store
                .claim(ClaimRequest {
                    key: &fresh,
                    fingerprint: None,
                    lease: Duration::from_secs(30),
                })
                .await;
            eprintln!("ack={ack}: unrelated claim: {claimed:?}");
            claimed.is_ok()
        })
    };
    // Another process calls K while `a` still runs it (its body takes 5 s),
    // past the first lease (2 s): only renewals keep K in progress.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let dup = b.slow(key.clone()).await;
    eprintln!("ack={ack}: the duplicate on b got {dup:?}");
    let first = slow.await.unwrap();
    let answered = probe.await.unwrap();
    eprintln!("ack={ack}: the first call got {first:?}");
    for f in fast {
        let _ = f.await;
    }
    replica.signal("-CONT");
    (a.runs() + b.runs(), answered)
}

/// Control: without the option, K is renewed and runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_option_a_long_body_is_renewed_and_runs_once() {
    let (runs, answered) = run_scenario(false).await;
    assert!(answered);
    assert_eq!(runs, 1);
}

/// With the option, `WAIT`s once went out on the store's one multiplexed
/// connection: the watchdog's renewals of K queued behind them, K's lease
/// lapsed while its body ran, and the other process ran it again (and an
/// unrelated claim timed out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_a_stopped_replica_hold_up_no_renewal() {
    let (runs, answered) = run_scenario(true).await;
    assert!(answered, "an unrelated claim timed out behind WAITs");
    assert_eq!(runs, 1, "the body ran twice");
}

/// An outcome completed by a store without the option (an old deployment in a
/// rolling upgrade, another service on the same prefix) while the replica is
/// stopped was replayed at once by a store with it: the replicas never had it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_written_without_the_option_waits_for_the_replicas_too() {
    let master = Server::start();
    let replica = Server::replica_of(&master);
    let plain = RedisStore::connect(&master.url()).await.unwrap();
    let acked = RedisStore::connect(&master.url())
        .await
        .unwrap()
        .with_replica_ack(1, Duration::from_millis(300));
    let key = idem_tests::unique("mixed");
    let token = acquire(&plain, req(&key)).await;
    replica.signal("-STOP");
    plain
        .complete(&key, token, b"x", Duration::from_secs(60))
        .await
        .unwrap();
    let got = acked.claim(req(&key)).await;
    replica.signal("-CONT");
    assert!(
        matches!(got, Err(Error::NotReplicated { .. })),
        "replayed an outcome the replica lacks: {got:?}"
    );
    let got = acked.claim(req(&key)).await;
    assert!(matches!(got, Ok(Claim::Completed { .. })), "{got:?}");
}

/// A flushed script cache between calls: the pipeline's EVALSHA fails with
/// NOSCRIPT, the script is loaded, the pipeline resent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_script_cache_is_reloaded_inside_the_wait_pipeline() {
    let (master, replica, acked) = pair(Duration::from_millis(300)).await;
    let key = idem_tests::unique("flush");
    let token = acquire(&acked, req(&key)).await;
    master.cli(&["SCRIPT", "FLUSH"]);
    replica.signal("-STOP");
    let done = acked
        .complete(&key, token, b"x", Duration::from_secs(60))
        .await;
    assert!(matches!(done, Err(Error::NotReplicated { .. })), "{done:?}");
    master.cli(&["SCRIPT", "FLUSH"]);
    let got = acked.get(&key).await;
    assert!(matches!(got, Err(Error::NotReplicated { .. })), "{got:?}");
    master.cli(&["SCRIPT", "FLUSH"]);
    let got = acked.claim(req(&key)).await;
    assert!(matches!(got, Err(Error::NotReplicated { .. })), "{got:?}");
    replica.resume_caught_up(&master);
    master.cli(&["SCRIPT", "FLUSH"]);
    let got = acked.claim(req(&key)).await;
    assert!(matches!(got, Ok(Claim::Completed { .. })), "{got:?}");
    let marked = master.cli(&[
        "EVAL",
        "return string.byte(redis.call('GET', KEYS[1]), 2)",
        "1",
        &acked.redis_key(&key),
    ]);
    assert_eq!(marked.trim(), "1", "marked as on the replicas");
}

/// A damaged helper (the touch byte, which readers change) on a completed
/// record: once a permanent `Store` error (a hash field was `HINCRBY`'d);
/// the byte now wraps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_helper_field_is_overwritten() {
    let (master, replica, acked) = pair(Duration::from_millis(300)).await;
    let key = idem_tests::unique("corrupt-w");
    let token = acquire(&acked, req(&key)).await;
    replica.signal("-STOP");
    let done = acked
        .complete(&key, token, b"x", Duration::from_secs(60))
        .await;
    assert!(matches!(done, Err(Error::NotReplicated { .. })), "{done:?}");
    replica.resume_caught_up(&master);
    master.cli(&[
        "EVAL",
        "return redis.call('SETRANGE', KEYS[1], 2, string.char(255))",
        "1",
        &acked.redis_key(&key),
    ]);
    let got = acked.get(&key).await;
    assert!(matches!(got, Ok(Some(_))), "{got:?}");
    let got = acked.claim(req(&key)).await;
    assert!(matches!(got, Ok(Claim::Completed { .. })), "{got:?}");
}

struct Pay {
    store: RedisStore,
    runs: AtomicUsize,
}

impl Pay {
    #[idempotent(key = id, name = "storm", store = self.store, in_progress = wait("10s"))]
    async fn pay(&self, id: String) -> Result<u64, AppError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) as u64;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(1000 + n)
    }
}

/// Many callers of one key on two stores while the replica is stopped, then
/// resumed: one execution, equal answers, none answered before the resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_callers_of_one_key_get_one_answer_only_after_the_replica_is_back() {
    let master = Server::start();
    let replica = Server::replica_of(&master);
    let mk = || async {
        Arc::new(Pay {
            store: RedisStore::connect(&master.url())
                .await
                .unwrap()
                .with_replica_ack(1, Duration::from_millis(400)),
            runs: AtomicUsize::new(0),
        })
    };
    let (p1, p2) = (mk().await, mk().await);
    let key = idem_tests::unique("storm");
    replica.signal("-STOP");
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let p = if i % 2 == 0 {
            Arc::clone(&p1)
        } else {
            Arc::clone(&p2)
        };
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..20 {
                let r = p.pay(key.clone()).await;
                answers.push((t0.elapsed(), format!("{r:?}")));
                if r.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answers
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let resumed = t0.elapsed();
    replica.signal("-CONT");
    let mut oks = std::collections::BTreeSet::new();
    let mut kinds = std::collections::BTreeMap::new();
    for t in tasks {
        for (at, r) in t.await.unwrap() {
            let kind = r.split(['(', '{']).take(3).collect::<Vec<_>>().join("(");
            *kinds.entry(kind).or_insert(0) += 1;
            if r.starts_with("Ok") {
                assert!(
                    at >= resumed,
                    "answered {r} at {at:?}, before the resume at {resumed:?}"
                );
                oks.insert(r);
            }
        }
    }
    eprintln!("answers: {kinds:?}");
    let runs = p1.runs.load(Ordering::SeqCst) + p2.runs.load(Ordering::SeqCst);
    assert_eq!(runs, 1);
    assert_eq!(oks.len(), 1, "{oks:?}");
}

struct Pay7 {
    store: RedisStore,
    runs: AtomicUsize,
}

impl Pay7 {
    fn new(store: RedisStore) -> Self {
        Pay7 {
            store,
            runs: AtomicUsize::new(0),
        }
    }

    #[idempotent(key = id, name = "replica-ack-round2", store = self.store)]
    async fn pay(&self, id: String) -> Result<u32, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(7)
    }
}

/// Opens 8 `WAIT` connections (8 completions at once), left idle in the pool.
async fn fill_pool(store: &RedisStore) {
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let key = idem_tests::unique("replica-ack-fill");
            let token = acquire(&store, req(&key)).await;
            store
                .complete(&key, token, b"1", Duration::from_secs(60))
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// The server drops its clients (a restart, its idle `timeout`, `CLIENT
/// KILL`): every idle `WAIT` connection once failed its next use, so the
/// engine's three tries met three dead connections and a caller of a
/// healthy server got an error. A dropped pooled connection is now replaced
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_wait_connections_cost_the_caller_nothing() {
    for ack in [false, true] {
        let (master, _replica, acked) = pair(Duration::from_secs(1)).await;
        let store = if ack {
            acked
        } else {
            RedisStore::connect(&master.url()).await.unwrap()
        };
        fill_pool(&store).await;
        master.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
        // The main connection fails once, then reconnects.
        let mut failures = 0;
        while store
            .claim(req(&idem_tests::unique("replica-ack-warm")))
            .await
            .is_err()
        {
            failures += 1;
            assert!(failures < 5, "the main connection did not come back");
        }
        let pay = Pay7::new(store);
        let answer = pay.pay(idem_tests::unique("replica-ack-drop")).await;
        assert!(
            answer.is_ok(),
            "ack {ack}: a healthy server, yet {answer:?}"
        );
    }
}

/// A burst of completions while the replica is stopped once opened a `WAIT`
/// connection each, without bound, until the server refused every client
/// (`maxclients`). Now at most 16 are open; the callers beyond them wait for
/// one (up to the ack timeout) or fail as for a store error; nothing runs
/// twice, and every call is answered once the replica is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_waits_leaves_the_server_room_for_other_clients() {
    let (master, replica, store) = pair(Duration::from_millis(1500)).await;
    assert!(master
        .cli(&["CONFIG", "SET", "maxclients", "64"])
        .contains("OK"));
    let pay = Arc::new(Pay7::new(store));
    let keys: Vec<String> = (0..200)
        .map(|i| idem_tests::unique(&format!("replica-ack-burst-{i}")))
        .collect();
    replica.signal("-STOP");
    let mut tasks = Vec::new();
    for key in keys.clone() {
        let pay = Arc::clone(&pay);
        tasks.push(tokio::spawn(async move { pay.pay(key).await }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other = RedisStore::connect(&master.url()).await;
    for t in tasks {
        match t.await.unwrap() {
            Err(AppError::Idem(Error::NotReplicated { .. } | Error::Store(_))) => {}
            other => panic!("answered while the replica was stopped: {other:?}"),
        }
    }
    replica.signal("-CONT");
    assert!(other.is_ok(), "another client of the server was locked out");
    for key in keys {
        let mut tries = 0;
        loop {
            match pay.pay(key.clone()).await {
                Ok(7) => break,
                Err(AppError::Idem(e)) if e.is_retryable() && tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(pay.runs.load(Ordering::SeqCst), 200, "each key ran once");
}

/// `a` once said only "acknowledged": a store requiring two replicas replayed
/// what a store requiring one had marked. It now holds the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_counts_the_replicas_it_was_acknowledged_by() {
    let (master, _replica, one) = pair(Duration::from_millis(300)).await;
    let two = RedisStore::connect(&master.url())
        .await
        .unwrap()
        .with_replica_ack(2, Duration::from_millis(300));
    let key = idem_tests::unique("replica-ack-count");
    let token = acquire(&one, req(&key)).await;
    one.complete(&key, token, b"1", Duration::from_secs(60))
        .await
        .unwrap();
    // The master has one replica: two can never acknowledge.
    let replayed = two.claim(req(&key)).await;
    assert!(
        matches!(
            replayed,
            Err(Error::NotReplicated {
                acknowledged: 1,
                required: 2
            })
        ),
        "{replayed:?}"
    );
    assert!(matches!(
        one.claim(req(&key)).await.unwrap(),
        Claim::Completed { .. }
    ));
}
