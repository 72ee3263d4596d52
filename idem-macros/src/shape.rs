//! Which kind of function the attribute was given.
//!
//! Input:  the parsed function.
//! Output: [`Shape::Native`] for an `async fn`; [`Shape::AsyncTrait`] for the
//! method `#[async_trait]` has already rewritten; or an error that says why the
//! function is not async (an attribute above `#[idempotent]` rewrote it, or a
//! boxed future whose body is not `Box::pin(async move { .. })`).
//!
//! `#[async_trait]` on an impl runs before `#[idempotent]` on its methods and turns
//! ```text
//! async fn m(&self, id: u64) -> R { body }
//! ```
//! into
//! ```text
//! fn m<'life0, 'async_trait>(&'life0 self, id: u64)
//!     -> Pin<Box<dyn Future<Output = R> + Send + 'async_trait>>
//! {
//!     Box::pin(async move {
//!         if let Some(__ret) = None::<R> { return __ret; }
//!         let __self = self;
//!         let id = id;
//!         let __ret: R = { body, with `self` renamed to `__self` };
//!         __ret
//!     })
//! }
//! ```
//! (async-trait 0.1.x). As `tracing`'s `#[instrument]` does, the attribute
//! recognises the `Box::pin(async move { .. })` tail and takes `R` from the
//! `Output =` binding; the rewrite then goes inside the async block.

use proc_macro2::{TokenStream, TokenTree};
use syn::{Expr, ExprAsync, GenericArgument, ItemFn, PathArguments, ReturnType, Stmt, Type};

/// The function as the attribute found it.
pub enum Shape {
    /// An `async fn`.
    Native,
    /// A method already rewritten by `#[async_trait]` (or written by hand in
    /// the same shape): `fn .. -> Pin<Box<dyn Future<Output = R> ..>> { Box::pin(async move { .. }) }`.
    AsyncTrait {
        /// `R`, the future's output.
        output: Box<Type>,
    },
}

/// Classifies `func`.
pub fn detect(func: &ItemFn) -> syn::Result<Shape> {
    if func.sig.asyncness.is_some() {
        return Ok(Shape::Native);
    }
    if let Some(output) = boxed_future_output(&func.sig.output) {
        return match boxed_async_block(&func.block.stmts) {
            Some(_) => Ok(Shape::AsyncTrait {
                output: Box::new(output),
            }),
            None => Err(syn::Error::new_spanned(
                func.sig.fn_token,
                "#[idempotent] needs an `async fn`; this `fn` returns a boxed future, but its body is not the single `Box::pin(async move { .. })` that `#[async_trait]` writes, so #[idempotent] cannot find the body to run once. \
                 Write the method as an `async fn` (inside an `#[async_trait]` impl, keep it `async fn` and put `#[idempotent]` on it), or make the body exactly `Box::pin(async move { .. })`",
            )),
        };
    }
    if rewritten_by_runtime_attribute(func) {
        return Err(syn::Error::new_spanned(
            func.sig.fn_token,
            "#[idempotent] needs an `async fn`, and an attribute above `#[idempotent]` (such as `#[tokio::test]` or `#[tokio::main]`) has already turned this `async fn` into a plain `fn`: \
             attributes apply from the top down, so put `#[idempotent(..)]` first, above that attribute",
        ));
    }
    Err(syn::Error::new_spanned(
        func.sig.fn_token,
        "#[idempotent] needs an `async fn`: it waits on the store before and after the body",
    ))
}

/// The statements of the `async move { .. }` in a body that is exactly
/// `Box::pin(async move { .. })`.
pub fn boxed_async_block(stmts: &[Stmt]) -> Option<&ExprAsync> {
    let [Stmt::Expr(Expr::Call(call), None)] = stmts else {
        return None;
    };
    let Expr::Path(func) = &*call.func else {
        return None;
    };
    let names: Vec<String> = func
        .path
        .segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect();
    if !names.ends_with(&["Box".to_owned(), "pin".to_owned()]) || call.args.len() != 1 {
        return None;
    }
    match &call.args[0] {
        Expr::Async(block) if block.capture.is_some() => Some(block),
        _ => None,
    }
}

/// The same, mutably.
pub fn boxed_async_block_mut(stmts: &mut [Stmt]) -> Option<&mut ExprAsync> {
    let [Stmt::Expr(Expr::Call(call), None)] = stmts else {
        return None;
    };
    match call.args.first_mut() {
        Some(Expr::Async(block)) => Some(block),
        _ => None,
    }
}

/// `R` in `Pin<Box<dyn Future<Output = R> + ..>>`.
pub fn boxed_future_output(output: &ReturnType) -> Option<Type> {
    let ReturnType::Type(_, ty) = output else {
        return None;
    };
    let boxed = single_type_argument(ty, "Pin")?;
    let Type::TraitObject(object) = single_type_argument(boxed, "Box")? else {
        return None;
    };
    object.bounds.iter().find_map(|bound| {
        let syn::TypeParamBound::Trait(bound) = bound else {
            return None;
        };
        let last = bound.path.segments.last()?;
        if last.ident != "Future" {
            return None;
        }
        let PathArguments::AngleBracketed(args) = &last.arguments else {
            return None;
        };
        args.args.iter().find_map(|arg| match arg {
            GenericArgument::AssocType(assoc) if assoc.ident == "Output" => Some(assoc.ty.clone()),
            _ => None,
        })
    })
}

/// `X` in `..::name<X>`.
fn single_type_argument<'t>(ty: &'t Type, name: &str) -> Option<&'t Type> {
    let Type::Path(path) = ty else {
        return None;
    };
    let last = path.path.segments.last()?;
    if last.ident != name {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let mut types = args.args.iter().filter_map(|a| match a {
        GenericArgument::Type(t) => Some(t),
        _ => None,
    });
    match (types.next(), types.next()) {
        (Some(t), None) => Some(t),
        _ => None,
    }
}

/// Whether a runtime attribute placed above `#[idempotent]` rewrote an
/// `async fn`: `#[tokio::test]`, `#[tokio::main]`, `#[async_std::test]` and their
/// kin all leave a plain `fn` that drives the former body with `block_on`.
fn rewritten_by_runtime_attribute(func: &ItemFn) -> bool {
    mentions(quote::ToTokens::to_token_stream(&func.block), "block_on")
}

fn mentions(tokens: TokenStream, word: &str) -> bool {
    tokens.into_iter().any(|tt| match tt {
        TokenTree::Ident(ident) => ident == word,
        TokenTree::Group(group) => mentions(group.stream(), word),
        _ => false,
    })
}
