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

    /// The default namespace: the path of the function that evaluates `&|| ()`.
    ///
    /// The generated code calls `fn_path(&|| ())` inside the function body, so
    /// `F` is a closure type, whose name `type_name` prints as the enclosing
    /// function's full path — the impl's self type, a trait impl as
    /// `<T as Tr>`, generic arguments — followed by one `::{{closure}}` per
    /// nesting level (an `async fn` body adds its own). Those trailing
    /// segments are removed; the result is a sub-slice, nothing is allocated.
    #[inline]
    pub fn fn_path<F>(_closure: &F) -> &'static str {
        strip_closures(::core::any::type_name::<F>())
    }

    /// `path` without its trailing `::{..}` segments (`{{closure}}`,
    /// `{{constant}}`, ..), then without a final all-lifetime generic list.
    /// Only segments at the end are removed: a generic argument may itself
    /// contain `{{closure}}`.
    #[inline]
    pub fn strip_closures(path: &str) -> &str {
        let mut path = path;
        loop {
            // The usual segment first: a suffix compare, a few ns.
            if let Some(rest) = path.strip_suffix("::{{closure}}") {
                path = rest;
                continue;
            }
            if !path.ends_with('}') {
                break;
            }
            // Walk back to the `{` that opens the last segment.
            let bytes = path.as_bytes();
            let mut depth = 0usize;
            let mut start = None;
            for (i, &b) in bytes.iter().enumerate().rev() {
                match b {
                    b'}' => depth += 1,
                    b'{' => {
                        depth -= 1;
                        if depth == 0 {
                            start = Some(i);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            match start {
                Some(i) if path[..i].ends_with("::") => path = &path[..i - 2],
                _ => break,
            }
        }
        strip_lifetimes(path)
    }

    /// `path` without a final generic list made only of erased lifetimes
    /// (`m<'_, '_>`: the early-bound `'life0, 'async_trait` of an
    /// `#[async_trait]` method), so such a method is named as its native
    /// `async fn` form is. A list that holds a type (`g<'_, u32>`) stays.
    #[inline]
    fn strip_lifetimes(path: &str) -> &str {
        let Some(mut rest) = path.strip_suffix("'_>") else {
            return path;
        };
        loop {
            if let Some(fn_path) = rest.strip_suffix('<') {
                return fn_path;
            }
            match rest.strip_suffix("'_, ") {
                Some(more) => rest = more,
                None => return path,
            }
        }
    }

    /// Builds a key part by part, keeping the first error for the engine to return.
    pub struct Keyer<'n>(Result<KeyBuilder<'n>, Error>);

    impl<'n> Keyer<'n> {
        #[inline]
        pub fn new(namespace: &'n str) -> Self {
            Keyer(Ok(KeyBuilder::new(namespace)))
        }
        /// Like [`new`](Self::new) for a default namespace, which must tell the
        /// instantiation apart: `type_name` prints every closure (and other
        /// anonymous types) alike, so one among the generic arguments would
        /// let two instantiations share records.
        #[inline]
        pub fn new_default(namespace: &'n str) -> Self {
            match namespace.find('<') {
                Some(generics) if namespace[generics..].contains('{') => {
                    Keyer(Err(Error::AmbiguousNamespace {
                        namespace: namespace.to_owned(),
                    }))
                }
                _ => Self::new(namespace),
            }
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

    #[cfg(test)]
    mod tests {
        use super::{fn_path, strip_closures};

        #[test]
        fn strips_every_trailing_closure_segment_and_nothing_else() {
            for (name, path) in [
                ("a::f::{{closure}}", "a::f"),
                ("a::A::m::{{closure}}::{{closure}}::{{closure}}", "a::A::m"),
                (
                    "<a::B<u8> as a::Tr>::t::{{closure}}",
                    "<a::B<u8> as a::Tr>::t",
                ),
                (
                    "a::g<a::main::{{closure}}>::{{closure}}",
                    "a::g<a::main::{{closure}}>",
                ),
                ("a::g<a::h::{{closure}}>", "a::g<a::h::{{closure}}>"),
                ("a::f::{{constant}}::{{closure}}", "a::f"),
                (
                    "<a::S as a::Tr>::m<'_, '_>::{{closure}}::{{closure}}",
                    "<a::S as a::Tr>::m",
                ),
                ("a::f<'_>::{{closure}}", "a::f"),
                ("a::g<'_, u32>::{{closure}}", "a::g<'_, u32>"),
                ("a::g<a::B<'_>>::{{closure}}", "a::g<a::B<'_>>"),
                ("a::g<fn() -> u8>::{{closure}}", "a::g<fn() -> u8>"),
                ("a::g<a::B<'_>, '_>::{{closure}}", "a::g<a::B<'_>, '_>"),
                ("a::S<'_>::m::{{closure}}", "a::S<'_>::m"),
                ("a::f", "a::f"),
                ("{{closure}}", "{{closure}}"),
                ("", ""),
            ] {
                assert_eq!(strip_closures(name), path, "{name}");
            }
        }

        fn generic<T: Default>() -> &'static str {
            let _unused = T::default();
            fn_path(&|| ())
        }

        #[test]
        fn names_the_enclosing_function_and_its_instantiation() {
            assert_eq!(
                fn_path(&|| ()),
                "idem_runtime::__private::tests::names_the_enclosing_function_and_its_instantiation"
            );
            assert_eq!(
                generic::<u32>(),
                "idem_runtime::__private::tests::generic<u32>"
            );
            assert_eq!(
                generic::<&str>(),
                "idem_runtime::__private::tests::generic<&str>"
            );
        }
    }
}
