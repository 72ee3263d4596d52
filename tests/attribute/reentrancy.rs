//! A call made from inside an idempotent body with the key that body holds
//! fails at once with `Error::Reentrant`, instead of waiting for itself.

use idem_runtime::{idempotent, Error, MemoryStore};

use crate::{AppError, Runs};

struct Svc {
    store: MemoryStore,
    runs: Runs,
}

impl Svc {
    #[idempotent(key = id, name = "reentrant", in_progress = wait("60s"), store = self.store)]
    async fn outer(&self, id: u32) -> Result<String, AppError> {
        self.runs.hit();
        match self.inner(id).await {
            Err(AppError::Idem(Error::Reentrant)) => Ok("refused at once".into()),
            other => Ok(format!("unexpected: {other:?}")),
        }
    }

    // Shares the outer call's name and key: the same record.
    #[idempotent(key = id, name = "reentrant", in_progress = wait("60s"), store = self.store)]
    async fn inner(&self, id: u32) -> Result<String, AppError> {
        self.runs.hit();
        Ok("inner ran".into())
    }

    // Three levels: outer key A → middle key B → the inner call with key A again.
    #[idempotent(key = id, name = "reentrant", store = self.store)]
    async fn top(&self, id: u32) -> Result<String, AppError> {
        self.middle(id + 1000, id).await
    }

    #[idempotent(key = id, name = "reentrant-middle", store = self.store)]
    async fn middle(&self, id: u32, back: u32) -> Result<String, AppError> {
        match self.inner(back).await {
            Err(AppError::Idem(Error::Reentrant)) => Ok("refused two levels down".into()),
            other => Ok(format!("unexpected: {other:?}")),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_reentrant_call_with_the_held_key_fails_at_once() {
    let svc = Svc {
        store: MemoryStore::new(),
        runs: Runs::default(),
    };
    let started = tokio::time::Instant::now();
    assert_eq!(svc.outer(1).await.unwrap(), "refused at once");
    assert_eq!(
        started.elapsed(),
        std::time::Duration::ZERO,
        "no wait for itself"
    );
    assert_eq!(svc.runs.get(), 1, "the inner body did not run");
    // Outside the outer body the same key is an ordinary replay.
    assert_eq!(svc.inner(1).await.unwrap(), "refused at once");
    assert_eq!(svc.top(2).await.unwrap(), "refused two levels down");
    // A different key inside a body is fine.
    assert_eq!(svc.inner(3).await.unwrap(), "inner ran");
    let message = Error::Reentrant.to_string();
    assert!(message.contains("re-entrant"), "{message}");
}
