//! PostgreSQL durability settings (docs/POSTGRES.md): `synchronous_commit`
//! set on the store's connections through the URL, or for one `tx =` call with
//! `SET LOCAL`, reaches the sessions idem commits in; and a store pointed at a
//! server that refuses writes (a hot standby, a read-only session) fails the
//! claim before the work runs.

use std::sync::atomic::{AtomicUsize, Ordering};

use idem_runtime::codec::Codec;
use idem_runtime::engine::{execute, execute_in_tx};
use idem_runtime::key::KeyBuilder;
use idem_runtime::{Error, Options, PostgresStore, Store};
use idem_tests::unique;

use crate::conformance::postgres_url;

static OPTIONS: Options = Options::new();

/// `url` with `options=-c name=value` (libpq's way to set a session setting).
fn with_setting(url: &str, name: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20{name}%3D{value}")
}

/// One payment under `namespace`, counted in `runs` when it runs.
async fn pay(store: &PostgresStore, namespace: &str, runs: &AtomicUsize) -> Result<u32, Error> {
    let key = KeyBuilder::new(namespace).part("pay").finish();
    execute(
        store.handle(),
        &OPTIONS,
        key,
        None,
        Codec::release_errors(),
        async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(42)
        },
    )
    .await
}

async fn setting(store: &PostgresStore, name: &str) -> String {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {name}")))
        .fetch_one(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn synchronous_commit_from_the_url_reaches_the_stores_sessions() {
    let url = with_setting(&postgres_url(), "synchronous_commit", "remote_apply");
    let store = PostgresStore::connect(&url).await.unwrap();
    assert_eq!(setting(&store, "synchronous_commit").await, "remote_apply");
    // Without a synchronous standby, remote_apply commits like `on`: the call
    // completes and replays as usual.
    let runs = AtomicUsize::new(0);
    let ns = unique("pg_sync_commit");
    for _ in 0..2 {
        assert_eq!(pay(&store, &ns, &runs).await.unwrap(), 42);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn set_local_synchronous_commit_holds_for_one_tx_call() {
    let store = PostgresStore::connect(&postgres_url()).await.unwrap();
    let ns = unique("pg_sync_local");
    let mut tx = store.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL synchronous_commit = 'remote_apply'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let key = KeyBuilder::new(&ns).part("order").finish();
    let out: Result<String, Error> = execute_in_tx(
        &store,
        &mut tx,
        &OPTIONS,
        key,
        None,
        Codec::release_errors(),
        async |tx: &mut sqlx::Transaction<'_, sqlx::Postgres>| {
            sqlx::query_scalar::<_, String>("SHOW synchronous_commit")
                .fetch_one(&mut **tx)
                .await
                .map_err(Error::store)
        },
    )
    .await;
    assert_eq!(out.unwrap(), "remote_apply");
    tx.commit().await.unwrap();
    // The setting ended with the transaction; the record is committed.
    assert_eq!(setting(&store, "synchronous_commit").await, "on");
    let key = KeyBuilder::new(&ns).part("order").finish().unwrap();
    let record = store.get(key.as_str()).await.unwrap().expect("committed");
    assert!(record.outcome.is_some());
}

#[tokio::test]
async fn a_store_on_a_read_only_server_fails_the_claim_before_the_work() {
    // Set the schema up first: a standby would have it from its primary.
    PostgresStore::connect(&postgres_url()).await.unwrap();
    let url = with_setting(&postgres_url(), "default_transaction_read_only", "on");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let store = PostgresStore::from_pool(pool);
    let runs = AtomicUsize::new(0);
    let err = pay(&store, &unique("pg_read_only"), &runs)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Store(_)), "{err:?}");
    assert!(err.to_string().contains("read-only"), "{err}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}
