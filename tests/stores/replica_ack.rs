//! Completions that survive a failover (`RedisStore::with_replica_ack`): an
//! answered outcome is on the replicas, so losing the master loses none; an
//! outcome the replicas have not acknowledged is not answered, to the caller
//! or to a duplicate, until they have it. Each test runs its own master and
//! replica; the last one fails over a master of the local Redis Cluster with
//! replicas (`IDEM_CLUSTER_REPLICAS=1 scripts/redis-cluster.sh`, ports 7201–7206).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idem_runtime::store::FencingToken;
use idem_runtime::{idempotent, Claim, ClaimRequest, Error, RecordState, RedisStore, Store};

use crate::redis_faults::{AppError, Server};

struct Payments {
    store: RedisStore,
    runs: AtomicUsize,
}

impl Payments {
    fn new(store: RedisStore) -> Self {
        Payments {
            store,
            runs: AtomicUsize::new(0),
        }
    }

    #[idempotent(key = id, name = "replica-ack", store = self.store)]
    async fn pay(&self, id: u32) -> Result<u32, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(id * 10)
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

fn not_replicated(result: Result<u32, AppError>) -> bool {
    matches!(
        result,
        Err(AppError::Idem(Error::NotReplicated {
            acknowledged: 0,
            required: 1
        }))
    )
}

/// Stops `replica` and fills its link, so that what the master writes from
/// now on stays in the master's output buffer (not in a socket buffer the
/// replica would still read after the master dies).
fn cut_off(master: &Server, replica: &Server) {
    replica.signal("-STOP");
    let filler = "x".repeat(4 << 20);
    let client = redis::Client::open(master.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    for i in 0..8 {
        redis::cmd("SET")
            .arg(format!("filler-{i}"))
            .arg(&filler)
            .exec(&mut conn)
            .unwrap();
    }
}

/// Kills the master and makes `replica` (resumed) the master in its place.
fn fail_over(master: &mut Server, replica: &Server) {
    master.kill();
    replica.signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(20);
    // The replica notices its master is gone, then is promoted.
    while replica
        .info("replication")
        .contains("master_link_status:up")
    {
        assert!(Instant::now() < deadline, "the replica kept its link");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(replica.cli(&["REPLICAOF", "NO", "ONE"]).contains("OK"));
}

/// A master, its replica (synced), and a store on the master that waits up
/// to `timeout` for the replica to acknowledge.
pub(crate) async fn pair(timeout: Duration) -> (Server, Server, RedisStore) {
    let master = Server::start();
    let replica = Server::replica_of(&master);
    let store = RedisStore::connect(&master.url())
        .await
        .unwrap()
        .with_replica_ack(1, timeout);
    (master, replica, store)
}

/// Claims a fresh key: its token.
pub(crate) async fn acquire(store: &RedisStore, req: ClaimRequest<'_>) -> FencingToken {
    match store.claim(req).await.expect("a claim") {
        Claim::Acquired { token, .. } => token,
        other => panic!("a fresh key is acquired, got {other:?}"),
    }
}

/// A claim of `key` with a 30 s lease.
pub(crate) fn req(key: &str) -> ClaimRequest<'_> {
    ClaimRequest {
        key,
        fingerprint: None,
        lease: Duration::from_secs(30),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_outcome_survives_losing_its_master() {
    let (mut master, replica, store) = pair(Duration::from_secs(2)).await;
    let payments = Payments::new(store);
    assert_eq!(payments.pay(1).await.unwrap(), 10);

    // The master dies with whatever it had not sent yet (nothing it answered).
    cut_off(&master, &replica);
    fail_over(&mut master, &replica);

    let promoted = RedisStore::connect(&replica.url()).await.unwrap();
    let after = Payments::new(promoted);
    assert_eq!(after.pay(1).await.unwrap(), 10, "replayed from the replica");
    assert_eq!(after.runs(), 0, "the answered payment did not run again");
}

/// The limit the option exists for, shown: without it, an answered outcome
/// the replica never received is gone after the failover, and runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replica_ack_a_failover_loses_an_answered_outcome() {
    let mut master = Server::start();
    let replica = Server::replica_of(&master);
    let payments = Payments::new(RedisStore::connect(&master.url()).await.unwrap());
    cut_off(&master, &replica);
    assert_eq!(payments.pay(2).await.unwrap(), 20, "answered by the master");
    fail_over(&mut master, &replica);

    let after = Payments::new(RedisStore::connect(&replica.url()).await.unwrap());
    assert_eq!(after.pay(2).await.unwrap(), 20);
    assert_eq!(after.runs(), 1, "the answered payment ran again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_the_replicas_lack_is_not_answered_until_they_have_it() {
    let (master, replica, store) = pair(Duration::from_millis(300)).await;
    let payments = Payments::new(store.clone());
    cut_off(&master, &replica);

    // The body runs once; its outcome is held back from the caller…
    let started = Instant::now();
    assert!(not_replicated(payments.pay(3).await));
    assert!(started.elapsed() >= Duration::from_millis(300), "it waited");
    assert_eq!(payments.runs(), 1);
    // …and from every duplicate, which does not run it again either.
    for _ in 0..3 {
        assert!(not_replicated(payments.pay(3).await));
    }
    let other = Payments::new(store.clone());
    assert!(not_replicated(other.pay(3).await));
    assert_eq!(payments.runs() + other.runs(), 1);

    // Once the replica has it, every caller gets the first outcome.
    replica.resume_caught_up(&master);
    assert_eq!(other.pay(3).await.unwrap(), 30);
    assert_eq!(payments.pay(3).await.unwrap(), 30);
    assert_eq!(payments.runs() + other.runs(), 1);
    // A store without the option replays whatever the master has.
    let plain = Payments::new(RedisStore::connect(&master.url()).await.unwrap());
    assert_eq!(plain.pay(3).await.unwrap(), 30);
    assert_eq!(plain.runs(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_waits_for_the_replicas_too() {
    let (master, replica, store) = pair(Duration::from_millis(200)).await;
    let key = idem_tests::unique("replica-ack-get");
    let req = req(&key);
    let token = acquire(&store, req).await;
    cut_off(&master, &replica);
    let refused = store
        .complete(&key, token, b"{\"ok\":1}", Duration::from_secs(60))
        .await;
    assert!(
        matches!(refused, Err(Error::NotReplicated { .. })),
        "{refused:?}"
    );
    assert!(matches!(
        store.get(&key).await,
        Err(Error::NotReplicated { .. })
    ));
    assert!(matches!(
        store.claim(req).await,
        Err(Error::NotReplicated { .. })
    ));
    // The record is there, completed, with the claim's token: nothing runs again.
    let plain = RedisStore::connect(&master.url()).await.unwrap();
    let record = plain.get(&key).await.unwrap().expect("the record");
    assert_eq!(
        (record.state, record.token),
        (RecordState::Completed, token)
    );

    replica.resume_caught_up(&master);
    let record = store.get(&key).await.unwrap().expect("the record");
    assert_eq!(record.outcome.as_deref(), Some(&b"{\"ok\":1}"[..]));
    assert!(matches!(
        store.claim(req).await.unwrap(),
        Claim::Completed { .. }
    ));
}

/// The Redis Cluster with a replica per master: `IDEM_REPLICATED_CLUSTER`
/// (comma-separated URLs), or the ports `scripts/test.sh` starts it on.
fn replicated_cluster() -> Vec<String> {
    std::env::var("IDEM_REPLICATED_CLUSTER")
        .unwrap_or_else(|_| {
            (7201..=7206)
                .map(|p| format!("redis://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// One line of `CLUSTER NODES`.
struct Node {
    id: String,
    port: String,
    master_of: Option<String>,
    slots: Vec<(u16, u16)>,
}

async fn query(port: &str, cmd: &mut redis::Cmd) -> redis::Value {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

async fn text(port: &str, cmd: &mut redis::Cmd) -> String {
    redis::from_redis_value(query(port, cmd).await).unwrap()
}

async fn nodes(seed: &str) -> Vec<Node> {
    let port = seed.rsplit(':').next().unwrap();
    let listing = text(port, redis::cmd("CLUSTER").arg("NODES")).await;
    listing
        .lines()
        .filter(|l| !l.contains("fail") && !l.contains("handshake"))
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let addr = f[1].split('@').next().unwrap();
            Node {
                id: f[0].to_owned(),
                port: addr.rsplit(':').next().unwrap().to_owned(),
                master_of: (f[3] != "-").then(|| f[3].to_owned()),
                slots: f[8..]
                    .iter()
                    .filter(|s| !s.starts_with('['))
                    .map(|s| match s.split_once('-') {
                        Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                        None => (s.parse().unwrap(), s.parse().unwrap()),
                    })
                    .collect(),
            }
        })
        .collect()
}

/// The master serving `slot` and one of its replicas, as ports.
async fn master_and_replica(seed: &str, slot: u16) -> (String, String) {
    let all = nodes(seed).await;
    let master = all
        .iter()
        .find(|n| n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
        .expect("a master for the slot");
    let replica = all
        .iter()
        .find(|n| n.master_of.as_deref() == Some(&master.id))
        .expect("the master has a replica: start the cluster with IDEM_CLUSTER_REPLICAS=1");
    (master.port.clone(), replica.port.clone())
}

async fn wait_role(port: &str, role: &str, linked: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = text(port, redis::cmd("INFO").arg("replication")).await;
        let up = !linked || info.contains("master_link_status:up");
        if info.contains(&format!("role:{role}")) && up {
            return;
        }
        assert!(Instant::now() < deadline, "{port} did not become {role}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGSTOPs a node; SIGCONTs it when dropped, whatever the test did.
struct Paused(String);

impl Paused {
    async fn node(port: &str) -> Paused {
        let info = text(port, redis::cmd("INFO").arg("server")).await;
        let pid = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .unwrap()
            .trim()
            .to_owned();
        let paused = Paused(pid);
        paused.signal("-STOP");
        paused
    }

    fn signal(&self, signal: &str) {
        let _ = std::process::Command::new("kill")
            .args([signal, &self.0])
            .status();
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        self.signal("-CONT");
    }
}

/// On the cluster: the conformance suite with the option on; an answered
/// outcome replayed after its master is failed over by force right after the
/// completion; an outcome held back while the slot's replica is stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_an_answered_outcome_survives_a_forced_failover() {
    let seeds = replicated_cluster();
    let store = RedisStore::connect_cluster(&seeds)
        .await
        .unwrap()
        .with_replica_ack(1, Duration::from_secs(2));
    idem_runtime::testing::conformance(&store).await;

    // Two keys of one slot (a hash tag), so both live on the same master.
    let tag = idem_tests::unique("replica-ack");
    let (one, two) = (format!("{{{tag}}}:1"), format!("{{{tag}}}:2"));
    let token = acquire(&store, req(&one)).await;
    store
        .complete(&one, token, b"{\"ok\":1}", Duration::from_secs(600))
        .await
        .unwrap();
    let slot: u16 = redis::from_redis_value(
        query(
            seeds[0].rsplit(':').next().unwrap(),
            redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(store.redis_key(&one)),
        )
        .await,
    )
    .unwrap();
    let (master, replica) = master_and_replica(&seeds[0], slot).await;
    text(&replica, redis::cmd("CLUSTER").arg("FAILOVER").arg("FORCE")).await;
    wait_role(&replica, "master", false).await;
    match store.claim(req(&one)).await.unwrap() {
        Claim::Completed { outcome, .. } => assert_eq!(outcome, b"{\"ok\":1}"),
        other => panic!("expected the outcome from the promoted replica, got {other:?}"),
    }

    // The old master now replicates the new one; stop it, and the slot's
    // completions are held back until it is back.
    wait_role(&master, "slave", true).await;
    // Every node names the new master for the slot before a client reads the
    // layout: a map read from a node that had not heard yet sent the next
    // claim to the old master, stopped below (a 5 s timeout, seen once in 8).
    for seed in &seeds {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let owner = nodes(seed)
                .await
                .into_iter()
                .find(|n| n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
                .map(|n| n.port);
            if owner.as_deref() == Some(replica.as_str()) {
                break;
            }
            assert!(Instant::now() < deadline, "{seed} still names {owner:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A client that has the new layout (the first one may still send a
    // request to the old master, now stopped, before it refreshes its map).
    let store = RedisStore::connect_cluster(&seeds)
        .await
        .unwrap()
        .with_replica_ack(1, Duration::from_secs(2));
    let paused = Paused::node(&master).await;
    // The cluster client may first ask the paused node for the layout (a
    // 5 s timeout, seen once in a full run): a client retries, as here.
    let mut tries = 0;
    let token = loop {
        tries += 1;
        match store.claim(req(&two)).await {
            Ok(Claim::Acquired { token, .. }) => break token,
            Err(Error::Store(err)) if tries < 3 => eprintln!("claim failed, retrying: {err}"),
            other => panic!("a fresh key is acquired, got {other:?}"),
        }
    };
    let refused = store
        .complete(&two, token, b"{\"ok\":2}", Duration::from_secs(600))
        .await;
    assert!(
        matches!(
            refused,
            Err(Error::NotReplicated {
                acknowledged: 0,
                required: 1
            })
        ),
        "{refused:?}"
    );
    assert!(matches!(
        store.claim(req(&two)).await,
        Err(Error::NotReplicated { .. })
    ));
    drop(paused);
    match store.claim(req(&two)).await.unwrap() {
        Claim::Completed { outcome, .. } => assert_eq!(outcome, b"{\"ok\":2}"),
        other => panic!("expected the outcome once replicated, got {other:?}"),
    }
}

/// The HTTP layer answers the first request 503 `not-replicated` (not the
/// handler's response, which a failover could take back), and the retry the
/// stored response once the replica has it; the handler runs once. A message
/// consumer does not acknowledge a message whose mark the replica lacks, and
/// the redelivery is a duplicate once it has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_layer_and_consumers_answer_only_what_the_replicas_hold() {
    use axum::routing::post;
    use idem_runtime::http::IdempotencyLayer;
    use idem_runtime::message::{Deduplicator, Outcome, ProcessError};
    use tower::ServiceExt as _;

    let (master, replica, store) = pair(Duration::from_millis(200)).await;
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route(
            "/pay",
            post({
                let runs = runs.clone();
                move || async move { format!("paid {}", runs.fetch_add(1, Ordering::SeqCst) + 1) }
            }),
        )
        .layer(IdempotencyLayer::new(store.clone()).global_scope());
    let pay = || async {
        let request = axum::http::Request::post("/pay")
            .header("idempotency-key", "k-1")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let retry_after = response.headers().contains_key("retry-after");
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        (
            status,
            retry_after,
            String::from_utf8_lossy(&body).into_owned(),
        )
    };

    cut_off(&master, &replica);
    for _ in 0..2 {
        let (status, retry_after, body) = pay().await;
        assert_eq!(status, 503, "{body}");
        assert!(retry_after);
        assert!(body.contains("not-replicated"), "{body}");
    }
    let dedup = Deduplicator::new(store.clone(), idem_tests::unique("replica-ack-consumer"));
    let first = dedup
        .process("msg-1", || async { Ok::<_, std::io::Error>("charged") })
        .await;
    assert!(
        matches!(
            first,
            Err(ProcessError::Idempotency(Error::NotReplicated { .. }))
        ),
        "{first:?}"
    );
    replica.resume_caught_up(&master);

    assert_eq!(pay().await, (200, false, "paid 1".to_owned()));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let again = dedup
        .process("msg-1", || async {
            Ok::<_, std::io::Error>("charged twice")
        })
        .await;
    assert!(matches!(again, Ok(Outcome::Duplicate)), "{again:?}");
}
