//! `crate = path` for a re-exported runtime.
mod facade {
    pub use idem_runtime as idem;
}

use facade::idem::{idempotent, MemoryStore};

#[derive(Debug)]
pub struct AppError;
impl From<facade::idem::Error> for AppError {
    fn from(_: facade::idem::Error) -> Self {
        AppError
    }
}

#[idempotent(key = id, store = store, crate = crate::facade::idem, name = "facade")]
async fn run(store: &MemoryStore, id: u32) -> Result<u32, AppError> {
    Ok(id)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    assert_eq!(rt.block_on(run(&MemoryStore::new(), 4)).unwrap(), 4);
}
