//! Emits the rewritten function: bind the store, key and fingerprint, then make
//! one call into `__private::execute` with the body as `async move { .. }`.
//!
//! Input:
//! ```text
//! #[idempotent(key = (req.user_id, req.product_id), window = "1d", store = self.store)]
//! async fn create_order(&self, req: Req) -> Result<Order, OrderError> { body }
//! ```
//! Output:
//! ```text
//! async fn create_order(&self, req: Req) -> Result<Order, OrderError> {
//!     const __IDEM_OPTIONS: ::idem_runtime::__private::Options =
//!         ::idem_runtime::__private::Options::new(concat!(module_path!(), "::", "create_order"))
//!             .ttl(::idem_runtime::__private::Duration::from_millis(86400000))
//!             .lease(..).in_progress(..);
//!     let __idem_store = ::idem_runtime::__private::store_handle(&(self.store));
//!     let __idem_key = ::idem_runtime::__private::Keyer::new(__IDEM_OPTIONS.namespace)
//!         .part(&(req.user_id)).part(&(req.product_id))
//!         .window(::idem_runtime::__private::Duration::from_millis(86400000))
//!         .finish();
//!     ::idem_runtime::__private::execute(__idem_store, &__IDEM_OPTIONS, __idem_key,
//!         None, ::idem_runtime::__private::release_errors::<Order, OrderError>(),
//!         async move { if false { let __idem_ret: Result<Order, OrderError> = loop {}; return __idem_ret; } body },
//!     ).await
//! }
//! ```
//! Key parts are borrowed (`&(expr)`), never moved, so a `String` field is
//! still there when the body runs.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned as _;
use syn::{Ident, ItemFn};

use crate::args::{self, Args, InProgressArg};
use crate::fallback;
use crate::validate::{self, Checked};

/// Default ttl: 24 hours.
const DEFAULT_TTL_MS: u64 = 24 * 60 * 60 * 1000;
/// Default lease: 30 seconds.
const DEFAULT_LEASE_MS: u64 = 30 * 1000;

/// The attribute's entry point, on `proc_macro2` tokens so it can be unit-tested.
pub fn idempotent(attr: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(func) => func,
        Err(err) => {
            let err = syn::Error::new(
                err.span(),
                format!("#[idempotent] applies to an `async fn` returning `Result<T, E>`: {err}"),
            );
            return fallback::emit(err, item);
        }
    };
    let parsed = args::parse(attr);
    let checked = match &parsed {
        Ok(args) => validate::check(&func.sig, args),
        // Still check the signature, so argument and signature errors show together.
        Err(_) => validate::check(&func.sig, &Args::lenient()),
    };
    match (parsed, checked) {
        (Ok(args), Ok(checked)) => expand(&args, &checked, func),
        (Err(mut err), Err(more)) => {
            err.combine(more);
            fallback::emit(err, item)
        }
        (Err(err), Ok(_)) | (Ok(_), Err(err)) => fallback::emit(err, item),
    }
}

impl Args {
    /// Arguments that satisfy every presence check, for validating a signature
    /// when the arguments themselves failed to parse.
    fn lenient() -> Self {
        Args {
            key: Some(Vec::new()),
            store: Some(syn::parse_quote!(())),
            ..Args::default()
        }
    }
}

fn local(name: &str) -> Ident {
    Ident::new(name, Span::mixed_site())
}

fn expand(args: &Args, checked: &Checked, func: ItemFn) -> TokenStream {
    let krate = args
        .krate
        .as_ref()
        .map(|p| quote!(#p))
        .unwrap_or_else(|| quote!(::idem_runtime));
    let private = quote!(#krate::__private);
    let ItemFn {
        attrs,
        vis,
        sig,
        block,
        ..
    } = func;
    // Inner attributes (`#![allow(..)]` at the top of the body) stay inside it.
    let (inner, outer): (Vec<_>, Vec<_>) = attrs
        .into_iter()
        .partition(|a| matches!(a.style, syn::AttrStyle::Inner(_)));
    let fn_name = sig.ident.to_string();

    let store_var = local("__idem_store");
    let key_var = local("__idem_key");
    let fp_var = local("__idem_fingerprint");
    let options = local("__IDEM_OPTIONS");
    let ret_var = local("__idem_ret");

    // Type checks land on the user's tokens: `T` and `E` are passed to `execute`
    // explicitly, so an unmet bound (`T: Serialize`, `E: From<Error>`) is reported
    // at the type in the signature. An alias (`AppResult<T>`) is checked to be a
    // `Result` first, and its parts are then inferred.
    let Checked {
        ret,
        ok,
        err,
        tx: tx_ty,
    } = checked;
    let check = match (ok, err) {
        (None, None) => Some(quote_spanned!(ret.span()=> #private::assert_result::<#ret>();)),
        _ => None,
    };
    let underscore = quote!(_);
    let ok_ty = ok.as_ref().map_or(underscore.clone(), |t| quote!(#t));
    let err_ty = err.as_ref().map_or(underscore, |t| quote!(#t));

    // Options: a constant, so nothing is parsed or allocated per call.
    let namespace = match &args.name {
        Some(lit) => quote!(#lit),
        None => quote!(::core::concat!(::core::module_path!(), "::", #fn_name)),
    };
    let ttl = args.ttl.as_ref().map_or(DEFAULT_TTL_MS, |d| d.ms);
    let lease = args.lease.as_ref().map_or(DEFAULT_LEASE_MS, |d| d.ms);
    let in_progress = match &args.in_progress {
        None | Some(InProgressArg::Reject) => quote!(#private::InProgress::Reject),
        Some(InProgressArg::Wait(d)) => {
            let ms = d.ms;
            quote!(#private::InProgress::Wait(#private::Duration::from_millis(#ms)))
        }
    };

    // The store: evaluated once, at call time, into an owned handle.
    let store_expr = args.store.as_ref().expect("validated: store is present");
    // Without `tx`, an owned handle (the engine renews the lease while the body
    // runs and releases the claim if the caller goes away); with `tx`, a borrow
    // checked to be a store that can write inside that transaction.
    let store = match &args.tx {
        None => quote_spanned!(store_expr.span()=> #private::store_handle(&(#store_expr))),
        Some(tx) => {
            let tx_ty = tx_ty.as_ref().map_or(quote!(_), |t| quote!(#t));
            quote_spanned!(tx.span()=> #private::tx_store::<_, #tx_ty>(&(#store_expr), &*#tx))
        }
    };

    // The key: every part borrowed, then hashed.
    let parts = args
        .key
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|part| quote_spanned!(part.span()=> .part(&(#part))));
    let window = args.window.as_ref().map(|d| {
        let ms = d.ms;
        quote!(.window(#private::Duration::from_millis(#ms)))
    });
    let fingerprint = match &args.fingerprint {
        None => quote!(::core::option::Option::None),
        Some(fp_parts) => {
            let fp_parts = fp_parts
                .iter()
                .map(|part| quote_spanned!(part.span()=> .part(&(#part))));
            quote!(#private::Fingerprinter::new() #(#fp_parts)* .finish())
        }
    };
    // How outcomes are stored; its bounds are checked against the written `T` and `E`.
    let codec = match &args.cache_errors {
        None => quote!(#private::release_errors::<#ok_ty, #err_ty>()),
        Some(args::CacheErrorsArg {
            predicate: None,
            keyword,
        }) => quote_spanned!(keyword.span()=>
            #private::cache_errors::<#ok_ty, #err_ty>(::core::option::Option::None)),
        Some(args::CacheErrorsArg {
            predicate: Some(path),
            keyword,
        }) => {
            let predicate = quote_spanned!(path.span()=> ::core::option::Option::Some(#path));
            quote_spanned!(keyword.span()=> #private::cache_errors::<#ok_ty, #err_ty>(#predicate))
        }
    };

    let stmts = &block.stmts;
    let body = quote! {
        #[allow(
            unknown_lints,
            unreachable_code,
            clippy::diverging_sub_expression,
            clippy::empty_loop,
            clippy::let_unit_value,
            clippy::needless_return,
            clippy::unreachable
        )]
        if false {
            let #ret_var: #ret = loop {};
            return #ret_var;
        }
        #(#stmts)*
    };
    // The body runs as `async move { .. }`, polled by the engine (which renews
    // the lease alongside it). With `tx`, the engine claims inside the
    // transaction, the body is awaited right here (so it borrows `tx` and the
    // arguments directly), and the engine then completes inside the transaction.
    let call = match &args.tx {
        None => quote! {
            #private::execute(#store_var, &#options, #key_var, #fp_var, #codec, async move { #body }).await
        },
        Some(tx) => {
            let codec_var = local("__idem_codec");
            let claim_var = local("__idem_claim");
            let outcome_var = local("__idem_outcome");
            quote! {
                let #codec_var = #codec;
                let #claim_var = match #private::claim_in_tx(
                    #store_var, &mut *#tx, &#options, #key_var, #fp_var, &#codec_var,
                ).await {
                    #private::ControlFlow::Continue(claim) => claim,
                    #private::ControlFlow::Break(done) => return done,
                };
                let #outcome_var = #claim_var.scope(async { #body }).await;
                #private::finish_in_tx(
                    #store_var, &mut *#tx, &#options, #claim_var, &#codec_var, #outcome_var,
                ).await
            }
        }
    };
    quote! {
        #(#outer)*
        #vis #sig {
            #(#inner)*
            #check
            const #options: #private::Options = #private::Options::new(#namespace)
                .ttl(#private::Duration::from_millis(#ttl))
                .lease(#private::Duration::from_millis(#lease))
                .in_progress(#in_progress);
            let #store_var = #store;
            let #key_var = #private::Keyer::new(#options.namespace) #(#parts)* #window .finish();
            let #fp_var = #fingerprint;
            #call
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(attr: TokenStream, item: TokenStream) -> String {
        idempotent(attr, item).to_string()
    }

    #[test]
    fn borrows_key_parts_and_moves_the_body() {
        let out = expand_str(
            quote!(key = (req.user_id, req.name), store = self.store),
            quote!(
                async fn f(&self, req: Req) -> Result<u32, E> {
                    Ok(req.name.len() as u32)
                }
            ),
        );
        assert!(out.contains(". part (& (req . user_id))"), "{out}");
        assert!(out.contains(". part (& (req . name))"), "{out}");
        assert!(out.contains("async move"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn errors_keep_the_function() {
        let out = expand_str(
            quote!(key = a, store = s, ttl = "0s"),
            quote!(
                async fn g(a: u32) -> Result<u32, E> {
                    Ok(a)
                }
            ),
        );
        assert!(out.contains("compile_error"), "{out}");
        assert!(out.contains("async fn g"), "{out}");
        assert!(!out.contains("execute"), "{out}");
    }

    #[test]
    fn reports_argument_and_signature_errors_together() {
        let out = expand_str(
            quote!(tll = "1h"),
            quote!(
                fn h() -> u32 {
                    1
                }
            ),
        );
        assert_eq!(out.matches("compile_error").count(), 3, "{out}");
    }
}
