//! The CLI's key derivation (`idem inspect NAMESPACE KEY_PARTS_JSON`) against
//! the key `#[idempotent]` stored, for the key shapes the README says JSON
//! spells: "an integer is any integer type, `null` a `None`, an object a
//! struct or map". A part the CLI cannot spell must be refused (exit 2), never
//! derived to another key (exit 1, "no record", when the record is there).

use std::collections::{BTreeMap, BTreeSet};

use idem_runtime::{idempotent, Error, MemoryStore, Store};
use serde::Serialize;
use serde_json::Value;

const NS: &str = "cli::keys";

#[derive(Debug, Serialize)]
struct Order {
    user: u64,
    coupon: Option<String>,
}

#[idempotent(name = "cli::keys", key = (order), store = store)]
async fn by_struct(store: &dyn Store, order: Order) -> Result<u32, Error> {
    Ok(1)
}

#[idempotent(name = "cli::keys", key = (id), store = store)]
async fn by_u128(store: &dyn Store, id: u128) -> Result<u32, Error> {
    Ok(1)
}

#[idempotent(name = "cli::keys", key = (tags), store = store)]
async fn by_set(store: &dyn Store, tags: BTreeSet<String>) -> Result<u32, Error> {
    Ok(1)
}

#[idempotent(name = "cli::keys", key = (qty), store = store)]
async fn by_map(store: &dyn Store, qty: BTreeMap<u32, u32>) -> Result<u32, Error> {
    Ok(1)
}

/// `idem inspect NS PARTS --json` on `store`: the exit and the document.
async fn inspect(store: &MemoryStore, parts: &str) -> (idem_cli::Exit, Value) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let exit = idem_cli::run_on(
        store,
        ["idem", "inspect", NS, parts, "--json"],
        &mut out,
        &mut err,
    )
    .await;
    let doc = serde_json::from_slice(&out).unwrap_or(Value::Null);
    (exit, doc)
}

/// The record is found, or the CLI says it cannot spell the part (usage):
/// never "no record" for a record that is there.
fn found_or_refused(exit: idem_cli::Exit, doc: &Value, what: &str) {
    assert!(
        matches!(exit, idem_cli::Exit::Ok | idem_cli::Exit::Usage),
        "{what}: the CLI derived another key than the macro's and reports {exit:?}: {doc}"
    );
}

#[tokio::test]
async fn a_struct_with_an_option_that_is_some() {
    let store = MemoryStore::new();
    let order = Order {
        user: 7,
        coupon: Some("SPRING".into()),
    };
    by_struct(&store, order).await.unwrap();
    let (exit, doc) = inspect(&store, r#"[{"user": 7, "coupon": {"$some": "SPRING"}}]"#).await;
    assert_eq!(exit, idem_cli::Exit::Ok, "{doc}");
    // Spelled as a plain string it is another value (a `String` field): the
    // miss says which parts need a typed spelling.
    let (exit, doc) = inspect(&store, r#"[{"user": 7, "coupon": "SPRING"}]"#).await;
    assert_eq!(exit, idem_cli::Exit::NotFound, "{doc}");
    assert!(doc.to_string().contains("$some"), "{doc}");
}

#[tokio::test]
async fn a_struct_with_an_option_that_is_none() {
    let store = MemoryStore::new();
    let order = Order {
        user: 8,
        coupon: None,
    };
    by_struct(&store, order).await.unwrap();
    let (exit, doc) = inspect(&store, r#"[{"user": 8, "coupon": null}]"#).await;
    assert_eq!(exit, idem_cli::Exit::Ok, "{doc}");
}

#[tokio::test]
async fn an_integer_beyond_64_bits() {
    let store = MemoryStore::new();
    let id = u128::from(u64::MAX) + 2;
    by_u128(&store, id).await.unwrap();
    let (exit, doc) = inspect(&store, &format!("[{id}]")).await;
    found_or_refused(exit, &doc, "u128 above u64::MAX");
    assert_eq!(exit, idem_cli::Exit::Usage, "{doc}");
    let (exit, doc) = inspect(&store, &format!(r#"[{{"$int": "{id}"}}]"#)).await;
    assert_eq!(exit, idem_cli::Exit::Ok, "{doc}");
}

#[tokio::test]
async fn a_set() {
    let store = MemoryStore::new();
    by_set(&store, BTreeSet::from(["a".to_owned(), "b".to_owned()]))
        .await
        .unwrap();
    let (exit, doc) = inspect(&store, r#"[{"$set": ["b", "a"]}]"#).await;
    assert_eq!(exit, idem_cli::Exit::Ok, "{doc}");
}

#[tokio::test]
async fn a_map_with_integer_keys() {
    let store = MemoryStore::new();
    by_map(&store, BTreeMap::from([(1, 2)])).await.unwrap();
    let (exit, doc) = inspect(&store, r#"[{"$map": [[1, 2]]}]"#).await;
    assert_eq!(exit, idem_cli::Exit::Ok, "{doc}");
}
