//! The same key with a different request fingerprint is `KeyReused`, whatever
//! state the record is in.

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{idempotent, Error, MemoryStore};
use serde::Serialize;

use crate::{AppError, Runs};

#[derive(Clone, Serialize)]
struct Transfer {
    idempotency_key: String,
    to: String,
    cents: u64,
}

struct Bank {
    store: MemoryStore,
    runs: Runs,
}

impl Bank {
    #[idempotent(key = t.idempotency_key, fingerprint = (t.to, t.cents), store = self.store)]
    async fn transfer(self: Arc<Self>, t: Transfer, hold: Duration) -> Result<usize, AppError> {
        let n = self.runs.hit();
        tokio::time::sleep(hold).await;
        Ok(n)
    }
}

fn transfer(to: &str, cents: u64) -> Transfer {
    Transfer {
        idempotency_key: "client-key-1".into(),
        to: to.into(),
        cents,
    }
}

fn is_key_reused(r: &Result<usize, AppError>) -> bool {
    matches!(r, Err(AppError::Idem(Error::KeyReused)))
}

#[tokio::test(start_paused = true)]
async fn a_changed_request_under_the_same_key_is_key_reused() {
    let bank = Arc::new(Bank {
        store: MemoryStore::new(),
        runs: Runs::default(),
    });
    // While the first is processing.
    let first = tokio::spawn(
        bank.clone()
            .transfer(transfer("bob", 100), Duration::from_secs(1)),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(is_key_reused(
        &bank
            .clone()
            .transfer(transfer("bob", 999), Duration::ZERO)
            .await
    ));
    assert_eq!(first.await.unwrap().unwrap(), 1);
    // Once completed.
    assert!(is_key_reused(
        &bank
            .clone()
            .transfer(transfer("eve", 100), Duration::ZERO)
            .await
    ));
    // The same request still replays.
    assert_eq!(
        bank.clone()
            .transfer(transfer("bob", 100), Duration::ZERO)
            .await
            .unwrap(),
        1
    );
    assert_eq!(bank.runs.get(), 1);
    let message = Error::KeyReused.to_string();
    assert!(message.contains("different request"), "{message}");
}
