//! [`PostgresStore`]: records in PostgreSQL, with completion inside the caller's
//! transaction.
//!
//! One statement decides every claim: an `INSERT … ON CONFLICT … DO UPDATE …
//! WHERE expired` that takes the key over when it is absent, expired or lapsed,
//! joined with a read of the live record when it is not. Leases and expiry are
//! judged by the database clock (`clock_timestamp()`); fencing tokens come from
//! a sequence, so they increase and never repeat, even after a record is
//! released or purged.
//!
//! The statement first reads the record without locking: a live record is
//! answered from that read (replayed, or reported in progress), so concurrent
//! replays never wait on each other. Only a claim that may take the key tries a
//! transaction-scoped advisory lock on it: shared outside a transaction (brief,
//! and compatible with other claims, which the unique key then arbitrates),
//! exclusive inside the caller's transaction (`tx =`), where it is held until
//! commit or rollback. A duplicate of an uncommitted `tx =` claim therefore
//! learns at once that the key is in progress, instead of blocking on the
//! uncommitted row. The holder's lease and fingerprint are in that uncommitted
//! row, which no other transaction can read: the duplicate is told the key is
//! in progress for its own lease (so waiters back off as they do against any
//! running claim, and `reject` advertises that lease as `retry_after`), and a
//! different fingerprint is reported as [`Claim::FingerprintMismatch`] only
//! once the claim has committed. A record committed by a concurrent claim after the read
//! makes the statement return no row; it is then simply run again.

use std::sync::Arc;

use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Postgres, Row, Transaction};

use super::sql::{self, ClaimRow, Ready};
use super::{Claim, ClaimRequest, FencingToken, TransactionalStore};
use crate::error::Error;

/// Idempotency records in PostgreSQL.
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_runtime::Error> {
/// let store = idem_runtime::PostgresStore::connect("postgres://postgres@127.0.0.1/test").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    sql: Arc<Statements>,
    ready: Ready,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.sql.table)
            .finish_non_exhaustive()
    }
}

/// The statements for one table, built once (the table name is validated).
struct Statements {
    table: String,
    present: String,
    exists: String,
    migrate: Vec<String>,
    claim: Arc<str>,
    complete: Arc<str>,
    renew: Arc<str>,
    release: Arc<str>,
    get: Arc<str>,
    purge: Arc<str>,
    record_step: Arc<str>,
    steps: Arc<str>,
    steps_held: Arc<str>,
}

/// The completion's fence: the caller's token is the record's, and the record
/// is still processing.
#[cfg(not(idem_unfenced))]
const FENCE: &str = "token = $2 AND state = 'processing'";
/// A deliberately broken build (`RUSTFLAGS="--cfg idem_unfenced"`), never to
/// be used: completions land whatever the token and state, so a paused holder
/// that wakes after a takeover overwrites the record. The chaos harness runs
/// services built so to show that its checker catches the double completion
/// (RELIABILITY.md, "The checker has teeth").
#[cfg(idem_unfenced)]
const FENCE: &str = "$2::bigint IS NOT NULL";

impl Statements {
    fn new(t: &str) -> Result<Self, Error> {
        sql::validate_table(t)?;
        // $1 key, $2 fingerprint, $3 lease (ms), $4 whether this claim is inside
        // the caller's transaction.
        let claim = format!(
            r#"
WITH existing AS MATERIALIZED (
    SELECT state, token, fingerprint, outcome, expires_at,
           expires_at > clock_timestamp() AS live,
           coalesce(steps_until > clock_timestamp(), false) AS kept
      FROM {t} WHERE key = $1
), lock AS MATERIALIZED (
    SELECT CASE WHEN $4 THEN pg_try_advisory_xact_lock(hashtextextended($1, 7))
                ELSE pg_try_advisory_xact_lock_shared(hashtextextended($1, 7)) END AS got
     WHERE NOT EXISTS (SELECT 1 FROM existing WHERE live)
), claimed AS (
    INSERT INTO {t} AS r (key, state, token, fingerprint, outcome, expires_at)
    SELECT $1, 'processing', nextval('{t}_token_seq'), $2, NULL,
           clock_timestamp() + $3 * interval '1 millisecond'
      FROM lock WHERE got
    ON CONFLICT (key) DO UPDATE
       SET state = 'processing', token = EXCLUDED.token, fingerprint = EXCLUDED.fingerprint,
           outcome = NULL, expires_at = EXCLUDED.expires_at, updated_at = clock_timestamp(),
           steps = CASE WHEN r.steps_until > clock_timestamp() THEN r.steps END,
           steps_until = CASE WHEN r.steps_until > clock_timestamp() THEN r.steps_until END
     WHERE r.expires_at <= clock_timestamp()
       AND NOT (coalesce(r.steps_until > clock_timestamp(), false)
                AND r.fingerprint IS NOT NULL AND EXCLUDED.fingerprint IS NOT NULL
                AND r.fingerprint <> EXCLUDED.fingerprint)
    RETURNING r.token
)
SELECT true AS acquired,
       coalesce((SELECT state = 'processing' OR kept FROM existing), false) AS took_over,
       'processing'::text AS state, token, NULL::bytea AS fingerprint, NULL::text AS outcome,
       $3::bigint AS remaining_ms
  FROM claimed
UNION ALL
SELECT false, false, 'processing', 0, NULL, NULL, $3::bigint FROM lock WHERE NOT got
UNION ALL
SELECT false, false, state, token, fingerprint, outcome,
       (extract(epoch FROM expires_at - clock_timestamp()) * 1000)::bigint
  FROM existing WHERE live
UNION ALL
-- Kept steps belong to the request that recorded them: another is refused.
SELECT false, false, 'processing', token, fingerprint, NULL, 0
  FROM existing
 WHERE NOT live AND kept AND fingerprint IS NOT NULL AND $2::bytea IS NOT NULL
   AND fingerprint <> $2::bytea"#
        );
        Ok(Statements {
            table: t.to_owned(),
            present: format!(
                "SELECT to_regclass('{t}') IS NOT NULL AND to_regclass('{t}_expires_at') IS NOT NULL
                    AND to_regclass('{t}_token_seq') IS NOT NULL
                    AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('{t}')
                                   AND attname = 'steps_until' AND NOT attisdropped)"
            ),
            exists: format!("SELECT to_regclass('{t}') IS NOT NULL"),
            migrate: vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {t} (
                        key         TEXT PRIMARY KEY,
                        state       TEXT NOT NULL CHECK (state IN ('processing', 'completed', 'released')),
                        token       BIGINT NOT NULL,
                        fingerprint BYTEA,
                        outcome     TEXT,
                        expires_at  TIMESTAMPTZ NOT NULL,
                        created_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
                        updated_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
                    )"
                ),
                format!("CREATE INDEX IF NOT EXISTS {t}_expires_at ON {t} (expires_at)"),
                format!("CREATE SEQUENCE IF NOT EXISTS {t}_token_seq"),
                // Tables made before steps existed: their columns, and the
                // `released` state (a release that keeps steps), checked for
                // new rows only (old rows hold the two older states).
                format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS steps JSONB"),
                format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS steps_until TIMESTAMPTZ"),
                format!(
                    "DO $$ DECLARE c record; BEGIN
                       FOR c IN SELECT conname FROM pg_constraint
                                 WHERE conrelid = '{t}'::regclass AND contype = 'c'
                                   AND pg_get_constraintdef(oid) LIKE '%state%'
                                   AND pg_get_constraintdef(oid) NOT LIKE '%released%' LOOP
                         EXECUTE format('ALTER TABLE {t} DROP CONSTRAINT %I', c.conname);
                         EXECUTE 'ALTER TABLE {t} ADD CHECK (state IN (''processing'', ''completed'', ''released'')) NOT VALID';
                       END LOOP;
                     END $$"
                ),
            ],
            claim: claim.into(),
            complete: format!(
                "UPDATE {t} SET state = 'completed', outcome = $3,
                        expires_at = clock_timestamp() + $4 * interval '1 millisecond',
                        updated_at = clock_timestamp(), steps = NULL, steps_until = NULL
                  WHERE key = $1 AND {FENCE}"
            )
            .into(),
            renew: format!(
                "UPDATE {t} SET expires_at = clock_timestamp() + $3 * interval '1 millisecond',
                        updated_at = clock_timestamp()
                  WHERE key = $1 AND token = $2 AND state = 'processing'"
            )
            .into(),
            // A released record stays (a tombstone, its steps kept) until
            // purged. One statement on one row: a step recorded by the same
            // holder while the release waits for its row is seen, not lost
            // between two statements of one snapshot.
            release: format!(
                "UPDATE {t} SET state = 'released', outcome = NULL,
                        expires_at = clock_timestamp(), updated_at = clock_timestamp()
                  WHERE key = $1 AND token = $2 AND state = 'processing'
                 RETURNING 1"
            )
            .into(),
            get: format!(
                "SELECT state, token, fingerprint, outcome,
                        greatest((extract(epoch FROM expires_at - clock_timestamp()) * 1000)::bigint, 0)
                   FROM {t}
                  WHERE key = $1 AND (state = 'processing' OR expires_at > clock_timestamp())"
            )
            .into(),
            // The rows by their physical address (`ctid`), taken from an array:
            // a batch then costs a TID scan of its own rows whatever the table's
            // size. `key IN (subquery)` let the planner pick a hash join over the
            // whole table once a batch was a few thousand rows (BENCHMARKS.md).
            // The rows are locked by the subquery, so their addresses hold until
            // the delete; the expiry is checked again all the same.
            purge: format!(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY(
                    SELECT ctid FROM {t} WHERE expires_at <= now()
                       AND (steps_until IS NULL OR steps_until <= now())
                     ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED))
                   AND expires_at <= now() AND (steps_until IS NULL OR steps_until <= now())"
            )
            .into(),
            // $3 the position, $4 the id, $5 the value, $6 how long to keep (ms).
            record_step: format!(
                "UPDATE {t}
                    SET steps = coalesce(steps, '{{}}'::jsonb)
                                || jsonb_build_object($3::text, jsonb_build_array($4::text, $5::text)),
                        steps_until = greatest(coalesce(steps_until, clock_timestamp()),
                                               clock_timestamp() + $6 * interval '1 millisecond'),
                        updated_at = clock_timestamp()
                  WHERE key = $1 AND token = $2 AND state = 'processing'"
            )
            .into(),
            steps: format!(
                "SELECT steps::text FROM {t}
                  WHERE key = $1 AND state <> 'completed' AND steps_until > clock_timestamp()"
            )
            .into(),
            steps_held: format!(
                "SELECT CASE WHEN steps_until > clock_timestamp() THEN steps::text END FROM {t}
                  WHERE key = $1 AND token = $2 AND state = 'processing'"
            )
            .into(),
        })
    }
}

/// A migration that failed; one refused for want of rights says what to run.
fn migration_error(table: &str, err: sqlx::Error) -> Error {
    let denied = err
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "42501");
    if denied {
        return Error::store(format!(
            "the table {table} needs idem's schema changes (the step columns of this version), \
             and this role may not make them: run PostgresStore::migrate() once with a role \
             that may ALTER {table} (docs/CONTRACT.md §5.1 lists the statements): {err}"
        ));
    }
    sql::db_error(err)
}

fn q(sql: &Arc<str>) -> sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(AssertSqlSafe(Arc::clone(sql)))
}

impl PostgresStore {
    /// Connects a pool to `url` (`postgres://user@host/db`) and creates the schema.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(url)
            .await
            .map_err(Error::store)?;
        let store = Self::from_pool(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// A store on an existing pool, in table `idem_records`. The schema is
    /// created on first use (or call [`migrate`](Self::migrate)).
    pub fn from_pool(pool: PgPool) -> Self {
        Self::with_table(pool, sql::DEFAULT_TABLE).expect("the default table name is valid")
    }

    /// A store on an existing pool, in table `table` (letters, digits, `_`).
    pub fn with_table(pool: PgPool, table: &str) -> Result<Self, Error> {
        Ok(PostgresStore {
            pool,
            sql: Arc::new(Statements::new(table)?),
            ready: Ready::default(),
        })
    }

    /// Creates the table, index and token sequence if they do not exist.
    /// Safe to run from many processes at once (it takes an advisory lock), and
    /// takes no lock at all once the schema is there.
    pub async fn migrate(&self) -> Result<(), Error> {
        let sql = self.sql.clone();
        let pool = self.pool.clone();
        self.ready
            .get(|| async move {
                // Already set up: take no lock. DDL would queue behind any open
                // transaction that wrote to the table (a `tx =` caller's, say) and
                // make every statement after it queue too.
                let present: bool = sqlx::query_scalar(AssertSqlSafe(sql.present.as_str()))
                    .fetch_one(&pool)
                    .await
                    .map_err(sql::db_error)?;
                if present {
                    return Ok(());
                }
                let mut tx = pool.begin().await.map_err(sql::db_error)?;
                for set_up in [
                    "SELECT pg_advisory_xact_lock(hashtextextended('idem:migrate', 7))",
                    // Behind a long transaction that wrote to the table, give up
                    // (the next call tries again) rather than queue every
                    // statement on the table behind this one.
                    "SET LOCAL lock_timeout = '5s'",
                ] {
                    sqlx::query(set_up)
                        .execute(&mut *tx)
                        .await
                        .map_err(sql::db_error)?;
                }
                // Another process may have finished it while this one waited.
                let present: bool = sqlx::query_scalar(AssertSqlSafe(sql.present.as_str()))
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(sql::db_error)?;
                if present {
                    return tx.commit().await.map_err(sql::db_error);
                }
                // An existing table is locked once, first, at the strongest level
                // the changes need: taken piecemeal (a weaker lock, then a stronger
                // one), it deadlocks with claims of processes already migrated.
                let exists: bool = sqlx::query_scalar(AssertSqlSafe(sql.exists.as_str()))
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(sql::db_error)?;
                let lock = format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", sql.table);
                let statements = exists.then_some(&lock).into_iter().chain(&sql.migrate);
                for statement in statements {
                    sqlx::query(AssertSqlSafe(statement.as_str()))
                        .execute(&mut *tx)
                        .await
                        .map_err(|err| migration_error(&sql.table, err))?;
                }
                tx.commit().await.map_err(sql::db_error)
            })
            .await
    }

    async fn claim_on(
        &self,
        conn: &mut PgConnection,
        request: ClaimRequest<'_>,
        in_transaction: bool,
    ) -> Result<Claim, Error> {
        // The first read sees the statement's snapshot; a record committed by a
        // concurrent claim after it was taken is invisible there, and the
        // statement then returns no row. Running it again sees it.
        for _ in 0..16 {
            let row = q(&self.sql.claim)
                .bind(request.key)
                .bind(request.fingerprint.map(|d| d.as_bytes().to_vec()))
                .bind(sql::millis(request.lease))
                .bind(in_transaction)
                .fetch_optional(&mut *conn)
                .await
                .map_err(sql::db_error)?;
            if let Some(row) = row {
                return claim_row(&row)?.decide(request.fingerprint);
            }
        }
        Err(Error::store(
            "the claim kept racing with concurrent writers; try again",
        ))
    }

    /// A claim inside the caller's transaction: the advisory lock it takes is
    /// exclusive and lasts until commit or rollback.
    async fn claim_in_transaction(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        request: ClaimRequest<'_>,
    ) -> Result<Claim, Error> {
        self.claim_on(tx, request, true).await
    }
}

fn claim_row(row: &PgRow) -> Result<ClaimRow, Error> {
    Ok(ClaimRow {
        acquired: row.try_get(0).map_err(sql::db_error)?,
        took_over: row.try_get(1).map_err(sql::db_error)?,
        state: row.try_get(2).map_err(sql::db_error)?,
        token: row.try_get(3).map_err(sql::db_error)?,
        fingerprint: row.try_get(4).map_err(sql::db_error)?,
        outcome: row.try_get(5).map_err(sql::db_error)?,
        remaining_ms: row.try_get(6).map_err(sql::db_error)?,
    })
}

#[async_trait::async_trait]
impl sql::PhaseStore<Postgres> for PostgresStore {
    async fn begin_phase(&self) -> Result<Transaction<'static, Postgres>, Error> {
        self.migrate().await?;
        self.pool.begin().await.map_err(sql::db_error)
    }
}

// `impl Store for PostgresStore`, `pool`, `table`, `spawn_reaper`: generated by
// `sql_store!` (store/sql.rs), shared with the other SQL store.
sql::sql_store!(PostgresStore, Postgres, PgPool, PgConnection, "postgres");

#[async_trait::async_trait]
impl<'c> TransactionalStore<Transaction<'c, Postgres>> for PostgresStore {
    async fn claim_in(
        &self,
        tx: &mut Transaction<'c, Postgres>,
        request: ClaimRequest<'_>,
    ) -> Result<Claim, Error> {
        self.migrate().await?;
        self.claim_in_transaction(tx, request).await
    }

    async fn complete_in(
        &self,
        tx: &mut Transaction<'c, Postgres>,
        key: &str,
        token: FencingToken,
        outcome: &[u8],
        ttl: std::time::Duration,
    ) -> Result<(), Error> {
        self.complete_on(tx, key, token, outcome, ttl).await
    }

    async fn release_in(
        &self,
        tx: &mut Transaction<'c, Postgres>,
        key: &str,
        token: FencingToken,
    ) -> Result<(), Error> {
        self.release_on(tx, key, token).await
    }

    async fn record_step_in(
        &self,
        tx: &mut Transaction<'c, Postgres>,
        key: &str,
        token: FencingToken,
        step: &super::Step,
        keep: std::time::Duration,
    ) -> Result<(), Error> {
        self.record_step_on(tx, key, token, step, keep).await
    }
}

mod admin;
