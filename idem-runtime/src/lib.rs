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
//! every duplicate. See `docs/CONTRACT.md` §2 for every argument.
//!
//! | module | what it holds |
//! |---|---|
//! | [`store`] | the [`Store`] trait and [`MemoryStore`]; [`Admin`], an operator's reads and fenced writes |
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
pub mod metrics;
pub mod store;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

/// Implement [`Store`] with this attribute (re-exported from `async-trait`).
pub use async_trait::async_trait;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "sqlite", feature = "postgres"))))]
pub use engine::step_in_tx;
pub use engine::{current, step, Attempt, InProgress, OnTakeover, Options, Phase, StepId};
pub use error::{BoxError, Error, InvalidKey};
pub use idem_macros::idempotent;
pub use key::{ClientKey, Digest, Key};
pub use store::admin::Admin;
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
    Claim, ClaimRequest, FencingToken, Record, RecordState, Step, Store, TransactionalStore,
};

#[doc(hidden)]
pub mod __private;
