//! Duplicates of a `tx =` claim that has not committed yet: what each SQL store
//! can tell them, and how hard they knock.
//!
//! SQLite keeps its open claims in the process, with their fingerprint and
//! lease: a duplicate with another fingerprint is `KeyReused` at once, and one
//! with the same fingerprint is in progress for the lease the holder has left.
//! PostgreSQL cannot read the uncommitted row: a duplicate is in progress for
//! its own lease, so waiters back off as against any running claim and
//! `reject` advertises a sane `retry_after` (it used to be 1 ms, and 20 waiters
//! made thousands of claims a second).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_runtime::async_trait;
use idem_runtime::{
    idempotent, Claim, ClaimRequest, Digest, Error, Key, PostgresStore, SqliteStore, Store,
    TransactionalStore,
};
use idem_tests::hooked::{ClaimHook, Hooked};
use idem_tests::{postgres_url, unique};

const NAME: &str = "uncommitted";

fn request<'a>(key: &'a Key, fingerprint: Option<&'a Digest>, lease: Duration) -> ClaimRequest<'a> {
    ClaimRequest {
        key: key.as_str(),
        fingerprint,
        lease,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_tells_a_reused_key_from_a_duplicate_while_uncommitted() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique("uncommitted"));
    std::fs::create_dir_all(&dir).unwrap();
    let store = SqliteStore::connect(&format!("sqlite://{}/r.db", dir.display()))
        .await
        .unwrap();
    let key = Key::derive(NAME, &unique("k")).unwrap();
    let (a, b) = (Digest([1; 32]), Digest([2; 32]));

    let mut tx = store.pool().begin().await.unwrap();
    let held = store
        .claim_in(&mut tx, request(&key, Some(&a), Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(matches!(held, Claim::Acquired { .. }), "{held:?}");

    // Another fingerprint: the key was reused, whatever the duplicate's path.
    let other = store
        .claim(request(&key, Some(&b), Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(other, Claim::FingerprintMismatch);
    // The same fingerprint (or none): in progress, for the holder's lease.
    for fingerprint in [Some(&a), None] {
        let same = store
            .claim(request(&key, fingerprint, Duration::from_secs(1)))
            .await
            .unwrap();
        match same {
            Claim::InProgress { lease_remaining } => assert!(
                lease_remaining > Duration::from_secs(20),
                "the holder's 30 s lease, not the duplicate's 1 s: {lease_remaining:?}"
            ),
            other => panic!("{other:?}"),
        }
    }
    tx.rollback().await.unwrap();
    // Rolled back: the other fingerprint now claims the key.
    let next = store
        .claim(request(&key, Some(&b), Duration::from_secs(1)))
        .await
        .unwrap();
    assert!(matches!(next, Claim::Acquired { .. }), "{next:?}");
}

/// A claim hook that counts claims.
#[derive(Clone)]
struct Counting {
    claims: Arc<AtomicUsize>,
}

#[async_trait]
impl ClaimHook for Counting {
    async fn claim(&self, inner: &dyn Store, request: ClaimRequest<'_>) -> Result<Claim, Error> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        inner.claim(request).await
    }
}

struct Waiters {
    store: Hooked<Counting>,
    runs: AtomicUsize,
}

impl Waiters {
    #[idempotent(key = id, name = "uncommitted", store = self.store, lease = "5s", in_progress = wait("1s"))]
    async fn wait(&self, id: String) -> Result<usize, Error> {
        Ok(self.runs.fetch_add(1, Ordering::SeqCst) + 1)
    }

    #[idempotent(key = id, name = "uncommitted", store = self.store, lease = "5s", in_progress = reject)]
    async fn reject(&self, id: String) -> Result<usize, Error> {
        Ok(self.runs.fetch_add(1, Ordering::SeqCst) + 1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_waiters_on_an_uncommitted_claim_back_off() {
    let inner = PostgresStore::connect(&postgres_url()).await.unwrap();
    let svc = Arc::new(Waiters {
        store: Hooked::new(
            Arc::new(inner.clone()),
            Counting {
                claims: Arc::new(AtomicUsize::new(0)),
            },
        ),
        runs: AtomicUsize::new(0),
    });
    let id = unique("waiters");
    let key = Key::derive(NAME, &id).unwrap();
    let mut tx = inner.pool().begin().await.unwrap();
    let held = inner
        .claim_in(&mut tx, request(&key, None, Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(matches!(held, Claim::Acquired { .. }), "{held:?}");

    // `reject`: refused, with a retry_after a client can live with.
    match svc.reject(id.clone()).await {
        Err(Error::InProgress { retry_after }) => assert!(
            retry_after >= Duration::from_secs(1),
            "retry_after {retry_after:?}"
        ),
        other => panic!("{other:?}"),
    }

    // 20 waiters for 1 s each: they back off (to 100 ms between claims), and
    // give up with InProgress while the claim stays uncommitted.
    svc.store.hook.claims.store(0, Ordering::SeqCst);
    let started = Instant::now();
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let svc = Arc::clone(&svc);
            let id = id.clone();
            tokio::spawn(async move { svc.wait(id).await })
        })
        .collect();
    for waiter in waiters {
        let result = waiter.await.unwrap();
        assert!(
            matches!(result, Err(Error::InProgress { .. })),
            "{result:?}"
        );
    }
    let elapsed = started.elapsed();
    let claims = svc.store.hook.claims.load(Ordering::SeqCst);
    // Backing off 2, 4, … 64 ms then 100 ms is about 17 claims in a second's
    // wait; polling every millisecond was hundreds per waiter.
    let most = 20 * (10 + (elapsed.as_millis() / 50) as usize);
    assert!(
        claims <= most,
        "{claims} claims by 20 waiters in {elapsed:?} (at most {most})"
    );
    assert_eq!(svc.runs.load(Ordering::SeqCst), 0, "no waiter ran the body");
    tx.rollback().await.unwrap();
    assert_eq!(svc.wait(id).await.unwrap(), 1, "after the rollback it runs");
}

async fn sqlite_store() -> (SqliteStore, String) {
    let dir = std::env::temp_dir().join(unique("idem-open-claims"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}/r.db", dir.display());
    (SqliteStore::connect(&url).await.unwrap(), url)
}

/// The body failed (an uncached error): the engine releases the claim inside the
/// transaction. Until that commits, a duplicate with another fingerprint is in
/// progress (never `KeyReused`, a final answer for a key that holds nothing),
/// and a retry inside the same transaction takes the key again.
/// Found by the break-it review of issue 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_claim_released_in_its_open_transaction_is_never_key_reused() {
    let (store, _) = sqlite_store().await;
    let key = Key::derive("break-open", &unique("k")).unwrap();
    let (a, b) = (Digest([1; 32]), Digest([2; 32]));
    let mut tx = store.pool().begin().await.unwrap();
    let Claim::Acquired { token, .. } = store
        .claim_in(&mut tx, request(&key, Some(&a), Duration::from_secs(30)))
        .await
        .unwrap()
    else {
        panic!()
    };
    store
        .release_in(&mut tx, key.as_str(), token)
        .await
        .unwrap();
    // Another request with a different body, from another task: the release is
    // not committed yet, so it is told to come back, not that the key is reused.
    let other = store
        .claim(request(&key, Some(&b), Duration::from_secs(1)))
        .await
        .unwrap();
    assert!(
        matches!(other, Claim::InProgress { .. }),
        "released, uncommitted: {other:?}"
    );
    // Same transaction, retried (the app retries the failed step before committing).
    let retry = store
        .claim_in(&mut tx, request(&key, Some(&a), Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(matches!(retry, Claim::Acquired { .. }), "retry: {retry:?}");
    tx.commit().await.unwrap();
    // The retry holds the key now, committed, with the first fingerprint.
    let after = store
        .claim(request(&key, Some(&b), Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(after, Claim::FingerprintMismatch, "after commit");
}

/// A key completed inside the transaction, claimed again inside the same
/// transaction: that connection sees its own write, so it replays instead of
/// being told "in progress" by its own claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_the_holding_transaction_sees_its_own_completion() {
    let (store, _) = sqlite_store().await;
    let key = Key::derive("break-open", &unique("k")).unwrap();
    let a = Digest([1; 32]);
    let mut tx = store.pool().begin().await.unwrap();
    let Claim::Acquired { token, .. } = store
        .claim_in(&mut tx, request(&key, Some(&a), Duration::from_secs(30)))
        .await
        .unwrap()
    else {
        panic!()
    };
    store
        .complete_in(
            &mut tx,
            key.as_str(),
            token,
            br#"{"ok":1}"#,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let again = store
        .claim_in(&mut tx, request(&key, Some(&a), Duration::from_secs(30)))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(matches!(again, Claim::Completed { .. }), "{again:?}");
}
