use idem_runtime::{idempotent, MemoryStore};

#[derive(Debug)]
pub struct AppError;
impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

#[idempotent(key = id, store = store, tx = tx)]
async fn create(store: &MemoryStore, tx: &mut Vec<u64>, id: u64) -> Result<u64, AppError> {
    tx.push(id);
    Ok(id)
}

fn main() {}
