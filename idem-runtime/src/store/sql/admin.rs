//! What the SQL stores' [`Admin`](crate::store::admin::Admin) impls share:
//! the statements each store writes in its dialect, and the impl itself
//! (`sql_admin!`), which reads rows of one shape on both.

/// The admin statements of one table. Rows of `inspect` and `list`: key,
/// status (a [`Status`](crate::store::admin::Status) word), token,
/// fingerprint, outcome size in bytes (completed only), time left in ms (of
/// the kept steps for a released record), the steps (only while kept).
/// Rows of `stats`: namespace, status, count. `invalidate` and `forget`
/// change one row or none (the fence).
pub(crate) struct AdminSql {
    /// `?1`/`$1` the key.
    pub inspect: String,
    /// `1` the namespace or NULL, `2` only lapsed claims, `3` the limit,
    /// `4` the digest (hex) or NULL.
    pub list: String,
    pub stats: String,
    /// `1` the key, `2` the token.
    pub invalidate: String,
    /// `1` the key, `2` the token.
    pub forget: String,
}

/// `impl Admin` for a SQL store that has `admin_sql()` (its [`AdminSql`]),
/// `pool`, and `migrate()`.
macro_rules! sql_admin {
    ($store:ident) => {
        impl $store {
            /// One `inspect`/`list` row as an entry.
            fn admin_entry<R>(row: &R) -> Result<$crate::store::admin::Entry, $crate::Error>
            where
                R: sqlx::Row,
                for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
                for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
                for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
                for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
                for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
                for<'r> Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
                usize: sqlx::ColumnIndex<R>,
            {
                use $crate::store::sql::db_error;
                let key: Vec<u8> = row.try_get(0).map_err(db_error)?;
                let key = String::from_utf8(key).map_err(|_| {
                    $crate::Error::codec("the stored key is not UTF-8 (corrupt record)")
                })?;
                let status: String = row.try_get(1).map_err(db_error)?;
                let status = Self::admin_status(&status)?;
                let token: i64 = row.try_get(2).map_err(db_error)?;
                let fingerprint: Option<Vec<u8>> = row.try_get(3).map_err(db_error)?;
                let outcome_len: Option<i64> = row.try_get(4).map_err(db_error)?;
                let remaining_ms: i64 = row.try_get(5).map_err(db_error)?;
                let steps: Option<String> = row.try_get(6).map_err(db_error)?;
                let fingerprint = fingerprint
                    .map(|bytes| {
                        bytes.try_into().map($crate::Digest).map_err(|_| {
                            $crate::Error::codec(
                                "a stored fingerprint is not 32 bytes (corrupt record)",
                            )
                        })
                    })
                    .transpose()?;
                let steps = steps
                    .map(|json| $crate::store::sql::parse_steps(&json))
                    .transpose()?
                    .unwrap_or_default();
                Ok($crate::store::admin::Entry::new(
                    key,
                    status,
                    $crate::store::FencingToken(token as u64),
                    fingerprint,
                    outcome_len.map(|n| n.max(0) as u64),
                    $crate::store::sql::remaining(remaining_ms),
                    &steps,
                ))
            }

            /// A statement's status word; `corrupt: why` is the row's
            /// problem, as [`Error::Codec`]($crate::Error::Codec).
            fn admin_status(word: &str) -> Result<$crate::store::admin::Status, $crate::Error> {
                if let Some(why) = word.strip_prefix("corrupt: ") {
                    return Err($crate::Error::codec(format!("{why} (corrupt record)")));
                }
                $crate::store::admin::Status::parse(word).ok_or_else(|| {
                    $crate::Error::codec(format!(
                        "a stored record has an unknown state {word:?} (corrupt record)"
                    ))
                })
            }

            /// Runs a fenced admin write: one row changed, else `LeaseLost`.
            async fn admin_fenced(
                &self,
                statement: String,
                key: &str,
                token: $crate::store::FencingToken,
            ) -> Result<(), $crate::Error> {
                self.migrate().await?;
                let done = sqlx::query(sqlx::AssertSqlSafe(statement))
                    .bind(key.to_owned())
                    .bind(token.0 as i64)
                    .execute(&self.pool)
                    .await
                    .map_err($crate::store::sql::db_error)?;
                $crate::store::sql::fenced(done.rows_affected())
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::admin::Admin for $store {
            async fn inspect(
                &self,
                key: &str,
            ) -> Result<Option<$crate::store::admin::Entry>, $crate::Error> {
                self.migrate().await?;
                let row = sqlx::query(sqlx::AssertSqlSafe(self.admin_sql().inspect))
                    .bind(key.to_owned())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err($crate::store::sql::db_error)?;
                row.as_ref().map(Self::admin_entry).transpose()
            }

            async fn list(
                &self,
                query: &$crate::store::admin::Query,
            ) -> Result<Vec<$crate::store::admin::Entry>, $crate::Error> {
                self.migrate().await?;
                let rows = sqlx::query(sqlx::AssertSqlSafe(self.admin_sql().list))
                    .bind(query.namespace.clone())
                    .bind(query.stuck)
                    .bind(i64::try_from(query.limit).unwrap_or(i64::MAX))
                    .bind(query.digest.map(|d| d.to_hex()))
                    .fetch_all(&self.pool)
                    .await
                    .map_err($crate::store::sql::db_error)?;
                let mut entries = Vec::with_capacity(rows.len());
                for row in &rows {
                    use sqlx::Row as _;
                    let key: Vec<u8> = row.try_get(0).map_err($crate::store::sql::db_error)?;
                    let key = String::from_utf8_lossy(&key);
                    let entry =
                        $crate::store::admin::Entry::or_corrupt(&key, Self::admin_entry(row))?;
                    // The statement left out what SQL can judge corrupt;
                    // Rust judges the rest (steps of the wrong shape).
                    if !(query.stuck && entry.status == $crate::store::admin::Status::Corrupt) {
                        entries.push(entry);
                    }
                }
                Ok(entries)
            }

            async fn stats(&self) -> Result<Vec<$crate::store::admin::Count>, $crate::Error> {
                use sqlx::Row as _;
                use $crate::store::sql::db_error;
                self.migrate().await?;
                let rows = sqlx::query(sqlx::AssertSqlSafe(self.admin_sql().stats))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_error)?;
                // Rows of one namespace corrupt for different reasons (or
                // with a namespace that is not UTF-8) count as one.
                let mut counts = std::collections::BTreeMap::new();
                for row in &rows {
                    let namespace: Vec<u8> = row.try_get(0).map_err(db_error)?;
                    let status: String = row.try_get(1).map_err(db_error)?;
                    let records: i64 = row.try_get(2).map_err(db_error)?;
                    let status =
                        match (std::str::from_utf8(&namespace), Self::admin_status(&status)) {
                            (Ok(_), Ok(status)) => status,
                            _ => $crate::store::admin::Status::Corrupt,
                        };
                    let namespace = String::from_utf8_lossy(&namespace).into_owned();
                    *counts.entry((namespace, status)).or_insert(0) += records.max(0) as u64;
                }
                Ok(counts
                    .into_iter()
                    .map(|((namespace, status), records)| {
                        $crate::store::admin::Count::new(namespace, status, records)
                    })
                    .collect())
            }

            async fn invalidate(
                &self,
                key: &str,
                token: $crate::store::FencingToken,
            ) -> Result<(), $crate::Error> {
                self.admin_fenced(self.admin_sql().invalidate, key, token)
                    .await
            }

            async fn forget(
                &self,
                key: &str,
                token: $crate::store::FencingToken,
            ) -> Result<(), $crate::Error> {
                self.admin_fenced(self.admin_sql().forget, key, token).await
            }
        }
    };
}

pub(crate) use sql_admin;
