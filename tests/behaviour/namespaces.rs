//! Two functions never share keys unless they share a `name`.

use idem_runtime::{idempotent, MemoryStore};

use crate::{AppError, Runs};

struct Svc {
    store: MemoryStore,
    runs: Runs,
}

impl Svc {
    #[idempotent(key = id, store = self.store)]
    async fn refund(&self, id: u64) -> Result<String, AppError> {
        self.runs.hit();
        Ok("refund".into())
    }

    #[idempotent(key = id, store = self.store)]
    async fn capture(&self, id: u64) -> Result<String, AppError> {
        self.runs.hit();
        Ok("capture".into())
    }

    #[idempotent(key = id, name = "shared-ledger", store = self.store)]
    async fn post_a(&self, id: u64) -> Result<String, AppError> {
        Ok(format!("a{}", self.runs.hit()))
    }

    #[idempotent(key = id, name = "shared-ledger", store = self.store)]
    async fn post_b(&self, id: u64) -> Result<String, AppError> {
        Ok(format!("b{}", self.runs.hit()))
    }
}

#[tokio::test]
async fn functions_are_isolated_by_namespace() {
    let svc = Svc {
        store: MemoryStore::new(),
        runs: Runs::default(),
    };
    assert_eq!(svc.refund(1).await.unwrap(), "refund");
    assert_eq!(svc.capture(1).await.unwrap(), "capture");
    assert_eq!(svc.runs.get(), 2, "same key, different functions: both ran");
    assert_eq!(svc.post_a(1).await.unwrap(), "a3");
    assert_eq!(
        svc.post_b(1).await.unwrap(),
        "a3",
        "a shared name shares records"
    );
    assert_eq!(svc.runs.get(), 3);
}
