//! 1,000 concurrent callers on one key: the body runs once.

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{idempotent, MemoryStore};

use crate::{AppError, Runs};

struct Orders {
    store: MemoryStore,
    runs: Runs,
}

impl Orders {
    #[idempotent(key = order, store = self.store, in_progress = wait("30s"))]
    async fn place_waiting(self: Arc<Self>, order: String) -> Result<usize, AppError> {
        let n = self.runs.hit();
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(n)
    }

    #[idempotent(key = order, store = self.store)]
    async fn place_rejecting(self: Arc<Self>, order: String) -> Result<usize, AppError> {
        let n = self.runs.hit();
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(n)
    }
}

fn orders() -> Arc<Orders> {
    Arc::new(Orders {
        store: MemoryStore::new(),
        runs: Runs::default(),
    })
}

const CALLERS: usize = 1000;

/// Spawns `CALLERS` tasks that each make `call` at the same moment (a barrier
/// releases them together).
fn all_at_once<F, Fut>(svc: &Arc<Orders>, call: F) -> Vec<tokio::task::JoinHandle<Fut::Output>>
where
    F: Fn(Arc<Orders>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
    (0..CALLERS)
        .map(|_| {
            let (svc, barrier, call) = (svc.clone(), barrier.clone(), call.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                call(svc).await
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_duplicates_all_get_the_one_result() {
    let svc = orders();
    let tasks = all_at_once(&svc, |svc| svc.place_waiting("order-1".into()));
    for task in tasks {
        let result = task.await.unwrap();
        assert_eq!(
            result.unwrap(),
            1,
            "every caller gets the first execution's result"
        );
    }
    assert_eq!(svc.runs.get(), 1, "the body ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejecting_duplicates_get_in_progress_or_the_replay() {
    let svc = orders();
    let tasks = all_at_once(&svc, |svc| svc.place_rejecting("order-2".into()));
    let (mut ok, mut in_progress) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(n) => {
                assert_eq!(n, 1);
                ok += 1;
            }
            Err(e) if e.is_in_progress() => in_progress += 1,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!(svc.runs.get(), 1, "the body ran once");
    assert!(ok >= 1, "the first caller got its result");
    assert_eq!(ok + in_progress, CALLERS);
    // Once it has finished, every later caller gets the replay.
    assert_eq!(
        svc.clone().place_rejecting("order-2".into()).await.unwrap(),
        1
    );
    assert_eq!(svc.runs.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_keys_at_once_each_run_once() {
    let svc = orders();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|i| {
            let svc = svc.clone();
            tokio::spawn(async move { svc.place_waiting(format!("k{}", i % 50)).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(svc.runs.get(), 50, "one execution per distinct key");
}
