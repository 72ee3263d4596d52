//! `#[idempotent]` on the methods of an `#[async_trait]` impl, used through a
//! trait object, and on a native `async fn` in a trait impl.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use idem_runtime::{async_trait, current, idempotent, MemoryStore};
use serde::{Deserialize, Serialize};

use crate::{AppError, Runs};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Order {
    id: usize,
    user: u64,
    sku: String,
    namespace: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Line {
    sku: String,
    qty: u32,
}

fn namespace() -> String {
    current()
        .expect("inside an idempotent body")
        .key()
        .namespace()
        .to_owned()
}

/// A service trait made object-safe with `#[async_trait]`.
#[async_trait]
pub trait OrderService: Send + Sync {
    async fn create(&self, user: u64, sku: String) -> Result<Order, AppError>;
    async fn reserve(&self, line: Line) -> Result<u32, AppError>;
    async fn tenant_scoped(&self, id: u64) -> Result<(u64, usize), AppError>;
}

struct Shop {
    store: MemoryStore,
    tenant: u64,
    runs: Runs,
}

#[async_trait]
impl OrderService for Shop {
    #[idempotent(key = (user, sku), fingerprint = sku, store = self.store)]
    async fn create(&self, user: u64, sku: String) -> Result<Order, AppError> {
        let id = self.runs.hit();
        Ok(Order {
            id,
            user,
            sku,
            namespace: namespace(),
        })
    }

    // A pattern parameter: async-trait destructures it inside the future.
    #[idempotent(key = sku, store = self.store)]
    async fn reserve(&self, Line { sku, qty }: Line) -> Result<u32, AppError> {
        self.runs.hit();
        Ok(qty + sku.len() as u32)
    }

    // `self` in the key and the store, renamed by async-trait in the body.
    #[idempotent(key = (self.tenant, id), store = self.store)]
    async fn tenant_scoped(&self, id: u64) -> Result<(u64, usize), AppError> {
        Ok((self.tenant + id, self.runs.hit()))
    }
}

#[tokio::test]
async fn a_dyn_async_trait_method_runs_once_and_replays() {
    let shop = Arc::new(Shop {
        store: MemoryStore::new(),
        tenant: 1000,
        runs: Runs::default(),
    });
    let service: Arc<dyn OrderService> = shop.clone();
    let first = service.create(7, "apple".into()).await.unwrap();
    assert_eq!(
        first,
        Order {
            id: 1,
            user: 7,
            sku: "apple".into(),
            namespace:
                "<attribute::dyn_traits::Shop as attribute::dyn_traits::OrderService>::create"
                    .into(),
        }
    );
    let retry = service.create(7, "apple".into()).await.unwrap();
    assert_eq!(retry, first, "the retry gets the first result");
    assert_eq!(shop.runs.get(), 1, "the body ran once");

    let other = service.create(8, "apple".into()).await.unwrap();
    assert_eq!(other.id, 2, "another key runs");

    // Both calls of one key from two tasks: one runs, one replays.
    let (a, b) = tokio::join!(
        service.create(9, "pear".into()),
        service.create(9, "pear".into())
    );
    let done: Vec<Order> = [a, b].into_iter().filter_map(Result::ok).collect();
    assert!(done.iter().all(|o| o.id == 3), "{done:?}");
    assert_eq!(shop.runs.get(), 3);
}

#[tokio::test]
async fn pattern_parameters_and_self_in_the_key_work_inside_async_trait() {
    let shop = Shop {
        store: MemoryStore::new(),
        tenant: 1000,
        runs: Runs::default(),
    };
    let service: &dyn OrderService = &shop;
    let line = Line {
        sku: "n5".into(),
        qty: 2,
    };
    assert_eq!(service.reserve(line.clone()).await.unwrap(), 4);
    let changed = Line { qty: 9, ..line };
    assert_eq!(
        service.reserve(changed).await.unwrap(),
        4,
        "keyed by sku only"
    );
    assert_eq!(shop.runs.get(), 1);

    assert_eq!(service.tenant_scoped(5).await.unwrap(), (1005, 2));
    assert_eq!(
        service.tenant_scoped(5).await.unwrap(),
        (1005, 2),
        "replayed"
    );
    let other_tenant = Shop {
        store: shop.store.clone(),
        tenant: 2000,
        runs: Runs::default(),
    };
    assert_eq!(
        other_tenant.tenant_scoped(5).await.unwrap(),
        (2005, 1),
        "`self.tenant` is part of the key"
    );
}

/// A `&mut self` method of an `#[async_trait]` trait, and a key that reads `self`.
#[async_trait]
trait Counter: Send {
    async fn bump(&mut self, by: u64) -> Result<u64, AppError>;
}

struct Tally {
    store: MemoryStore,
    id: u64,
    total: u64,
}

#[async_trait]
impl Counter for Tally {
    #[idempotent(key = (self.id, by), store = self.store)]
    async fn bump(&mut self, by: u64) -> Result<u64, AppError> {
        self.total += by;
        Ok(self.total)
    }
}

#[tokio::test]
async fn mut_self_methods_of_an_async_trait_object() {
    let mut tally = Tally {
        store: MemoryStore::new(),
        id: 1,
        total: 0,
    };
    let counter: &mut dyn Counter = &mut tally;
    assert_eq!(counter.bump(3).await.unwrap(), 3);
    assert_eq!(counter.bump(3).await.unwrap(), 3, "replayed");
    assert_eq!(counter.bump(4).await.unwrap(), 7);
    assert_eq!(tally.total, 7, "the body ran once per key");
}

/// A boxed future written by hand in async-trait's shape.
struct Legacy {
    store: MemoryStore,
    runs: Runs,
}

impl Legacy {
    #[allow(clippy::type_complexity)]
    #[idempotent(key = id, store = self.store)]
    fn fetch(&self, id: u64) -> Pin<Box<dyn Future<Output = Result<usize, AppError>> + Send + '_>> {
        Box::pin(async move { Ok(self.runs.hit() + id as usize) })
    }
}

#[tokio::test]
async fn a_hand_written_boxed_async_block_is_rewritten_too() {
    let legacy = Legacy {
        store: MemoryStore::new(),
        runs: Runs::default(),
    };
    assert_eq!(legacy.fetch(10).await.unwrap(), 11);
    assert_eq!(legacy.fetch(10).await.unwrap(), 11, "replayed");
    assert_eq!(legacy.runs.get(), 1);
}

/// The same service written with native `async fn` in the trait (not object-safe).
trait NativeService {
    async fn create(&self, user: u64, sku: String) -> Result<Order, AppError>;
}

impl NativeService for Shop {
    #[idempotent(key = (user, sku), store = self.store)]
    async fn create(&self, user: u64, sku: String) -> Result<Order, AppError> {
        Ok(Order {
            id: self.runs.hit(),
            user,
            sku,
            namespace: namespace(),
        })
    }
}

#[tokio::test]
async fn native_async_fn_in_a_trait_impl_keeps_working() {
    let shop = Shop {
        store: MemoryStore::new(),
        tenant: 0,
        runs: Runs::default(),
    };
    let first = NativeService::create(&shop, 1, "fig".into()).await.unwrap();
    assert_eq!(
        first.namespace,
        "<attribute::dyn_traits::Shop as attribute::dyn_traits::NativeService>::create"
    );
    assert_eq!(
        NativeService::create(&shop, 1, "fig".into()).await.unwrap(),
        first
    );
    // The async-trait impl of the other trait is a different function.
    let dyn_first = OrderService::create(&shop, 1, "fig".into()).await.unwrap();
    assert_eq!(
        dyn_first.id, 2,
        "a different trait's method does not replay it"
    );
    assert_eq!(shop.runs.get(), 2);
}
