//! What the SQL stores share: table names, error mapping, the claim's result
//! row, lazy migration; the background [`Reaper`] is re-exported here.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;

use super::{Claim, Record, RecordState};
use crate::error::Error;
use crate::key::Digest;

/// The table records live in unless another is chosen.
pub const DEFAULT_TABLE: &str = "idem_records";

/// Checks that `name` is a plain SQL identifier: it is spliced into statements,
/// so only `[A-Za-z_][A-Za-z0-9_]{0,62}` is accepted.
pub(crate) fn validate_table(name: &str) -> Result<(), Error> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok && name.len() <= 63 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(Error::store(format!(
            "invalid table name {name:?}: use letters, digits and `_` (at most 63, not starting with a digit)"
        )))
    }
}

/// Maps a driver error: undecodable columns are `Codec` (a corrupt record),
/// everything else is `Store`.
pub(crate) fn db_error(err: sqlx::Error) -> Error {
    match err {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => Error::codec(format!(
            "a stored record could not be read (corrupt column): {err}"
        )),
        other => Error::store(other),
    }
}

/// A store's one-time schema set-up, run on first use.
#[derive(Clone, Default)]
pub(crate) struct Ready(Arc<OnceCell<()>>);

impl Ready {
    /// Runs `migrate` once; later calls return at once.
    pub(crate) async fn get<F, Fut>(&self, migrate: F) -> Result<(), Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), Error>>,
    {
        if self.0.initialized() {
            return Ok(());
        }
        self.0.get_or_try_init(migrate).await.map(|_| ())
    }
}

/// The columns every claim statement returns, for the existing or new record.
pub(crate) struct ClaimRow {
    pub acquired: bool,
    pub took_over: bool,
    pub state: String,
    pub token: i64,
    pub fingerprint: Option<Vec<u8>>,
    pub outcome: Option<String>,
    pub remaining_ms: i64,
}

impl ClaimRow {
    /// Whether the row and the request both have fingerprints, and they differ.
    pub(crate) fn fingerprint_differs(&self, fingerprint: Option<&Digest>) -> bool {
        matches!((&self.fingerprint, fingerprint), (Some(stored), Some(given)) if stored.as_slice() != given.as_bytes())
    }

    /// The claim decision this row stands for, as `MemoryStore` decides it.
    pub(crate) fn decide(self, fingerprint: Option<&Digest>) -> Result<Claim, Error> {
        if self.acquired {
            return Ok(Claim::Acquired {
                token: super::FencingToken(self.token as u64),
                took_over: self.took_over,
            });
        }
        if let (Some(stored), Some(given)) = (&self.fingerprint, fingerprint) {
            if stored.as_slice() != given.as_bytes() {
                return Ok(Claim::FingerprintMismatch);
            }
        }
        match state(&self.state)? {
            RecordState::Completed => Ok(Claim::Completed {
                outcome: self.outcome.map(String::into_bytes).ok_or_else(|| {
                    Error::codec("a completed record has no stored outcome (corrupt record)")
                })?,
                fingerprint: self
                    .fingerprint
                    .map(|f| {
                        f.try_into().map(Digest).map_err(|_| {
                            Error::codec("a stored fingerprint is not 32 bytes (corrupt record)")
                        })
                    })
                    .transpose()?,
                expires_in: remaining(self.remaining_ms),
            }),
            _ => Ok(Claim::InProgress {
                lease_remaining: remaining(self.remaining_ms),
            }),
        }
    }
}

/// Parses a stored state.
pub(crate) fn state(text: &str) -> Result<RecordState, Error> {
    match text {
        "processing" => Ok(RecordState::Processing),
        "completed" => Ok(RecordState::Completed),
        other => Err(Error::codec(format!(
            "a stored record has an unknown state {other:?} (corrupt record)"
        ))),
    }
}

pub(crate) fn remaining(ms: i64) -> Duration {
    Duration::from_millis(ms.max(0) as u64)
}

/// Milliseconds as the `i64` SQL binds take, saturating.
/// `d` in whole milliseconds, capped to [`MAX_DURATION`](super::MAX_DURATION)
/// (database interval arithmetic overflows long before `i64::MAX` ms).
pub(crate) fn millis(d: Duration) -> i64 {
    super::cap_duration(d).as_millis() as i64
}

/// Builds a [`Record`] from a stored row.
pub(crate) fn record(
    key: &str,
    state_text: &str,
    token: i64,
    fingerprint: Option<Vec<u8>>,
    outcome: Option<String>,
    remaining_ms: i64,
) -> Result<Record, Error> {
    let fingerprint = match fingerprint {
        None => None,
        Some(bytes) => Some(Digest(bytes.try_into().map_err(|_| {
            Error::codec("a stored fingerprint is not 32 bytes (corrupt record)")
        })?)),
    };
    Ok(Record::new(
        key.to_owned(),
        state(state_text)?,
        super::FencingToken(token as u64),
        fingerprint,
        outcome.map(String::into_bytes),
        remaining(remaining_ms),
    ))
}

/// `Ok` if exactly the fenced row was changed, else [`Error::LeaseLost`].
pub(crate) fn fenced(rows: u64) -> Result<(), Error> {
    if rows == 1 {
        Ok(())
    } else {
        Err(Error::LeaseLost)
    }
}

/// What both SQL stores share: accessors, the reaper, completion, release and
/// the `Store` impl. The store type provides `migrate`, `claim_on`, a
/// module-level `q` and its statements (`complete`, `release`, `renew`, `get`,
/// `purge`). Each store writes its own `TransactionalStore` impl, so a
/// compile error for `tx =` lists plain impls rather than this macro.
macro_rules! sql_store {
    ($store:ident, $db:ident, $pool:ident, $conn:ident, $kind:literal) => {
        impl $store {
            /// The pool, for the service's own queries and transactions.
            pub fn pool(&self) -> &sqlx::$pool {
                &self.pool
            }

            /// The table records live in.
            pub fn table(&self) -> &str {
                &self.sql.table
            }

            /// Starts a background task that purges expired records every
            /// `interval`, `batch` at a time. Stop it with [`Reaper::shutdown`].
            /// A `batch` of 0 counts as 1 and intervals below
            /// [`Reaper::MIN_INTERVAL`] as that (see [`Reaper::spawn`]).
            ///
            /// [`Reaper::shutdown`]: $crate::Reaper::shutdown
            /// [`Reaper::MIN_INTERVAL`]: $crate::Reaper::MIN_INTERVAL
            /// [`Reaper::spawn`]: $crate::Reaper::spawn
            pub fn spawn_reaper(
                &self,
                interval: std::time::Duration,
                batch: usize,
            ) -> $crate::Reaper {
                $crate::Reaper::spawn($crate::store::Store::handle(self), interval, batch)
            }

            async fn complete_on(
                &self,
                conn: &mut sqlx::$conn,
                key: &str,
                token: $crate::store::FencingToken,
                outcome: &[u8],
                ttl: std::time::Duration,
            ) -> Result<(), $crate::Error> {
                let text = std::str::from_utf8(outcome).map_err(|e| {
                    $crate::Error::codec(format!("outcomes are stored as UTF-8 JSON: {e}"))
                })?;
                let done = q(&self.sql.complete)
                    .bind(key.to_owned())
                    .bind(token.0 as i64)
                    .bind(text.to_owned())
                    .bind($crate::store::sql::millis(ttl))
                    .execute(&mut *conn)
                    .await
                    .map_err($crate::store::sql::db_error)?;
                $crate::store::sql::fenced(done.rows_affected())
            }

            async fn release_on(
                &self,
                conn: &mut sqlx::$conn,
                key: &str,
                token: $crate::store::FencingToken,
            ) -> Result<(), $crate::Error> {
                // A row back when the fenced record was released.
                let done = q(&self.sql.release)
                    .bind(key.to_owned())
                    .bind(token.0 as i64)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err($crate::store::sql::db_error)?;
                $crate::store::sql::fenced(u64::from(done.is_some()))
            }

            async fn record_step_on(
                &self,
                conn: &mut sqlx::$conn,
                key: &str,
                token: $crate::store::FencingToken,
                step: &$crate::store::Step,
                keep: std::time::Duration,
            ) -> Result<(), $crate::Error> {
                let value = std::str::from_utf8(&step.value).map_err(|e| {
                    $crate::Error::codec(format!("step values are stored as UTF-8 JSON: {e}"))
                })?;
                let done = q(&self.sql.record_step)
                    .bind(key.to_owned())
                    .bind(token.0 as i64)
                    .bind(step.at.to_string())
                    .bind(step.id.clone())
                    .bind(value.to_owned())
                    .bind($crate::store::sql::millis(keep))
                    .execute(&mut *conn)
                    .await
                    .map_err($crate::store::sql::db_error)?;
                $crate::store::sql::fenced(done.rows_affected())
            }

            async fn conn(&self) -> Result<sqlx::pool::PoolConnection<sqlx::$db>, $crate::Error> {
                self.migrate().await?;
                self.pool.acquire().await.map_err($crate::Error::store)
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            async fn claim(
                &self,
                request: $crate::store::ClaimRequest<'_>,
            ) -> Result<$crate::store::Claim, $crate::Error> {
                let mut conn = self.conn().await?;
                self.claim_on(&mut conn, request, false).await
            }

            async fn complete(
                &self,
                key: &str,
                token: $crate::store::FencingToken,
                outcome: &[u8],
                ttl: std::time::Duration,
            ) -> Result<(), $crate::Error> {
                let mut conn = self.conn().await?;
                self.complete_on(&mut conn, key, token, outcome, ttl).await
            }

            async fn release(
                &self,
                key: &str,
                token: $crate::store::FencingToken,
            ) -> Result<(), $crate::Error> {
                let mut conn = self.conn().await?;
                self.release_on(&mut conn, key, token).await
            }

            async fn renew(
                &self,
                key: &str,
                token: $crate::store::FencingToken,
                lease: std::time::Duration,
            ) -> Result<(), $crate::Error> {
                self.migrate().await?;
                let done = q(&self.sql.renew)
                    .bind(key.to_owned())
                    .bind(token.0 as i64)
                    .bind($crate::store::sql::millis(lease))
                    .execute(&self.pool)
                    .await
                    .map_err($crate::store::sql::db_error)?;
                $crate::store::sql::fenced(done.rows_affected())
            }

            async fn get(&self, key: &str) -> Result<Option<$crate::store::Record>, $crate::Error> {
                use sqlx::Row as _;
                use $crate::store::sql::db_error;
                self.migrate().await?;
                let row = q(&self.sql.get)
                    .bind(key.to_owned())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_error)?;
                row.map(|row| {
                    $crate::store::sql::record(
                        key,
                        row.try_get::<String, _>(0).map_err(db_error)?.as_str(),
                        row.try_get(1).map_err(db_error)?,
                        row.try_get(2).map_err(db_error)?,
                        row.try_get(3).map_err(db_error)?,
                        row.try_get(4).map_err(db_error)?,
                    )
                })
                .transpose()
            }

            async fn purge_expired(&self, batch: usize) -> Result<u64, $crate::Error> {
                self.migrate().await?;
                let done = q(&self.sql.purge)
                    .bind(i64::try_from(batch).unwrap_or(i64::MAX))
                    .execute(&self.pool)
                    .await
                    .map_err($crate::store::sql::db_error)?;
                Ok(done.rows_affected())
            }

            async fn record_step(
                &self,
                key: &str,
                token: $crate::store::FencingToken,
                step: &$crate::store::Step,
                keep: std::time::Duration,
            ) -> Result<(), $crate::Error> {
                let mut conn = self.conn().await?;
                self.record_step_on(&mut conn, key, token, step, keep).await
            }

            async fn steps(
                &self,
                key: &str,
                held: Option<$crate::store::FencingToken>,
            ) -> Result<Vec<$crate::store::Step>, $crate::Error> {
                self.migrate().await?;
                let steps: Option<String> = match held {
                    None => sqlx::query_scalar(sqlx::AssertSqlSafe(std::sync::Arc::clone(
                        &self.sql.steps,
                    )))
                    .bind(key.to_owned())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err($crate::store::sql::db_error)?
                    .flatten(),
                    // A row only for the holder: none is a lost claim.
                    Some(token) => sqlx::query_scalar::<_, Option<String>>(sqlx::AssertSqlSafe(
                        std::sync::Arc::clone(&self.sql.steps_held),
                    ))
                    .bind(key.to_owned())
                    .bind(token.0 as i64)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err($crate::store::sql::db_error)?
                    .ok_or($crate::Error::LeaseLost)?,
                };
                steps
                    .map(|json| $crate::store::sql::parse_steps(&json))
                    .transpose()
                    .map(Option::unwrap_or_default)
            }

            fn keeps_steps(&self) -> bool {
                true
            }

            fn kind(&self) -> &'static str {
                $kind
            }

            fn handle(&self) -> std::sync::Arc<dyn $crate::store::Store> {
                std::sync::Arc::new(self.clone())
            }
        }
    };
}

/// A SQL store that can run one phase of a call in a transaction of its own
/// ([`step_in_tx`](crate::step_in_tx)): the phase's writes and its step record
/// commit together.
#[async_trait::async_trait]
pub trait PhaseStore<DB: sqlx::Database>:
    super::TransactionalStore<sqlx::Transaction<'static, DB>>
{
    /// Begins a phase's transaction on the store's pool (SQLite: `BEGIN
    /// IMMEDIATE`, so the phase never fails busy midway).
    async fn begin_phase(&self) -> Result<sqlx::Transaction<'static, DB>, Error>;
}

/// The steps column: a JSON object from position to `[id, value]`.
pub(crate) fn parse_steps(json: &str) -> Result<Vec<super::Step>, Error> {
    let corrupt = |why: String| Error::codec(format!("the recorded steps are corrupt: {why}"));
    let map: std::collections::HashMap<String, (String, String)> =
        serde_json::from_str(json).map_err(|e| corrupt(e.to_string()))?;
    let mut steps = map
        .into_iter()
        .map(|(at, (id, value))| {
            let at = at
                .parse::<u32>()
                .map_err(|_| corrupt(format!("position {at:?}")))?;
            Ok(super::Step::new(at, id, value.into_bytes()))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    steps.sort_by_key(|s| s.at);
    Ok(steps)
}

pub(crate) use sql_store;

pub(crate) mod admin;

pub use super::reaper::Reaper;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        for ok in ["idem_records", "_t", "T1"] {
            assert!(validate_table(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1t",
            "a-b",
            "a;drop table x",
            "a b",
            "\"q\"",
            &"x".repeat(64),
        ] {
            assert!(validate_table(bad).is_err(), "{bad}");
        }
    }
}
