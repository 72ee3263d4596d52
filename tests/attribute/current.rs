//! `idem_runtime::current()` inside the body names the running attempt.

use idem_runtime::{current, idempotent, MemoryStore, Store};

use crate::AppError;

struct Provider {
    store: MemoryStore,
}

impl Provider {
    #[idempotent(key = order_id, name = "pay", store = self.store)]
    async fn pay(&self, order_id: u64) -> Result<(String, u64, String), AppError> {
        let attempt = current().expect("inside an idempotent body");
        Ok((
            attempt.digest().to_hex(),
            attempt.token().get(),
            attempt.derive_key("provider"),
        ))
    }
}

#[tokio::test]
async fn current_gives_the_digest_token_and_a_stable_downstream_key() {
    assert!(current().is_none(), "outside a body there is no attempt");
    let p = Provider {
        store: MemoryStore::new(),
    };
    let (digest, token, downstream) = p.pay(11).await.unwrap();
    let key = idem_runtime::Key::derive("pay", &11u64).unwrap();
    assert_eq!(digest, key.digest().to_hex());
    let record = p.store.get(key.as_str()).await.unwrap().unwrap();
    assert_eq!(record.token.get(), token);
    assert_eq!(downstream.len(), 64);
    assert!(
        !downstream.contains(&digest),
        "the downstream key does not reveal the digest"
    );
    let (_, _, other) = p.pay(12).await.unwrap();
    assert_ne!(downstream, other);
}
