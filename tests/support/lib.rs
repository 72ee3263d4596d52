//! Fixtures for idem's workspace tests: order services on PostgreSQL and
//! SQLite whose `place` writes an order row and its idempotency record in one
//! transaction (`tx =`), and one with records in Redis whose orders go to
//! PostgreSQL; shared by the in-process tests in `tests/` and the
//! `idem-test-worker` binary they start as separate OS processes.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_runtime::{
    async_trait, idempotent, Claim, ClaimRequest, Error, FencingToken, MemoryStore, PostgresStore,
    Record, RedisStore, SqliteStore, Step, Store,
};
use sqlx::{AssertSqlSafe, Postgres, Sqlite, Transaction};

pub mod effects;
pub mod hooked;
pub mod kafka;
pub mod logs;
pub mod nats;
pub mod steps;

/// The PostgreSQL the tests use: `IDEM_POSTGRES_URL`, or the local server.
pub fn postgres_url() -> String {
    std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The Redis the tests use: `IDEM_REDIS_URL`, or the local server.
pub fn redis_url() -> String {
    std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A name no other test, in this process or another, uses (for keys and
/// tables): the process id, the time, and a count within the process.
pub fn unique(prefix: &str) -> String {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}_{}_{nanos}_{n}", std::process::id())
}

/// What the order services return.
#[derive(Debug)]
pub enum AppError {
    /// idem refused or failed.
    Idem(idem_runtime::Error),
    /// The business write failed.
    Db(sqlx::Error),
    /// The business logic refused.
    Refused,
}

impl From<idem_runtime::Error> for AppError {
    fn from(e: idem_runtime::Error) -> Self {
        AppError::Idem(e)
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        AppError::Db(e)
    }
}

impl AppError {
    /// Whether idem reported the key in progress.
    pub fn is_in_progress(&self) -> bool {
        matches!(self, AppError::Idem(idem_runtime::Error::InProgress { .. }))
    }
}

/// Orders in PostgreSQL; `place` inserts the order and counts the execution
/// inside the caller's transaction.
pub struct PgOrders {
    /// The idempotency store (same database).
    pub store: PostgresStore,
    /// The table orders go to.
    pub orders: String,
}

impl PgOrders {
    /// Connects and creates the `orders` table (and the records table).
    pub async fn setup(orders: &str) -> Self {
        let store = PostgresStore::connect(&postgres_url())
            .await
            .expect("postgres");
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {orders} (id BIGSERIAL PRIMARY KEY, order_ref TEXT NOT NULL, by_pid BIGINT NOT NULL)"
        )))
        .execute(store.pool())
        .await
        .expect("orders table");
        PgOrders {
            store,
            orders: orders.to_owned(),
        }
    }
}

/// Orders in SQLite, the same shape as [`PgOrders`].
pub struct SqliteOrders {
    /// The idempotency store (same database file).
    pub store: SqliteStore,
    /// The table orders go to.
    pub orders: String,
}

impl SqliteOrders {
    /// Opens the database at `url` and creates the `orders` table.
    pub async fn setup(url: &str, orders: &str) -> Self {
        let store = SqliteStore::connect(url).await.expect("sqlite");
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {orders} (id INTEGER PRIMARY KEY AUTOINCREMENT, order_ref TEXT NOT NULL, by_pid INTEGER NOT NULL)"
        )))
        .execute(store.pool())
        .await
        .expect("orders table");
        SqliteOrders {
            store,
            orders: orders.to_owned(),
        }
    }
}

/// The calls both transactional fixtures share, for database `$db` with its
/// namespace and its flavour of SQL for the insert and the count.
macro_rules! order_calls {
    ($fixture:ident, $db:ident, $name:literal, $insert:literal, $count:literal) => {
        impl $fixture {
            /// Places an order once per `order_ref`; duplicates wait for the first.
            #[idempotent(key = order_ref, name = $name, store = self.store, tx = tx, in_progress = wait("60s"))]
            pub async fn place(
                &self,
                tx: &mut Transaction<'_, $db>,
                order_ref: &str,
            ) -> Result<i64, AppError> {
                self.insert(tx, order_ref).await
            }

            /// Places an order once per `order_ref`; duplicates are refused at once.
            #[idempotent(key = order_ref, name = $name, store = self.store, tx = tx)]
            pub async fn place_or_reject(
                &self,
                tx: &mut Transaction<'_, $db>,
                order_ref: &str,
            ) -> Result<i64, AppError> {
                self.insert(tx, order_ref).await
            }

            /// Like `place`, but the business logic refuses (after writing).
            #[idempotent(key = order_ref, name = $name, store = self.store, tx = tx)]
            pub async fn place_refused(
                &self,
                tx: &mut Transaction<'_, $db>,
                order_ref: &str,
            ) -> Result<i64, AppError> {
                self.insert(tx, order_ref).await?;
                Err(AppError::Refused)
            }

            async fn insert(
                &self,
                tx: &mut Transaction<'_, $db>,
                order_ref: &str,
            ) -> Result<i64, AppError> {
                let id = sqlx::query_scalar(AssertSqlSafe(format!($insert, self.orders)))
                    .bind(order_ref.to_owned())
                    .bind(i64::from(std::process::id()))
                    .fetch_one(&mut **tx)
                    .await?;
                Ok(id)
            }

            /// How many orders exist for `order_ref`.
            pub async fn count(&self, order_ref: &str) -> i64 {
                sqlx::query_scalar(AssertSqlSafe(format!($count, self.orders)))
                    .bind(order_ref.to_owned())
                    .fetch_one(self.store.pool())
                    .await
                    .expect("count")
            }
        }
    };
}

order_calls!(
    PgOrders,
    Postgres,
    "pg-place",
    "INSERT INTO {} (order_ref, by_pid) VALUES ($1, $2) RETURNING id",
    "SELECT count(*) FROM {} WHERE order_ref = $1"
);
order_calls!(
    SqliteOrders,
    Sqlite,
    "sqlite-place",
    "INSERT INTO {} (order_ref, by_pid) VALUES (?1, ?2) RETURNING id",
    "SELECT count(*) FROM {} WHERE order_ref = ?1"
);

/// Records in Redis, orders in PostgreSQL: each execution of `place` inserts
/// one order row, so the orders table counts executions.
pub struct RedisOrders {
    /// The idempotency store.
    pub store: RedisStore,
    /// Where orders go.
    pub pg: sqlx::PgPool,
    /// The table orders go to.
    pub orders: String,
}

impl RedisOrders {
    /// Connects both and creates the `orders` table.
    pub async fn setup(redis_url: &str, orders: &str) -> Self {
        let store = RedisStore::connect(redis_url).await.expect("redis");
        let pg = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&postgres_url())
            .await
            .expect("postgres");
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {orders} (id BIGSERIAL PRIMARY KEY, order_ref TEXT NOT NULL, by_pid INT NOT NULL)"
        )))
        .execute(&pg)
        .await
        .expect("orders table");
        RedisOrders {
            store,
            pg,
            orders: orders.to_owned(),
        }
    }

    /// Places an order once per `order_ref`; duplicates wait for the first.
    #[idempotent(key = order_ref, name = "redis-place", store = self.store, in_progress = wait("60s"))]
    pub async fn place(&self, order_ref: &str) -> Result<i64, AppError> {
        let id = sqlx::query_scalar(AssertSqlSafe(format!(
            "INSERT INTO {} (order_ref, by_pid) VALUES ($1, $2) RETURNING id",
            self.orders
        )))
        .bind(order_ref.to_owned())
        .bind(std::process::id() as i32)
        .fetch_one(&self.pg)
        .await?;
        Ok(id)
    }

    /// How many orders exist for `order_ref`.
    pub async fn count(&self, order_ref: &str) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {} WHERE order_ref = $1",
            self.orders
        )))
        .bind(order_ref.to_owned())
        .fetch_one(&self.pg)
        .await
        .expect("count")
    }
}

/// A real `MemoryStore` behind a switch that makes chosen operations fail,
/// as a store that went away (or a partitioned connection) would. Shared by
/// the fault, lease and replay-cache tests.
#[derive(Clone, Default)]
pub struct FaultyStore {
    /// The real store underneath.
    pub inner: MemoryStore,
    /// How many claims reached the store.
    pub claims: Arc<AtomicUsize>,
    /// Claims fail while set.
    pub claims_fail: Arc<AtomicBool>,
    /// Completions fail while set.
    pub completions_fail: Arc<AtomicBool>,
    /// Lease renewals fail while set (a partition of the renewing connection).
    pub renewals_fail: Arc<AtomicBool>,
    /// Lease renewals panic while set (a bug in a store's `renew`).
    pub renewals_panic: Arc<AtomicBool>,
    /// How many lease renewals reached the store (failed ones too).
    pub renewals: Arc<AtomicUsize>,
    /// How many of them the store refused with `LeaseLost` (another caller holds the key).
    pub renewals_refused: Arc<AtomicUsize>,
    /// Completions store bytes that decode to nothing while set (a corrupt record).
    pub completions_corrupt: Arc<AtomicBool>,
    /// Set: the store answers a caller only once its outcome is recorded
    /// (`Store::answers_before_recorded` is false), as a `RedisStore` waiting
    /// for replicas does.
    pub strict: Arc<AtomicBool>,
    /// Step records fail while set (before they reach the store).
    pub steps_fail: Arc<AtomicBool>,
    /// How many step records reached the store (failed ones too).
    pub steps_recorded: Arc<AtomicUsize>,
}

fn down() -> Error {
    Error::store(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        "store unreachable",
    ))
}

#[async_trait]
impl Store for FaultyStore {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim, Error> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        if self.claims_fail.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner.claim(request).await
    }
    async fn complete(
        &self,
        key: &str,
        token: FencingToken,
        outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        if self.completions_fail.load(Ordering::SeqCst) {
            return Err(down());
        }
        if self.completions_corrupt.load(Ordering::SeqCst) {
            return self.inner.complete(key, token, b"\x00corrupt", ttl).await;
        }
        self.inner.complete(key, token, outcome, ttl).await
    }
    async fn release(&self, key: &str, token: FencingToken) -> Result<(), Error> {
        self.inner.release(key, token).await
    }
    async fn renew(&self, key: &str, token: FencingToken, lease: Duration) -> Result<(), Error> {
        self.renewals.fetch_add(1, Ordering::SeqCst);
        if self.renewals_panic.load(Ordering::SeqCst) {
            panic!("renew panicked (a test's store)");
        }
        if self.renewals_fail.load(Ordering::SeqCst) {
            return Err(down());
        }
        let renewed = self.inner.renew(key, token, lease).await;
        if matches!(renewed, Err(Error::LeaseLost)) {
            self.renewals_refused.fetch_add(1, Ordering::SeqCst);
        }
        renewed
    }
    async fn get(&self, key: &str) -> Result<Option<Record>, Error> {
        self.inner.get(key).await
    }
    async fn purge_expired(&self, batch: usize) -> Result<u64, Error> {
        self.inner.purge_expired(batch).await
    }
    async fn record_step(
        &self,
        key: &str,
        token: FencingToken,
        step: &Step,
        keep: Duration,
    ) -> Result<(), Error> {
        self.steps_recorded.fetch_add(1, Ordering::SeqCst);
        if self.steps_fail.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner.record_step(key, token, step, keep).await
    }
    async fn steps(&self, key: &str, held: Option<FencingToken>) -> Result<Vec<Step>, Error> {
        self.inner.steps(key, held).await
    }
    fn keeps_steps(&self) -> bool {
        self.inner.keeps_steps()
    }
    fn handle(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }
    fn answers_before_recorded(&self) -> bool {
        !self.strict.load(Ordering::SeqCst)
    }
}
