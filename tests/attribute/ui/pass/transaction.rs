//! `tx = ident`: the claim and the completed record are written inside the
//! caller's transaction, next to the body's own writes.
use idem_runtime::{idempotent, SqliteStore};
use sqlx::{Sqlite, Transaction};

#[derive(Debug)]
pub enum AppError {
    Idem,
    Db,
}
impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError::Idem
    }
}
impl From<sqlx::Error> for AppError {
    fn from(_: sqlx::Error) -> Self {
        AppError::Db
    }
}

pub struct Ledger {
    store: SqliteStore,
}

impl Ledger {
    #[idempotent(key = entry, store = self.store, tx = tx)]
    async fn post(&self, tx: &mut Transaction<'_, Sqlite>, entry: String, cents: i64) -> Result<i64, AppError> {
        sqlx::query("INSERT INTO ledger (entry, cents) VALUES (?1, ?2)")
            .bind(entry)
            .bind(cents)
            .execute(&mut **tx)
            .await?;
        if cents < 0 {
            return Ok(0);
        }
        Ok(cents)
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let ledger = Ledger {
            store: SqliteStore::connect("sqlite::memory:").await.unwrap(),
        };
        sqlx::query("CREATE TABLE ledger (entry TEXT, cents INTEGER)")
            .execute(ledger.store.pool())
            .await
            .unwrap();
        for _ in 0..2 {
            let mut tx = ledger.store.pool().begin().await.unwrap();
            assert_eq!(ledger.post(&mut tx, "e1".into(), 5).await.unwrap(), 5);
            tx.commit().await.unwrap();
        }
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
            .fetch_one(ledger.store.pool())
            .await
            .unwrap();
        assert_eq!(rows, 1, "the second call was replayed");
    });
}
