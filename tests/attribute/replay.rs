//! A completed call is replayed until its ttl elapses; then it runs again.

use std::time::Duration;

use idem_runtime::{idempotent, MemoryStore};
use serde::{Deserialize, Serialize};

use crate::{AppError, Runs};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    id: usize,
    amount: u64,
}

struct Payments {
    store: MemoryStore,
    runs: Runs,
}

impl Payments {
    #[idempotent(key = (customer, amount), ttl = "1h", store = self.store)]
    async fn charge(&self, customer: String, amount: u64) -> Result<Receipt, AppError> {
        let id = self.runs.hit();
        Ok(Receipt { id, amount })
    }
}

fn payments() -> Payments {
    Payments {
        store: MemoryStore::new(),
        runs: Runs::default(),
    }
}

#[tokio::test]
async fn a_repeat_gets_the_first_result_without_running() {
    let p = payments();
    let first = p.charge("ann".into(), 100).await.unwrap();
    let second = p.charge("ann".into(), 100).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(p.runs.get(), 1);
    // A different key runs.
    let other = p.charge("ann".into(), 200).await.unwrap();
    assert_eq!(other.id, 2);
    assert_eq!(p.runs.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn ttl_expiry_runs_the_body_again() {
    let p = payments();
    let first = p.charge("bob".into(), 5).await.unwrap();
    tokio::time::advance(Duration::from_secs(3599)).await;
    assert_eq!(
        p.charge("bob".into(), 5).await.unwrap(),
        first,
        "still within the ttl"
    );
    assert_eq!(p.runs.get(), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    let again = p.charge("bob".into(), 5).await.unwrap();
    assert_eq!(again.id, 2, "after the ttl the body runs again");
    assert_eq!(p.runs.get(), 2);
}

#[tokio::test]
async fn the_store_holds_the_json_outcome() {
    let p = payments();
    p.charge("cy".into(), 9).await.unwrap();
    let key = idem_runtime::key::KeyBuilder::new(concat!(module_path!(), "::Payments::charge"))
        .part("cy")
        .part(&9u64)
        .finish()
        .unwrap();
    let record = idem_runtime::Store::get(&p.store, key.as_str())
        .await
        .unwrap()
        .expect("a completed record under namespace:digest");
    assert_eq!(record.state, idem_runtime::RecordState::Completed);
    assert_eq!(
        record.outcome.as_deref(),
        Some(&br#"{"ok":{"id":1,"amount":9}}"#[..])
    );
}
