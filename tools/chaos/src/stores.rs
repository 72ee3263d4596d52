//! The stores a run can use, named on the command line, and the tables the
//! checker reads.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{MemoryStore, PostgresStore, RedisStore, SqliteStore, Store};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::SqlitePool;

/// The idempotency records' table in the SQL stores.
pub const TABLE: &str = "idem_chaos";
/// The Redis key prefix.
pub const PREFIX: &str = "idem-chaos:";

/// Where a service keeps its idempotency records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// In the service process.
    Memory,
    /// A SQLite file shared by the service processes.
    Sqlite(String),
    /// PostgreSQL.
    Postgres(String),
    /// One Redis server.
    Redis(String),
    /// A Redis Cluster, through these nodes.
    Cluster(Vec<String>),
}

impl Spec {
    /// Parses `memory`, `sqlite://FILE`, `postgres://…`, `redis://…` or
    /// `cluster:redis://h:p,redis://h:p`.
    pub fn parse(s: &str) -> Option<Spec> {
        Some(if s == "memory" {
            Spec::Memory
        } else if s.starts_with("sqlite:") {
            Spec::Sqlite(s.to_owned())
        } else if s.starts_with("postgres://") {
            Spec::Postgres(s.to_owned())
        } else if s.starts_with("redis://") {
            Spec::Redis(s.to_owned())
        } else if let Some(nodes) = s.strip_prefix("cluster:") {
            Spec::Cluster(nodes.split(',').map(str::to_owned).collect())
        } else {
            return None;
        })
    }

    /// The form `parse` reads.
    pub fn to_arg(&self) -> String {
        match self {
            Spec::Memory => "memory".into(),
            Spec::Sqlite(u) | Spec::Postgres(u) | Spec::Redis(u) => u.clone(),
            Spec::Cluster(nodes) => format!("cluster:{}", nodes.join(",")),
        }
    }
}

/// A SQLite pool as the service and the checker open it: WAL, a busy timeout.
pub async fn sqlite_pool(url: &str) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(5));
    SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
}

/// The SQLite store of a run.
pub async fn sqlite(url: &str) -> Result<SqliteStore, Box<dyn std::error::Error>> {
    let store = SqliteStore::with_table(sqlite_pool(url).await?, TABLE)?;
    store.migrate().await?;
    Ok(store)
}

/// The PostgreSQL store of a run. Connections are made lazily, so a service
/// started while the database (or the proxy in front of it) is down comes up
/// anyway and serves errors until it is back.
pub async fn postgres(url: &str) -> Result<PostgresStore, Box<dyn std::error::Error>> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy(url)?;
    Ok(PostgresStore::with_table(pool, TABLE)?)
}

/// How long a completion waits for replicas with `--replica-ack`.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// Opens the store `spec` names; a Redis store waits for `replica_ack`
/// replicas to acknowledge each completion.
pub async fn open(
    spec: &Spec,
    replica_ack: u32,
) -> Result<Arc<dyn Store>, Box<dyn std::error::Error>> {
    Ok(match spec {
        Spec::Memory => MemoryStore::new().handle(),
        Spec::Sqlite(url) => sqlite(url).await?.handle(),
        Spec::Postgres(url) => postgres(url).await?.handle(),
        Spec::Redis(url) => RedisStore::connect(url)
            .await?
            .with_prefix(PREFIX)
            .with_replica_ack(replica_ack, ACK_TIMEOUT)
            .handle(),
        Spec::Cluster(nodes) => RedisStore::connect_cluster(nodes)
            .await?
            .with_prefix(PREFIX)
            .with_replica_ack(replica_ack, ACK_TIMEOUT)
            .handle(),
    })
}
