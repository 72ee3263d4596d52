//! A module that shadows prelude names and has its own `mod core`.
#![allow(dead_code, non_camel_case_types)]

mod service {
    use idem_runtime::{idempotent, MemoryStore};

    mod core {}
    pub struct Result;
    pub struct Option;
    pub struct Box;
    pub struct Duration;
    pub struct Ok;
    pub struct Some;
    pub struct Err;
    pub struct None;
    pub struct Vec;
    pub struct String;
    pub struct From;
    pub struct Into;
    pub struct Send;
    pub struct Sync;
    pub struct Future;
    pub struct Arc;

    #[derive(Debug)]
    pub struct AppError;
    impl ::core::convert::From<idem_runtime::Error> for AppError {
        fn from(_: idem_runtime::Error) -> Self {
            AppError
        }
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    pub enum Declined {
        #[serde(skip)]
        Idem,
        Code(u8),
    }
    impl ::core::convert::From<idem_runtime::Error> for Declined {
        fn from(_: idem_runtime::Error) -> Self {
            Declined::Idem
        }
    }

    pub struct Svc {
        pub store: MemoryStore,
    }

    impl Svc {
        #[idempotent(key = id, store = self.store, ttl = "1h", window = "1d", in_progress = wait("1s"))]
        pub async fn run(&self, id: u64) -> ::core::result::Result<u64, AppError> {
            ::core::result::Result::Ok(id * 2)
        }

        #[idempotent(key = id, store = self.store, cache_errors, fingerprint = id)]
        pub async fn cached(&self, id: u64) -> ::core::result::Result<u64, Declined> {
            ::core::result::Result::Err(Declined::Code(id as u8))
        }
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let svc = service::Svc {
            store: idem_runtime::MemoryStore::new(),
        };
        assert_eq!(svc.run(21).await.unwrap(), 42);
        assert_eq!(svc.cached(3).await, Err(service::Declined::Code(3)));
        assert_eq!(svc.cached(3).await, Err(service::Declined::Code(3)));
    });
}
