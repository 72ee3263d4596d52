//! Two functions never share keys unless they share a `name`.

use idem_runtime::{idempotent, MemoryStore};

use crate::{AppError, Runs};

struct Svc {
    store: MemoryStore,
    runs: Runs,
}

impl Svc {
    #[idempotent(key = id, store = self.store)]
    async fn refund(&self, id: u64) -> Result<String, AppError> {
        self.runs.hit();
        Ok("refund".into())
    }

    #[idempotent(key = id, store = self.store)]
    async fn capture(&self, id: u64) -> Result<String, AppError> {
        self.runs.hit();
        Ok("capture".into())
    }

    #[idempotent(key = id, name = "shared-ledger", store = self.store)]
    async fn post_a(&self, id: u64) -> Result<String, AppError> {
        Ok(format!("a{}", self.runs.hit()))
    }

    #[idempotent(key = id, name = "shared-ledger", store = self.store)]
    async fn post_b(&self, id: u64) -> Result<String, AppError> {
        Ok(format!("b{}", self.runs.hit()))
    }
}

#[tokio::test]
async fn functions_are_isolated_by_namespace() {
    let svc = Svc {
        store: MemoryStore::new(),
        runs: Runs::default(),
    };
    assert_eq!(svc.refund(1).await.unwrap(), "refund");
    assert_eq!(svc.capture(1).await.unwrap(), "capture");
    assert_eq!(svc.runs.get(), 2, "same key, different functions: both ran");
    assert_eq!(svc.post_a(1).await.unwrap(), "a3");
    assert_eq!(
        svc.post_b(1).await.unwrap(),
        "a3",
        "a shared name shares records"
    );
    assert_eq!(svc.runs.get(), 3);
}

/// The namespace the running attempt holds.
fn namespace() -> String {
    idem_runtime::current()
        .expect("inside an idempotent body")
        .key()
        .namespace()
        .to_owned()
}

/// Two types in one module, each with a method named `submit`.
struct Left {
    store: MemoryStore,
    runs: Runs,
}

struct Right {
    store: MemoryStore,
    runs: Runs,
}

impl Left {
    #[idempotent(key = id, store = self.store)]
    async fn submit(&self, id: u64) -> Result<(String, usize), AppError> {
        Ok((namespace(), self.runs.hit()))
    }
}

impl Right {
    #[idempotent(key = id, store = self.store)]
    async fn submit(&self, id: u64) -> Result<(String, usize), AppError> {
        Ok((namespace(), 100 + self.runs.hit()))
    }
}

#[tokio::test]
async fn same_named_methods_of_two_types_in_one_module_do_not_share_records() {
    let store = MemoryStore::new();
    let left = Left {
        store: store.clone(),
        runs: Runs::default(),
    };
    let right = Right {
        store: store.clone(),
        runs: Runs::default(),
    };
    let l = left.submit(1).await.unwrap();
    let r = right.submit(1).await.unwrap();
    assert_eq!(l, ("attribute::namespaces::Left::submit".to_owned(), 1));
    assert_eq!(r, ("attribute::namespaces::Right::submit".to_owned(), 101));
    assert_eq!(left.submit(1).await.unwrap(), l, "Left replays its own");
    assert_eq!(right.submit(1).await.unwrap(), r, "Right replays its own");
    assert_eq!((left.runs.get(), right.runs.get()), (1, 1), "each ran once");
}

/// One generic function, two instantiations.
#[idempotent(key = id, store = store)]
async fn convert<T: Default + serde::Serialize + serde::de::DeserializeOwned>(
    store: &MemoryStore,
    runs: &Runs,
    id: u64,
) -> Result<(String, T, usize), AppError> {
    Ok((namespace(), T::default(), runs.hit()))
}

#[tokio::test]
async fn each_instantiation_of_a_generic_function_has_its_own_namespace() {
    let store = MemoryStore::new();
    let runs = Runs::default();
    let n = convert::<u32>(&store, &runs, 1).await.unwrap();
    assert_eq!(n, ("attribute::namespaces::convert<u32>".to_owned(), 0, 1));
    // Before: `String` replayed `u32`'s record and failed to decode it.
    let s = convert::<String>(&store, &runs, 1).await.unwrap();
    assert_eq!(
        s,
        (
            "attribute::namespaces::convert<alloc::string::String>".to_owned(),
            String::new(),
            2
        )
    );
    assert_eq!(
        convert::<u32>(&store, &runs, 1).await.unwrap(),
        n,
        "replayed"
    );
    assert_eq!(
        convert::<String>(&store, &runs, 1).await.unwrap(),
        s,
        "replayed"
    );
    assert_eq!(runs.get(), 2, "each instantiation ran once");
}

/// A generic type: `Boxed<u8>` and `Boxed<u16>` are different services.
struct Boxed<T> {
    store: MemoryStore,
    runs: Runs,
    value: T,
}

impl<T: Clone + serde::Serialize + serde::de::DeserializeOwned + Send + Sync> Boxed<T> {
    #[idempotent(key = id, store = self.store)]
    async fn get(&self, id: u64) -> Result<(String, T, usize), AppError> {
        Ok((namespace(), self.value.clone(), self.runs.hit()))
    }
}

#[tokio::test]
async fn each_instantiation_of_a_generic_impl_has_its_own_namespace() {
    let store = MemoryStore::new();
    let small = Boxed {
        store: store.clone(),
        runs: Runs::default(),
        value: 7u8,
    };
    let wide = Boxed {
        store: store.clone(),
        runs: Runs::default(),
        value: 700u16,
    };
    let a = small.get(1).await.unwrap();
    let b = wide.get(1).await.unwrap();
    assert_eq!(
        a,
        ("attribute::namespaces::Boxed<u8>::get".to_owned(), 7, 1)
    );
    assert_eq!(
        b,
        ("attribute::namespaces::Boxed<u16>::get".to_owned(), 700, 1)
    );
    assert_eq!(small.get(1).await.unwrap(), a, "replayed");
    assert_eq!(wide.get(1).await.unwrap(), b, "replayed");
    assert_eq!((small.runs.get(), wide.runs.get()), (1, 1));
}

/// A trait implemented by two types in one module.
trait Charge {
    async fn charge(&self, id: u64) -> Result<String, AppError>;
}

impl Charge for Left {
    #[idempotent(key = id, store = self.store)]
    async fn charge(&self, id: u64) -> Result<String, AppError> {
        self.runs.hit();
        Ok(namespace())
    }
}

impl Charge for Right {
    #[idempotent(key = id, store = self.store)]
    async fn charge(&self, id: u64) -> Result<String, AppError> {
        self.runs.hit();
        Ok(namespace())
    }
}

#[tokio::test]
async fn trait_impls_are_named_by_type_and_trait() {
    let store = MemoryStore::new();
    let left = Left {
        store: store.clone(),
        runs: Runs::default(),
    };
    let right = Right {
        store,
        runs: Runs::default(),
    };
    let l = left.charge(1).await.unwrap();
    let r = right.charge(1).await.unwrap();
    assert_eq!(
        l,
        "<attribute::namespaces::Left as attribute::namespaces::Charge>::charge"
    );
    assert_eq!(
        r,
        "<attribute::namespaces::Right as attribute::namespaces::Charge>::charge"
    );
    assert_eq!(left.charge(1).await.unwrap(), l);
    assert_eq!(right.charge(1).await.unwrap(), r);
    assert_eq!((left.runs.get(), right.runs.get()), (1, 1));
}

/// A non-generic free function.
#[idempotent(key = id, store = store)]
async fn settle(store: &MemoryStore, id: u64) -> Result<String, AppError> {
    Ok(namespace())
}

#[tokio::test]
async fn a_free_function_keeps_module_path_and_name_so_digests_are_unchanged() {
    let store = MemoryStore::new();
    let ns = settle(&store, 9).await.unwrap();
    assert_eq!(ns, concat!(module_path!(), "::settle"));
    assert_eq!(ns, "attribute::namespaces::settle");
    let key = idem_runtime::Key::derive("attribute::namespaces::settle", &9u64).unwrap();
    assert!(
        idem_runtime::Store::get(&store, key.as_str())
            .await
            .unwrap()
            .is_some(),
        "the record sits under the key the earlier releases derived"
    );
}

/// With an explicit `name`, every instantiation shares it.
#[idempotent(key = id, name = "wrap", store = store)]
async fn wrap<T: Default + serde::Serialize + serde::de::DeserializeOwned>(
    store: &MemoryStore,
    runs: &Runs,
    id: u64,
) -> Result<(String, usize), AppError> {
    let _ = T::default();
    Ok((namespace(), runs.hit()))
}

#[tokio::test]
async fn an_explicit_name_is_shared_by_every_instantiation() {
    let store = MemoryStore::new();
    let runs = Runs::default();
    let first = wrap::<u8>(&store, &runs, 1).await.unwrap();
    assert_eq!(first, ("wrap".to_owned(), 1));
    assert_eq!(wrap::<String>(&store, &runs, 1).await.unwrap(), first);
    assert_eq!(runs.get(), 1);
}
