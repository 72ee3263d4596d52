//! Parses the attribute's arguments into a typed [`Args`].
//!
//! Input:  `key = (req.user_id, req.product_id), window = "1d", store = self.store`
//! Output: `Args { key: Some([req.user_id, req.product_id]), window: Some(86_400_000 ms), store: Some(self.store), .. }`
//!
//! Each argument is split off at its top-level comma first, so one bad
//! argument does not hide the others: every problem is collected and reported
//! in one compile.

use proc_macro2::{Span, TokenStream, TokenTree};
use syn::ext::IdentExt as _;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned as _;
use syn::{Expr, Ident, LitStr, Path, Token};

use crate::duration;

/// Every argument the attribute accepts, in the order the docs list them.
pub const KNOWN: &[&str] = &[
    "key",
    "store",
    "ttl",
    "window",
    "name",
    "fingerprint",
    "lease",
    "in_progress",
    "on_takeover",
    "cache_errors",
    "tx",
    "crate",
];

/// A duration literal and its value.
pub struct DurationArg {
    pub ms: u64,
}

/// `in_progress = reject` or `in_progress = wait("10s")`.
pub enum InProgressArg {
    Reject,
    Wait(DurationArg),
}

/// `on_takeover = run`, `fail` or `reconcile(expr)`.
pub enum OnTakeoverArg {
    Run,
    Fail,
    /// `expr` called with the `&Attempt`, awaited; its `Err` fails the call.
    Reconcile(Box<Expr>),
}

/// `cache_errors` or `cache_errors = path::to::predicate`.
pub struct CacheErrorsArg {
    pub keyword: Ident,
    pub predicate: Option<Path>,
}

/// The parsed attribute.
#[derive(Default)]
pub struct Args {
    /// The span of the whole attribute, for "missing argument" errors.
    pub span: Option<Span>,
    pub key: Option<Vec<Expr>>,
    pub store: Option<Expr>,
    pub ttl: Option<DurationArg>,
    pub window: Option<DurationArg>,
    pub name: Option<LitStr>,
    pub fingerprint: Option<Vec<Expr>>,
    pub lease: Option<DurationArg>,
    pub in_progress: Option<InProgressArg>,
    pub on_takeover: Option<OnTakeoverArg>,
    pub cache_errors: Option<CacheErrorsArg>,
    pub tx: Option<Ident>,
    pub krate: Option<Path>,
}

/// One `name = value` (or bare `name`) before interpretation.
struct RawArg {
    name: Ident,
    value: Option<(Token![=], TokenStream)>,
}

impl Parse for RawArg {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let name = input.call(Ident::parse_any)?;
        let value = if input.peek(Token![=]) {
            let eq: Token![=] = input.parse()?;
            let mut tokens = TokenStream::new();
            while !input.is_empty() && !input.peek(Token![,]) {
                tokens.extend([input.parse::<TokenTree>()?]);
            }
            Some((eq, tokens))
        } else {
            None
        };
        Ok(RawArg { name, value })
    }
}

/// Collects independent errors so they are reported together.
#[derive(Default)]
pub struct Errors(Option<syn::Error>);

impl Errors {
    pub fn push(&mut self, err: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(err),
            None => self.0 = Some(err),
        }
    }

    pub fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// Parses the attribute tokens.
pub fn parse(tokens: TokenStream) -> syn::Result<Args> {
    let span = tokens.span();
    let raw =
        syn::parse::Parser::parse2(Punctuated::<RawArg, Token![,]>::parse_terminated, tokens)?;
    let mut args = Args {
        span: Some(span),
        ..Args::default()
    };
    let mut errors = Errors::default();
    let mut seen: Vec<String> = Vec::new();
    for arg in raw {
        let name = arg.name.unraw().to_string();
        if !KNOWN.contains(&name.as_str()) {
            errors.push(unknown(&arg.name, &name));
            continue;
        }
        if seen.contains(&name) {
            errors.push(syn::Error::new_spanned(
                &arg.name,
                format!("duplicate argument `{name}`: give each argument once"),
            ));
            continue;
        }
        seen.push(name.clone());
        if let Err(err) = interpret(&mut args, &name, arg) {
            errors.push(err);
        }
    }
    errors.finish()?;
    Ok(args)
}

fn unknown(ident: &Ident, name: &str) -> syn::Error {
    let mut message = format!("unknown argument `{name}`");
    if let Some(best) = closest(name) {
        message.push_str(&format!(": did you mean `{best}`?"));
    }
    message.push_str(&format!(" (expected one of: {})", KNOWN.join(", ")));
    syn::Error::new_spanned(ident, message)
}

/// The known argument nearest to `name` by edit distance, if it is close.
fn closest(name: &str) -> Option<&'static str> {
    KNOWN
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(1) + 1)
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (prev + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

fn interpret(args: &mut Args, name: &str, arg: RawArg) -> syn::Result<()> {
    if name == "cache_errors" {
        let keyword = arg.name;
        let predicate = match arg.value {
            None => None,
            Some((_, tokens)) => Some(syn::parse2::<Path>(tokens).map_err(|e| {
                syn::Error::new(
                    e.span(),
                    "expected a path to a predicate `fn(&E) -> bool`, e.g. `cache_errors = OrderError::is_final`",
                )
            })?),
        };
        args.cache_errors = Some(CacheErrorsArg { keyword, predicate });
        return Ok(());
    }
    let Some((eq, tokens)) = arg.value else {
        return Err(syn::Error::new_spanned(
            &arg.name,
            format!("argument `{name}` needs a value: `{name} = ...`"),
        ));
    };
    if tokens.is_empty() {
        return Err(syn::Error::new_spanned(
            eq,
            format!("argument `{name}` needs a value after `=`"),
        ));
    }
    match name {
        "key" => {
            let parts = parts(tokens)?;
            if parts.is_empty() {
                return Err(syn::Error::new_spanned(
                    &arg.name,
                    "`key` needs at least one part: `key = req.id` or `key = (a, b)`",
                ));
            }
            args.key = Some(parts);
        }
        "fingerprint" => args.fingerprint = Some(parts(tokens)?),
        "store" => args.store = Some(syn::parse2(tokens)?),
        "ttl" => args.ttl = Some(duration_arg(tokens)?),
        "window" => args.window = Some(duration_arg(tokens)?),
        "lease" => args.lease = Some(duration_arg(tokens)?),
        "name" => {
            let lit: LitStr = syn::parse2(tokens).map_err(|e| {
                syn::Error::new(
                    e.span(),
                    "expected a string literal, e.g. `name = \"create-order\"`",
                )
            })?;
            if lit.value().trim().is_empty() {
                return Err(syn::Error::new_spanned(
                    &lit,
                    "`name` must not be empty: it is the namespace that prefixes every storage key",
                ));
            }
            args.name = Some(lit);
        }
        "in_progress" => args.in_progress = Some(in_progress(tokens)?),
        "on_takeover" => args.on_takeover = Some(on_takeover(tokens)?),
        "tx" => {
            args.tx = Some(syn::parse2::<Ident>(tokens).map_err(|e| {
                syn::Error::new(
                    e.span(),
                    "expected the name of the transaction parameter, e.g. `tx = tx`",
                )
            })?)
        }
        "crate" => args.krate = Some(syn::parse2(tokens)?),
        _ => unreachable!("every known argument is interpreted"),
    }
    Ok(())
}

/// `expr` or `(e1, e2, ..)` into its parts.
fn parts(tokens: TokenStream) -> syn::Result<Vec<Expr>> {
    Ok(match syn::parse2::<Expr>(tokens)? {
        Expr::Tuple(tuple) => tuple.elems.into_iter().collect(),
        Expr::Paren(paren) => vec![*paren.expr],
        expr => vec![expr],
    })
}

fn duration_arg(tokens: TokenStream) -> syn::Result<DurationArg> {
    let lit: LitStr = syn::parse2(tokens).map_err(|e| {
        syn::Error::new(
            e.span(),
            "expected a duration string such as \"24h\", \"30s\" or \"1h30m\"",
        )
    })?;
    let ms = duration::parse_ms(&lit.value()).map_err(|msg| syn::Error::new_spanned(&lit, msg))?;
    Ok(DurationArg { ms })
}

fn on_takeover(tokens: TokenStream) -> syn::Result<OnTakeoverArg> {
    const EXPECTED: &str = "expected `run`, `fail` or `reconcile(f)` (an async function or \
                            closure given the `&Attempt`, returning `Result<(), E>`)";
    let expr: Expr = syn::parse2(tokens).map_err(|e| syn::Error::new(e.span(), EXPECTED))?;
    match expr {
        Expr::Path(p) if p.path.is_ident("run") => Ok(OnTakeoverArg::Run),
        Expr::Path(p) if p.path.is_ident("fail") => Ok(OnTakeoverArg::Fail),
        Expr::Call(call)
            if matches!(&*call.func, Expr::Path(p) if p.path.is_ident("reconcile"))
                && call.args.len() == 1 =>
        {
            Ok(OnTakeoverArg::Reconcile(Box::new(
                call.args.into_iter().next().expect("one argument"),
            )))
        }
        other => Err(syn::Error::new_spanned(
            other,
            format!("invalid `on_takeover`: {EXPECTED}"),
        )),
    }
}

fn in_progress(tokens: TokenStream) -> syn::Result<InProgressArg> {
    const EXPECTED: &str = "expected `reject` or `wait(\"10s\")`";
    let expr: Expr = syn::parse2(tokens).map_err(|e| syn::Error::new(e.span(), EXPECTED))?;
    match &expr {
        Expr::Path(p) if p.path.is_ident("reject") => Ok(InProgressArg::Reject),
        Expr::Call(call) => {
            let is_wait = matches!(&*call.func, Expr::Path(p) if p.path.is_ident("wait"));
            if !is_wait || call.args.len() != 1 {
                return Err(syn::Error::new_spanned(&expr, EXPECTED));
            }
            match &call.args[0] {
                Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(lit),
                    ..
                }) => {
                    let ms = duration::parse_ms(&lit.value())
                        .map_err(|msg| syn::Error::new_spanned(lit, msg))?;
                    Ok(InProgressArg::Wait(DurationArg { ms }))
                }
                other => Err(syn::Error::new_spanned(
                    other,
                    "expected a duration string, e.g. `wait(\"10s\")`",
                )),
            }
        }
        _ => Err(syn::Error::new_spanned(
            &expr,
            format!("invalid `in_progress`: {EXPECTED}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    #[test]
    fn parses_the_full_grammar() {
        let args = parse(quote!(
            key = (req.user_id, req.product_id),
            window = "1d",
            ttl = "24h",
            store = self.store,
            name = "create-order",
            fingerprint = req,
            lease = "10s",
            in_progress = wait("5s"),
            cache_errors = E::is_final,
            tx = tx,
            crate = ::my_idem
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(args.key.as_ref().map(Vec::len), Some(2));
        assert_eq!(args.window.as_ref().map(|d| d.ms), Some(86_400_000));
        assert_eq!(args.lease.as_ref().map(|d| d.ms), Some(10_000));
        assert!(matches!(
            args.in_progress,
            Some(InProgressArg::Wait(DurationArg { ms: 5000, .. }))
        ));
        assert!(args.cache_errors.as_ref().unwrap().predicate.is_some());
        assert_eq!(args.tx.as_ref().unwrap().to_string(), "tx");
        assert!(args.krate.is_some());
    }

    #[test]
    fn collects_every_problem() {
        let err = parse(quote!(key = a, tll = "1h", key = b, ttl = "0s"))
            .err()
            .unwrap();
        let messages: Vec<String> = err.into_iter().map(|e| e.to_string()).collect();
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(messages[0].contains("did you mean `ttl`"));
        assert!(messages[1].contains("duplicate argument `key`"));
        assert!(messages[2].contains("zero"));
    }

    #[test]
    fn suggestions_are_close_only() {
        assert_eq!(closest("tll"), Some("ttl"));
        assert_eq!(closest("stor"), Some("store"));
        assert_eq!(closest("inprogress"), Some("in_progress"));
        assert_eq!(closest("zzzzzz"), None);
    }
}
