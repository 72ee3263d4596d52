//! A stored record that cannot be decoded is a `Codec` error: no rerun, no panic.

use idem_runtime::{idempotent, Error, MemoryStore};
use serde::{Deserialize, Serialize};

use crate::{AppError, Runs};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Invoice {
    number: u64,
}

struct Billing {
    store: MemoryStore,
    runs: Runs,
}

impl Billing {
    #[idempotent(key = customer, name = "invoice", store = self.store)]
    async fn invoice(&self, customer: &str) -> Result<Invoice, AppError> {
        Ok(Invoice {
            number: self.runs.hit() as u64,
        })
    }
}

#[tokio::test]
async fn corrupt_or_incompatible_records_fail_with_codec_and_never_rerun() {
    let billing = Billing {
        store: MemoryStore::new(),
        runs: Runs::default(),
    };
    billing.invoice("acme").await.unwrap();
    let key = idem_runtime::Key::derive("invoice", "acme").unwrap();
    for garbage in [
        &b"\xff\xfe not json"[..],
        br#"{"ok":{"number":"not a number"}}"#,
        br#"{"something":"else"}"#,
        b"",
    ] {
        assert!(billing
            .store
            .overwrite_outcome(key.as_str(), garbage.to_vec()));
        let result = billing.invoice("acme").await;
        assert!(
            matches!(result, Err(AppError::Idem(Error::Codec(_)))),
            "{garbage:?} gave {result:?}"
        );
        let message = match result {
            Err(AppError::Idem(e)) => e.to_string(),
            _ => unreachable!(),
        };
        assert!(message.contains("corrupt"), "{message}");
    }
    assert_eq!(
        billing.runs.get(),
        1,
        "a corrupt record never causes a rerun"
    );
}
