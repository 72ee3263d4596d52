//! Side effects counted in PostgreSQL: one row per processed message, written
//! in the same transaction as the message's idempotency record
//! (`begin_in_tx` … `finish_in_tx`). Shared by the NATS and Kafka consumers of
//! the tests, in-process and in `idem-test-worker`.

use std::ops::ControlFlow;
use std::time::Duration;

use idem_runtime::message::{Deduplicator, MessageId, Outcome, ProcessError};
use idem_runtime::{Error, PostgresStore};
use sqlx::AssertSqlSafe;

/// Deliveries by outcome.
#[derive(Debug, Default)]
pub struct Tally {
    /// Processed now.
    pub processed: std::sync::atomic::AtomicUsize,
    /// Acknowledged as duplicates.
    pub duplicates: std::sync::atomic::AtomicUsize,
    /// Not done: another delivery was in progress.
    pub in_progress: std::sync::atomic::AtomicUsize,
    /// Not done: the handler failed (or the store).
    pub failed: std::sync::atomic::AtomicUsize,
}

impl Tally {
    /// Counts `out`.
    pub fn record<T>(&self, out: &Result<Outcome<T>, ProcessError<Error>>) {
        let counter = match out {
            Ok(Outcome::Processed(_)) => &self.processed,
            Ok(Outcome::Duplicate) => &self.duplicates,
            Ok(_) => &self.in_progress,
            Err(_) => &self.failed,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Connects to PostgreSQL and creates the effects table `table` (`msg_id`, `pid`).
pub async fn table(table: &str) -> PostgresStore {
    let store = PostgresStore::connect(&crate::postgres_url())
        .await
        .expect("connect to PostgreSQL");
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {table} (msg_id TEXT NOT NULL, pid BIGINT NOT NULL)"
    )))
    .execute(store.pool())
    .await
    .expect("create effects table");
    store
}

/// Processes message number `n` under `id`: its effect row and its record
/// commit together. On its `first` delivery it misbehaves on purpose:
/// `n % 10 == 3` fails, `n % 50 == 7` takes 1.5 s.
pub async fn apply(
    store: &PostgresStore,
    table: &str,
    dedup: &Deduplicator,
    id: &MessageId,
    n: u64,
    first: bool,
) -> Result<Outcome<()>, ProcessError<Error>> {
    let db = |e: sqlx::Error| ProcessError::Idempotency(Error::store(e));
    let mut tx = store.pool().begin().await.map_err(db)?;
    let claim = match dedup.begin_in_tx(store, &mut tx, id).await {
        ControlFlow::Continue(claim) => claim,
        ControlFlow::Break(done) => return done,
    };
    let result = async {
        if first && n % 10 == 3 {
            return Err(Error::store("a flaky handler failed on purpose"));
        }
        if first && n % 50 == 7 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {table} (msg_id, pid) VALUES ($1, $2)"
        )))
        .bind(id.to_string())
        .bind(i64::from(std::process::id()))
        .execute(&mut *tx)
        .await
        .map_err(Error::store)?;
        Ok(())
    }
    .await;
    let out = dedup.finish_in_tx(store, &mut tx, claim, result).await;
    if let Ok(Outcome::Processed(())) = out {
        tx.commit().await.map_err(db)?;
    }
    out
}

/// `(distinct messages with an effect, most effects of one message, effects)`.
pub async fn counts(store: &PostgresStore, table: &str) -> (i64, i64, i64) {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT count(DISTINCT msg_id), coalesce(max(c), 0), coalesce(sum(c), 0)::BIGINT
         FROM (SELECT msg_id, count(*) AS c FROM {table} GROUP BY msg_id) per"
    )))
    .fetch_one(store.pool())
    .await
    .expect("count effects")
}
