use idem_runtime::{idempotent, MemoryStore};

#[derive(Debug)]
pub struct AppError;
impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

#[idempotent(key = id, store = store, on_takeover = retry)]
async fn create(store: &MemoryStore, id: u64) -> Result<u64, AppError> {
    Ok(id)
}

fn main() {}
