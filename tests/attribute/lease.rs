//! Leases: renewed while the body runs; a lapsed claim is taken over with a new
//! token, and the stale holder's completion is refused and changes nothing.

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{idempotent, Claim, ClaimRequest, Error, MemoryStore, RecordState, Store};

use crate::{AppError, FaultyStore, Runs};

struct Jobs<S> {
    store: S,
    runs: Runs,
}

impl<S: Store> Jobs<S> {
    #[idempotent(key = job, lease = "100ms", name = "lease-jobs", store = self.store)]
    async fn run(&self, job: u32, work: Duration) -> Result<usize, AppError> {
        let n = self.runs.hit();
        tokio::time::sleep(work).await;
        Ok(n)
    }
}

fn key(job: u32) -> String {
    idem_runtime::Key::derive("lease-jobs", &job)
        .unwrap()
        .as_str()
        .to_owned()
}

#[tokio::test(start_paused = true)]
async fn the_lease_is_renewed_while_the_body_runs() {
    let jobs = Arc::new(Jobs {
        store: MemoryStore::new(),
        runs: Runs::default(),
    });
    let long = tokio::spawn({
        let jobs = jobs.clone();
        async move { jobs.run(1, Duration::from_millis(1000)).await }
    });
    // Ten leases later the first call still holds the key.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dup = jobs.run(1, Duration::ZERO).await;
    assert!(matches!(dup, Err(ref e) if e.is_in_progress()), "{dup:?}");
    assert_eq!(long.await.unwrap().unwrap(), 1);
    assert_eq!(jobs.runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_claim_is_taken_over_after_the_lease() {
    let jobs = Jobs {
        store: MemoryStore::new(),
        runs: Runs::default(),
    };
    // A caller that crashed after claiming: its claim is never renewed or completed.
    let crashed = match jobs
        .store
        .claim(ClaimRequest {
            key: &key(2),
            fingerprint: None,
            lease: Duration::from_millis(100),
        })
        .await
        .unwrap()
    {
        Claim::Acquired { token, .. } => token,
        other => panic!("{other:?}"),
    };
    let early = jobs.run(2, Duration::ZERO).await;
    assert!(
        matches!(early, Err(ref e) if e.is_in_progress()),
        "lease still live: {early:?}"
    );
    tokio::time::advance(Duration::from_millis(150)).await;
    assert_eq!(
        jobs.run(2, Duration::ZERO).await.unwrap(),
        1,
        "taken over and run"
    );
    let record = jobs.store.get(&key(2)).await.unwrap().unwrap();
    assert!(record.token > crashed, "the takeover has a newer token");
    // The crashed holder comes back: its completion is refused and changes nothing.
    let late = jobs
        .store
        .complete(&key(2), crashed, b"{\"ok\":99}", Duration::from_secs(60))
        .await;
    assert!(matches!(late, Err(Error::LeaseLost)));
    assert_eq!(jobs.store.get(&key(2)).await.unwrap().unwrap(), record);
    assert_eq!(
        jobs.run(2, Duration::ZERO).await.unwrap(),
        1,
        "the takeover's result replays"
    );
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_lost_its_lease_gets_lease_lost_and_records_nothing() {
    let store = FaultyStore::default();
    store
        .renewals_fail
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let jobs = Arc::new(Jobs {
        store: store.clone(),
        runs: Runs::default(),
    });
    // The first call's renewals cannot reach the store, so its lease lapses mid-body.
    let slow = tokio::spawn({
        let jobs = jobs.clone();
        async move { jobs.run(3, Duration::from_millis(500)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = jobs.run(3, Duration::ZERO).await.unwrap();
    assert_eq!(
        second, 2,
        "the lapsed claim was taken over and the body ran"
    );
    let stale = slow.await.unwrap();
    assert!(
        matches!(stale, Err(AppError::Idem(Error::LeaseLost))),
        "the stale holder learns its outcome was not recorded: {stale:?}"
    );
    let record = store.inner.get(&key(3)).await.unwrap().unwrap();
    assert_eq!(record.state, RecordState::Completed);
    assert_eq!(record.outcome.as_deref(), Some(&b"{\"ok\":2}"[..]));
    assert_eq!(jobs.runs.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_call_polled_once_then_left_unpolled_keeps_its_lease() {
    let jobs = Jobs {
        store: MemoryStore::new(),
        runs: Runs::default(),
    };
    // Polled once (it claims and starts its body), then not polled again for
    // three leases — a `select!` whose other branch runs long.
    let mut first = Box::pin(jobs.run(4, Duration::from_millis(10_000)));
    assert!(futures::poll!(first.as_mut()).is_pending());
    assert_eq!(jobs.runs.get(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dup = jobs.run(4, Duration::ZERO).await;
    assert!(
        matches!(dup, Err(ref e) if e.is_in_progress()),
        "the unpolled call still holds its lease: {dup:?}"
    );
    let record = jobs.store.get(&key(4)).await.unwrap().unwrap();
    assert_eq!(record.state, RecordState::Processing);
    assert!(record.expires_in > Duration::from_millis(50), "{record:?}");
    assert_eq!(jobs.runs.get(), 1, "nobody took it over");
    // Dropping the call releases the claim at once: the next call runs.
    drop(first);
    assert_eq!(jobs.run(4, Duration::ZERO).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_blocks_its_thread_keeps_its_lease() {
    struct Blocking {
        store: MemoryStore,
        runs: Runs,
    }
    impl Blocking {
        #[idempotent(key = job, lease = "1s", name = "blocking", store = self.store)]
        async fn run(&self, job: u32) -> Result<usize, AppError> {
            let n = self.runs.hit();
            // Blocks its worker thread for three leases before its first await.
            std::thread::sleep(Duration::from_secs(3));
            Ok(n)
        }
    }
    let jobs = Arc::new(Blocking {
        store: MemoryStore::new(),
        runs: Runs::default(),
    });
    let first = tokio::spawn({
        let jobs = jobs.clone();
        async move { jobs.run(1).await }
    });
    while jobs.runs.get() == 0 {
        tokio::task::yield_now().await;
    }
    // Past two leases of the blocked body, a duplicate is still refused.
    std::thread::sleep(Duration::from_millis(2_200));
    let dup = jobs.run(1).await;
    assert!(
        matches!(dup, Err(ref e) if e.is_in_progress()),
        "the blocked body still holds its lease: {dup:?}"
    );
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(jobs.run(1).await.unwrap(), 1, "replayed");
    assert_eq!(jobs.runs.get(), 1);
}

/// Jobs on a multi-threaded runtime, whose leases the keeper thread renews.
struct Kept {
    store: FaultyStore,
    runs: Runs,
}

impl Kept {
    #[idempotent(key = job, lease = "1s", name = "kept-jobs", store = self.store)]
    async fn run(&self, job: u32, work: Duration) -> Result<usize, AppError> {
        let n = self.runs.hit();
        tokio::time::sleep(work).await;
        Ok(n)
    }
}

fn kept_key(job: u32) -> String {
    idem_runtime::Key::derive("kept-jobs", &job)
        .unwrap()
        .as_str()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_claims_keep_their_leases_and_renewals_stop_when_they_settle() {
    use std::sync::atomic::Ordering;
    let jobs = Arc::new(Kept {
        store: FaultyStore::default(),
        runs: Runs::default(),
    });
    // 64 bodies that each run for two and a half leases.
    let calls: Vec<_> = (0..64)
        .map(|job| {
            let jobs = jobs.clone();
            tokio::spawn(async move { jobs.run(job, Duration::from_millis(2_500)).await })
        })
        .collect();
    while jobs.runs.get() < 64 {
        tokio::task::yield_now().await;
    }
    // Past the first lease every claim is still held (renewed, not lapsed).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for job in 0..64 {
        let dup = jobs.run(job, Duration::ZERO).await;
        assert!(
            matches!(dup, Err(ref e) if e.is_in_progress()),
            "job {job}: {dup:?}"
        );
    }
    assert!(jobs.store.renewals.load(Ordering::SeqCst) >= 64, "renewed");
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(jobs.runs.get(), 64, "each body ran once");
    // Settled claims are renewed no more (the keeper forgot them): three
    // renewal intervals later the count has not moved.
    let settled = jobs.store.renewals.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(jobs.store.renewals.load(Ordering::SeqCst), settled);
    for job in 0..64 {
        let record = jobs.store.inner.get(&kept_key(job)).await.unwrap().unwrap();
        assert_eq!(record.state, RecordState::Completed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_lease_that_keeps_failing_lapses_and_a_lost_one_is_renewed_no_more() {
    use std::sync::atomic::Ordering;
    let jobs = Arc::new(Kept {
        store: FaultyStore::default(),
        runs: Runs::default(),
    });
    // Renewals cannot reach the store: the keeper retries, the lease lapses.
    jobs.store.renewals_fail.store(true, Ordering::SeqCst);
    let slow = tokio::spawn({
        let jobs = jobs.clone();
        async move { jobs.run(1, Duration::from_millis(3_000)).await }
    });
    while jobs.runs.get() == 0 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let tries = jobs.store.renewals.load(Ordering::SeqCst);
    assert!(tries >= 2, "the keeper retried: {tries}");
    // The lapsed claim is taken over by a second call that holds the key while
    // the first still runs; then the store is back for renewals.
    let second = tokio::spawn({
        let jobs = jobs.clone();
        async move { jobs.run(1, Duration::from_millis(2_500)).await }
    });
    while jobs.runs.get() < 2 {
        tokio::task::yield_now().await;
    }
    jobs.store.renewals_fail.store(false, Ordering::SeqCst);
    // The first holder's next renewal is refused (`LeaseLost`) and it is
    // renewed no more; it learns at completion that nothing was recorded.
    let stale = slow.await.unwrap();
    assert!(
        matches!(stale, Err(AppError::Idem(Error::LeaseLost))),
        "{stale:?}"
    );
    assert_eq!(second.await.unwrap().unwrap(), 2, "the takeover ran");
    assert_eq!(
        jobs.store.renewals_refused.load(Ordering::SeqCst),
        1,
        "a lease refused once is not renewed again"
    );
    let record = jobs.store.inner.get(&kept_key(1)).await.unwrap().unwrap();
    assert_eq!(record.state, RecordState::Completed);
    assert_eq!(record.outcome.as_deref(), Some(&b"{\"ok\":2}"[..]));
    assert_eq!(jobs.runs.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_panics_is_retried_and_the_lease_kept() {
    use std::sync::atomic::Ordering;
    let jobs = Arc::new(Kept {
        store: FaultyStore::default(),
        runs: Runs::default(),
    });
    // The store's first renewal panics (a bug in a store), then it recovers.
    jobs.store.renewals_panic.store(true, Ordering::SeqCst);
    let first = tokio::spawn({
        let jobs = jobs.clone();
        async move { jobs.run(1, Duration::from_millis(2_500)).await }
    });
    while jobs.store.renewals.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    jobs.store.renewals_panic.store(false, Ordering::SeqCst);
    // Past the first lease, the claim is still held: the panic was retried.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let dup = jobs.run(1, Duration::ZERO).await;
    assert!(
        matches!(dup, Err(ref e) if e.is_in_progress()),
        "the lease lapsed after a renewal panicked: {dup:?}"
    );
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(jobs.runs.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_due_sooner_than_the_keeper_planned_to_wake_is_on_time() {
    use idem_runtime::engine::{claim, Claimed, Options};
    // A claim with a long lease: the keeper plans to wake in 20 s for it (or
    // lingers a second with nothing else queued).
    let store = MemoryStore::new();
    let long = claim(
        store.handle(),
        &Options::new().lease(Duration::from_secs(60)),
        idem_runtime::Key::derive("kept-long", &1u32).unwrap(),
        None,
    )
    .await
    .unwrap();
    assert!(matches!(long, Claimed::Run(_)));
    tokio::time::sleep(Duration::from_millis(20)).await;
    // A claim with a 1 s lease is due for renewal long before that.
    let jobs = Arc::new(Kept {
        store: FaultyStore::default(),
        runs: Runs::default(),
    });
    let first = tokio::spawn({
        let jobs = jobs.clone();
        async move { jobs.run(7, Duration::from_millis(2_500)).await }
    });
    while jobs.runs.get() == 0 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let dup = jobs.run(7, Duration::ZERO).await;
    assert!(
        matches!(dup, Err(ref e) if e.is_in_progress()),
        "the short lease lapsed: {dup:?}"
    );
    assert_eq!(first.await.unwrap().unwrap(), 1);
    drop(long);
}
