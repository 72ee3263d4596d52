//! Opening a store from its URL, as an operator's tool should: an existing
//! database only (a mistyped SQLite path is an error, not a new file), a
//! few connections, and a bounded wait for a store that is down.

use std::str::FromStr;
use std::time::Duration;

use idem_runtime::store::admin::Admin;
use idem_runtime::{Error, PostgresStore, RedisStore, SqliteStore};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

/// How long to wait for a store before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The store options from the command line.
pub(crate) struct Options<'a> {
    pub url: &'a str,
    pub table: Option<&'a str>,
    pub prefix: Option<&'a str>,
    /// PostgreSQL's `lock_timeout` (default [`PG_LOCK_TIMEOUT`]).
    pub lock_timeout: Option<Duration>,
}

/// Why a store could not be opened.
pub(crate) enum Failure {
    /// The URL or options are wrong (a usage error).
    Usage(String),
    /// The store is unreachable or refused.
    Store(Error),
}

/// The URL schemes `--store` takes.
pub(crate) const SCHEMES: &str =
    "sqlite://PATH, postgres://USER@HOST/DB, redis://HOST:PORT, redis-cluster://HOST:PORT,HOST:PORT";

/// How long a PostgreSQL statement of the CLI waits for a row lock unless
/// `--lock-timeout` says otherwise.
const PG_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest wait PostgreSQL's `lock_timeout` and `statement_timeout` take
/// (an `int` of milliseconds).
const PG_MAX_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// Parses `--lock-timeout`: a duration as the attribute writes them, or `0s`
/// (also `0`, `0ms`) for no limit; at most PostgreSQL's 24d20h31m23s.
pub(crate) fn lock_timeout(text: &str) -> Result<Duration, String> {
    let timeout = match text {
        "0" | "0s" | "0ms" => Duration::ZERO,
        text => crate::duration::parse(text)?,
    };
    if timeout > PG_MAX_TIMEOUT {
        return Err(format!(
            "{text:?} is longer than PostgreSQL waits (at most 24d20h31m23s; 0s for no limit)"
        ));
    }
    Ok(timeout)
}

/// Opens the store `options` name.
pub(crate) async fn open(options: &Options<'_>) -> Result<Box<dyn Admin>, Failure> {
    let url = options.url;
    let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
    let sql = matches!(scheme, "sqlite" | "postgres" | "postgresql");
    if options.table.is_some() && !sql {
        return Err(Failure::Usage(
            "--table applies to sqlite:// and postgres:// stores".into(),
        ));
    }
    if options.prefix.is_some() && sql {
        return Err(Failure::Usage(
            "--prefix applies to redis:// and redis-cluster:// stores".into(),
        ));
    }
    if options.lock_timeout.is_some() && !matches!(scheme, "postgres" | "postgresql") {
        return Err(Failure::Usage(
            "--lock-timeout applies to postgres:// stores".into(),
        ));
    }
    let table = options
        .table
        .unwrap_or(idem_runtime::store::sql::DEFAULT_TABLE);
    let prefix = options.prefix.unwrap_or("idem:");
    let store: Box<dyn Admin> = match scheme {
        "sqlite" => {
            let connect = SqliteConnectOptions::from_str(url)
                .map_err(|e| Failure::Usage(format!("--store {url:?}: {e}")))?
                .create_if_missing(false)
                .busy_timeout(CONNECT_TIMEOUT);
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(CONNECT_TIMEOUT)
                .connect_with(connect)
                .await
                .map_err(|e| Failure::Store(Error::store(format!("cannot open {url}: {e}"))))?;
            let store = SqliteStore::with_table(pool.clone(), table)
                .map_err(|e| Failure::Usage(e.to_string()))?;
            // The store creates its table on first use: a mistyped --table
            // would be a new, empty table, read as "no records".
            let found: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1 COLLATE NOCASE",
            )
            .bind(table)
            .fetch_one(&pool)
            .await
            .map_err(|e| Failure::Store(Error::store(format!("cannot read {url}: {e}"))))?;
            if found == 0 {
                return Err(missing_table(url, table));
            }
            Box::new(store)
        }
        "postgres" | "postgresql" => {
            // An operator's command waits for no one for long: a row another
            // transaction holds (a running call's `tx =`) is an error after
            // `lock_timeout`, not a hang.
            // Sent as startup options, which a connection pooler (PgBouncer,
            // Neon) may refuse: then without them, as before.
            let plain = PgConnectOptions::from_str(url)
                .map_err(|e| Failure::Usage(format!("{url}: {e}")))?;
            // A statement's own limit is a minute past the lock's (none
            // when the lock wait has none).
            let lock = options.lock_timeout.unwrap_or(PG_LOCK_TIMEOUT);
            let statement = if lock.is_zero() {
                Duration::ZERO
            } else {
                (lock + Duration::from_secs(60)).min(PG_MAX_TIMEOUT)
            };
            let (lock, statement) = (
                format!("{}ms", lock.as_millis()),
                format!("{}ms", statement.as_millis()),
            );
            let timed = plain.clone().options([
                ("lock_timeout", lock.as_str()),
                ("statement_timeout", statement.as_str()),
            ]);
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(CONNECT_TIMEOUT);
            let pool = match pool.clone().connect_with(timed).await {
                // A limit the operator asked for is not dropped in silence.
                Err(e)
                    if e.to_string().contains("unsupported startup parameter")
                        && options.lock_timeout.is_some() =>
                {
                    return Err(Failure::Store(Error::store(format!(
                        "{url} refuses startup options (a connection pooler?), so --lock-timeout \
                         cannot be applied; connect to the server itself, or leave the flag out \
                         to wait without a limit: {e}"
                    ))));
                }
                Err(e) if e.to_string().contains("unsupported startup parameter") => {
                    pool.connect_with(plain).await
                }
                connected => connected,
            }
            .map_err(|e| Failure::Store(Error::store(format!("cannot connect to {url}: {e}"))))?;
            let store = PostgresStore::with_table(pool.clone(), table)
                .map_err(|e| Failure::Usage(e.to_string()))?;
            // As for SQLite: the CLI creates no table (nor sequence).
            let found: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(table)
                .fetch_one(&pool)
                .await
                .map_err(|e| Failure::Store(Error::store(format!("cannot read {url}: {e}"))))?;
            if !found {
                return Err(missing_table(url, table));
            }
            Box::new(store)
        }
        "redis" | "rediss" => Box::new(
            timed(RedisStore::connect(url))
                .await
                .map_err(Failure::Store)?
                .with_prefix(prefix),
        ),
        "redis-cluster" => {
            let nodes = cluster_nodes(url).map_err(Failure::Usage)?;
            Box::new(
                timed(RedisStore::connect_cluster(&nodes))
                    .await
                    .map_err(Failure::Store)?
                    .with_prefix(prefix),
            )
        }
        _ => {
            return Err(Failure::Usage(format!(
                "--store {url:?}: unknown store; expected one of {SCHEMES}"
            )))
        }
    };
    Ok(store)
}

/// The table `--table` names (or the default) is not in the database.
fn missing_table(url: &str, table: &str) -> Failure {
    Failure::Store(Error::store(format!(
        "{url} has no table {table:?}: check --table (the CLI creates nothing)"
    )))
}

/// `connect` within [`CONNECT_TIMEOUT`].
async fn timed<T>(
    connect: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .unwrap_or_else(|_| Err(Error::store("the store did not answer within 5 s")))
}

/// The node URLs of `redis-cluster://[user:password@]host:port,host:port`:
/// each node gets the credentials.
pub(crate) fn cluster_nodes(url: &str) -> Result<Vec<String>, String> {
    let rest = url
        .strip_prefix("redis-cluster://")
        .ok_or_else(|| format!("{url:?}: expected redis-cluster://HOST:PORT,HOST:PORT"))?;
    let (credentials, hosts) = match rest.rsplit_once('@') {
        Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
        None => (String::new(), rest),
    };
    let hosts = hosts.trim_end_matches('/');
    let nodes: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|host| format!("redis://{credentials}{host}"))
        .collect();
    if nodes.is_empty() {
        return Err(format!(
            "{url:?}: name at least one node, redis-cluster://HOST:PORT"
        ));
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_name_every_node() {
        assert_eq!(
            cluster_nodes("redis-cluster://127.0.0.1:7101,127.0.0.1:7102").unwrap(),
            ["redis://127.0.0.1:7101", "redis://127.0.0.1:7102"]
        );
        assert_eq!(
            cluster_nodes("redis-cluster://u:p@h1:1,h2:2/").unwrap(),
            ["redis://u:p@h1:1", "redis://u:p@h2:2"]
        );
        assert!(cluster_nodes("redis-cluster://").is_err());
    }
}
