//! The SQL stores beyond the conformance suite: restarts, purging and the
//! reaper, faults (a database that is unreachable or goes away mid-request),
//! corrupt records and hostile keys.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{
    idempotent, Claim, ClaimRequest, Error, Key, PostgresStore, RecordState, SqliteStore, Store,
};
use idem_tests::{postgres_url, unique, AppError, PgOrders};
use sqlx::AssertSqlSafe;

use crate::proxy::Proxy;

fn sqlite_url(name: &str) -> String {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique(name));
    std::fs::create_dir_all(&dir).unwrap();
    format!("sqlite://{}/records.db", dir.display())
}

struct Counter<S> {
    store: S,
    runs: AtomicUsize,
}

impl<S: Store> Counter<S> {
    #[idempotent(key = id, name = "sql-stores", store = self.store, lease = "300ms")]
    async fn run(&self, id: String) -> Result<usize, AppError> {
        Ok(self.runs.fetch_add(1, Ordering::SeqCst) + 1)
    }
}

fn counter<S: Store>(store: S) -> Counter<S> {
    Counter {
        store,
        runs: AtomicUsize::new(0),
    }
}

#[tokio::test]
async fn a_sqlite_file_keeps_its_records_across_a_restart() {
    let url = sqlite_url("restart");
    let first = counter(SqliteStore::connect(&url).await.unwrap());
    assert_eq!(first.run("order-1".into()).await.unwrap(), 1);
    first.store.pool().close().await;
    drop(first);

    let second = counter(SqliteStore::connect(&url).await.unwrap());
    assert_eq!(
        second.run("order-1".into()).await.unwrap(),
        1,
        "replayed from the file"
    );
    assert_eq!(
        second.runs.load(Ordering::SeqCst),
        0,
        "nothing ran after the restart"
    );
}

async fn expire_records(store: &dyn Store, prefix: &str, n: usize) {
    for i in 0..n {
        let key = format!("{prefix}:{i}");
        let req = ClaimRequest {
            key: &key,
            fingerprint: None,
            lease: Duration::from_secs(60),
        };
        let Claim::Acquired { token, .. } = store.claim(req).await.unwrap() else {
            panic!("fresh key")
        };
        store
            .complete(&key, token, b"{\"ok\":1}", Duration::from_millis(1))
            .await
            .unwrap();
    }
    // Past the ttl, and past SQLite's 100 ms purge grace.
    tokio::time::sleep(Duration::from_millis(250)).await;
}

#[tokio::test]
async fn postgres_purge_skips_rows_locked_by_others_instead_of_waiting() {
    // A table of its own: another test's purge must not take these rows
    // before the holder locks one.
    let table = unique("idem_purge_locked");
    let pool = sqlx::PgPool::connect(&postgres_url()).await.unwrap();
    let store = PostgresStore::with_table(pool, &table).unwrap();
    let prefix = unique("purge-locked");
    expire_records(&store, &prefix, 3).await;
    let locked = format!("{prefix}:0");
    let mut holder = store.pool().begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "SELECT 1 FROM {table} WHERE key = $1 FOR UPDATE"
    )))
    .bind(&locked)
    .execute(&mut *holder)
    .await
    .unwrap();
    // Purge everything it can: it must return, leaving the locked row alone.
    let purge = async {
        let mut total = 0;
        loop {
            let n = store.purge_expired(1000).await.unwrap();
            total += n;
            if n < 1000 {
                return total;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), purge)
        .await
        .expect("purge returned while a row was locked");
    let left: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {table} WHERE key LIKE $1"
    )))
    .bind(format!("{prefix}:%"))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(left, 1, "only the locked row is left");
    holder.rollback().await.unwrap();
    assert!(store.purge_expired(1000).await.unwrap() >= 1);
}

/// Purges racing re-claims of the expired keys they delete (issue 15's
/// faster statement locks rows by address): a key claimed again and
/// completed is never deleted by a purge that had picked it as expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_purge_racing_reclaims_never_deletes_a_live_record() {
    // A table of its own: its purges must not take other tests' expired rows.
    let pool = sqlx::PgPool::connect(&postgres_url()).await.unwrap();
    let store = PostgresStore::with_table(pool, &unique("idem_purge_race")).unwrap();
    let prefix = unique("purge-race");
    const N: usize = 400;
    expire_records(&store, &prefix, N).await;
    let purging = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut deleted = 0;
            for _ in 0..200 {
                deleted += store.purge_expired(7).await.unwrap();
            }
            deleted
        })
    };
    let mut claimers = Vec::new();
    for part in 0..4 {
        let (store, prefix) = (store.clone(), prefix.clone());
        claimers.push(tokio::spawn(async move {
            let mut live = Vec::new();
            for i in (part..N).step_by(4) {
                let key = format!("{prefix}:{i}");
                let req = ClaimRequest {
                    key: &key,
                    fingerprint: None,
                    lease: Duration::from_secs(60),
                };
                match store.claim(req).await.unwrap() {
                    Claim::Acquired { token, .. } => {
                        store
                            .complete(&key, token, b"{\"ok\":2}", Duration::from_secs(600))
                            .await
                            .unwrap();
                        live.push(key);
                    }
                    other => panic!("an expired key is claimed again, got {other:?}"),
                }
            }
            live
        }));
    }
    let mut live = Vec::new();
    for c in claimers {
        live.extend(c.await.unwrap());
    }
    purging.await.unwrap();
    assert_eq!(live.len(), N);
    for key in &live {
        let record = store.get(key).await.unwrap();
        assert!(
            matches!(&record, Some(r) if r.outcome.as_deref() == Some(&b"{\"ok\":2}"[..])),
            "{key}: {record:?}"
        );
    }
}

async fn reaper_purges_then_stops(
    store: Arc<dyn Store>,
    reaper: idem_runtime::Reaper,
    prefix: &str,
) {
    expire_records(&*store, prefix, 25).await;
    let last = format!("{prefix}:24");
    // The reaper runs every 20 ms, 10 records a batch; wait until it is done.
    let gone = async {
        loop {
            if store.get(&last).await.unwrap().is_none()
                && store.purge_expired(1).await.unwrap() == 0
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), gone)
        .await
        .expect("reaped");
    let purged = reaper.shutdown().await.unwrap();
    assert!(
        purged >= 24,
        "the reaper purged the expired records ({purged})"
    );
}

#[tokio::test]
async fn sqlite_reaper_purges_in_batches_and_shuts_down() {
    let store = SqliteStore::connect(&sqlite_url("reaper")).await.unwrap();
    let reaper = store.spawn_reaper(Duration::from_millis(20), 10);
    reaper_purges_then_stops(Arc::new(store), reaper, &unique("reaper")).await;
}

#[tokio::test]
async fn postgres_reaper_purges_in_batches_and_shuts_down() {
    let pool = sqlx::PgPool::connect(&postgres_url()).await.unwrap();
    let table = unique("idem_reaper");
    let store = PostgresStore::with_table(pool, &table).unwrap();
    let reaper = store.spawn_reaper(Duration::from_millis(20), 10);
    reaper_purges_then_stops(Arc::new(store), reaper, "reaped").await;
}

#[tokio::test]
async fn an_unreachable_database_fails_closed() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .unwrap();
    let svc = counter(PostgresStore::from_pool(pool));
    let result = svc.run("x".into()).await;
    assert!(
        matches!(result, Err(AppError::Idem(Error::Store(_)))),
        "{result:?}"
    );
    assert_eq!(svc.runs.load(Ordering::SeqCst), 0, "the body did not run");
}

#[tokio::test]
async fn a_database_that_goes_away_mid_request_causes_no_duplicate() {
    // Everything goes through a proxy the test can cut.
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let url = format!("postgres://postgres@{}/test", proxy.addr());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect(&url)
        .await
        .unwrap();
    let store = PostgresStore::from_pool(pool);
    store.migrate().await.unwrap();
    let svc = PgOrders {
        store,
        orders: "orders_faults".into(),
    };
    sqlx::query("CREATE TABLE IF NOT EXISTS orders_faults (id BIGSERIAL PRIMARY KEY, order_ref TEXT NOT NULL, by_pid INT NOT NULL)")
        .execute(svc.store.pool())
        .await
        .unwrap();
    let r = unique("cut");

    // The order is written, then the connection dies before the commit.
    let mut tx = svc.store.pool().begin().await.unwrap();
    svc.place(&mut tx, &r).await.unwrap();
    proxy.cut();
    assert!(
        tx.commit().await.is_err(),
        "the commit cannot reach the database"
    );
    proxy.restore();

    // Nothing was committed: the retry runs once, and exactly one order exists.
    let mut tx = svc.store.pool().begin().await.unwrap();
    let id = svc.place(&mut tx, &r).await.unwrap();
    tx.commit().await.unwrap();
    let direct = PgOrders::setup("orders_faults").await;
    assert_eq!(direct.count(&r).await, 1);
    let mut tx = svc.store.pool().begin().await.unwrap();
    assert_eq!(
        svc.place(&mut tx, &r).await.unwrap(),
        id,
        "and is replayed after"
    );
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_cut_completion_is_finished_in_the_background_and_never_reruns() {
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let url = format!("postgres://postgres@{}/test", proxy.addr());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect(&url)
        .await
        .unwrap();
    let store = PostgresStore::from_pool(pool);
    store.migrate().await.unwrap();
    let svc = Arc::new(Cutting {
        store,
        proxy,
        runs: AtomicUsize::new(0),
    });
    let id = unique("lost");
    // The work ran: the caller gets its result even though the database is
    // cut off; the completion is retried in the background.
    let result = svc.run(id.clone()).await;
    assert!(matches!(result, Ok(1)), "{result:?}");
    svc.proxy.restore();
    let key = Key::derive("sql-cutting", &id).unwrap();
    let mut state = None;
    for _ in 0..400 {
        let record = svc.store.get(key.as_str()).await.unwrap();
        state = record.map(|r| r.state);
        assert!(state.is_some(), "the claim was kept, never released");
        if state == Some(RecordState::Completed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        state,
        Some(RecordState::Completed),
        "recorded once the database is back"
    );
    let retry = svc.run(id).await;
    assert!(matches!(retry, Ok(1)), "replayed: {retry:?}");
    assert_eq!(svc.runs.load(Ordering::SeqCst), 1, "no second execution");
}

struct Cutting {
    store: PostgresStore,
    proxy: Proxy,
    runs: AtomicUsize,
}

impl Cutting {
    /// Runs once, and cuts the database off before it returns.
    #[idempotent(key = id, name = "sql-cutting", store = self.store)]
    async fn run(&self, id: String) -> Result<usize, AppError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if n == 1 {
            self.proxy.cut();
        }
        Ok(n)
    }
}

#[tokio::test]
async fn corrupt_columns_are_codec_errors_and_never_rerun() {
    // PostgreSQL: an outcome that is not JSON.
    let pg = counter(PostgresStore::connect(&postgres_url()).await.unwrap());
    let id = unique("corrupt");
    pg.run(id.clone()).await.unwrap();
    let key = Key::derive("sql-stores", &id).unwrap();
    sqlx::query("UPDATE idem_records SET outcome = 'not json' WHERE key = $1")
        .bind(key.as_str())
        .execute(pg.store.pool())
        .await
        .unwrap();
    let result = pg.run(id.clone()).await;
    assert!(
        matches!(result, Err(AppError::Idem(Error::Codec(_)))),
        "{result:?}"
    );
    assert_eq!(pg.runs.load(Ordering::SeqCst), 1);

    // SQLite: a column holding bytes that are not text at all.
    let lite = counter(SqliteStore::connect(&sqlite_url("corrupt")).await.unwrap());
    lite.run(id.clone()).await.unwrap();
    sqlx::query(AssertSqlSafe(
        "UPDATE idem_records SET outcome = X'FFFE00' WHERE key = ?1",
    ))
    .bind(key.as_str().to_owned())
    .execute(lite.store.pool())
    .await
    .unwrap();
    let result = lite.run(id).await;
    assert!(
        matches!(result, Err(AppError::Idem(Error::Codec(_)))),
        "{result:?}"
    );
    assert_eq!(lite.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn hostile_keys_are_data_not_sql() {
    let hostile = "x'); DROP TABLE idem_records; --";
    let pg = PostgresStore::connect(&postgres_url()).await.unwrap();
    let lite = SqliteStore::connect(&sqlite_url("hostile")).await.unwrap();
    for store in [&pg as &dyn Store, &lite] {
        let req = ClaimRequest {
            key: hostile,
            fingerprint: None,
            lease: Duration::from_secs(60),
        };
        match store.claim(req).await.unwrap() {
            Claim::Acquired { token, .. } => store.release(hostile, token).await.unwrap(),
            Claim::InProgress { .. } | Claim::Completed { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    // The tables are still there.
    assert!(pg.purge_expired(1).await.is_ok());
    assert!(lite.purge_expired(1).await.is_ok());
    assert!(idem_runtime::SqliteStore::with_table(lite.pool().clone(), "x; drop").is_err());
}
