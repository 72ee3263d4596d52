//! `#[idempotent]` in `#[async_trait]` code: `tx =` inside an async-trait impl,
//! a `?Send` trait, a default method in the trait itself, and `cache_errors`.
use idem_runtime::{async_trait, idempotent, MemoryStore, SqliteStore};
use sqlx::{Sqlite, Transaction};

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum AppError {
    #[serde(skip)]
    Idem,
    #[serde(skip)]
    Db,
    Declined(u64),
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

#[async_trait]
pub trait Posting: Send + Sync {
    async fn post(&self, tx: &mut Transaction<'_, Sqlite>, entry: String, cents: i64) -> Result<i64, AppError>;
}

pub struct Ledger {
    store: SqliteStore,
}

#[async_trait]
impl Posting for Ledger {
    #[idempotent(key = entry, store = self.store, tx = tx)]
    async fn post(&self, tx: &mut Transaction<'_, Sqlite>, entry: String, cents: i64) -> Result<i64, AppError> {
        sqlx::query("INSERT INTO ledger (entry, cents) VALUES (?1, ?2)")
            .bind(entry)
            .bind(cents)
            .execute(&mut **tx)
            .await?;
        Ok(cents)
    }
}

#[async_trait(?Send)]
pub trait Local {
    fn store(&self) -> &MemoryStore;
    fn runs(&self) -> &std::cell::Cell<u64>;

    // A default method, rewritten by async-trait in the trait itself.
    #[idempotent(key = id, store = self.store(), cache_errors)]
    async fn decline(&self, id: u64) -> Result<u64, AppError> {
        self.runs().set(self.runs().get() + 1);
        Err(AppError::Declined(id))
    }
}

pub struct Here {
    store: MemoryStore,
    runs: std::cell::Cell<u64>,
}

impl Local for Here {
    fn store(&self) -> &MemoryStore {
        &self.store
    }
    fn runs(&self) -> &std::cell::Cell<u64> {
        &self.runs
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
        let posting: &dyn Posting = &ledger;
        for _ in 0..2 {
            let mut tx = ledger.store.pool().begin().await.unwrap();
            assert_eq!(posting.post(&mut tx, "e1".into(), 5).await.unwrap(), 5);
            tx.commit().await.unwrap();
        }
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
            .fetch_one(ledger.store.pool())
            .await
            .unwrap();
        assert_eq!(rows, 1, "the second call was replayed");

        let here = Here {
            store: MemoryStore::new(),
            runs: std::cell::Cell::new(0),
        };
        assert_eq!(here.decline(4).await, Err(AppError::Declined(4)));
        assert_eq!(here.decline(4).await, Err(AppError::Declined(4)));
        assert_eq!(here.runs.get(), 1, "the cached error was replayed");
    });
}
