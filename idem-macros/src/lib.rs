//! The `#[idempotent]` attribute. Use it through `idem-runtime`, which re-exports
//! it as `idem_runtime::idempotent`; the generated code calls only
//! `::idem_runtime::__private` (or the path given with `crate = ...`).

mod args;
mod duration;
mod expand;
mod fallback;
mod shape;
mod validate;

use proc_macro::TokenStream;

/// Makes an async function idempotent: the body runs once per key, and every
/// repeat gets the first result back. See the `idem_runtime` crate docs.
#[proc_macro_attribute]
pub fn idempotent(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(attr.into(), item.into()).into()
}
