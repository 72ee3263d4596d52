//! Adversarial review tests for issue 10 (engine + macro namespaces).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{idempotent, Error, MemoryStore};
use idem_tests::{AppError, FaultyStore};

static COUNT: AtomicUsize = AtomicUsize::new(0);

struct Svc {
    store: FaultyStore,
    runs: Arc<AtomicUsize>,
}

impl Svc {
    #[idempotent(key = id, name = "review-cancel-complete", store = self.store)]
    async fn pay(&self, id: u32) -> Result<u32, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(7)
    }
}

/// Item 5: once the body's outcome is in hand, a store hiccup must end in a
/// replay, not a rerun. A caller that gives up (timeout) while the engine is
/// retrying the completion in place drops the claim without completing it and
/// without releasing it: duplicates get InProgress for a whole lease, then the
/// body runs a second time.
#[tokio::test(start_paused = true)]
async fn cancelled_during_completion_retries_reruns_the_body() {
    let svc = Svc { store: FaultyStore::default(), runs: Arc::default() };
    svc.store.completions_fail.store(true, Ordering::SeqCst);
    // Body takes 5 ms, then completion fails at once and sleeps 20 ms before
    // its second try: the caller's 15 ms timeout fires in between.
    let first = tokio::time::timeout(Duration::from_millis(15), svc.pay(1)).await;
    assert!(first.is_err(), "expected the caller's timeout, got {first:?}");
    assert_eq!(svc.runs.load(Ordering::SeqCst), 1);
    svc.store.completions_fail.store(false, Ordering::SeqCst);

    // Right after: the claim was neither released nor completed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dup = svc.pay(1).await;
    let in_progress = matches!(dup, Err(AppError::Idem(Error::InProgress { .. })));
    // After the lease (30 s) the body runs again.
    tokio::time::sleep(Duration::from_secs(31)).await;
    let later = svc.pay(1).await;
    assert_eq!(
        svc.runs.load(Ordering::SeqCst),
        1,
        "body ran again: dup right after cancel = {dup:?} (in_progress={in_progress}), after lease = {later:?}"
    );
}

// ---- namespaces ----

#[idempotent(key = k, store = store)]
async fn apply<F: Fn(u32) -> u32>(store: &MemoryStore, k: u32, f: F) -> Result<u32, AppError> {
    COUNT.fetch_add(1, Ordering::SeqCst);
    Ok(f(k))
}

/// SPEC §2: each instantiation of a generic function gets its own namespace.
/// Two closures are two instantiations, but `type_name` prints both closure
/// types the same (`review_engine::...::{{closure}}`), so they share records.
#[tokio::test]
async fn two_instantiations_with_closure_types_share_a_namespace() {
    let store = MemoryStore::new();
    let a = apply(&store, 3, |x| x + 1).await.unwrap();
    let b = apply(&store, 3, |x| x * 100).await.unwrap();
    assert_eq!((a, b), (4, 300), "second instantiation replayed the first's result");
}

struct Counter(AtomicUsize);

async fn sibling_blocks(store: &MemoryStore, counter: &'static Counter) -> (Result<u32, AppError>, Result<u32, AppError>) {
    let a = {
        #[idempotent(key = k, store = store)]
        async fn step(store: &MemoryStore, k: u32, c: &'static Counter) -> Result<u32, AppError> {
            c.0.fetch_add(1, Ordering::SeqCst);
            Ok(1)
        }
        step(store, 9, counter).await
    };
    let b = {
        #[idempotent(key = k, store = store)]
        async fn step(store: &MemoryStore, k: u32, c: &'static Counter) -> Result<u32, AppError> {
            c.0.fetch_add(1, Ordering::SeqCst);
            Ok(2)
        }
        step(store, 9, counter).await
    };
    (a, b)
}

/// SPEC §2: two functions never share keys unless they share a `name`.
/// Two different functions, both named `step`, in sibling blocks of one function.
#[tokio::test]
async fn same_named_functions_in_sibling_blocks_share_a_namespace() {
    static C: Counter = Counter(AtomicUsize::new(0));
    let store = MemoryStore::new();
    let (a, b) = sibling_blocks(&store, &C).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a, b), (1, 2), "the second function replayed the first one's record");
}

trait Job {
    fn store(&self) -> &MemoryStore;
    fn value(&self) -> u32;
    #[idempotent(key = k, store = self.store())]
    async fn go(&self, k: u32) -> Result<u32, AppError> {
        Ok(self.value())
    }
}
struct JobA(MemoryStore);
struct JobB(MemoryStore);
impl Job for JobA {
    fn store(&self) -> &MemoryStore { &self.0 }
    fn value(&self) -> u32 { 1 }
}
impl Job for JobB {
    fn store(&self) -> &MemoryStore { &self.0 }
    fn value(&self) -> u32 { 2 }
}

/// A provided (default) trait method used by two types: same-named methods of
/// different types must not share records.
#[tokio::test]
async fn a_default_trait_method_on_two_types_shares_a_namespace() {
    let store = MemoryStore::new();
    let a = JobA(store.clone()).go(5).await.unwrap();
    let b = JobB(store.clone()).go(5).await.unwrap();
    assert_eq!((a, b), (1, 2), "JobB replayed JobA's record");
}
