//! A key that is `None` or empty fails with `MissingKey` and the body does not run.

use idem_runtime::{idempotent, Error, MemoryStore};

use crate::{AppError, Runs};

struct Api {
    store: MemoryStore,
    runs: Runs,
}

impl Api {
    #[idempotent(key = idempotency_key, store = self.store)]
    async fn create(&self, idempotency_key: Option<String>) -> Result<usize, AppError> {
        Ok(self.runs.hit())
    }

    #[idempotent(key = (user, header), store = self.store)]
    async fn scoped(&self, user: u64, header: &str) -> Result<usize, AppError> {
        Ok(self.runs.hit())
    }
}

fn missing(r: Result<usize, AppError>) -> bool {
    matches!(r, Err(AppError::Idem(Error::MissingKey)))
}

#[tokio::test]
async fn none_or_empty_keys_are_missing_and_nothing_runs() {
    let api = Api {
        store: MemoryStore::new(),
        runs: Runs::default(),
    };
    assert!(missing(api.create(None).await));
    assert!(missing(api.create(Some(String::new())).await));
    assert!(missing(api.scoped(1, "").await));
    assert_eq!(api.runs.get(), 0, "the body never ran");
    assert!(api.store.is_empty(), "nothing was claimed");
    // Some(key) behaves like the key itself.
    assert_eq!(api.create(Some("k".into())).await.unwrap(), 1);
    assert_eq!(api.create(Some("k".into())).await.unwrap(), 1);
}
