//! [`SqliteStore`]: records in an embedded SQLite database, the example
//! service's default, with completion inside the caller's transaction.
//!
//! One `INSERT … ON CONFLICT DO UPDATE … WHERE … RETURNING` statement decides
//! every claim atomically: a key that is absent, expired, released or whose
//! lease lapsed is taken over with a new token. Only when a live record holds
//! the key does a second statement read it (to replay it or report it in
//! progress); the claim never rewrites a live record, so a replay costs no
//! write. Time is SQLite's clock (`julianday('now')`), in milliseconds.
//!
//! Fencing tokens increase per key and never repeat: a new token is the larger
//! of the previous token + 1 and `clock_ms × 2^20 + salt` (the salt counts up
//! from a random start, so keys claimed in the same millisecond differ too),
//! and a released record stays as a tombstone (keeping its token) until it is
//! purged, at least 100 ms after it expired. Only a wall clock stepping back by
//! more than that, between a record's purge and the next claim of its key,
//! could reuse a token.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow,
};
use sqlx::{AssertSqlSafe, Row, Sqlite, Transaction};

use super::sql::{self, ClaimRow, Ready};
use super::{Claim, ClaimRequest, FencingToken, TransactionalStore};
use crate::error::Error;
use crate::key::Digest;

/// The database clock in milliseconds since the Unix epoch.
const NOW: &str = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";

/// Idempotency records in SQLite (WAL mode, 5 s busy timeout).
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_runtime::Error> {
/// let store = idem_runtime::SqliteStore::connect("sqlite://orders.db").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    sql: Arc<Statements>,
    ready: Ready,
    open: Arc<OpenClaims>,
}

/// Keys claimed inside transactions of this process that have not yet
/// committed or rolled back.
///
/// SQLite lets one transaction write at a time, so a duplicate's claim would
/// block on an open `tx =` claim until its commit. A rejecting duplicate is
/// answered from here at once instead; each connection's commit and rollback
/// hooks clear its keys. An entry keeps the claim's fingerprint and lease, so a
/// duplicate with another fingerprint is told the key was reused, and one
/// that waits backs off for the lease actually left. An entry also lapses with the claim's lease, in case a
/// connection is closed with its transaction open (SQLite then rolls back
/// without calling the hook). A duplicate in another process still waits on
/// the database lock, up to the busy timeout.
#[derive(Default)]
struct OpenClaims(Mutex<OpenInner>);

#[derive(Default)]
struct OpenInner {
    by_connection: HashMap<usize, Vec<String>>,
    keys: HashMap<String, Open>,
}

/// An open claim's connection, fingerprint and lease end.
struct Open {
    connection: usize,
    /// `None` once the claim was released inside its transaction: until the
    /// release commits, duplicates are told it is in progress, never reused.
    fingerprint: Option<Digest>,
    until: tokio::time::Instant,
}

impl OpenClaims {
    /// The decision for a duplicate of an open claim, if `request` is one.
    /// A claim on the connection that holds it (`connection`) goes to the
    /// database, which shows that transaction its own writes.
    fn decide(&self, request: &ClaimRequest<'_>, connection: Option<usize>) -> Option<Claim> {
        let mut inner = self.lock();
        let open = inner.keys.get(request.key)?;
        let now = tokio::time::Instant::now();
        if open.until <= now {
            inner.keys.remove(request.key);
            return None;
        }
        if connection == Some(open.connection) {
            return None;
        }
        if let (Some(held), Some(given)) = (&open.fingerprint, request.fingerprint) {
            if held != given {
                return Some(Claim::FingerprintMismatch);
            }
        }
        Some(Claim::InProgress {
            lease_remaining: open.until - now,
        })
    }

    fn add(&self, connection: usize, request: &ClaimRequest<'_>) {
        let mut inner = self.lock();
        let now = tokio::time::Instant::now();
        let until = now
            .checked_add(request.lease)
            .unwrap_or(now + super::MAX_DURATION);
        let open = Open {
            connection,
            fingerprint: request.fingerprint.copied(),
            until,
        };
        let key = request.key;
        inner.keys.insert(key.to_owned(), open);
        inner
            .by_connection
            .entry(connection)
            .or_default()
            .push(key.to_owned());
    }

    /// The claim was released inside its still-open transaction.
    fn released(&self, key: &str) {
        if let Some(open) = self.lock().keys.get_mut(key) {
            open.fingerprint = None;
        }
    }

    fn end(&self, connection: usize) {
        let mut inner = self.lock();
        if let Some(keys) = inner.by_connection.remove(&connection) {
            for key in keys {
                inner.keys.remove(&key);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpenInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("table", &self.sql.table)
            .finish_non_exhaustive()
    }
}

struct Statements {
    table: String,
    migrate: Vec<String>,
    claim: Arc<str>,
    read: Arc<str>,
    complete: Arc<str>,
    renew: Arc<str>,
    release: Arc<str>,
    get: Arc<str>,
    purge: Arc<str>,
    record_step: Arc<str>,
    steps: Arc<str>,
    steps_held: Arc<str>,
    /// Whether the table has the step columns (added to older tables).
    has_steps: String,
    add_steps: Vec<String>,
}

impl Statements {
    fn new(t: &str) -> Result<Self, Error> {
        sql::validate_table(t)?;
        // The claim writes only when it takes the key: a live record is left
        // untouched (SQLite would otherwise rewrite the row and its index on every
        // replay), and a second statement reads it.
        let claim = format!(
            "INSERT INTO {t} (key, state, token, fingerprint, outcome, expires_at, took_over, created_at, updated_at)
             VALUES (?1, 'processing', {NOW} * 1048576 + ?4, ?2, NULL, {NOW} + ?3, 0, {NOW}, {NOW})
             ON CONFLICT (key) DO UPDATE SET
                 token = max(token + 1, excluded.token),
                 took_over = (state = 'processing' OR coalesce(steps_until, 0) > excluded.created_at),
                 state = 'processing', fingerprint = excluded.fingerprint, outcome = NULL,
                 expires_at = excluded.expires_at, updated_at = excluded.updated_at,
                 steps = CASE WHEN steps_until > excluded.created_at THEN steps END,
                 steps_until = CASE WHEN steps_until > excluded.created_at THEN steps_until END
             WHERE (state = 'released' OR expires_at <= excluded.created_at)
               AND NOT (coalesce(steps_until, 0) > excluded.created_at
                        AND fingerprint IS NOT NULL AND excluded.fingerprint IS NOT NULL
                        AND fingerprint <> excluded.fingerprint)
             RETURNING token, took_over"
        );
        let read = format!(
            "SELECT state, token, fingerprint, outcome, expires_at - {NOW},
                    coalesce(steps_until, 0) > {NOW}
               FROM {t} WHERE key = ?1"
        );
        Ok(Statements {
            table: t.to_owned(),
            migrate: vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {t} (
                        key         TEXT NOT NULL PRIMARY KEY,
                        state       TEXT NOT NULL CHECK (state IN ('processing', 'completed', 'released')),
                        token       INTEGER NOT NULL,
                        fingerprint BLOB,
                        outcome     TEXT,
                        expires_at  INTEGER NOT NULL,
                        took_over   INTEGER NOT NULL DEFAULT 0,
                        created_at  INTEGER NOT NULL,
                        updated_at  INTEGER NOT NULL,
                        steps       TEXT,
                        steps_until INTEGER
                    ) WITHOUT ROWID"
                ),
                format!("CREATE INDEX IF NOT EXISTS {t}_expires_at ON {t} (expires_at)"),
            ],
            claim: claim.into(),
            read: read.into(),
            complete: format!(
                "UPDATE {t} SET state = 'completed', outcome = ?3, expires_at = {NOW} + ?4, updated_at = {NOW},
                        steps = NULL, steps_until = NULL
                  WHERE key = ?1 AND token = ?2 AND state = 'processing'"
            )
            .into(),
            renew: format!(
                "UPDATE {t} SET expires_at = {NOW} + ?3, updated_at = {NOW}
                  WHERE key = ?1 AND token = ?2 AND state = 'processing'"
            )
            .into(),
            release: format!(
                "UPDATE {t} SET state = 'released', outcome = NULL, expires_at = {NOW}, updated_at = {NOW}
                  WHERE key = ?1 AND token = ?2 AND state = 'processing' RETURNING 1"
            )
            .into(),
            get: format!(
                "SELECT state, token, fingerprint, outcome, max(expires_at - {NOW}, 0) FROM {t}
                  WHERE key = ?1 AND (state = 'processing' OR (state = 'completed' AND expires_at > {NOW}))"
            )
            .into(),
            // A record that keeps steps stays until they are kept no longer.
            purge: format!(
                "DELETE FROM {t} WHERE key IN (
                    SELECT key FROM {t} WHERE expires_at <= {NOW} - 100
                       AND coalesce(steps_until, 0) <= {NOW}
                     ORDER BY expires_at LIMIT ?1)"
            )
            .into(),
            // ?3 the position, ?4 the id, ?5 the value, ?6 how long to keep (ms).
            record_step: format!(
                "UPDATE {t} SET steps = json_set(coalesce(steps, '{{}}'), '$.\"' || ?3 || '\"', json_array(?4, ?5)),
                        steps_until = max(coalesce(steps_until, 0), {NOW} + ?6), updated_at = {NOW}
                  WHERE key = ?1 AND token = ?2 AND state = 'processing'"
            )
            .into(),
            steps: format!(
                "SELECT steps FROM {t}
                  WHERE key = ?1 AND state <> 'completed' AND steps_until > {NOW}"
            )
            .into(),
            steps_held: format!(
                "SELECT CASE WHEN steps_until > {NOW} THEN steps END FROM {t}
                  WHERE key = ?1 AND token = ?2 AND state = 'processing'"
            )
            .into(),
            has_steps: format!("SELECT count(*) FROM pragma_table_info('{t}') WHERE name = 'steps_until'"),
            add_steps: vec![
                format!("ALTER TABLE {t} ADD COLUMN steps TEXT"),
                format!("ALTER TABLE {t} ADD COLUMN steps_until INTEGER"),
            ],
        })
    }
}

fn q(sql: &Arc<str>) -> sqlx::query::Query<'static, Sqlite, sqlx::sqlite::SqliteArguments> {
    sqlx::query(AssertSqlSafe(Arc::clone(sql)))
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://orders.db`,
    /// `sqlite::memory:`) in WAL mode with a 5 s busy timeout, and creates the schema.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(Error::store)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        // An in-memory database exists once per connection: keep one.
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let pool = SqlitePoolOptions::new()
            .max_connections(if in_memory { 1 } else { 8 })
            .connect_with(options)
            .await
            .map_err(Error::store)?;
        let store = Self::from_pool(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// A store on an existing pool, in table `idem_records`. The schema is
    /// created on first use (or call [`migrate`](Self::migrate)).
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self::with_table(pool, sql::DEFAULT_TABLE).expect("the default table name is valid")
    }

    /// A store on an existing pool, in table `table` (letters, digits, `_`).
    pub fn with_table(pool: SqlitePool, table: &str) -> Result<Self, Error> {
        Ok(SqliteStore {
            pool,
            sql: Arc::new(Statements::new(table)?),
            ready: Ready::default(),
            open: Arc::default(),
        })
    }

    /// Creates the table and its index if they do not exist.
    pub async fn migrate(&self) -> Result<(), Error> {
        let sql = self.sql.clone();
        let pool = self.pool.clone();
        self.ready
            .get(|| async move {
                // Already set up (the table, with the step columns): nothing to
                // write, so no write lock to wait for behind busy writers.
                let ready: i64 = sqlx::query_scalar(AssertSqlSafe(sql.has_steps.as_str()))
                    .fetch_one(&pool)
                    .await
                    .map_err(sql::db_error)?;
                if ready > 0 {
                    return Ok(());
                }
                // Immediate: take the write lock first. A deferred transaction
                // that reads and then writes fails at once (busy) when another
                // process opening the same file migrated meanwhile.
                let mut tx = pool
                    .begin_with("BEGIN IMMEDIATE")
                    .await
                    .map_err(sql::db_error)?;
                for statement in &sql.migrate {
                    sqlx::query(AssertSqlSafe(statement.as_str()))
                        .execute(&mut *tx)
                        .await
                        .map_err(sql::db_error)?;
                }
                // Tables made before steps existed get their columns.
                let has_steps: i64 = sqlx::query_scalar(AssertSqlSafe(sql.has_steps.as_str()))
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(sql::db_error)?;
                if has_steps == 0 {
                    for statement in &sql.add_steps {
                        match sqlx::query(AssertSqlSafe(statement.as_str()))
                            .execute(&mut *tx)
                            .await
                        {
                            // Another process added it meanwhile.
                            Err(err) if err.to_string().contains("duplicate column") => {}
                            done => {
                                done.map_err(sql::db_error)?;
                            }
                        }
                    }
                }
                tx.commit().await.map_err(sql::db_error)
            })
            .await
    }

    /// `in_transaction` changes nothing here: SQLite's write lock already
    /// serialises claims; see [`OpenClaims`] for duplicates of an open one.
    async fn claim_on(
        &self,
        conn: &mut SqliteConnection,
        request: ClaimRequest<'_>,
        _in_transaction: bool,
    ) -> Result<Claim, Error> {
        self.claim_with(conn, request, None).await
    }

    /// A claim on `conn`; `connection` names it when it holds open claims.
    async fn claim_with(
        &self,
        conn: &mut SqliteConnection,
        request: ClaimRequest<'_>,
        connection: Option<usize>,
    ) -> Result<Claim, Error> {
        if let Some(duplicate) = self.open.decide(&request, connection) {
            return Ok(duplicate);
        }
        // The insert decides atomically whether this call takes the key. When a
        // live record holds it, the read that follows sees that record, or (if it
        // ended in between) nothing live, and the claim is simply tried again.
        for _ in 0..16 {
            let acquired = q(&self.sql.claim)
                .bind(request.key.to_owned())
                .bind(request.fingerprint.map(|d| d.as_bytes().to_vec()))
                .bind(sql::millis(request.lease))
                .bind(token_salt())
                .fetch_optional(&mut *conn)
                .await
                .map_err(sql::db_error)?;
            if let Some(row) = acquired {
                return Ok(Claim::Acquired {
                    token: FencingToken(row.try_get::<i64, _>(0).map_err(sql::db_error)? as u64),
                    took_over: row.try_get(1).map_err(sql::db_error)?,
                });
            }
            let row = q(&self.sql.read)
                .bind(request.key.to_owned())
                .fetch_optional(&mut *conn)
                .await
                .map_err(sql::db_error)?;
            if let Some(row) = row {
                let kept: bool = row.try_get(5).map_err(sql::db_error)?;
                let row = read_row(&row)?;
                if row.state != "released" && row.remaining_ms > 0 {
                    return row.decide(request.fingerprint);
                }
                // Kept steps belong to the request that recorded them.
                if kept && row.fingerprint_differs(request.fingerprint) {
                    return Ok(Claim::FingerprintMismatch);
                }
            }
        }
        Err(Error::store(
            "the claim kept racing with concurrent writers; try again",
        ))
    }

    /// A claim inside the caller's transaction; until it commits or rolls
    /// back, duplicates in this process are answered from memory.
    async fn claim_in_transaction(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        request: ClaimRequest<'_>,
    ) -> Result<Claim, Error> {
        let connection = {
            let mut handle = tx.lock_handle().await.map_err(Error::store)?;
            handle.as_raw_handle().as_ptr() as usize
        };
        let claim = self.claim_with(tx, request, Some(connection)).await?;
        if let Claim::Acquired { .. } = claim {
            let mut handle = tx.lock_handle().await.map_err(Error::store)?;
            self.open.add(connection, &request);
            let open = Arc::clone(&self.open);
            handle.set_commit_hook(move || {
                open.end(connection);
                true
            });
            let open = Arc::clone(&self.open);
            handle.set_rollback_hook(move || open.end(connection));
        }
        Ok(claim)
    }
}

fn read_row(row: &SqliteRow) -> Result<ClaimRow, Error> {
    Ok(ClaimRow {
        acquired: false,
        took_over: false,
        state: row.try_get(0).map_err(sql::db_error)?,
        token: row.try_get(1).map_err(sql::db_error)?,
        fingerprint: row.try_get(2).map_err(sql::db_error)?,
        outcome: row.try_get(3).map_err(sql::db_error)?,
        remaining_ms: row.try_get(4).map_err(sql::db_error)?,
    })
}

/// The low 20 bits of a SQLite fencing token: distinct for 2^20 consecutive
/// claims in this process (a counter from a random start), so two keys
/// claimed in the same millisecond get different tokens.
fn token_salt() -> i64 {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static START: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let start = *START.get_or_init(|| std::hash::RandomState::new().hash_one(std::process::id()));
    (start.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed)) & 0xF_FFFF) as i64
}

#[async_trait::async_trait]
impl sql::PhaseStore<Sqlite> for SqliteStore {
    async fn begin_phase(&self) -> Result<Transaction<'static, Sqlite>, Error> {
        self.migrate().await?;
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(sql::db_error)
    }
}

// `impl Store for SqliteStore`, `pool`, `table`, `spawn_reaper`: generated by
// `sql_store!` (store/sql.rs), shared with the other SQL store.
sql::sql_store!(SqliteStore, Sqlite, SqlitePool, SqliteConnection, "sqlite");

#[async_trait::async_trait]
impl<'c> TransactionalStore<Transaction<'c, Sqlite>> for SqliteStore {
    async fn claim_in(
        &self,
        tx: &mut Transaction<'c, Sqlite>,
        request: ClaimRequest<'_>,
    ) -> Result<Claim, Error> {
        self.migrate().await?;
        self.claim_in_transaction(tx, request).await
    }

    async fn complete_in(
        &self,
        tx: &mut Transaction<'c, Sqlite>,
        key: &str,
        token: FencingToken,
        outcome: &[u8],
        ttl: std::time::Duration,
    ) -> Result<(), Error> {
        self.complete_on(tx, key, token, outcome, ttl).await
    }

    async fn release_in(
        &self,
        tx: &mut Transaction<'c, Sqlite>,
        key: &str,
        token: FencingToken,
    ) -> Result<(), Error> {
        self.release_on(tx, key, token).await?;
        self.open.released(key);
        Ok(())
    }

    async fn record_step_in(
        &self,
        tx: &mut Transaction<'c, Sqlite>,
        key: &str,
        token: FencingToken,
        step: &super::Step,
        keep: std::time::Duration,
    ) -> Result<(), Error> {
        self.record_step_on(tx, key, token, step, keep).await
    }
}

mod admin;
