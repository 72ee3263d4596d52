//! idem makes side-effecting async operations safe to retry: a payment, an order,
//! a consumed message runs once, and every repeat gets the first result back.
//!
//! Put `#[idempotent]` on an async function that returns `Result<T, E>`:
//!
//! ```
//! use idem_runtime::{idempotent, MemoryStore};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
//! struct Order { id: u64, user_id: u64, product_id: u64 }
//!
//! #[derive(Debug)]
//! enum OrderError { Idem(idem_runtime::Error) }
//! impl From<idem_runtime::Error> for OrderError {
//!     fn from(e: idem_runtime::Error) -> Self { OrderError::Idem(e) }
//! }
//!
//! struct OrderService { store: MemoryStore, next_id: std::sync::atomic::AtomicU64 }
//!
//! impl OrderService {
//!     #[idempotent(key = (user_id, product_id), window = "1d", ttl = "24h", store = self.store)]
//!     async fn create_order(&self, user_id: u64, product_id: u64) -> Result<Order, OrderError> {
//!         let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//!         Ok(Order { id, user_id, product_id })
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let service = OrderService { store: MemoryStore::new(), next_id: 1.into() };
//! let first = service.create_order(7, 42).await.unwrap();
//! let retry = service.create_order(7, 42).await.unwrap(); // replayed, not run again
//! assert_eq!(first, retry);
//! assert_eq!(service.next_id.load(std::sync::atomic::Ordering::SeqCst), 2);
//! # }
//! ```
//!
//! The attribute claims the key atomically in the store, runs the body once
//! (renewing its lease while it runs), stores the serialized result — or releases
//! the claim on error, unless `cache_errors` — and replays the stored result to
//! every duplicate. See `SPEC.md` §2 for every argument.
//!
//! | module | what it holds |
//! |---|---|
//! | [`store`] | the [`Store`] trait and [`MemoryStore`] |
//! | [`engine`] | claim → run → complete / release, callable without the macro |
//! | [`key`] | canonical key encoding, digests, windows, [`ClientKey`] |
//! | [`codec`] | how outcomes are stored (JSON) |
//! | [`message`] | [`Deduplicator`](message::Deduplicator): effectively-once message consumers; NATS JetStream (feature `nats`) and Kafka (feature `kafka`) adapters |
//! | `http` | [`IdempotencyLayer`](crate::http::IdempotencyLayer): the `Idempotency-Key` header for tower / axum (feature `http`) |
//! | `testing` | the store conformance suite (feature `testing`) |
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod codec;
pub mod engine;
mod error;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
pub mod key;
pub mod message;
pub mod store;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

/// Implement [`Store`] with this attribute (re-exported from `async-trait`).
pub use async_trait::async_trait;
pub use engine::{current, Attempt, InProgress, Options};
pub use error::{BoxError, Error, InvalidKey};
pub use idem_macros::idempotent;
pub use key::{ClientKey, Digest, Key};
pub use store::cache::ReplayCache;
pub use store::memory::MemoryStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use store::postgres::PostgresStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::redis::RedisStore;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "sqlite", feature = "postgres"))))]
pub use store::sql::Reaper;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use store::sqlite::SqliteStore;
pub use store::{
    Claim, ClaimRequest, FencingToken, Record, RecordState, Store, TransactionalStore,
};

/// What generated code calls. Not a public API: names here change without notice.
#[doc(hidden)]
pub mod __private {
    use std::sync::Arc;

    use serde::de::DeserializeOwned;
    use serde::Serialize;

    pub use crate::codec::{cache_errors, release_errors};
    pub use crate::engine::{claim_in_tx, execute, finish_in_tx, InProgress, Options};
    pub use core::ops::ControlFlow;
    pub use core::time::Duration;

    use crate::key::{Digest, FingerprintBuilder, Key, KeyBuilder};
    use crate::{Error, Store};

    /// An owned handle to the store named by `store =`.
    #[inline]
    pub fn store_handle<S: Store + ?Sized>(store: &S) -> Arc<dyn Store> {
        store.handle()
    }

    /// Builds a key part by part, keeping the first error for the engine to return.
    pub struct Keyer<'n>(Result<KeyBuilder<'n>, Error>);

    impl<'n> Keyer<'n> {
        #[inline]
        pub fn new(namespace: &'n str) -> Self {
            Keyer(Ok(KeyBuilder::new(namespace)))
        }
        #[inline]
        pub fn part<T: Serialize + ?Sized>(self, value: &T) -> Self {
            Keyer(self.0.and_then(|b| b.part(value)))
        }
        #[inline]
        pub fn window(self, window: Duration) -> Self {
            Keyer(self.0.map(|b| b.window(window)))
        }
        #[inline]
        pub fn finish(self) -> Result<Key, Error> {
            self.0.and_then(KeyBuilder::try_finish)
        }
    }

    /// Builds a fingerprint part by part.
    pub struct Fingerprinter(Result<FingerprintBuilder, Error>);

    impl Fingerprinter {
        #[inline]
        #[allow(clippy::new_without_default)]
        pub fn new() -> Self {
            Fingerprinter(Ok(FingerprintBuilder::new()))
        }
        #[inline]
        pub fn part<T: Serialize + ?Sized>(self, value: &T) -> Self {
            Fingerprinter(self.0.and_then(|b| b.part(value)))
        }
        #[inline]
        pub fn finish(self) -> Option<Result<Digest, Error>> {
            Some(self.0.map(FingerprintBuilder::finish))
        }
    }

    /// The success type of an `#[idempotent]` function is stored as JSON and replayed.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot be stored: the success type of an #[idempotent] function must implement `Serialize` and `DeserializeOwned`",
        label = "the result is stored and replayed, so this type must be serializable",
        note = "derive them: `#[derive(serde::Serialize, serde::Deserialize)]`"
    )]
    pub trait StorableOutput: Serialize + DeserializeOwned {}
    impl<T: Serialize + DeserializeOwned> StorableOutput for T {}

    /// An `#[idempotent]` function must be able to return idem's own errors.
    #[diagnostic::on_unimplemented(
        message = "the error type `{Self}` must implement `From<idem_runtime::Error>`",
        label = "an #[idempotent] call can fail before the body runs (in progress, key reused, store down), so this error must hold an `idem_runtime::Error`",
        note = "add `impl From<idem_runtime::Error> for {Self}`"
    )]
    pub trait IdempotentError: From<Error> {}
    impl<E: From<Error>> IdempotentError for E {}

    /// With `cache_errors`, errors are stored and replayed too.
    #[diagnostic::on_unimplemented(
        message = "`cache_errors` needs an error type that implements `Serialize` and `DeserializeOwned`, and `{Self}` does not",
        label = "cached errors are stored and replayed, so this type must be serializable",
        note = "derive them on the error type, or remove `cache_errors`"
    )]
    pub trait StorableError: Serialize + DeserializeOwned {}
    impl<E: Serialize + DeserializeOwned> StorableError for E {}

    /// Checks that a return type written as an alias (`AppResult<T>`) is a `Result`.
    #[diagnostic::on_unimplemented(
        message = "#[idempotent] functions must return `Result<T, E>`, and `{Self}` is not a `Result`",
        label = "the `Ok` value is stored and replayed, and the error carries idem's errors"
    )]
    pub trait ResultParts {}
    impl<T, E> ResultParts for ::core::result::Result<T, E> {}

    #[inline]
    pub fn assert_result<R: ResultParts>() {}

    /// The store named by `store =`, checked to write inside the `tx =` transaction.
    #[inline]
    pub fn tx_store<'s, S, X>(store: &'s S, _tx: &X) -> &'s S
    where
        S: crate::TransactionalStore<X> + ?Sized,
        X: Send + ?Sized,
    {
        store
    }
}
