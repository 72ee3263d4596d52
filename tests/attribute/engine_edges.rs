//! Edges found by review: a caller dropped mid-completion, closure-typed generic instantiations.

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
async fn a_caller_dropped_during_completion_retries_still_ends_in_a_replay() {
    let svc = Svc {
        store: FaultyStore::default(),
        runs: Arc::default(),
    };
    svc.store.completions_fail.store(true, Ordering::SeqCst);
    // Body takes 5 ms, then completion fails at once and sleeps 20 ms before
    // its second try: the caller's 15 ms timeout fires in between.
    let first = tokio::time::timeout(Duration::from_millis(15), svc.pay(1)).await;
    assert!(
        first.is_err(),
        "expected the caller's timeout, got {first:?}"
    );
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

/// CONTRACT §2: each instantiation of a generic function gets its own namespace.
/// `type_name` prints every closure type alike, so instantiations over two
/// closures cannot be told apart: the default namespace is refused with a clear
/// error (nothing runs), and an explicit `name` works (and is shared).
#[tokio::test]
async fn closure_typed_instantiations_refuse_the_default_namespace() {
    let store = MemoryStore::new();
    let before = COUNT.load(Ordering::SeqCst);
    for result in [
        apply(&store, 3, |x| x + 1).await,
        apply(&store, 3, |x| x * 100).await,
    ] {
        match result {
            Err(AppError::Idem(e @ Error::AmbiguousNamespace { .. })) => {
                assert!(e.to_string().contains("name = "), "{e}")
            }
            other => panic!("expected AmbiguousNamespace, got {other:?}"),
        }
    }
    assert_eq!(COUNT.load(Ordering::SeqCst), before, "nothing ran");
    assert_eq!(named(&store, 3, |x| x + 1).await.unwrap(), 4);
}

#[idempotent(key = k, name = "apply-named", store = store)]
async fn named<F: Fn(u32) -> u32>(store: &MemoryStore, k: u32, f: F) -> Result<u32, AppError> {
    Ok(f(k))
}
