//! `tx =` with an outcome the codec refuses: the first call fails with
//! `Error::Codec` and its claim is deleted inside the transaction, so a caller
//! that commits anyway leaves no claim behind and the retry runs at once.

use std::collections::HashMap;

use idem_runtime::{idempotent, Error, Key, PostgresStore, SqliteStore, Store};
use idem_tests::{postgres_url, unique, AppError};
use sqlx::{Postgres, Sqlite, Transaction};

/// JSON objects need string keys: a map keyed by tuples cannot be stored.
type Unstorable = HashMap<(u8, u8), u8>;

#[idempotent(key = id, name = "tx-refused-pg", tx = tx, store = store)]
async fn pg(
    store: &PostgresStore,
    tx: &mut Transaction<'_, Postgres>,
    id: &str,
) -> Result<Unstorable, AppError> {
    Ok(HashMap::from([((1, 2), 3)]))
}

#[idempotent(key = id, name = "tx-refused-sqlite", tx = tx, store = store)]
async fn lite(
    store: &SqliteStore,
    tx: &mut Transaction<'_, Sqlite>,
    id: &str,
) -> Result<Unstorable, AppError> {
    Ok(HashMap::from([((1, 2), 3)]))
}

fn refused<T: std::fmt::Debug>(result: Result<T, AppError>) {
    assert!(
        matches!(result, Err(AppError::Idem(Error::Codec(_)))),
        "{result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_refused_outcome_leaves_no_claim_in_a_committed_transaction() {
    let store = PostgresStore::connect(&postgres_url()).await.unwrap();
    let id = unique("refused");
    for _ in 0..2 {
        let mut tx = store.pool().begin().await.unwrap();
        refused(pg(&store, &mut tx, &id).await);
        tx.commit().await.unwrap();
        let key = Key::derive("tx-refused-pg", &id).unwrap();
        assert!(
            store.get(key.as_str()).await.unwrap().is_none(),
            "no claim left"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_refused_outcome_leaves_no_claim_in_a_committed_transaction() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique("refused"));
    std::fs::create_dir_all(&dir).unwrap();
    let store = SqliteStore::connect(&format!("sqlite://{}/r.db", dir.display()))
        .await
        .unwrap();
    for _ in 0..2 {
        let mut tx = store.pool().begin().await.unwrap();
        refused(lite(&store, &mut tx, "order-1").await);
        tx.commit().await.unwrap();
        let key = Key::derive("tx-refused-sqlite", "order-1").unwrap();
        assert!(
            store.get(key.as_str()).await.unwrap().is_none(),
            "no claim left"
        );
    }
}
