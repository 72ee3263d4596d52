use idem_runtime::{idempotent, MemoryStore};

#[derive(Debug)]
pub struct AppError;
impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

fn is_final(_: &String) -> bool {
    true
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum Declined {
    #[serde(skip)]
    Idem(idem_runtime::Error),
    Card,
}
impl From<idem_runtime::Error> for Declined {
    fn from(e: idem_runtime::Error) -> Self {
        Declined::Idem(e)
    }
}

#[idempotent(key = id, store = store, cache_errors = is_final)]
async fn create(store: &MemoryStore, id: u64) -> Result<u64, Declined> {
    Ok(id)
}

fn main() {}
