//! A store that fails: fail-closed at claim (the body does not run), and a
//! completion that cannot be written is kept and retried in the background with
//! the claim held, rather than inviting a second execution.

use std::sync::atomic::Ordering;
use std::time::Duration;

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
async fn a_completion_that_keeps_failing_is_recorded_in_the_background_and_never_reruns() {
    let svc = Svc {
        store: FaultyStore::default(),
        runs: Runs::default(),
    };
    svc.store.completions_fail.store(true, Ordering::SeqCst);
    // The work ran and its outcome is in hand: the caller gets it.
    assert_eq!(svc.pay(2).await.unwrap(), 1);
    assert_eq!(svc.runs.get(), 1);
    let key = idem_runtime::Key::derive("faults", &2u32).unwrap();
    // The store stays unwritable for three leases (30 s each): the claim is kept
    // renewed, so every retry meanwhile waits instead of running the work again.
    for _ in 0..9 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let retry = svc.pay(2).await;
        assert!(
            matches!(retry, Err(ref e) if e.is_in_progress()),
            "{retry:?}"
        );
        let record = svc.store.inner.get(key.as_str()).await.unwrap().unwrap();
        assert_eq!(record.state, RecordState::Processing);
    }
    assert_eq!(svc.runs.get(), 1);
    // The store recovers: the background completion lands and retries replay.
    svc.store.completions_fail.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let record = svc.store.inner.get(key.as_str()).await.unwrap().unwrap();
    assert_eq!(record.state, RecordState::Completed);
    assert_eq!(svc.pay(2).await.unwrap(), 1, "replayed");
    assert_eq!(svc.runs.get(), 1, "the body ran once");
}

/// A store that answers only once an outcome is recorded (a `RedisStore`
/// waiting for replicas): a completion that keeps failing still goes on in the
/// background with the claim held, but the caller gets the store's error, not
/// a result the store may never hold; the retry replays once it lands.
#[tokio::test(start_paused = true)]
async fn a_store_that_answers_only_once_recorded_fails_the_call_and_replays_later() {
    let svc = Svc {
        store: FaultyStore::default(),
        runs: Runs::default(),
    };
    svc.store.strict.store(true, Ordering::SeqCst);
    svc.store.completions_fail.store(true, Ordering::SeqCst);
    let first = svc.pay(3).await;
    assert!(
        matches!(first, Err(AppError::Idem(Error::Store(_)))),
        "{first:?}"
    );
    assert_eq!(svc.runs.get(), 1);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let retry = svc.pay(3).await;
    assert!(
        matches!(retry, Err(ref e) if e.is_in_progress()),
        "{retry:?}"
    );
    svc.store.completions_fail.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(svc.pay(3).await.unwrap(), 1, "replayed");
    assert_eq!(svc.runs.get(), 1, "the body ran once");
}

#[tokio::test(start_paused = true)]
async fn a_background_completion_gives_up_after_its_limit_and_the_claim_lapses() {
    let svc = Svc {
        store: FaultyStore::default(),
        runs: Runs::default(),
    };
    svc.store.completions_fail.store(true, Ordering::SeqCst);
    assert_eq!(svc.pay(3).await.unwrap(), 1);
    tokio::time::sleep(idem_runtime::engine::COMPLETION_RETRY_LIMIT + Duration::from_secs(5)).await;
    // Bounded: the claim is no longer renewed; once its lease lapses a retry runs.
    tokio::time::sleep(Duration::from_secs(31)).await;
    svc.store.completions_fail.store(false, Ordering::SeqCst);
    assert_eq!(svc.pay(3).await.unwrap(), 2);
    assert_eq!(svc.pay(3).await.unwrap(), 2);
}

struct Waiting {
    store: FaultyStore,
    runs: Runs,
}

impl Waiting {
    #[idempotent(key = id, name = "faults-wait", in_progress = wait("60s"), store = self.store)]
    async fn pay(&self, id: u32, work: Duration) -> Result<usize, AppError> {
        let n = self.runs.hit();
        tokio::time::sleep(work).await;
        Ok(n)
    }
}

#[tokio::test(start_paused = true)]
async fn a_waiting_duplicate_rides_out_a_transient_store_error() {
    let svc = std::sync::Arc::new(Waiting {
        store: FaultyStore::default(),
        runs: Runs::default(),
    });
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { svc.pay(1, Duration::from_secs(5)).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let waiter = tokio::spawn({
        let svc = svc.clone();
        async move { svc.pay(1, Duration::ZERO).await }
    });
    // The waiter is polling; the store drops out for a second, then comes back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    svc.store.claims_fail.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    svc.store.claims_fail.store(false, Ordering::SeqCst);
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(
        waiter.await.unwrap().unwrap(),
        1,
        "the wait survived the store error and replayed the first result"
    );
    assert_eq!(svc.runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_store_down_before_any_wait_still_fails_closed_at_once() {
    let svc = Waiting {
        store: FaultyStore::default(),
        runs: Runs::default(),
    };
    svc.store.claims_fail.store(true, Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    let result = svc.pay(2, Duration::ZERO).await;
    assert!(
        matches!(result, Err(AppError::Idem(Error::Store(_)))),
        "{result:?}"
    );
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(svc.runs.get(), 0);
}
