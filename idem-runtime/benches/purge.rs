//! What `PostgresStore::purge_expired(batch)` costs as the table grows: a
//! batch's cost must follow the batch, not the table.
//!
//! For tables of 100k and 1.1M records (bulk-loaded, 1 % expired), each batch
//! size (1k, 10k) purges until nothing is left and prints the milliseconds per
//! call; then, with only 8 expired records in the table but statistics from
//! when 1 % had expired, one call of 10k (a reaper's call on a clean table
//! between two autovacuum runs). Each figure is printed for the store's
//! statement and, on the same table, for the statement before issue 15
//! (`DELETE … WHERE key IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)`), so the
//! two are compared in one run.
//!
//! Run: `cargo bench -p idem-runtime --bench purge --features postgres`
//! (`IDEM_POSTGRES_URL` overrides the database).

use std::time::Instant;

use idem_runtime::{PostgresStore, Store};
use sqlx::{AssertSqlSafe, PgPool};

const TABLE: &str = "idem_bench_purge";

/// The statement `purge_expired` ran before issue 15.
fn old_purge() -> String {
    format!(
        "DELETE FROM {TABLE} WHERE key IN (
            SELECT key FROM {TABLE} WHERE expires_at <= now()
             ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
    )
}

/// Refills the table with `rows` records whose keys look like the macro's
/// (namespace and 64 hex digits), `expired_every`-th of them expired.
async fn fill(pool: &PgPool, rows: i64, expired_every: i64) {
    let sql = format!(
        "INSERT INTO {TABLE} (key, state, token, outcome, expires_at)
         SELECT 'bench::orders::create:' || md5(i::text) || md5((-i)::text), 'completed', i,
                '{{\"ok\":{{\"id\":' || i || ',\"status\":\"created\"}}}}',
                CASE WHEN i % $2 = 0 THEN now() - interval '1 hour' ELSE now() + interval '1 day' END
           FROM generate_series(1, $1) i"
    );
    sqlx::query(AssertSqlSafe(format!("TRUNCATE {TABLE}")))
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(AssertSqlSafe(sql))
        .bind(rows)
        .bind(expired_every)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(AssertSqlSafe(format!("VACUUM ANALYZE {TABLE}")))
        .execute(pool)
        .await
        .unwrap();
}

/// Marks every `every`-th record expired again (after a purge deleted them,
/// they are inserted back); `analyze`: refresh the planner's statistics
/// (else they still describe the table as the last `ANALYZE` saw it, as a
/// reaper meets them between autovacuum runs).
async fn expire_again(pool: &PgPool, rows: i64, every: i64, analyze: bool) {
    let sql = format!(
        "INSERT INTO {TABLE} (key, state, token, outcome, expires_at)
         SELECT 'bench::orders::create:' || md5(i::text) || md5((-i)::text), 'completed', i,
                '{{}}', now() - interval '1 hour'
           FROM generate_series($2, $1, $2) i
         ON CONFLICT (key) DO UPDATE SET expires_at = now() - interval '1 hour'"
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(rows)
        .bind(every)
        .execute(pool)
        .await
        .unwrap();
    if analyze {
        sqlx::query(AssertSqlSafe(format!("ANALYZE {TABLE}")))
            .execute(pool)
            .await
            .unwrap();
    }
}

/// Purges until a call deletes less than `batch`; returns (calls, rows, ms per call).
async fn drain(pool: &PgPool, store: &PostgresStore, batch: usize, old: bool) -> (usize, u64, f64) {
    let (mut calls, mut rows) = (0, 0);
    let started = Instant::now();
    loop {
        let deleted = if old {
            sqlx::query(AssertSqlSafe(old_purge()))
                .bind(batch as i64)
                .execute(pool)
                .await
                .unwrap()
                .rows_affected()
        } else {
            store.purge_expired(batch).await.unwrap()
        };
        calls += 1;
        rows += deleted;
        if deleted < batch as u64 {
            break;
        }
    }
    let ms = started.elapsed().as_secs_f64() * 1000.0 / calls as f64;
    (calls, rows, ms)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let url = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = PgPool::connect(&url).await.unwrap();
        let store = PostgresStore::with_table(pool.clone(), TABLE).unwrap();
        store.migrate().await.unwrap();
        println!("| records | expired | batch | statement | calls | deleted | ms per call |");
        println!("|---:|---:|---:|---|---:|---:|---:|");
        for rows in [100_000i64, 1_100_000] {
            fill(&pool, rows, 100).await;
            for batch in [1_000usize, 10_000] {
                for old in [true, false] {
                    expire_again(&pool, rows, 100, true).await;
                    let (calls, deleted, ms) = drain(&pool, &store, batch, old).await;
                    println!(
                        "| {rows} | {} | {batch} | {} | {calls} | {deleted} | {ms:.1} |",
                        rows / 100,
                        if old {
                            "before (key IN)"
                        } else {
                            "now (ctid = ANY)"
                        },
                    );
                }
            }
            // A reaper's call on a table with almost nothing to delete, the
            // statistics still from when 1 % had expired.
            let few = rows / 8;
            for old in [true, false] {
                expire_again(&pool, rows, 100, true).await;
                drain(&pool, &store, 100_000, false).await;
                expire_again(&pool, rows, few, false).await;
                let (calls, deleted, ms) = drain(&pool, &store, 10_000, old).await;
                println!(
                    "| {rows} | 8 | 10000 | {} | {calls} | {deleted} | {ms:.1} |",
                    if old {
                        "before (key IN)"
                    } else {
                        "now (ctid = ANY)"
                    },
                );
            }
        }
        sqlx::query(AssertSqlSafe(format!("DROP TABLE {TABLE}")))
            .execute(&pool)
            .await
            .unwrap();
    });
}
