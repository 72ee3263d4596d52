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
//!     let __idem_namespace: &'static str = ::idem_runtime::__private::fn_path(&|| ());
//!     let __idem_options: ::idem_runtime::__private::Options =
//!         ::idem_runtime::__private::Options::new()
//!             .ttl(::idem_runtime::__private::Duration::from_millis(86400000))
//!             .lease(..).in_progress(..);
//!     let __idem_store = ::idem_runtime::__private::store_handle(&(self.store));
//!     let __idem_key = ::idem_runtime::__private::KeyBuilder::new(__idem_namespace)
//!         .part(&(req.user_id)).part(&(req.product_id))
//!         .window(::idem_runtime::__private::Duration::from_millis(86400000))
//!         .finish();
//!     ::idem_runtime::__private::execute(__idem_store, &__idem_options, __idem_key,
//!         None, ::idem_runtime::__private::release_errors::<Order, OrderError>(),
//!         async move { if false { let __idem_ret: Result<Order, OrderError> = loop {}; return __idem_ret; } body },
//!     ).await
//! }
//! ```
//! Every generated name is a local with `Span::mixed_site()` hygiene, so none
//! of them can shadow, or be shadowed by, a user's name.
//! Key parts are borrowed (`&(expr)`), never moved, so a `String` field is
//! still there when the body runs.

use proc_macro2::{Group, Span, TokenStream, TokenTree};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned as _;
use syn::{Expr, Ident, ItemFn, Pat, Stmt};

use crate::args::{self, Args, InProgressArg, OnTakeoverArg};
use crate::fallback;
use crate::shape::{self, Shape};
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
    let (shape, shape_err) = match shape::detect(&func) {
        Ok(shape) => (Some(shape), None),
        Err(err) => (None, Some(err)),
    };
    // The signature as the user wrote it: for an `#[async_trait]` method, the
    // future's output is the return type.
    // (Also when its body was not recognised, so the one error is about that.)
    let output = match &shape {
        Some(Shape::AsyncTrait { output }) => Some((**output).clone()),
        Some(Shape::Native) => None,
        None => shape::boxed_future_output(&func.sig.output),
    };
    let sig = match output {
        Some(output) => {
            let mut sig = func.sig.clone();
            sig.asyncness = Some(Default::default());
            sig.output = syn::parse_quote!(-> #output);
            sig
        }
        None => func.sig.clone(),
    };
    let parsed = args::parse(attr);
    let checked = match &parsed {
        Ok(args) => validate::check(&sig, shape_err, args),
        // Still check the signature, so argument and signature errors show together.
        Err(_) => validate::check(&sig, shape_err, &Args::lenient()),
    };
    match (parsed, checked, shape) {
        (Ok(args), Ok(checked), Some(Shape::Native)) => expand(&args, &checked, func),
        (Ok(args), Ok(checked), Some(Shape::AsyncTrait { .. })) => {
            expand_async_trait(args, &checked, func)
        }
        (Err(mut err), Err(more), _) => {
            err.combine(more);
            fallback::emit(err, item)
        }
        (Err(err), _, _) | (_, Err(err), _) => fallback::emit(err, item),
        (Ok(_), Ok(_), None) => unreachable!("a shape error fails the check"),
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

fn krate(args: &Args) -> TokenStream {
    args.krate
        .as_ref()
        .map(|p| quote!(#p))
        .unwrap_or_else(|| quote!(::idem_runtime))
}

/// An `async fn`: the rewrite replaces its body.
fn expand(args: &Args, checked: &Checked, func: ItemFn) -> TokenStream {
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
    let stmts = &block.stmts;
    let rewritten = rewrite(args, checked, quote!(#(#stmts)*));
    quote! {
        #(#outer)*
        #vis #sig {
            #(#inner)*
            #rewritten
        }
    }
}

/// A method `#[async_trait]` has rewritten: the rewrite goes inside its
/// `Box::pin(async move { .. })`.
///
/// async-trait 0.1 ends that block with `let __ret: R = { body }; __ret`, after
/// rebinding the receiver as `__self` and each parameter under its own name (a
/// pattern parameter is destructured there). The rewrite replaces `{ body }`, so
/// `key`, `fingerprint` and `store` see every parameter binding; `self` in them
/// is renamed to `__self` as async-trait renamed it in the body. Without that
/// statement (a boxed future written by hand, another version), the rewrite
/// wraps the whole block, before any rebinding, where `self` and the
/// parameters are still the function's own.
fn expand_async_trait(mut args: Args, checked: &Checked, mut func: ItemFn) -> TokenStream {
    let block = shape::boxed_async_block_mut(&mut func.block.stmts)
        .expect("detected: the body is Box::pin(async move { .. })");
    let stmts = &mut block.block.stmts;
    let renames_self = stmts.iter().any(|stmt| match stmt {
        Stmt::Local(local) => {
            matches!(&local.pat, Pat::Ident(p) if p.ident == "__self")
                && local.init.as_ref().is_some_and(
                    |init| matches!(&*init.expr, Expr::Path(p) if p.path.is_ident("self")),
                )
        }
        _ => false,
    });
    let ret_stmt = stmts.iter_mut().rev().find_map(|stmt| match stmt {
        Stmt::Local(local) => match (&local.pat, &mut local.init) {
            (Pat::Type(typed), Some(init))
                if matches!(&*typed.pat, Pat::Ident(p) if p.ident == "__ret") =>
            {
                Some(init)
            }
            _ => None,
        },
        _ => None,
    });
    match ret_stmt {
        Some(init) => {
            if renames_self {
                rename_self_in(&mut args);
            }
            let body = &init.expr;
            let rewritten = rewrite(&args, checked, quote!(#body));
            *init.expr = syn::parse_quote!({ #rewritten });
        }
        None => {
            let all = std::mem::take(stmts);
            let rewritten = rewrite(&args, checked, quote!(#(#all)*));
            *stmts = syn::parse_quote!(#rewritten);
        }
    }
    quote!(#func)
}

/// `self` → `__self` in the `key`, `fingerprint` and `store` expressions.
fn rename_self_in(args: &mut Args) {
    fn rename(tokens: TokenStream) -> TokenStream {
        let mut tokens = tokens.into_iter().peekable();
        let mut out = Vec::new();
        while let Some(tt) = tokens.next() {
            out.push(match tt {
                // `self::CONST` is a module path, not the receiver.
                TokenTree::Ident(ident)
                    if ident == "self"
                        && !matches!(tokens.peek(), Some(TokenTree::Punct(p)) if p.as_char() == ':') =>
                {
                    TokenTree::Ident(Ident::new("__self", ident.span()))
                }
                TokenTree::Group(group) => {
                    let mut renamed = Group::new(group.delimiter(), rename(group.stream()));
                    renamed.set_span(group.span());
                    TokenTree::Group(renamed)
                }
                other => other,
            });
        }
        out.into_iter().collect()
    }
    fn expr(e: &mut Expr) {
        let renamed = rename(quote!(#e));
        *e = syn::parse2(renamed).expect("renaming an identifier keeps an expression");
    }
    args.key.iter_mut().flatten().for_each(expr);
    args.fingerprint.iter_mut().flatten().for_each(expr);
    args.store.iter_mut().for_each(expr);
}

/// The statements that replace `body` (tokens that evaluate to the function's
/// `Result`): bind the options, store, key and fingerprint, then call the engine.
fn rewrite(args: &Args, checked: &Checked, body: TokenStream) -> TokenStream {
    let krate = krate(args);
    let private = quote!(#krate::__private);

    let store_var = local("__idem_store");
    let key_var = local("__idem_key");
    let fp_var = local("__idem_fingerprint");
    let options = local("__idem_options");
    let namespace_var = local("__idem_namespace");
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

    // Options: a local value (hygienic, unlike an item, so no user name is
    // shadowed); building it is a few moves, nothing is parsed or allocated.
    // The default namespace is the function's own path as the compiler names
    // it: `module::f`, `module::Type::m`, `<module::T as module::Tr>::m`,
    // `module::g<u32>`.
    let namespace = match &args.name {
        Some(lit) => quote!(#lit),
        None => quote!(#private::fn_path(&|| ())),
    };
    // A default namespace is checked to tell this instantiation apart (a
    // closure as a generic argument does not); a given name is the user's.
    let keyer = match &args.name {
        Some(_) => quote!(#private::KeyBuilder::new),
        None => quote!(#private::default_key),
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
    // The borrow is bound by a `let` of its own, so a store expression that
    // is a value rather than a place (`self.store()`, a method returning
    // `&PostgresStore`) lives to the end of the function instead of the end
    // of the statement.
    let store_ref = local("__idem_store_ref");
    let store = match &args.tx {
        None => quote_spanned!(store_expr.span()=> #private::store_handle(&(#store_expr))),
        Some(tx) => {
            let tx_ty = tx_ty.as_ref().map_or(quote!(_), |t| quote!(#t));
            quote_spanned!(tx.span()=> {
                #private::tx_store::<_, #tx_ty>(#store_ref, &*#tx)
            })
        }
    };
    let bind_ref = args
        .tx
        .as_ref()
        .map(|_| quote_spanned!(store_expr.span()=> let #store_ref = &(#store_expr);));

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
            quote!(::core::option::Option::Some(
                #private::FingerprintBuilder::new() #(#fp_parts)* .finish()
            ))
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

    let on_takeover = match &args.on_takeover {
        Some(OnTakeoverArg::Fail) => quote!(#private::OnTakeover::Fail),
        _ => quote!(#private::OnTakeover::Run),
    };
    // `reconcile(f)`: an attempt that continues an unfinished one awaits
    // `f(&attempt)` first; its error (through `?`) fails the call.
    let reconcile = match &args.on_takeover {
        Some(OnTakeoverArg::Reconcile(f)) => {
            let attempt = local("__idem_attempt");
            let reconcile = local("__idem_reconcile");
            quote_spanned!(f.span()=>
                if let ::core::option::Option::Some(#attempt) =
                    #private::current().filter(|a| a.took_over())
                {
                    let #reconcile = #f;
                    // A refusal is not an outcome: never recorded, whatever
                    // the codec keeps.
                    #reconcile(&#attempt)
                        .await
                        .inspect_err(|_| #private::withhold_outcome())?;
                }
            )
        }
        _ => quote!(),
    };
    let body = quote! {
        #reconcile
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
        #body
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
                let #claim_var = match #private::begin_in_tx(
                    #store_var, &mut *#tx, &#options, #key_var, #fp_var, &#codec_var,
                ).await {
                    #private::ControlFlow::Continue(claim) => claim,
                    #private::ControlFlow::Break(done) => return done,
                };
                let #outcome_var = #claim_var.run(async { #body }).await;
                #private::finish_in_tx(
                    #store_var, &mut *#tx, &#options, #claim_var, &#codec_var, #outcome_var,
                ).await
            }
        }
    };
    quote! {
        #check
        let #namespace_var: &'static str = #namespace;
        let #options: #private::Options = #private::Options::new()
            .ttl(#private::Duration::from_millis(#ttl))
            .lease(#private::Duration::from_millis(#lease))
            .in_progress(#in_progress)
            .on_takeover(#on_takeover);
        #bind_ref
        let #store_var = #store;
        let #key_var = #keyer(#namespace_var) #(#parts)* #window .finish();
        let #fp_var = #fingerprint;
        #call
    }
}

#[cfg(test)]
mod tests;
