//! A store that fails: fail-closed at claim (the body does not run), and a
//! completion that cannot be written leaves the claim in place rather than
//! inviting a second execution.

use std::sync::atomic::Ordering;

use idem_runtime::{idempotent, Error, RecordState, Store};

use crate::{AppError, FaultyStore, Runs};

struct Svc {
    store: FaultyStore,
    runs: Runs,
}

impl Svc {
    #[idempotent(key = id, name = "faults", store = self.store)]
    async fn pay(&self, id: u32) -> Result<usize, AppError> {
        Ok(self.runs.hit())
    }
}

#[tokio::test(start_paused = true)]
async fn a_store_down_at_claim_fails_closed_and_the_body_does_not_run() {
    let svc = Svc {
        store: FaultyStore::default(),
        runs: Runs::default(),
    };
    svc.store.claims_fail.store(true, Ordering::SeqCst);
    let result = svc.pay(1).await;
    match result {
        Err(AppError::Idem(e @ Error::Store(_))) => {
            assert!(e.is_retryable());
            assert!(e.to_string().contains("store unreachable"), "{e}");
        }
        other => panic!("expected Error::Store, got {other:?}"),
    }
    assert_eq!(svc.runs.get(), 0, "fail-closed: the body did not run");
    svc.store.claims_fail.store(false, Ordering::SeqCst);
    assert_eq!(
        svc.pay(1).await.unwrap(),
        1,
        "once the store is back, work resumes"
    );
    assert_eq!(svc.pay(1).await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_completion_that_cannot_be_written_keeps_the_claim() {
    let svc = Svc {
        store: FaultyStore::default(),
        runs: Runs::default(),
    };
    svc.store.completions_fail.store(true, Ordering::SeqCst);
    let result = svc.pay(2).await;
    assert!(
        matches!(result, Err(AppError::Idem(Error::Store(_)))),
        "{result:?}"
    );
    assert_eq!(svc.runs.get(), 1);
    // The claim stays (not released), so an immediate retry does not run the body again.
    let key = idem_runtime::Key::derive("faults", &2u32).unwrap();
    let record = svc.store.inner.get(key.as_str()).await.unwrap().unwrap();
    assert_eq!(record.state, RecordState::Processing);
    svc.store.completions_fail.store(false, Ordering::SeqCst);
    let retry = svc.pay(2).await;
    assert!(
        matches!(retry, Err(ref e) if e.is_in_progress()),
        "{retry:?}"
    );
    assert_eq!(svc.runs.get(), 1);
}
