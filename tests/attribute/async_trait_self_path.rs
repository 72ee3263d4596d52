//! `self::` module paths in `key` inside an `#[async_trait]` impl: the macro
//! renames the receiver `self` to async-trait's `__self`, but not the `self` of
//! a module path (which once failed with "cannot find module `__self`").

use std::sync::Arc;

use idem_runtime::{async_trait, idempotent, MemoryStore};
use idem_tests::AppError;

const TENANT: u32 = 4;

#[async_trait]
trait Svc: Send + Sync {
    async fn m(&self, id: u32) -> Result<u32, AppError>;
}

struct S {
    store: MemoryStore,
}

#[async_trait]
impl Svc for S {
    #[idempotent(key = (self::TENANT, id), store = self.store)]
    async fn m(&self, id: u32) -> Result<u32, AppError> {
        Ok(id)
    }
}

#[tokio::test]
async fn async_trait_key_with_a_self_module_path() {
    let s: Arc<dyn Svc> = Arc::new(S {
        store: MemoryStore::new(),
    });
    assert_eq!(s.m(3).await.unwrap(), 3);
}
