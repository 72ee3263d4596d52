//! By default an `Err` releases the claim so a retry runs again; with
//! `cache_errors` errors are stored and replayed (all, or those a predicate picks).

use idem_runtime::{idempotent, MemoryStore};

use crate::{AppError, Runs};

struct Cards {
    store: MemoryStore,
    runs: Runs,
}

fn outcome(n: usize, card: &str) -> Result<usize, AppError> {
    match card {
        "declined" if n == 1 => Err(AppError::Declined("insufficient funds".into())),
        "flaky" if n % 2 == 0 => Err(AppError::Unavailable),
        _ => Ok(n),
    }
}

impl Cards {
    #[idempotent(key = card, store = self.store)]
    async fn released(&self, card: &str) -> Result<usize, AppError> {
        outcome(self.runs.hit(), card)
    }

    #[idempotent(key = card, store = self.store, cache_errors)]
    async fn cached(&self, card: &str) -> Result<usize, AppError> {
        outcome(self.runs.hit(), card)
    }

    #[idempotent(key = card, store = self.store, cache_errors = AppError::is_final)]
    async fn filtered(&self, card: &str) -> Result<usize, AppError> {
        outcome(self.runs.hit(), card)
    }
}

fn cards() -> Cards {
    Cards {
        store: MemoryStore::new(),
        runs: Runs::default(),
    }
}

#[tokio::test]
async fn errors_release_the_claim_by_default() {
    let c = cards();
    assert!(matches!(
        c.released("declined").await,
        Err(AppError::Declined(_))
    ));
    assert!(c.store.is_empty(), "nothing is stored for an error");
    assert_eq!(
        c.released("declined").await.unwrap(),
        2,
        "the retry runs again"
    );
    assert_eq!(
        c.released("declined").await.unwrap(),
        2,
        "and its success is replayed"
    );
    assert_eq!(c.runs.get(), 2);
}

#[tokio::test]
async fn cache_errors_stores_and_replays_errors() {
    let c = cards();
    for _ in 0..3 {
        match c.cached("declined").await {
            Err(AppError::Declined(reason)) => assert_eq!(reason, "insufficient funds"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(c.runs.get(), 1, "the error was replayed, not rerun");
}

#[tokio::test]
async fn a_predicate_picks_which_errors_are_cached() {
    let c = cards();
    assert!(matches!(
        c.filtered("declined").await,
        Err(AppError::Declined(_))
    ));
    assert!(matches!(
        c.filtered("declined").await,
        Err(AppError::Declined(_))
    ));
    assert_eq!(c.runs.get(), 1, "a final error is cached");
    assert!(matches!(
        c.filtered("flaky").await,
        Err(AppError::Unavailable)
    ));
    assert_eq!(
        c.filtered("flaky").await.unwrap(),
        3,
        "a transient error is released"
    );
    assert_eq!(c.filtered("flaky").await.unwrap(), 3);
    assert_eq!(c.runs.get(), 3);
}
