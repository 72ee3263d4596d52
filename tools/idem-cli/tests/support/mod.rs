//! The servers the tests use, and names no other test run uses.

#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

/// The PostgreSQL the tests use: `IDEM_POSTGRES_URL` (as in the workspace's
/// other tests), or the local server.
pub fn pg_url() -> String {
    std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The Redis the tests use: `IDEM_REDIS_URL`, or the local server.
pub fn redis_url() -> String {
    std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The cluster `scripts/redis-cluster.sh` starts: `IDEM_REDIS_CLUSTER`
/// (comma-separated `redis://` URLs), or its default ports.
pub fn cluster_nodes() -> Vec<String> {
    std::env::var("IDEM_REDIS_CLUSTER")
        .unwrap_or_else(|_| {
            "redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103".into()
        })
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// The cluster as the CLI's `--store` names it.
pub fn cluster_url() -> String {
    let hosts: Vec<String> = cluster_nodes()
        .iter()
        .map(|n| n.trim_start_matches("redis://").to_owned())
        .collect();
    format!("redis-cluster://{}", hosts.join(","))
}

/// A name no other test (or run) uses: letters, digits, `_`.
pub fn unique(what: &str) -> String {
    use std::hash::{BuildHasher, RandomState};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let salt = RandomState::new().hash_one(nanos) & 0xffff_ffff;
    format!("{what}_{nanos:x}_{salt:x}")
}

/// A PostgreSQL store on a table of its own (named after `what`), its pool
/// and the table's name; [`drop_pg_table`] removes it.
pub async fn pg_table(what: &str) -> (idem_runtime::PostgresStore, sqlx::PgPool, String) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&pg_url())
        .await
        .unwrap();
    let table = unique(what);
    let store = idem_runtime::PostgresStore::with_table(pool.clone(), &table).unwrap();
    store.migrate().await.unwrap();
    (store, pool, table)
}

/// Drops a table [`pg_table`] made, and its token sequence.
pub async fn drop_pg_table(pool: &sqlx::PgPool, table: &str) {
    let drop = format!("DROP TABLE {table}; DROP SEQUENCE IF EXISTS {table}_token_seq");
    sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
        .execute(pool)
        .await
        .unwrap();
}
