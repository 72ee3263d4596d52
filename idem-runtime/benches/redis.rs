//! What `RedisStore` costs next to the raw floor and to the best peer, the
//! crate `idempotent` 0.3.0's Valkey store, measured in one run against the
//! same server.
//!
//! - `fresh`: a call through `#[idempotent]` with a new key (claim script, run,
//!   complete script); the peer's `try_insert` that claims, then `complete`;
//!   the floor, two plain round trips, `SET key v NX PX` then `SET key v PX`;
//! - `replay`: a call whose key is completed; the peer's `try_insert` that
//!   finds the completed entry; the floor, one plain `GET`;
//! - `replay (store API)`: the same replay through `RedisStore::claim` alone
//!   (no key derivation, no decoding), driven as the peer is;
//! - `cached replay`: idem's replay through a [`ReplayCache`], served from
//!   process memory (the peer has none).
//!
//! Each sequentially and from 64 concurrent tasks (one multiplexed connection
//! per side, as each store opens it). Best of 5 rounds, the sides alternating
//! in every round. Then one more round per side with Redis's statistics reset
//! before it: the server's time in commands per call (`INFO commandstats`:
//! the script calls where scripts ran — each includes the commands it calls,
//! which Redis also counts on their own lines — else every command), Redis's
//! whole CPU time per call (`INFO cpu`: commands, parsing, network) and the
//! benchmark process's CPU time per call (the client: key, encoding,
//! connection), so the next reader knows which side of the wire a cost is on.
//!
//! Run: `cargo bench -p idem-runtime --bench redis --features redis`
//! (`IDEM_REDIS_URL` overrides the server; `IDEM_BENCH_OPS` the calls per figure;
//! `IDEM_BENCH_ONLY=replay` runs only the lines whose label contains it).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{Claim, ClaimRequest, Key, RedisStore, ReplayCache, Store};
use idempotent::entry::ExistingEntry;
use idempotent::fingerprint::{DefaultFingerprintStrategy, FingerprintStrategy};
use idempotent::store::valkey::ValkeyStore;
use idempotent::store::{IdempotencyStore, InsertResult};
use idempotent::{CachedResponse, IdempotencyEntry, IdempotencyKey, Metadata};
use redis::aio::MultiplexedConnection;

mod common;

use common::{measure, Svc};

/// One side of a figure: a call made with a fresh id.
type Op = Arc<dyn Fn(u64) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

fn op<F, Fut>(f: F) -> Op
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |id| Box::pin(f(id)))
}

/// This process's CPU time (user + system) so far, in µs.
fn cpu_us() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the
    // 12th, stime the 13th, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) * 10_000.0
}

/// The server's time in every command since the last `CONFIG RESETSTAT`, µs,
/// but for the statistics commands themselves.
async fn server_us(admin: &mut MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .unwrap();
    let usec = |l: &str| {
        l.split(',')
            .find_map(|f| f.strip_prefix("usec="))
            .and_then(|u| u.parse::<f64>().ok())
    };
    let stats: Vec<&str> = info
        .lines()
        .filter(|l| l.starts_with("cmdstat_"))
        .filter(|l| !l.starts_with("cmdstat_info") && !l.starts_with("cmdstat_config"))
        .collect();
    // Redis counts the commands a script calls in their own lines too: where
    // scripts ran, their lines alone (each includes its calls).
    let scripts: Vec<&str> = stats
        .iter()
        .copied()
        .filter(|l| l.starts_with("cmdstat_eval"))
        .collect();
    let top = if scripts.is_empty() { stats } else { scripts };
    top.into_iter().filter_map(usec).sum()
}

/// Redis's own CPU time (user + system, µs): commands, parsing and the
/// network calls commandstats leaves out.
async fn redis_cpu_us(admin: &mut MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(admin)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(':')?;
            (name == "used_cpu_sys" || name == "used_cpu_user")
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .sum::<f64>()
        * 1e6
}

/// Runs `side` once more with Redis's statistics reset: (server µs in
/// commands, Redis CPU µs, client CPU µs) per call.
async fn account(
    admin: &mut MultiplexedConnection,
    ops: usize,
    tasks: usize,
    side: &Op,
) -> (f64, f64, f64) {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(admin)
        .await
        .unwrap();
    let (cpu, redis_cpu) = (cpu_us(), redis_cpu_us(admin).await);
    let s = side.clone();
    measure(ops, tasks, move |id| s(id)).await;
    let client = (cpu_us() - cpu) / ops as f64;
    let redis_cpu = (redis_cpu_us(admin).await - redis_cpu) / ops as f64;
    (server_us(admin).await / ops as f64, redis_cpu, client)
}

/// Prints one figure: floor, peer (if any) and idem, best of five rounds each,
/// and their server and client time per call.
async fn figure(
    admin: &mut MultiplexedConnection,
    label: &str,
    ops: usize,
    tasks: usize,
    sides: &[(&str, Op)],
) {
    if std::env::var("IDEM_BENCH_ONLY").is_ok_and(|only| !label.contains(&only)) {
        return;
    }
    for (_, side) in sides {
        let s = side.clone();
        measure(ops / 4, tasks, move |id| s(id)).await; // warm up
    }
    let mut best = vec![f64::MAX; sides.len()];
    for _ in 0..5 {
        for (i, (_, side)) in sides.iter().enumerate() {
            let s = side.clone();
            best[i] = best[i].min(measure(ops, tasks, move |id| s(id)).await);
        }
    }
    let mut accounts = Vec::new();
    for (_, side) in sides {
        accounts.push(account(admin, ops, tasks, side).await);
    }
    let idem = best[sides.len() - 1];
    let mut line = format!("{label:<24}");
    for (i, (name, _)) in sides.iter().enumerate() {
        line.push_str(&format!(
            " | {name} {:>7.1} µs ({:>7.0}/s; server {:>5.1} µs, redis cpu {:>5.1} µs, client cpu {:>5.1} µs)",
            best[i],
            1e6 / best[i],
            accounts[i].0,
            accounts[i].1,
            accounts[i].2
        ));
    }
    line.push_str(&format!(" | idem/floor {:.2}x", idem / best[0]));
    if sides.len() == 3 {
        line.push_str(&format!(" | idem/peer {:.2}x", idem / best[1]));
    }
    println!("{line}");
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let ops = common::ops(20_000);
    let url = std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = redis::Client::open(url.as_str()).unwrap();
        let conn: MultiplexedConnection = client.get_multiplexed_async_connection().await.unwrap();
        let mut admin: MultiplexedConnection =
            client.get_multiplexed_async_connection().await.unwrap();
        let store = RedisStore::connect(&url)
            .await
            .unwrap()
            .with_prefix("idem-bench:");
        let svc = Arc::new(Svc {
            store: store.clone(),
        });
        let store_api = Arc::new(store.clone());
        let cached = Arc::new(Svc {
            store: ReplayCache::new(store, 10_000),
        });
        svc.call(u64::MAX).await.unwrap();
        cached.call(u64::MAX).await.unwrap();
        cached.call(u64::MAX).await.unwrap();
        let mut c = conn.clone();
        let _: () = redis::cmd("SET")
            .arg("idem-floor:replayed")
            .arg(r#"{"ok":1}"#)
            .query_async(&mut c)
            .await
            .unwrap();

        // The peer, as its documentation sets it up; keys of the same length
        // as idem's digests; a response of the same size as idem's outcome.
        let peer = Arc::new(
            ValkeyStore::with_prefix(client.clone(), Some("idem-peer"))
                .await
                .unwrap(),
        );
        let fingerprint = DefaultFingerprintStrategy.compute("bench", b"");
        let ttl = Duration::from_secs(3600);
        let response = CachedResponse {
            status_code: 200,
            metadata: Metadata::default(),
            body: bytes::Bytes::from_static(br#"{"ok":1}"#),
        };
        let replayed = IdempotencyKey::new(format!("{:064x}", u64::MAX)).unwrap();
        {
            let entry = IdempotencyEntry::new(fingerprint, ttl);
            if let InsertResult::Claimed { fencing_token } =
                peer.try_insert(&replayed, entry.clone()).await.unwrap()
            {
                peer.complete(&replayed, entry.complete(response.clone()), fencing_token)
                    .await
                    .unwrap();
            }
        }
        println!("{ops} calls per figure (x4 for replays); best of 5 rounds\n");

        for tasks in [1, 64] {
            let c = conn.clone();
            let floor = op(move |_| {
                let mut c = c.clone();
                async move {
                    let _: Option<String> = redis::cmd("GET")
                        .arg("idem-floor:replayed")
                        .query_async(&mut c)
                        .await
                        .unwrap();
                }
            });
            let (p, key) = (peer.clone(), replayed.clone());
            let peer_replay = op(move |_| {
                let (p, key) = (p.clone(), key.clone());
                async move {
                    match p
                        .try_insert(&key, IdempotencyEntry::new(fingerprint, ttl))
                        .await
                        .unwrap()
                    {
                        InsertResult::Exists(ExistingEntry::Completed(entry)) => {
                            std::hint::black_box(entry.into_response());
                        }
                        other => panic!("the peer did not replay: {other:?}"),
                    }
                }
            });
            let s = svc.clone();
            let idem = op(move |_| {
                let s = s.clone();
                async move {
                    s.call(u64::MAX).await.unwrap();
                }
            });
            figure(
                &mut admin,
                &format!("replay, {tasks} task(s)"),
                ops * 4,
                tasks,
                &[
                    ("floor", floor.clone()),
                    ("peer", peer_replay.clone()),
                    ("idem", idem),
                ],
            )
            .await;

            // The same replay through idem's store API alone (no key
            // derivation, no decoding), as the peer is driven.
            let (st, key) = (store_api.clone(), Key::derive("bench", &u64::MAX).unwrap());
            let idem_store = op(move |_| {
                let (st, key) = (st.clone(), key.clone());
                async move {
                    let claim = st
                        .claim(ClaimRequest {
                            key: key.as_str(),
                            fingerprint: None,
                            lease: Duration::from_secs(30),
                        })
                        .await
                        .unwrap();
                    assert!(matches!(claim, Claim::Completed { .. }), "{claim:?}");
                    std::hint::black_box(claim);
                }
            });
            figure(
                &mut admin,
                &format!("replay (store API), {tasks} task(s)"),
                ops * 4,
                tasks,
                &[
                    ("floor", floor.clone()),
                    ("peer", peer_replay),
                    ("idem", idem_store),
                ],
            )
            .await;

            let s = cached.clone();
            let idem = op(move |_| {
                let s = s.clone();
                async move {
                    s.call(u64::MAX).await.unwrap();
                }
            });
            figure(
                &mut admin,
                &format!("cached replay, {tasks} task(s)"),
                ops * 4,
                tasks,
                &[("floor", floor), ("idem", idem)],
            )
            .await;

            let c = conn.clone();
            let floor = op(move |id: u64| {
                let mut c = c.clone();
                async move {
                    let key = format!("idem-floor:{id:064x}");
                    let _: Option<String> = redis::cmd("SET")
                        .arg(&key)
                        .arg("p")
                        .arg("NX")
                        .arg("PX")
                        .arg(30_000)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                    let _: () = redis::cmd("SET")
                        .arg(&key)
                        .arg(r#"{"ok":1}"#)
                        .arg("PX")
                        .arg(60_000)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                }
            });
            let (p, response) = (peer.clone(), response.clone());
            let peer_fresh = op(move |id: u64| {
                let (p, response) = (p.clone(), response.clone());
                async move {
                    let key = IdempotencyKey::new(format!("{id:064x}")).unwrap();
                    let entry = IdempotencyEntry::new(fingerprint, ttl);
                    match p.try_insert(&key, entry.clone()).await.unwrap() {
                        InsertResult::Claimed { fencing_token } => p
                            .complete(&key, entry.complete(response), fencing_token)
                            .await
                            .unwrap(),
                        other => panic!("the peer did not claim a new key: {other:?}"),
                    }
                }
            });
            let s = svc.clone();
            let idem = op(move |id: u64| {
                let s = s.clone();
                async move {
                    s.call(id).await.unwrap();
                }
            });
            figure(
                &mut admin,
                &format!("fresh, {tasks} task(s)"),
                ops,
                tasks,
                &[("floor", floor), ("peer", peer_fresh), ("idem", idem)],
            )
            .await;
        }
    });
}
