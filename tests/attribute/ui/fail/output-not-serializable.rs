use idem_runtime::{idempotent, MemoryStore};

#[derive(Debug)]
pub struct AppError;
impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

pub struct Receipt {
    pub id: u64,
}

#[idempotent(key = id, store = store)]
async fn create(store: &MemoryStore, id: u64) -> Result<Receipt, AppError> {
    Ok(Receipt { id })
}

fn main() {}
