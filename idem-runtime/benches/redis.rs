//! What `RedisStore` costs next to the raw floor, measured in one run against
//! the same server.
//!
//! - `fresh`: a call through `#[idempotent]` with a new key (claim script, run,
//!   complete script) vs the floor of two plain round trips, `SET key v NX PX`
//!   then `SET key v PX`;
//! - `replay`: a call whose key is completed vs one plain `GET`;
//! - `cached replay`: the same replay through a [`ReplayCache`], served from
//!   process memory.
//!
//! Each sequentially and from 64 concurrent tasks (one multiplexed connection).
//! Run: `cargo bench -p idem-runtime --bench redis --features redis`
//! (`IDEM_REDIS_URL` overrides the server; `IDEM_BENCH_OPS` the calls per figure;
//! `IDEM_BENCH_ONLY=replay` runs only the lines whose label contains it).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use idem_runtime::{idempotent, RedisStore, ReplayCache, Store};
use redis::aio::MultiplexedConnection;

#[derive(Debug)]
struct BenchError;

impl From<idem_runtime::Error> for BenchError {
    fn from(e: idem_runtime::Error) -> Self {
        panic!("idem error in benchmark: {e}")
    }
}

struct Svc<S> {
    store: S,
}

impl<S: Store> Svc<S> {
    #[idempotent(key = id, name = "bench", ttl = "1h", store = self.store)]
    async fn call(&self, id: u64) -> Result<u64, BenchError> {
        Ok(id)
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// An id no earlier run used (records from a previous run live for an hour).
fn fresh_id() -> u64 {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    start + NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Runs `ops` calls of `op` from `tasks` concurrent tasks; returns calls per second.
async fn measure<F, Fut>(ops: usize, tasks: usize, op: F) -> f64
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let op = op.clone();
            tokio::spawn(async move {
                for _ in 0..ops / tasks {
                    op(fresh_id()).await;
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    (ops / tasks * tasks) as f64 / started.elapsed().as_secs_f64()
}

/// Best of five rounds each, alternating floor and idem.
async fn compare<A, AF, B, BF>(label: &str, ops: usize, tasks: usize, floor: A, idem: B)
where
    A: Fn(u64) -> AF + Clone + Send + Sync + 'static,
    AF: Future<Output = ()> + Send,
    B: Fn(u64) -> BF + Clone + Send + Sync + 'static,
    BF: Future<Output = ()> + Send,
{
    if let Ok(only) = std::env::var("IDEM_BENCH_ONLY") {
        if !label.contains(&only) {
            return;
        }
    }
    measure(ops / 4, tasks, floor.clone()).await;
    measure(ops / 4, tasks, idem.clone()).await;
    let (mut f, mut i) = (0f64, 0f64);
    for _ in 0..5 {
        f = f.max(measure(ops, tasks, floor.clone()).await);
        i = i.max(measure(ops, tasks, idem.clone()).await);
    }
    println!(
        "{label:<30} floor {f:>9.0}/s ({:>7.1} µs)   idem {i:>9.0}/s ({:>7.1} µs)   cost ratio {:.2}x",
        1e6 / f,
        1e6 / i,
        f / i
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let ops: usize = std::env::var("IDEM_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let url = std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = redis::Client::open(url.as_str()).unwrap();
        let conn: MultiplexedConnection = client.get_multiplexed_async_connection().await.unwrap();
        let store = RedisStore::connect(&url)
            .await
            .unwrap()
            .with_prefix("idem-bench:");
        let svc = Arc::new(Svc {
            store: store.clone(),
        });
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
        println!("{ops} calls per figure (x4 for replays); best of 5 rounds\n");

        for tasks in [1, 64] {
            let c = conn.clone();
            let floor = move |_| {
                let mut c = c.clone();
                async move {
                    let _: Option<String> = redis::cmd("GET")
                        .arg("idem-floor:replayed")
                        .query_async(&mut c)
                        .await
                        .unwrap();
                }
            };
            let s = svc.clone();
            let idem = move |_| {
                let s = s.clone();
                async move {
                    s.call(u64::MAX).await.unwrap();
                }
            };
            compare(
                &format!("replay, {tasks} task(s)"),
                ops * 4,
                tasks,
                floor.clone(),
                idem.clone(),
            )
            .await;

            // For reading the figure above: a script round trip that only GETs.
            let c = conn.clone();
            let get_script = Arc::new(redis::Script::new("return redis.call('GET', KEYS[1])"));
            let script_floor = move |_| {
                let mut c = c.clone();
                let script = get_script.clone();
                async move {
                    let _: Option<String> = script
                        .key("idem-floor:replayed")
                        .invoke_async(&mut c)
                        .await
                        .unwrap();
                }
            };
            compare(
                "  (replay vs GET-only script)",
                ops * 4,
                tasks,
                script_floor,
                idem,
            )
            .await;

            let s = cached.clone();
            let idem = move |_| {
                let s = s.clone();
                async move {
                    s.call(u64::MAX).await.unwrap();
                }
            };
            compare(
                &format!("cached replay, {tasks} task(s)"),
                ops * 4,
                tasks,
                floor,
                idem,
            )
            .await;

            let c = conn.clone();
            let floor = move |id: u64| {
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
            };
            let s = svc.clone();
            let idem = move |id: u64| {
                let s = s.clone();
                async move {
                    s.call(id).await.unwrap();
                }
            };
            compare(&format!("fresh, {tasks} task(s)"), ops, tasks, floor, idem).await;
        }
    });
}
