//! A process forked after idem's lease keeper thread started has the keeper's
//! memory but not its thread: claims there must still keep their leases (they
//! fall back to a renewal task each). Its own test binary without the test
//! harness, so the process that forks has no other test threads.

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{idempotent, MemoryStore};
use idem_tests::AppError;

struct Jobs {
    store: MemoryStore,
    runs: std::sync::atomic::AtomicUsize,
}

impl Jobs {
    #[idempotent(key = job, lease = "300ms", name = "fork-keeper", store = self.store)]
    async fn run(&self, job: u32, work: Duration) -> Result<usize, AppError> {
        let n = self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        tokio::time::sleep(work).await;
        Ok(n)
    }
}

/// On a new multi-threaded runtime: a body runs for four leases and a
/// duplicate arrives after two. Returns how many times the body ran, and what
/// the callers got.
fn duplicate_after_two_leases() -> (usize, String) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let jobs = Arc::new(Jobs {
            store: MemoryStore::new(),
            runs: Default::default(),
        });
        let first = tokio::spawn({
            let jobs = jobs.clone();
            async move { jobs.run(1, Duration::from_millis(1_200)).await }
        });
        while jobs.runs.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        let dup = jobs.run(1, Duration::ZERO).await;
        let first = first.await.expect("first call");
        (
            jobs.runs.load(std::sync::atomic::Ordering::SeqCst),
            format!("duplicate: {dup:?}; first: {first:?}"),
        )
    })
}

fn main() {
    // `cargo test -- --list` and filters: this binary has one test.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        println!("a_claim_in_a_forked_process_keeps_its_lease: test");
        return;
    }
    // Starts the keeper thread in this process.
    let (runs, what) = duplicate_after_two_leases();
    assert_eq!(runs, 1, "before the fork: {what}");
    match fork::fork().expect("fork") {
        fork::Fork::Child => {
            let (runs, what) = duplicate_after_two_leases();
            eprintln!("forked process: the body ran {runs} time(s); {what}");
            std::process::exit(if runs == 1 { 0 } else { 1 });
        }
        fork::Fork::Parent(pid) => {
            let status = fork::waitpid(pid).expect("waitpid");
            assert!(
                fork::WIFEXITED(status) && fork::WEXITSTATUS(status) == 0,
                "in the forked process the lease lapsed while the body ran (status {status:#x})"
            );
            println!("test a_claim_in_a_forked_process_keeps_its_lease ... ok");
        }
    }
}
