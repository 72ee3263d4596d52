//! What the SQL stores cost next to the raw floor, measured in one run.
//!
//! For each store (an SQLite file, PostgreSQL on 127.0.0.1) and each load
//! (sequential; 16 concurrent tasks):
//! - `fresh`: a call through `#[idempotent]` with a new key (claim, run,
//!   complete) vs the floor, the same number of plain sqlx statements of the
//!   same shape run directly: an `INSERT … ON CONFLICT … RETURNING` and an
//!   `UPDATE … WHERE key AND token`;
//! - `replay`: a call whose key is completed vs the same statements run
//!   plainly: PostgreSQL's claim answers a live record from a lock-free read in
//!   one statement (floors: one plain upsert of the same shape meeting the
//!   record, and, stricter, one `SELECT` of the row by key); SQLite's claim
//!   leaves a live record untouched and reads it with a second statement (floor:
//!   the no-op upsert and a `SELECT` by key).
//!
//! Run: `cargo bench -p idem-runtime --bench sql --features sqlite,postgres`
//! (`IDEM_POSTGRES_URL` overrides the database; `IDEM_BENCH_OPS` the calls per figure).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_runtime::{idempotent, PostgresStore, SqliteStore, Store};
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};

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

fn fresh_id() -> u64 {
    NEXT.fetch_add(1, Ordering::Relaxed)
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
}

/// Runs `ops` calls of `op`, from `tasks` concurrent tasks; returns µs per call.
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
    started.elapsed().as_secs_f64() * 1e6 / (ops / tasks * tasks) as f64
}

/// The best of five rounds, alternating floor and idem so drift hits both.
async fn compare<A, AF, B, BF>(label: &str, ops: usize, tasks: usize, floor: A, idem: B)
where
    A: Fn(u64) -> AF + Clone + Send + Sync + 'static,
    AF: Future<Output = ()> + Send,
    B: Fn(u64) -> BF + Clone + Send + Sync + 'static,
    BF: Future<Output = ()> + Send,
{
    measure(ops / 4, tasks, floor.clone()).await; // warm up
    measure(ops / 4, tasks, idem.clone()).await;
    let (mut f, mut i) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        f = f.min(measure(ops, tasks, floor.clone()).await);
        i = i.min(measure(ops, tasks, idem.clone()).await);
    }
    let per_sec = |us: f64| tasks as f64 * 1e6 / us / tasks as f64;
    println!(
        "{label:<34} floor {f:>8.1} µs ({:>6.0}/s)   idem {i:>8.1} µs ({:>6.0}/s)   ratio {:.2}x",
        per_sec(f),
        per_sec(i),
        i / f
    );
}

async fn sqlite(ops: usize) {
    let dir = std::env::temp_dir().join(format!("idem-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}/bench.db", dir.display());
    let store = SqliteStore::connect(&url).await.unwrap();
    let pool: SqlitePool = store.pool().clone();
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS floor (key TEXT NOT NULL PRIMARY KEY, state TEXT NOT NULL, token INTEGER NOT NULL,
         fingerprint BLOB, outcome TEXT, expires_at INTEGER NOT NULL) WITHOUT ROWID",
    )
    .execute(&pool)
    .await
    .unwrap();
    let claim = "INSERT INTO floor (key, state, token, fingerprint, outcome, expires_at)
                 VALUES (?1, 'processing', ?2, NULL, NULL, ?2 + 30000)
                 ON CONFLICT (key) DO UPDATE SET token = excluded.token WHERE floor.expires_at <= ?2
                 RETURNING token, state, outcome";
    let complete =
        "UPDATE floor SET state = 'completed', outcome = ?3 WHERE key = ?1 AND token = ?2";
    let read = "SELECT state, token, fingerprint, outcome, expires_at FROM floor WHERE key = ?1";
    let svc = Arc::new(Svc { store });
    sqlx::query(claim)
        .bind("replayed")
        .bind(0i64)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(complete)
        .bind("replayed")
        .bind(0i64)
        .bind("{\"ok\":1}")
        .execute(&pool)
        .await
        .unwrap();
    svc.call(u64::MAX).await.unwrap();

    // Replays first, while both tables are small and alike; then fresh calls.
    for tasks in [1, 16] {
        let p = pool.clone();
        let floor = move |_| {
            let p = p.clone();
            async move {
                let mut conn = p.acquire().await.unwrap();
                sqlx::query(claim)
                    .bind("replayed")
                    .bind(0i64)
                    .fetch_all(&mut *conn)
                    .await
                    .unwrap();
                sqlx::query(read)
                    .bind("replayed")
                    .fetch_all(&mut *conn)
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
            &format!("sqlite replay, {tasks} task(s)"),
            ops * 4,
            tasks,
            floor,
            idem,
        )
        .await;
    }
    for tasks in [1, 16] {
        let p = pool.clone();
        let floor = move |id: u64| {
            let p = p.clone();
            async move {
                let key = format!("bench:{id:064x}");
                sqlx::query(claim)
                    .bind(key.clone())
                    .bind(id as i64 >> 1)
                    .fetch_all(&p)
                    .await
                    .unwrap();
                sqlx::query(complete)
                    .bind(key)
                    .bind(id as i64 >> 1)
                    .bind("{\"ok\":1}")
                    .execute(&p)
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
        compare(
            &format!("sqlite fresh, {tasks} task(s)"),
            ops,
            tasks,
            floor,
            idem,
        )
        .await;
    }
    let _ = std::fs::remove_dir_all(dir);
}

async fn postgres(url: &str, ops: usize) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(url)
        .await
        .unwrap();
    let store = PostgresStore::from_pool(pool.clone());
    store.migrate().await.unwrap();
    let pool: PgPool = pool;
    for ddl in [
        "CREATE TABLE IF NOT EXISTS idem_bench_floor (key TEXT PRIMARY KEY, state TEXT NOT NULL, token BIGINT NOT NULL,
         fingerprint BYTEA, outcome TEXT, expires_at TIMESTAMPTZ NOT NULL)",
        "CREATE SEQUENCE IF NOT EXISTS idem_bench_floor_seq",
        "TRUNCATE idem_bench_floor",
    ] {
        sqlx::query(AssertSqlSafe(ddl)).execute(&pool).await.unwrap();
    }
    let claim = "INSERT INTO idem_bench_floor AS r (key, state, token, fingerprint, outcome, expires_at)
                 VALUES ($1, 'processing', nextval('idem_bench_floor_seq'), NULL, NULL, clock_timestamp() + interval '30 seconds')
                 ON CONFLICT (key) DO UPDATE SET token = EXCLUDED.token WHERE r.expires_at <= clock_timestamp()
                 RETURNING token, state, outcome";
    let complete = "UPDATE idem_bench_floor SET state = 'completed', outcome = $3,
                    expires_at = clock_timestamp() + interval '1 hour' WHERE key = $1 AND token = $2";
    let read = "SELECT state, token, fingerprint, outcome, expires_at FROM idem_bench_floor WHERE key = $1";
    let svc = Arc::new(Svc { store });
    sqlx::query(claim)
        .bind("replayed")
        .execute(&pool)
        .await
        .unwrap();
    svc.call(u64::MAX).await.unwrap();
    // Replays first, while both tables are small and alike; then fresh calls.
    for tasks in [1, 16] {
        let p = pool.clone();
        let floor = move |_| {
            let p = p.clone();
            async move {
                sqlx::query(read)
                    .bind("replayed")
                    .fetch_optional(&p)
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
            &format!("postgres replay, {tasks} task(s)"),
            ops * 4,
            tasks,
            floor,
            idem.clone(),
        )
        .await;

        // The same number of statements of the same shape as the claim: one
        // plain upsert that meets the live record (it row-locks it, which the
        // store's lock-free read avoids).
        let p = pool.clone();
        let upsert = move |_| {
            let p = p.clone();
            async move {
                sqlx::query(claim)
                    .bind("replayed")
                    .fetch_optional(&p)
                    .await
                    .unwrap();
            }
        };
        compare(
            &format!("postgres replay vs upsert, {tasks}"),
            ops * 4,
            tasks,
            upsert,
            idem,
        )
        .await;
    }
    for tasks in [1, 16] {
        let p = pool.clone();
        let floor = move |id: u64| {
            let p = p.clone();
            async move {
                let key = format!("bench:{id:064x}");
                let row: (i64, String, Option<String>) = sqlx::query_as(claim)
                    .bind(key.clone())
                    .fetch_one(&p)
                    .await
                    .unwrap();
                sqlx::query(complete)
                    .bind(key)
                    .bind(row.0)
                    .bind("{\"ok\":1}")
                    .execute(&p)
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
        compare(
            &format!("postgres fresh, {tasks} task(s)"),
            ops,
            tasks,
            floor,
            idem,
        )
        .await;
    }
    sqlx::query("DELETE FROM idem_records WHERE key LIKE 'bench:%'")
        .execute(&pool)
        .await
        .unwrap();
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing and
    // should only check that this builds and starts.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let ops: usize = std::env::var("IDEM_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(800);
    let url = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!(
            "{ops} calls per fresh figure, {} per replay figure; best of 5 rounds\n",
            ops * 4
        );
        sqlite(ops).await;
        postgres(&url, ops).await;
    });
    let _ = Duration::ZERO;
}
