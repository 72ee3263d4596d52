//! A message that meets a completed record is a duplicate only if the record
//! is the processed mark. Any other record — corrupt, a cached error, a value
//! written under this consumer's keys by something else — is `Error::Codec`
//! (CONTRACT §3.3): the handler does not run and the message is not taken for
//! done. Found by the break-it review of issue 12: the engine refactor had
//! made `process_in_tx` acknowledge such messages as duplicates.

use std::time::Duration;

use idem_runtime::message::{Deduplicator, Outcome, ProcessError};
use idem_runtime::{Claim, ClaimRequest, Error, PostgresStore, Store};
use idem_tests::{postgres_url, unique};

/// Writes a completed record holding `outcome` under `key`.
async fn completed_with(store: &dyn Store, key: &str, outcome: &[u8]) {
    let Claim::Acquired { token, .. } = store
        .claim(ClaimRequest {
            key,
            fingerprint: None,
            lease: Duration::from_secs(30),
        })
        .await
        .unwrap()
    else {
        panic!("a fresh key")
    };
    store
        .complete(key, token, outcome, Duration::from_secs(3600))
        .await
        .unwrap();
}

const FOREIGN: [&[u8]; 3] = [br#"{"ok":"#, br#"{"err":"declined"}"#, br#"{"ok":5}"#];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_processed_mark_is_a_duplicate_in_a_transaction() {
    let store = PostgresStore::connect(&postgres_url()).await.unwrap();
    let dedup = Deduplicator::new(store.clone(), unique("records-tx"));
    for (i, stored) in FOREIGN.into_iter().enumerate() {
        let id = format!("m-{i}");
        completed_with(&store, dedup.key(id.as_str()).unwrap().as_str(), stored).await;
        let mut tx = store.pool().begin().await.unwrap();
        let mut ran = false;
        let out = dedup
            .process_in_tx(&store, &mut tx, id.as_str(), async |_tx| {
                ran = true;
                Ok::<_, std::io::Error>(())
            })
            .await;
        tx.rollback().await.unwrap();
        assert!(!ran, "the handler never runs");
        assert!(
            matches!(out, Err(ProcessError::Idempotency(Error::Codec(_)))),
            "record {:?}: {out:?}",
            String::from_utf8_lossy(stored)
        );
    }
    // The processed mark itself is a duplicate.
    let mut tx = store.pool().begin().await.unwrap();
    let first = dedup
        .process_in_tx(&store, &mut tx, "fresh", async |_tx| {
            Ok::<_, std::io::Error>(())
        })
        .await;
    tx.commit().await.unwrap();
    assert!(matches!(first, Ok(Outcome::Processed(()))), "{first:?}");
    let mut tx = store.pool().begin().await.unwrap();
    let again = dedup
        .process_in_tx(&store, &mut tx, "fresh", async |_tx| {
            Ok::<_, std::io::Error>(())
        })
        .await;
    tx.rollback().await.unwrap();
    assert!(matches!(again, Ok(Outcome::Duplicate)), "{again:?}");
}

#[tokio::test]
async fn only_the_processed_mark_is_a_duplicate_on_the_stores_own_connection() {
    let store = idem_runtime::MemoryStore::new();
    let dedup = Deduplicator::new(store.clone(), "records");
    for (i, stored) in FOREIGN.into_iter().enumerate() {
        let id = format!("m-{i}");
        completed_with(&store, dedup.key(id.as_str()).unwrap().as_str(), stored).await;
        let mut ran = false;
        let out = dedup
            .process(id.as_str(), || {
                ran = true;
                async { Ok::<_, std::io::Error>(()) }
            })
            .await;
        assert!(!ran, "the handler never runs");
        assert!(
            matches!(out, Err(ProcessError::Idempotency(Error::Codec(_)))),
            "record {:?}: {out:?}",
            String::from_utf8_lossy(stored)
        );
    }
}
