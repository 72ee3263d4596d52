use idem_runtime::{idempotent, MemoryStore};

#[derive(Debug)]
pub struct PlainError;

#[idempotent(key = id, store = store)]
async fn create(store: &MemoryStore, id: u64) -> Result<u64, PlainError> {
    Ok(id)
}

fn main() {}
