//! The shapes a service method takes all keep working under the attribute:
//! `&mut self`, generics, `impl Trait`, patterns, early `return`, `?`, and a
//! store given as `Arc<dyn Store>`.

use std::fmt::Display;
use std::sync::Arc;

use idem_runtime::{idempotent, MemoryStore, Store};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::AppError;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Line {
    sku: String,
    qty: u32,
}

struct Cart {
    store: Arc<dyn Store>,
    lines: Vec<Line>,
}

impl Cart {
    #[idempotent(key = (line.sku, line.qty), store = self.store)]
    async fn add(&mut self, line: Line) -> Result<usize, AppError> {
        self.lines.push(line);
        Ok(self.lines.len())
    }

    #[idempotent(key = label.to_string(), store = self.store)]
    async fn labelled<T: Serialize + DeserializeOwned + Clone + Send>(
        &self,
        label: impl Display + Send,
        value: T,
    ) -> Result<Vec<T>, AppError> {
        Ok(vec![value.clone(), value])
    }

    #[idempotent(key = sku, store = self.store)]
    async fn pattern(&self, Line { sku, qty }: Line) -> Result<u32, AppError> {
        if qty == 0 {
            return Err(AppError::Declined(format!("{sku}: empty")));
        }
        let parsed: u32 = sku
            .trim_start_matches("n")
            .parse()
            .map_err(|_| AppError::Unavailable)?;
        Ok(parsed + qty)
    }
}

#[tokio::test]
async fn mut_self_generics_impl_trait_patterns_early_return_and_question_mark() {
    let mut cart = Cart {
        store: Arc::new(MemoryStore::new()),
        lines: Vec::new(),
    };
    let line = Line {
        sku: "n5".into(),
        qty: 2,
    };
    assert_eq!(cart.add(line.clone()).await.unwrap(), 1);
    assert_eq!(cart.add(line.clone()).await.unwrap(), 1, "replayed");
    assert_eq!(cart.lines, vec![line.clone()], "the body ran once");

    assert_eq!(cart.labelled("x", 3u8).await.unwrap(), vec![3, 3]);
    assert_eq!(
        cart.labelled("x", 9u8).await.unwrap(),
        vec![3, 3],
        "same key replays"
    );

    assert_eq!(cart.pattern(line.clone()).await.unwrap(), 7);
    let empty = Line {
        sku: "n1".into(),
        qty: 0,
    };
    assert!(matches!(
        cart.pattern(empty).await,
        Err(AppError::Declined(_))
    ));
    let bad = Line {
        sku: "zz".into(),
        qty: 1,
    };
    assert!(matches!(
        cart.pattern(bad).await,
        Err(AppError::Unavailable)
    ));
}

static ORDER_STORE: std::sync::LazyLock<MemoryStore> = std::sync::LazyLock::new(MemoryStore::new);

// `#[idempotent]` first, then `#[tokio::test]`: the order the attribute-order
// error asks for compiles and runs the body as an idempotent call.
#[idempotent(key = "attribute-order", store = *ORDER_STORE)]
#[tokio::test]
async fn idempotent_above_tokio_test_runs_inside_a_claim() -> Result<(), AppError> {
    let attempt = idem_runtime::current().expect("the body runs inside a claim");
    assert_eq!(
        attempt.key().namespace(),
        "attribute::signatures::idempotent_above_tokio_test_runs_inside_a_claim"
    );
    Ok(())
}
