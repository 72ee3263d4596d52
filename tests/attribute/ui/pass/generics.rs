//! Generic functions, `impl Trait` arguments, and stores passed as parameters.
use std::fmt::Display;
use std::sync::Arc;

use idem_runtime::{idempotent, MemoryStore, Store};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug)]
pub struct AppError;
impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

#[idempotent(key = key, store = store)]
async fn generic<S, T>(store: &S, key: T) -> Result<T, AppError>
where
    S: Store,
    T: Serialize + DeserializeOwned + Send,
{
    Ok(key)
}

#[idempotent(key = label.to_string(), store = store)]
async fn impl_trait(store: Arc<dyn Store>, label: impl Display + Send) -> Result<String, AppError> {
    Ok(format!("<{label}>"))
}

#[idempotent(key = id, store = store)]
async fn boxed(store: Box<dyn Store>, id: u32) -> Result<u32, AppError> {
    Ok(id)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let store = MemoryStore::new();
        assert_eq!(generic(&store, 5u8).await.unwrap(), 5);
        assert_eq!(generic(&store, String::from("s")).await.unwrap(), "s");
        assert_eq!(impl_trait(Arc::new(store.clone()), 3).await.unwrap(), "<3>");
        assert_eq!(boxed(Box::new(store), 9).await.unwrap(), 9);
    });
}
