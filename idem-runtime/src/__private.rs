//! What generated code calls (`::idem_runtime::__private::…`). Not a public
//! API: names here change without notice.

use std::sync::Arc;

pub use crate::codec::{
    cache_errors, release_errors, IdempotentError, StorableError, StorableOutput,
};
pub use crate::engine::{
    begin_in_tx, current, execute, finish_in_tx, withhold_outcome, InProgress, OnTakeover, Options,
};
pub use core::ops::ControlFlow;
pub use core::time::Duration;

pub use crate::key::{FingerprintBuilder, KeyBuilder};
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

/// The key builder of a default namespace, which must tell the instantiation
/// apart: `type_name` prints every closure (and other anonymous types) alike,
/// so one among the generic arguments would let two instantiations share
/// records. Such a namespace gives a builder that finishes with
/// [`Error::AmbiguousNamespace`].
#[inline]
pub fn default_key(namespace: &str) -> KeyBuilder<'_> {
    match namespace.find('<') {
        Some(generics) if namespace[generics..].contains('{') => KeyBuilder::failed(
            namespace,
            Error::AmbiguousNamespace {
                namespace: namespace.to_owned(),
            },
        ),
        _ => KeyBuilder::new(namespace),
    }
}

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
