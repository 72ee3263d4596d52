use idem_runtime::idempotent;

#[derive(Debug)]
pub struct AppError;
impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

pub struct Service {
    pub store: String,
}

impl Service {
    #[idempotent(key = id, store = self.store)]
    async fn create(&self, id: u64) -> Result<u64, AppError> {
        Ok(id)
    }
}

fn main() {}
