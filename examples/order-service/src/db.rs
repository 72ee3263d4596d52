//! Where orders, stock, charges and idempotency records live: one SQLite file
//! (the default) or one PostgreSQL database, and the schema in it.
//!
//! Ids are strings, as in the original service's API (`UserID string`,
//! `ProductID string`). A database made by an earlier version of this example
//! (numeric ids) is not rewritten: its three tables are renamed with a `_v1`
//! suffix, kept for whoever wants them, and new tables are made beside them.

use std::sync::Arc;

use idem_runtime::{PostgresStore, SqliteStore, Store};
use sqlx::{Executor, Postgres, Sqlite, Transaction};

use crate::OrderError;

/// Where orders and idempotency records live.
#[derive(Debug, Clone)]
pub enum Db {
    /// An SQLite file (the default) or in-memory database.
    Sqlite(SqliteStore),
    /// A PostgreSQL database.
    Postgres(PostgresStore),
}

const SQLITE_SCHEMA: [&str; 5] = [
    "CREATE TABLE IF NOT EXISTS orders (
        id INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL,
        product_id TEXT NOT NULL, quantity INTEGER NOT NULL,
        ship_to TEXT NOT NULL, total_cents INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS stock (product_id TEXT PRIMARY KEY, quantity INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS charges (
        id INTEGER PRIMARY KEY AUTOINCREMENT, provider_key TEXT NOT NULL UNIQUE,
        order_id INTEGER NOT NULL, amount_cents INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS shipments (
        id INTEGER PRIMARY KEY AUTOINCREMENT, order_id INTEGER NOT NULL, ship_to TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS emails (
        id INTEGER PRIMARY KEY AUTOINCREMENT, order_id INTEGER NOT NULL,
        recipient TEXT NOT NULL, subject TEXT NOT NULL)",
];

const POSTGRES_SCHEMA: [&str; 5] = [
    "CREATE TABLE IF NOT EXISTS orders (
        id BIGSERIAL PRIMARY KEY, user_id TEXT NOT NULL,
        product_id TEXT NOT NULL, quantity INT NOT NULL,
        ship_to TEXT NOT NULL, total_cents BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS stock (product_id TEXT PRIMARY KEY, quantity INT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS charges (
        id BIGSERIAL PRIMARY KEY, provider_key TEXT NOT NULL UNIQUE,
        order_id BIGINT NOT NULL, amount_cents BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS shipments (
        id BIGSERIAL PRIMARY KEY, order_id BIGINT NOT NULL, ship_to TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS emails (
        id BIGSERIAL PRIMARY KEY, order_id BIGINT NOT NULL,
        recipient TEXT NOT NULL, subject TEXT NOT NULL)",
];

/// The tables an earlier version made, renamed `<name>_v1` when found.
const TABLES: [&str; 3] = ["orders", "stock", "charges"];

impl Db {
    /// Opens `url`: `sqlite://orders.db`, `sqlite::memory:` or `postgres://...`,
    /// and creates the schema (records, orders, stock, charges).
    pub async fn open(url: &str) -> Result<Db, OrderError> {
        let db = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Db::Postgres(PostgresStore::connect(url).await?)
        } else {
            Db::Sqlite(SqliteStore::connect(url).await?)
        };
        db.migrate().await?;
        Ok(db)
    }

    /// The database's idempotency store, as a shared handle.
    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            Db::Sqlite(s) => s.handle(),
            Db::Postgres(s) => s.handle(),
        }
    }

    /// The database's idempotency store, for an operator's reads and fenced
    /// writes (what the `idem` CLI runs on).
    pub fn admin(&self) -> &dyn idem_runtime::Admin {
        match self {
            Db::Sqlite(s) => s,
            Db::Postgres(s) => s,
        }
    }

    /// Which database this is, for display.
    pub fn backend(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "SQLite",
            Db::Postgres(_) => "PostgreSQL",
        }
    }

    async fn migrate(&self) -> Result<(), OrderError> {
        match self {
            Db::Sqlite(s) => {
                // One writer at a time: servers starting together on one file
                // see the schema either before or after, never half-made.
                let mut tx = s.pool().begin_with("BEGIN IMMEDIATE").await?;
                // Either id column numeric: an earlier version's tables (all
                // three, or the first few it made before it stopped).
                let numeric: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM (
                        SELECT type FROM pragma_table_info('stock') WHERE name = 'product_id'
                        UNION ALL
                        SELECT type FROM pragma_table_info('orders') WHERE name = 'user_id'
                     ) WHERE upper(type) <> 'TEXT'",
                )
                .fetch_one(&mut *tx)
                .await?;
                if numeric > 0 {
                    rename_v1_sqlite(&mut tx).await?;
                }
                for ddl in SQLITE_SCHEMA {
                    tx.execute(ddl).await?;
                }
                tx.commit().await?;
            }
            Db::Postgres(s) => {
                let mut tx = s.pool().begin().await?;
                // Servers starting together on one database take turns.
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext('order-service schema'))")
                    .execute(&mut *tx)
                    .await?;
                let numeric: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM information_schema.columns
                     WHERE table_schema = current_schema() AND data_type <> 'text'
                       AND ((table_name = 'stock' AND column_name = 'product_id')
                         OR (table_name = 'orders' AND column_name = 'user_id'))",
                )
                .fetch_one(&mut *tx)
                .await?;
                if numeric > 0 {
                    rename_v1_postgres(&mut tx).await?;
                }
                for ddl in POSTGRES_SCHEMA {
                    tx.execute(ddl).await?;
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }
}

async fn rename_v1_sqlite(tx: &mut Transaction<'_, Sqlite>) -> Result<(), sqlx::Error> {
    for table in TABLES {
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")
                .bind(table)
                .fetch_optional(&mut **tx)
                .await?;
        if exists.is_some() {
            tracing::warn!(
                table,
                "numeric-id table of an earlier version kept as {table}_v1"
            );
            tx.execute(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE {table} RENAME TO {table}_v1"
            )))
            .await?;
        }
    }
    Ok(())
}

async fn rename_v1_postgres(tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
    tracing::warn!(
        "numeric-id tables of an earlier version kept as orders_v1, stock_v1, charges_v1"
    );
    for table in TABLES {
        tx.execute(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE IF EXISTS {table} RENAME TO {table}_v1"
        )))
        .await?;
    }
    Ok(())
}
