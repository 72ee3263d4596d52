//! `&self`, `&mut self` and `self: Arc<Self>` receivers.
use std::sync::Arc;

use idem_runtime::{idempotent, MemoryStore, Store};

#[derive(Debug)]
pub struct AppError(#[allow(dead_code)] idem_runtime::Error);
impl From<idem_runtime::Error> for AppError {
    fn from(e: idem_runtime::Error) -> Self {
        AppError(e)
    }
}

pub struct Service {
    store: MemoryStore,
    shared: Arc<dyn Store>,
    count: u32,
}

impl Service {
    #[idempotent(key = id, store = self.store)]
    pub async fn by_ref(&self, id: u64) -> Result<u64, AppError> {
        Ok(id + self.count as u64)
    }

    #[idempotent(key = id, store = self.shared)]
    pub async fn by_mut(&mut self, id: u64) -> Result<u32, AppError> {
        self.count += 1;
        Ok(self.count)
    }

    #[idempotent(key = name, store = self.store)]
    pub async fn by_arc(self: Arc<Self>, name: String) -> Result<String, AppError> {
        Ok(format!("{name}:{}", self.count))
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut svc = Service {
            store: MemoryStore::new(),
            shared: Arc::new(MemoryStore::new()),
            count: 0,
        };
        assert_eq!(svc.by_ref(1).await.unwrap(), 1);
        assert_eq!(svc.by_mut(1).await.unwrap(), 1);
        assert_eq!(svc.by_mut(1).await.unwrap(), 1);
        assert_eq!(svc.count, 1);
        let svc = Arc::new(svc);
        assert_eq!(svc.clone().by_arc("a".into()).await.unwrap(), "a:1");
    });
}
