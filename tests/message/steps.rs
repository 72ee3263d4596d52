//! Steps inside a `Deduplicator` handler: a handler that fails after a step
//! releases the message's key with the step kept, and the redelivery resumes
//! after it.

use std::sync::atomic::{AtomicUsize, Ordering};

use idem_runtime::message::{Deduplicator, Outcome, ProcessError};
use idem_runtime::{step, MemoryStore};

#[derive(Debug)]
enum Failed {
    /// idem's own error (shown by the assertions' `Debug`).
    #[allow(dead_code)]
    Idem(idem_runtime::Error),
    Down,
}

impl From<idem_runtime::Error> for Failed {
    fn from(e: idem_runtime::Error) -> Self {
        Failed::Idem(e)
    }
}

#[tokio::test]
async fn a_redelivered_message_resumes_after_the_steps_its_handler_recorded() {
    let dedup = Deduplicator::new(MemoryStore::new(), "steps-consumer");
    let (debits, credits, down) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(1),
    );
    let handle = || async {
        let debit = step("debit", async {
            Ok::<_, Failed>(debits.fetch_add(1, Ordering::SeqCst) + 1)
        })
        .await?;
        let credit = step("credit", async {
            if down
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(Failed::Down);
            }
            Ok(credits.fetch_add(1, Ordering::SeqCst) + 1)
        })
        .await?;
        Ok::<_, Failed>((debit, credit))
    };
    match dedup.process("transfer-1", handle).await {
        Err(ProcessError::Handler(Failed::Down)) => {}
        other => panic!("{other:?}"),
    }
    match dedup.process("transfer-1", handle).await {
        Ok(Outcome::Processed((1, 1))) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        dedup.process("transfer-1", handle).await,
        Ok(Outcome::Duplicate)
    ));
    assert_eq!(debits.load(Ordering::SeqCst), 1, "debited once");
    assert_eq!(credits.load(Ordering::SeqCst), 1);
}
