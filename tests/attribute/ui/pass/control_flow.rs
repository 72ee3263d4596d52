//! Patterns in arguments, early `return`, `?`, and a `Result` alias.
use idem_runtime::{idempotent, MemoryStore};

#[derive(Debug)]
pub enum AppError {
    Idem,
    Parse,
    Empty,
}
impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError::Idem
    }
}
impl From<std::num::ParseIntError> for AppError {
    fn from(_: std::num::ParseIntError) -> Self {
        AppError::Parse
    }
}

type AppResult<T> = Result<T, AppError>;

pub struct Pair {
    pub left: String,
    pub right: String,
}

#[idempotent(key = (left, right), store = store)]
async fn add(store: &MemoryStore, Pair { left, right }: Pair) -> AppResult<i64> {
    if right == "0" {
        return Err(AppError::Empty);
    }
    let l: i64 = left.parse()?;
    let r: i64 = right.parse()?;
    Ok(l + r)
}

#[idempotent(key = (a, b), store = store)]
async fn tuple(store: &MemoryStore, (a, b): (u8, u8)) -> Result<u16, AppError> {
    Ok(a as u16 * b as u16)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let store = MemoryStore::new();
        let pair = |l: &str, r: &str| Pair { left: l.into(), right: r.into() };
        assert_eq!(add(&store, pair("2", "3")).await.unwrap(), 5);
        assert!(matches!(add(&store, pair("1", "0")).await, Err(AppError::Empty)));
        assert!(matches!(add(&store, pair("x", "3")).await, Err(AppError::Parse)));
        assert_eq!(tuple(&store, (3, 4)).await.unwrap(), 12);
    });
}
