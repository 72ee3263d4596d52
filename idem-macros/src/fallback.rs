//! The error path: report the problems and emit the function unchanged.
//!
//! Input:  `#[idempotent(ttl = "0s", ..)] async fn f(..) -> Result<T, E> { body }`
//! Output: `compile_error!("duration \"0s\" is zero ..");  async fn f(..) -> Result<T, E> { body }`
//!
//! Emitting the function untouched keeps its callers type-checking, so one
//! mistake in the attribute gives one message, not one per call site.

use proc_macro2::TokenStream;
use quote::quote;

/// The compile errors followed by the original item.
///
/// Parameters the attribute would have used (the store, the key fields) look
/// unused in the untouched body; that warning is silenced so the error stands alone.
pub fn emit(error: syn::Error, item: TokenStream) -> TokenStream {
    let error = error.into_compile_error();
    quote! {
        #error
        #[allow(unused_variables)]
        #item
    }
}
