use idem_runtime::{idempotent, MemoryStore};

#[derive(Debug)]
pub struct AppError;
impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

pub struct Customer {
    pub id: u64,
}

#[idempotent(key = customer, store = store)]
async fn create(store: &MemoryStore, customer: Customer) -> Result<u64, AppError> {
    Ok(customer.id)
}

fn main() {}
