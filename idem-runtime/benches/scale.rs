//! How each store's cost grows with the records it holds: latency must stay
//! flat, and space per record is counted, not assumed (issue 15).
//!
//! For each store, records are written through the store itself (claim, then
//! complete, as `#[idempotent]` writes them: a key of the macro's shape, a
//! 72-byte outcome, no fingerprint) from 32 tasks, up to each level (0, 100k,
//! 1M by default). At each level:
//!
//! - `fresh`: claim + complete of a new key, and `replay`: a claim of a random
//!   record already written, one call at a time; p50 and p99 in µs over 2,000
//!   calls each;
//! - bytes per record, and that over the record's payload (key + outcome):
//!   memory — the process's resident memory grown since the store was empty;
//!   SQLite — the database file's pages (`page_count × page_size`, after a WAL
//!   checkpoint); PostgreSQL — `pg_total_relation_size` of the store's table
//!   (table, indexes, TOAST) as written, and again after `VACUUM`; Redis —
//!   `used_memory` grown since the database was empty (its own database
//!   number, 9, flushed first).
//!
//! Run: `cargo bench -p idem-runtime --bench scale --features sqlite,postgres,redis`
//! (`IDEM_SCALE_LEVELS=0,100000,1000000`, `IDEM_SCALE_STORES=memory,sqlite,postgres,redis`
//! choose what runs; `IDEM_POSTGRES_URL` and `IDEM_REDIS_URL` override the servers;
//! the Redis URL must name a database nothing else uses, it is flushed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_runtime::{
    Claim, ClaimRequest, Key, MemoryStore, PostgresStore, RedisStore, SqliteStore, Store,
};
use sqlx::AssertSqlSafe;

const OUTCOME: &[u8] =
    br#"{"ok":{"id":123456,"status":"created","total_cents":4999,"currency":"EUR"}}"#;
const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(24 * 3600);
const SAMPLES: usize = 2_000;
const FILLERS: u64 = 32;

/// The storage key of record `i`: the macro's shape (`namespace:digest`).
fn key(i: u64) -> Key {
    Key::derive("orders::create", &i).expect("a key")
}

/// Claims and completes record `i`.
async fn write(store: &dyn Store, i: u64) {
    let key = key(i);
    let request = ClaimRequest {
        key: key.as_str(),
        fingerprint: None,
        lease: LEASE,
    };
    match store.claim(request).await.expect("a claim") {
        Claim::Acquired { token, .. } => store
            .complete(key.as_str(), token, OUTCOME, TTL)
            .await
            .expect("a completion"),
        other => panic!("record {i} existed: {other:?}"),
    }
}

/// Writes records `from..to` from [`FILLERS`] tasks.
async fn fill(store: &Arc<dyn Store>, from: u64, to: u64) {
    let tasks: Vec<_> = (0..FILLERS)
        .map(|t| {
            let store = Arc::clone(store);
            tokio::spawn(async move {
                let mut i = from + t;
                while i < to {
                    write(&*store, i).await;
                    i += FILLERS;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// p50 and p99 of `samples`, in µs.
fn percentiles(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    (at(0.50), at(0.99))
}

/// Fresh calls on new keys (`next..`) and replays of random records below
/// `filled`: (fresh p50, p99, replay p50, p99) in µs.
async fn latency(store: &dyn Store, filled: u64, next: u64) -> (f64, f64, f64, f64) {
    let mut fresh = Vec::with_capacity(SAMPLES);
    for i in next..next + SAMPLES as u64 {
        let started = Instant::now();
        write(store, i).await;
        fresh.push(started.elapsed().as_secs_f64() * 1e6);
    }
    // Replays of records spread over the whole store (a small LCG: no
    // dependency, the same sequence every run), or of the fresh ones at 0.
    let (range, base) = if filled == 0 {
        (SAMPLES as u64, next)
    } else {
        (filled, 0)
    };
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut replay = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let key = key(base + (x >> 33) % range);
        let request = ClaimRequest {
            key: key.as_str(),
            fingerprint: None,
            lease: LEASE,
        };
        let started = Instant::now();
        let claim = store.claim(request).await.expect("a claim");
        replay.push(started.elapsed().as_secs_f64() * 1e6);
        assert!(matches!(claim, Claim::Completed { .. }), "{claim:?}");
    }
    let (f50, f99) = percentiles(fresh);
    let (r50, r99) = percentiles(replay);
    (f50, f99, r50, r99)
}

/// One store under test: how to count its bytes.
#[allow(clippy::large_enum_variant)]
enum Space {
    Memory {
        resident_before: u64,
    },
    Sqlite {
        pool: sqlx::SqlitePool,
    },
    Postgres {
        pool: sqlx::PgPool,
        table: String,
    },
    Redis {
        admin: redis::aio::MultiplexedConnection,
        used_before: u64,
    },
}

/// The process's resident memory in bytes.
fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn redis_used(admin: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(admin)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

impl Space {
    /// Bytes the store holds now: as written, and (PostgreSQL) after `VACUUM`.
    async fn bytes(&mut self) -> (u64, Option<u64>) {
        match self {
            Space::Memory { resident_before } => {
                (resident().saturating_sub(*resident_before), None)
            }
            Space::Sqlite { pool } => {
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(&*pool)
                    .await
                    .unwrap();
                let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
                    .fetch_one(&*pool)
                    .await
                    .unwrap();
                let size: i64 = sqlx::query_scalar("PRAGMA page_size")
                    .fetch_one(&*pool)
                    .await
                    .unwrap();
                ((pages * size) as u64, None)
            }
            Space::Postgres { pool, table } => {
                let size = |pool: sqlx::PgPool, table: String| async move {
                    let bytes: i64 =
                        sqlx::query_scalar("SELECT pg_total_relation_size($1::regclass)")
                            .bind(table)
                            .fetch_one(&pool)
                            .await
                            .unwrap();
                    bytes as u64
                };
                let written = size(pool.clone(), table.clone()).await;
                sqlx::query(AssertSqlSafe(format!("VACUUM {table}")))
                    .execute(&*pool)
                    .await
                    .unwrap();
                (written, Some(size(pool.clone(), table.clone()).await))
            }
            Space::Redis { admin, used_before } => {
                let used = redis_used(admin).await;
                (used.saturating_sub(*used_before), None)
            }
        }
    }
}

async fn open(name: &str) -> (Arc<dyn Store>, Space) {
    match name {
        "memory" => {
            let resident_before = resident();
            (
                Arc::new(MemoryStore::new()),
                Space::Memory { resident_before },
            )
        }
        "sqlite" => {
            let dir = std::env::temp_dir().join(format!("idem-scale-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let url = format!("sqlite://{}/scale.db", dir.display());
            let store = SqliteStore::connect(&url).await.unwrap();
            let pool = store.pool().clone();
            (Arc::new(store), Space::Sqlite { pool })
        }
        "postgres" => {
            let url = std::env::var("IDEM_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            let table = "idem_bench_scale".to_owned();
            let store = PostgresStore::with_table(pool.clone(), &table).unwrap();
            store.migrate().await.unwrap();
            sqlx::query(AssertSqlSafe(format!("TRUNCATE {table}")))
                .execute(&pool)
                .await
                .unwrap();
            (Arc::new(store), Space::Postgres { pool, table })
        }
        "redis" => {
            let url = std::env::var("IDEM_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379/9".into());
            let client = redis::Client::open(url.as_str()).unwrap();
            let mut admin = client.get_multiplexed_async_connection().await.unwrap();
            let _: () = redis::cmd("FLUSHDB").query_async(&mut admin).await.unwrap();
            let used_before = redis_used(&mut admin).await;
            let store = RedisStore::connect(&url).await.unwrap();
            (Arc::new(store), Space::Redis { admin, used_before })
        }
        other => panic!("unknown store {other}"),
    }
}

fn main() {
    let levels: Vec<u64> = std::env::var("IDEM_SCALE_LEVELS")
        .unwrap_or_else(|_| "0,100000,1000000".into())
        .split(',')
        .map(|l| l.trim().parse().expect("a record count"))
        .collect();
    let stores = std::env::var("IDEM_SCALE_STORES")
        .unwrap_or_else(|_| "memory,sqlite,postgres,redis".into());
    let payload = (key(0).as_str().len() + OUTCOME.len()) as f64;
    println!(
        "key {} bytes, outcome {} bytes: payload {payload} bytes per record",
        key(0).as_str().len(),
        OUTCOME.len()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for name in stores.split(',').map(str::trim) {
            let (store, mut space) = open(name).await;
            let mut filled = 0;
            // Keys for the latency samples, above every level.
            let mut next = 1 << 40;
            for &level in &levels {
                let started = Instant::now();
                fill(&store, filled, level.max(filled)).await;
                let fill_s = started.elapsed().as_secs_f64();
                filled = level.max(filled);
                let (f50, f99, r50, r99) = latency(&*store, filled, next).await;
                next += SAMPLES as u64;
                let records = filled + (next - (1 << 40));
                let (bytes, vacuumed) = space.bytes().await;
                let per = bytes as f64 / records as f64;
                let vacuumed = vacuumed.map_or(String::new(), |v| {
                    let per = v as f64 / records as f64;
                    format!(", after VACUUM {per:>5.0} B ({:.2}x)", per / payload)
                });
                println!(
                    "{name:<8} {filled:>8} records (filled in {fill_s:>5.1} s) | fresh p50 {f50:>6.1} µs p99 {f99:>7.1} µs | replay p50 {r50:>6.1} µs p99 {r99:>7.1} µs | {per:>5.0} B per record ({:.2}x payload){vacuumed}",
                    per / payload
                );
            }
        }
    });
}
