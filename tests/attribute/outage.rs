//! A store outage shorter than the lease, right as the body finishes, ends in a replay.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_runtime::idempotent;
use idem_tests::{AppError, FaultyStore};

struct Svc {
    store: FaultyStore,
    runs: Arc<AtomicUsize>,
}

impl Svc {
    #[idempotent(key = id, name = "review-outage", lease = "3s", store = self.store)]
    async fn pay(&self, id: u32) -> Result<usize, AppError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
        // The store goes away (completions and renewals) as the body finishes.
        self.store.completions_fail.store(true, Ordering::SeqCst);
        self.store.renewals_fail.store(true, Ordering::SeqCst);
        Ok(n)
    }
}

/// Issue 10 item 5: after an outage longer than the lease, "retries replay and
/// the body ran once". The first caller got `Ok` (deferred completion), but a
/// retry that reaches the store as soon as it is back takes the lapsed claim
/// over before the background task's next attempt (backoff up to 2 s), and the
/// body runs a second time.
#[tokio::test(start_paused = true)]
async fn a_retry_after_an_outage_shorter_than_the_lease_replays() {
    let svc = Svc {
        store: FaultyStore::default(),
        runs: Arc::default(),
    };
    assert_eq!(svc.pay(2).await.unwrap(), 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    svc.store.completions_fail.store(false, Ordering::SeqCst);
    svc.store.renewals_fail.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let retry = svc.pay(2).await;
    assert_eq!(svc.runs.load(Ordering::SeqCst), 1, "retry got {retry:?}");
}
