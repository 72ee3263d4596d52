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

use std::sync::Arc;

use idem_runtime::{PostgresStore, SqliteStore};
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};

mod common;

use common::{compare, Svc};

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
    let ops = common::ops(800);
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
}
