//! The expansion's unit tests: what the attribute generates for each argument.

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

/// What async-trait 0.1.92 makes of `async fn m(&self, id: u64) -> Result<u32, E>`.
fn async_trait_method() -> TokenStream {
    quote!(
        fn m<'life0, 'async_trait>(
            &'life0 self,
            id: u64,
        ) -> ::core::pin::Pin<
            Box<
                dyn ::core::future::Future<Output = Result<u32, E>>
                    + ::core::marker::Send
                    + 'async_trait,
            >,
        >
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(async move {
                if let ::core::option::Option::Some(__ret) =
                    ::core::option::Option::None::<Result<u32, E>>
                {
                    #[allow(unreachable_code)]
                    return __ret;
                }
                let __self = self;
                let id = id;
                let __ret: Result<u32, E> = { Ok(__self.n + id as u32) };
                #[allow(unreachable_code)]
                __ret
            })
        }
    )
}

#[test]
fn rewrites_inside_the_async_trait_future_with_self_renamed() {
    let out = expand_str(
        quote!(key = (self.tenant, id), store = self.store),
        async_trait_method(),
    );
    assert!(!out.contains("compile_error"), "{out}");
    assert!(out.contains("Box :: pin (async move"), "{out}");
    assert!(out.contains("store_handle (& (__self . store))"), "{out}");
    assert!(out.contains(". part (& (__self . tenant))"), "{out}");
    assert!(out.contains("let __ret : Result < u32 , E > = {"), "{out}");
    assert!(out.contains("execute"), "{out}");
    assert!(!out.contains("(self ."), "{out}");
}

#[test]
fn a_boxed_future_of_another_shape_is_one_clear_error() {
    let out = expand_str(
        quote!(key = id, store = self.store),
        quote!(
            fn m(&self, id: u64) -> Pin<Box<dyn Future<Output = Result<u32, E>> + Send + '_>> {
                let fut = async move { Ok(1) };
                Box::pin(fut)
            }
        ),
    );
    assert_eq!(out.matches("compile_error").count(), 1, "{out}");
    assert!(out.contains("Box::pin(async move { .. })"), "{out}");
}

#[test]
fn a_runtime_attribute_above_is_named_as_the_cause() {
    let out = expand_str(
        quote!(key = id, store = s),
        quote!(
            #[::core::prelude::v1::test]
            fn t() -> Result<(), E> {
                let body = async { Ok(()) };
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap()
                    .block_on(body)
            }
        ),
    );
    assert_eq!(out.matches("compile_error").count(), 1, "{out}");
    assert!(out.contains("put `#[idempotent(..)]` first"), "{out}");
    // A plain `fn` that was never async gets the plain message.
    let out = expand_str(
        quote!(key = id, store = s),
        quote!(
            #[test]
            fn t() -> Result<(), E> {
                Ok(())
            }
        ),
    );
    assert!(out.contains("it waits on the store"), "{out}");
}

#[test]
fn impl_trait_results_are_one_error_that_names_the_fix() {
    let out = expand_str(
        quote!(key = id, store = s),
        quote!(
            async fn f(id: u64) -> Result<Vec<impl Display>, E> {
                Ok(vec![id])
            }
        ),
    );
    assert_eq!(out.matches("compile_error").count(), 1, "{out}");
    assert!(out.contains("Return a concrete type"), "{out}");
}

#[test]
fn options_are_a_hygienic_local_not_an_item() {
    let out = expand_str(
        quote!(key = id, store = s),
        quote!(
            async fn f(s: &S, id: u64) -> Result<u64, E> {
                Ok(id)
            }
        ),
    );
    assert!(!out.contains("const"), "{out}");
    assert!(out.contains("let __idem_options"), "{out}");
    assert!(out.contains("fn_path (& || ())"), "{out}");
}
