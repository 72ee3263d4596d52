//! What the store benchmarks share: the measured service, unique ids, and the
//! floor-versus-idem comparison that prints one line per figure.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use idem_runtime::{idempotent, Store};

/// The benchmarks' error type: any idem error is a bug in the benchmark.
#[derive(Debug)]
pub struct BenchError;

impl From<idem_runtime::Error> for BenchError {
    fn from(e: idem_runtime::Error) -> Self {
        panic!("idem error in benchmark: {e}")
    }
}

/// A service whose one method does nothing but go through `#[idempotent]`.
pub struct Svc<S> {
    pub store: S,
}

impl<S: Store> Svc<S> {
    #[idempotent(key = id, name = "bench", ttl = "1h", store = self.store)]
    pub async fn call(&self, id: u64) -> Result<u64, BenchError> {
        Ok(id)
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// An id no earlier run used (records of a previous run live for an hour).
pub fn fresh_id() -> u64 {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    start + NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Runs `ops` calls of `op` from `tasks` concurrent tasks; returns µs per call
/// (wall time over all tasks, so the inverse of throughput).
pub async fn measure<F, Fut>(ops: usize, tasks: usize, op: F) -> f64
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
    started.elapsed().as_secs_f64() * 1e6 / (ops / tasks * tasks) as f64
}

/// Prints floor and idem for one figure: the best of five rounds each, rounds
/// alternating so drift hits both. `IDEM_BENCH_ONLY=text` skips figures whose
/// label does not contain `text`.
#[allow(dead_code)] // benches/redis.rs prints three sides with its own `figure`
pub async fn compare<A, AF, B, BF>(label: &str, ops: usize, tasks: usize, floor: A, idem: B)
where
    A: Fn(u64) -> AF + Clone + Send + Sync + 'static,
    AF: Future<Output = ()> + Send,
    B: Fn(u64) -> BF + Clone + Send + Sync + 'static,
    BF: Future<Output = ()> + Send,
{
    if std::env::var("IDEM_BENCH_ONLY").is_ok_and(|only| !label.contains(&only)) {
        return;
    }
    measure(ops / 4, tasks, floor.clone()).await; // warm up
    measure(ops / 4, tasks, idem.clone()).await;
    let (mut f, mut i) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        f = f.min(measure(ops, tasks, floor.clone()).await);
        i = i.min(measure(ops, tasks, idem.clone()).await);
    }
    println!(
        "{label:<36} floor {f:>8.1} µs ({:>9.0}/s)   idem {i:>8.1} µs ({:>9.0}/s)   ratio {:.2}x",
        1e6 / f,
        1e6 / i,
        i / f
    );
}

/// The number of calls per figure: `IDEM_BENCH_OPS`, or `default`.
pub fn ops(default: usize) -> usize {
    std::env::var("IDEM_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
