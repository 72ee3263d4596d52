//! `tx =`: the claim, the business write and the completed record share the
//! caller's transaction, on PostgreSQL and SQLite. Commit keeps all three;
//! rollback leaves nothing and the next call runs at once; a duplicate meets
//! the uncommitted claim (waits, or is refused at once); a process killed
//! between the write and the commit leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use idem_runtime::{Error, Key, RecordState, Store};
use idem_tests::{unique, AppError, PgOrders, SqliteOrders};

fn sqlite_url(name: &str) -> String {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique(name));
    std::fs::create_dir_all(&dir).unwrap();
    format!("sqlite://{}/orders.db", dir.display())
}

async fn record_state(store: &dyn Store, namespace: &str, order_ref: &str) -> Option<RecordState> {
    let key = Key::derive(namespace, order_ref).unwrap();
    store.get(key.as_str()).await.unwrap().map(|r| r.state)
}

/// Runs the same scenario against both databases.
macro_rules! both {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let svc = PgOrders::setup("orders_tx_tests").await;
                ($body)(Db::Pg(svc)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let svc = SqliteOrders::setup(&sqlite_url(stringify!($name)), "orders").await;
                ($body)(Db::Sqlite(svc)).await;
            }
        }
    };
}

/// Either fixture, with the calls the scenarios need.
#[allow(missing_docs)]
pub enum Db {
    Pg(PgOrders),
    Sqlite(SqliteOrders),
}

/// How a scenario ends its transaction.
#[derive(Clone, Copy)]
#[allow(missing_docs)]
pub enum End {
    Commit,
    Rollback,
}

impl Db {
    fn namespace(&self) -> &'static str {
        match self {
            Db::Pg(_) => "pg-place",
            Db::Sqlite(_) => "sqlite-place",
        }
    }

    fn store(&self) -> &dyn Store {
        match self {
            Db::Pg(s) => &s.store,
            Db::Sqlite(s) => &s.store,
        }
    }

    async fn count(&self, order_ref: &str) -> i64 {
        match self {
            Db::Pg(s) => s.count(order_ref).await,
            Db::Sqlite(s) => s.count(order_ref).await,
        }
    }

    /// Places an order in a fresh transaction and ends it as told.
    async fn place(&self, order_ref: &str, end: End) -> Result<i64, AppError> {
        macro_rules! run {
            ($svc:expr) => {{
                let mut tx = $svc.store.pool().begin().await.unwrap();
                let out = $svc.place(&mut tx, order_ref).await;
                match end {
                    End::Commit => tx.commit().await.unwrap(),
                    End::Rollback => tx.rollback().await.unwrap(),
                }
                out
            }};
        }
        match self {
            Db::Pg(s) => run!(s),
            Db::Sqlite(s) => run!(s),
        }
    }

    /// Places an order whose business logic refuses after writing, then commits.
    async fn place_refused(&self, order_ref: &str) -> Result<i64, AppError> {
        macro_rules! run {
            ($svc:expr) => {{
                let mut tx = $svc.store.pool().begin().await.unwrap();
                let out = $svc.place_refused(&mut tx, order_ref).await;
                tx.commit().await.unwrap();
                out
            }};
        }
        match self {
            Db::Pg(s) => run!(s),
            Db::Sqlite(s) => run!(s),
        }
    }
}

both!(commit_keeps_the_order_and_the_record, |db: Db| async move {
    let r = unique("commit");
    let id = db.place(&r, End::Commit).await.unwrap();
    assert_eq!(db.count(&r).await, 1);
    assert_eq!(
        record_state(db.store(), db.namespace(), &r).await,
        Some(RecordState::Completed)
    );
    // A retry replays the committed result: no second order.
    assert_eq!(db.place(&r, End::Commit).await.unwrap(), id);
    assert_eq!(db.count(&r).await, 1);
});

both!(
    rollback_leaves_nothing_and_the_next_call_runs_at_once,
    |db: Db| async move {
        let r = unique("rollback");
        db.place(&r, End::Rollback).await.unwrap();
        assert_eq!(db.count(&r).await, 0, "no order");
        assert_eq!(
            record_state(db.store(), db.namespace(), &r).await,
            None,
            "no record"
        );
        let id = db.place(&r, End::Commit).await.unwrap();
        assert_eq!(db.count(&r).await, 1);
        assert_eq!(db.place(&r, End::Commit).await.unwrap(), id);
    }
);

both!(
    an_error_deletes_the_claim_inside_the_transaction,
    |db: Db| async move {
        let r = unique("refused");
        assert!(matches!(db.place_refused(&r).await, Err(AppError::Refused)));
        // The caller committed its own write, but the claim is gone: a retry runs.
        assert_eq!(record_state(db.store(), db.namespace(), &r).await, None);
        db.place(&r, End::Commit).await.unwrap();
        assert_eq!(
            db.count(&r).await,
            2,
            "the refused attempt's write was the caller's to keep"
        );
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_duplicate_is_refused_at_once_then_replays_after_commit() {
    let svc = std::sync::Arc::new(PgOrders::setup("orders_tx_tests").await);
    let r = unique("dup");
    let mut first = svc.store.pool().begin().await.unwrap();
    let id = svc.place(&mut first, &r).await.unwrap();

    // Uncommitted: a rejecting duplicate learns at once.
    let mut dup = svc.store.pool().begin().await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(5), svc.place_or_reject(&mut dup, &r))
        .await
        .expect("refused at once, not blocked");
    assert!(
        refused.as_ref().is_err_and(AppError::is_in_progress),
        "{refused:?}"
    );
    dup.rollback().await.unwrap();

    // A waiting duplicate blocks until the first commits, then replays.
    let waiter = tokio::spawn({
        let svc = svc.clone();
        let r = r.clone();
        async move {
            let mut tx = svc.store.pool().begin().await.unwrap();
            let out = svc.place(&mut tx, &r).await;
            tx.commit().await.unwrap();
            out
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiter.is_finished(),
        "the waiting duplicate waits for the commit"
    );
    first.commit().await.unwrap();
    assert_eq!(
        waiter.await.unwrap().unwrap(),
        id,
        "it replays the committed result"
    );
    assert_eq!(svc.count(&r).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_waiting_duplicate_replays_after_commit() {
    let svc = std::sync::Arc::new(SqliteOrders::setup(&sqlite_url("dup"), "orders").await);
    let r = unique("dup");
    let mut first = svc.store.pool().begin().await.unwrap();
    let id = svc.place(&mut first, &r).await.unwrap();
    let waiter = tokio::spawn({
        let svc = svc.clone();
        let r = r.clone();
        async move {
            let mut tx = svc.store.pool().begin().await.unwrap();
            let out = svc.place(&mut tx, &r).await;
            tx.commit().await.unwrap();
            out
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.commit().await.unwrap();
    assert_eq!(waiter.await.unwrap().unwrap(), id);
    assert_eq!(svc.count(&r).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_duplicate_is_refused_at_once_while_uncommitted() {
    let svc = SqliteOrders::setup(&sqlite_url("reject"), "orders").await;
    let r = unique("reject");
    let mut first = svc.store.pool().begin().await.unwrap();
    svc.place(&mut first, &r).await.unwrap();
    // Without a transaction, and inside one: both refused at once.
    let started = std::time::Instant::now();
    let mut dup = svc.store.pool().begin().await.unwrap();
    let refused = svc.place_or_reject(&mut dup, &r).await;
    assert!(
        refused.as_ref().is_err_and(AppError::is_in_progress),
        "{refused:?}"
    );
    dup.rollback().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered before the 5 s busy timeout could pass"
    );
    first.rollback().await.unwrap();
    // The rollback cleared the in-flight mark: the next call runs at once.
    let mut tx = svc.store.pool().begin().await.unwrap();
    svc.place_or_reject(&mut tx, &r).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(svc.count(&r).await, 1);
}

/// Starts a worker that places `order_ref` in a transaction and never commits;
/// returns once it has written, then kills it with SIGKILL.
fn kill_mid_transaction(args: &[&str]) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_idem-test-worker"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("worker");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ready"), "worker said {line:?}");
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sigkill_before_commit_leaves_nothing() {
    let svc = PgOrders::setup("orders_tx_kill").await;
    let r = unique("kill");
    kill_mid_transaction(&["hold", "postgres", "orders_tx_kill", &r]);
    // The retry runs (waiting only while the server notices the dead client).
    let mut tx = svc.store.pool().begin().await.unwrap();
    svc.place(&mut tx, &r).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(svc.count(&r).await, 1, "exactly one order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sigkill_before_commit_leaves_nothing() {
    let url = sqlite_url("kill");
    let svc = SqliteOrders::setup(&url, "orders").await;
    let r = unique("kill");
    kill_mid_transaction(&["hold", "sqlite", &url, "orders", &r]);
    let mut tx = svc.store.pool().begin().await.unwrap();
    svc.place(&mut tx, &r).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(svc.count(&r).await, 1, "exactly one order");
}

/// `engine::execute_in_tx`, the typed transaction step without the attribute:
/// the body's write and the record commit together; a rolled-back call leaves
/// nothing, so the next runs; a committed one replays without running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_in_tx_commits_the_write_and_the_record_together() {
    use idem_runtime::codec::Codec;
    use idem_runtime::engine::{execute_in_tx, Options};
    use idem_runtime::key::KeyBuilder;
    use sqlx::{AssertSqlSafe, Postgres, Transaction};

    let svc = PgOrders::setup("orders_execute_in_tx").await;
    let order_ref = unique("exec-tx");
    let namespace = "execute-in-tx";
    let options = Options::new();
    let place = async |order_ref: &str, end: End| -> Result<i64, Error> {
        let mut tx = svc.store.pool().begin().await.unwrap();
        let key = KeyBuilder::new(namespace).part(order_ref).finish();
        let out = execute_in_tx(
            &svc.store,
            &mut tx,
            &options,
            key,
            None,
            Codec::release_errors(),
            async |tx: &mut Transaction<'_, Postgres>| {
                let id: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                    "INSERT INTO {} (order_ref, by_pid) VALUES ($1, 0) RETURNING id",
                    svc.orders
                )))
                .bind(order_ref)
                .fetch_one(&mut **tx)
                .await
                .map_err(Error::store)?;
                Ok(id)
            },
        )
        .await;
        match end {
            End::Commit => tx.commit().await.unwrap(),
            End::Rollback => tx.rollback().await.unwrap(),
        }
        out
    };

    place(&order_ref, End::Rollback).await.unwrap();
    assert_eq!(
        svc.count(&order_ref).await,
        0,
        "the rollback took the write back"
    );
    assert_eq!(
        record_state(&svc.store, namespace, &order_ref).await,
        None,
        "and the claim"
    );

    let first = place(&order_ref, End::Commit).await.unwrap();
    assert_eq!(svc.count(&order_ref).await, 1);
    assert_eq!(
        record_state(&svc.store, namespace, &order_ref).await,
        Some(RecordState::Completed)
    );
    assert_eq!(
        place(&order_ref, End::Commit).await.unwrap(),
        first,
        "a replay"
    );
    assert_eq!(svc.count(&order_ref).await, 1, "the replay ran nothing");
}

/// A store named by a method call (`store = self.store()`, a value, not a
/// place) lives as long as the call with `tx =` too; it used to be a borrow of
/// a temporary dropped at the end of the generated `let` (E0716), found by
/// the chaos harness's service.
mod store_from_a_method {
    use idem_runtime::{idempotent, SqliteStore};
    use idem_tests::AppError;
    use sqlx::{Sqlite, Transaction};

    struct Service {
        stores: Vec<SqliteStore>,
    }

    impl Service {
        fn store(&self) -> &SqliteStore {
            &self.stores[0]
        }

        #[idempotent(key = id, name = "store-from-a-method", store = self.store(), tx = tx)]
        async fn place(
            &self,
            tx: &mut Transaction<'_, Sqlite>,
            id: &str,
        ) -> Result<String, AppError> {
            sqlx::query("INSERT INTO placed (id) VALUES (?1)")
                .bind(id)
                .execute(&mut **tx)
                .await?;
            Ok(format!("placed {id}"))
        }
    }

    #[tokio::test]
    async fn runs_once_and_replays() {
        let store = SqliteStore::connect(&super::sqlite_url("store_from_a_method"))
            .await
            .unwrap();
        sqlx::query("CREATE TABLE placed (id TEXT NOT NULL)")
            .execute(store.pool())
            .await
            .unwrap();
        let svc = Service {
            stores: vec![store.clone()],
        };
        for _ in 0..2 {
            let mut tx = store.pool().begin().await.unwrap();
            assert_eq!(svc.place(&mut tx, "o-1").await.unwrap(), "placed o-1");
            tx.commit().await.unwrap();
        }
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM placed")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(rows, 1);
    }
}
