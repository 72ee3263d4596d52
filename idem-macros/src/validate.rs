//! Checks the function's signature against the arguments.
//!
//! Input:  `async fn create_order(&self, req: Req) -> Result<Order, OrderError>` and its `Args`
//! Output: `Checked { ok: Some(Order), err: Some(OrderError), .. }`, or every problem found.

use proc_macro2::Span;
use syn::{FnArg, GenericArgument, Pat, PathArguments, ReturnType, Signature, Type};

use crate::args::{Args, Errors};

/// What the expansion needs to know about the signature.
pub struct Checked {
    /// The declared return type, as written.
    pub ret: Type,
    /// `T` in `Result<T, E>`, when written out (an alias like `AppResult` hides it).
    pub ok: Option<Type>,
    /// `E` in `Result<T, E>`, when written out (an alias like `Result<T>` hides it).
    pub err: Option<Type>,
    /// With `tx = name`: the transaction type `X` of the parameter `name: &mut X`.
    pub tx: Option<Type>,
}

/// Validates `sig` and `args`, collecting every problem; `shape` is the
/// verdict on the function's form (not async, not a recognised boxed future).
pub fn check(sig: &Signature, shape: Option<syn::Error>, args: &Args) -> syn::Result<Checked> {
    let mut errors = Errors::default();
    let attr_span = args.span.unwrap_or_else(Span::call_site);

    if let Some(shape) = shape {
        errors.push(shape);
    }
    let checked = return_type(sig).map_err(|e| errors.push(e)).ok();

    if args.key.is_none() {
        errors.push(syn::Error::new(
            attr_span,
            "missing `key`: say what makes two calls the same, e.g. `key = req.order_id` or `key = (req.user_id, req.product_id)`",
        ));
    }
    if args.store.is_none() {
        errors.push(syn::Error::new(
            attr_span,
            "missing `store`: name the store to keep records in, e.g. `store = self.store`",
        ));
    }
    let mut tx_type = None;
    if let Some(tx) = &args.tx {
        let param = sig.inputs.iter().find_map(|arg| match arg {
            FnArg::Typed(typed) => match &*typed.pat {
                Pat::Ident(ident) if ident.ident == *tx => Some(typed),
                _ => None,
            },
            FnArg::Receiver(_) => None,
        });
        match param {
            None => {
                let names: Vec<String> = sig.inputs.iter().filter_map(param_name).collect();
                let listed = if names.is_empty() {
                    "it has no named parameters".to_owned()
                } else {
                    format!("its parameters are: {}", names.join(", "))
                };
                errors.push(syn::Error::new_spanned(
                    tx,
                    format!("`tx = {tx}` names no parameter of `{}`; {listed}", sig.ident),
                ));
            }
            Some(typed) => match &*typed.ty {
                Type::Reference(r) if r.mutability.is_some() => tx_type = Some((*r.elem).clone()),
                other => errors.push(syn::Error::new_spanned(
                    other,
                    format!(
                        "the `tx` parameter must be a mutable reference to the open transaction, e.g. `{tx}: &mut sqlx::Transaction<'_, Postgres>`"
                    ),
                )),
            },
        }
    }
    errors.finish()?;
    let mut checked =
        checked.ok_or_else(|| syn::Error::new(Span::call_site(), "invalid return type"))?;
    checked.tx = tx_type;
    Ok(checked)
}

fn param_name(arg: &FnArg) -> Option<String> {
    match arg {
        FnArg::Typed(typed) => match &*typed.pat {
            Pat::Ident(ident) => Some(ident.ident.to_string()),
            _ => None,
        },
        FnArg::Receiver(_) => None,
    }
}

fn return_type(sig: &Signature) -> syn::Result<Checked> {
    let not_result = |span: &dyn quote::ToTokens| {
        syn::Error::new_spanned(
            span,
            "#[idempotent] functions must return `Result<T, E>` (or an alias named `...Result`): the `Ok` value is stored and replayed, and `E` carries idem's errors",
        )
    };
    let ty = match &sig.output {
        ReturnType::Default => return Err(not_result(&sig.ident)),
        ReturnType::Type(_, ty) => ty,
    };
    if let Some(opaque) = impl_trait(ty) {
        return Err(syn::Error::new_spanned(
            opaque,
            "#[idempotent] cannot store an `impl Trait` result: the `Ok` value is serialized, stored and replayed, so its type must be named. \
             Return a concrete type that implements `Serialize` + `DeserializeOwned`",
        ));
    }
    let mut inner: &Type = ty;
    while let Type::Paren(p) = inner {
        inner = &p.elem;
    }
    let Type::Path(path) = inner else {
        return Err(not_result(ty));
    };
    let Some(last) = path.path.segments.last() else {
        return Err(not_result(ty));
    };
    // An alias (`io::Result<T>`, `AppResult<T>`) is accepted when its name ends in
    // `Result`; its parts are then checked through the type system instead.
    if !last.ident.to_string().ends_with("Result") {
        return Err(not_result(ty));
    }
    let alias = Checked {
        ret: (**ty).clone(),
        ok: None,
        err: None,
        tx: None,
    };
    if last.ident != "Result" {
        return Ok(alias);
    }
    let PathArguments::AngleBracketed(generics) = &last.arguments else {
        return Ok(alias);
    };
    let types: Vec<&Type> = generics
        .args
        .iter()
        .filter_map(|a| match a {
            GenericArgument::Type(t) => Some(t),
            _ => None,
        })
        .collect();
    match types.as_slice() {
        [ok] => Ok(Checked {
            ok: Some((*ok).clone()),
            ..alias
        }),
        [ok, err] => Ok(Checked {
            ok: Some((*ok).clone()),
            err: Some((*err).clone()),
            ..alias
        }),
        _ => Ok(alias),
    }
}

/// The first opaque `impl Trait` type inside `ty`.
fn impl_trait(ty: &Type) -> Option<&Type> {
    match ty {
        Type::ImplTrait(_) => Some(ty),
        Type::Paren(t) => impl_trait(&t.elem),
        Type::Group(t) => impl_trait(&t.elem),
        Type::Reference(t) => impl_trait(&t.elem),
        Type::Slice(t) => impl_trait(&t.elem),
        Type::Array(t) => impl_trait(&t.elem),
        Type::Ptr(t) => impl_trait(&t.elem),
        Type::Tuple(t) => t.elems.iter().find_map(impl_trait),
        Type::Path(t) => t
            .path
            .segments
            .iter()
            .find_map(|segment| match &segment.arguments {
                PathArguments::AngleBracketed(args) => args.args.iter().find_map(|arg| match arg {
                    GenericArgument::Type(t) => impl_trait(t),
                    _ => None,
                }),
                _ => None,
            }),
        _ => None,
    }
}
