use idem_runtime::{idempotent, SqliteStore};

#[derive(Debug)]
pub struct AppError;
impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

#[idempotent(key = id, store = store, tx = tx)]
async fn create(store: &SqliteStore, tx: sqlx::Transaction<'static, sqlx::Sqlite>, id: u64) -> Result<u64, AppError> {
    drop(tx);
    Ok(id)
}

fn main() {}
