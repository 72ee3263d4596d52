//! Parameters named like every local the attribute generates: none of them is
//! shadowed, in the key, the fingerprint or the body (the generated names are
//! hygienic locals, not items).
#![allow(non_snake_case)]

use idem_runtime::{idempotent, MemoryStore};

#[derive(Debug)]
pub struct AppError;
impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

#[idempotent(key = (__IDEM_OPTIONS, __idem_options), fingerprint = __idem_fingerprint, store = __idem_store)]
async fn create(
    __idem_store: &MemoryStore,
    __IDEM_OPTIONS: u64,
    __idem_options: String,
    __idem_key: u32,
    __idem_fingerprint: bool,
    __idem_ret: &str,
    __idem_codec: u8,
    __idem_claim: i8,
    __idem_outcome: char,
) -> Result<String, AppError> {
    Ok(format!(
        "{__IDEM_OPTIONS} {__idem_options} {__idem_key} {__idem_fingerprint} {__idem_ret} {__idem_codec} {__idem_claim} {__idem_outcome}"
    ))
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let store = MemoryStore::new();
        let out = create(&store, 7, "o".into(), 3, true, "r", 1, -1, 'c').await.unwrap();
        assert_eq!(out, "7 o 3 true r 1 -1 c");
        let again = create(&store, 7, "o".into(), 4, true, "x", 2, -2, 'd').await.unwrap();
        assert_eq!(again, out, "replayed: the key is (7, \"o\")");
    });
}
