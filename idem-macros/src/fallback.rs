//! The error path: report the problems and emit the function unchanged.
//!
//! Input:  `#[idempotent(ttl = "0s", ..)] async fn f(..) -> Result<T, E> { body }`
//! Output: `compile_error!("duration \"0s\" is zero ..");  async fn f(..) -> Result<T, E> { body }`
//!
//! Emitting the function untouched keeps its callers type-checking, so one
//! mistake in the attribute gives one message, not one per call site.

use proc_macro2::TokenStream;
use quote::ToTokens as _;

/// The compile errors followed by the original item.
pub fn emit(error: syn::Error, item: TokenStream) -> TokenStream {
    let mut out = error.into_compile_error();
    item.to_tokens(&mut out);
    out
}
