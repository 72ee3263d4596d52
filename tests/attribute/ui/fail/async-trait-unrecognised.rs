use std::future::Future;
use std::pin::Pin;

use idem_runtime::{idempotent, MemoryStore};

#[derive(Debug)]
pub struct AppError;
impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

pub struct Svc {
    store: MemoryStore,
}

impl Svc {
    // A boxed future, but not the `Box::pin(async move { .. })` async-trait writes.
    #[idempotent(key = id, store = self.store)]
    pub fn create(&self, id: u64) -> Pin<Box<dyn Future<Output = Result<u64, AppError>> + Send + '_>> {
        let fut = async move { Ok(id) };
        Box::pin(fut)
    }
}

fn main() {}
