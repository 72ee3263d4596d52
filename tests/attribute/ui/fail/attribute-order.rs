use idem_runtime::{idempotent, MemoryStore};

#[derive(Debug)]
pub struct AppError;
impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

static STORE: std::sync::LazyLock<MemoryStore> = std::sync::LazyLock::new(MemoryStore::new);

// `#[tokio::main]` runs first and turns the `async fn` into a plain `fn`.
#[tokio::main(flavor = "current_thread")]
#[idempotent(key = "nightly", store = *STORE)]
async fn nightly_job() -> Result<u64, AppError> {
    Ok(1)
}

fn main() {}
