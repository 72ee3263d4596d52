//! Every outcome is traced with the namespace and digest, never the raw key.
//!
//! Its own test binary, with the subscriber installed globally: tracing caches
//! per-callsite interest, which a scoped subscriber shares unreliably with
//! other tests running on other threads.

use std::io::Write;
use std::sync::{Arc, Mutex};

use idem_runtime::{idempotent, MemoryStore};

#[derive(Debug)]
enum AppError {
    #[allow(dead_code)]
    Idem(idem_runtime::Error),
    Unavailable,
}

impl From<idem_runtime::Error> for AppError {
    fn from(e: idem_runtime::Error) -> Self {
        AppError::Idem(e)
    }
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Svc {
    store: MemoryStore,
}

impl Svc {
    #[idempotent(key = email, name = "signup", fingerprint = plan, store = self.store)]
    async fn signup(&self, email: String, plan: u8) -> Result<u8, AppError> {
        if plan == 0 {
            return Err(AppError::Unavailable);
        }
        Ok(plan)
    }
}

#[tokio::test(flavor = "current_thread")]
async fn outcomes_are_traced_by_digest_never_by_key_material() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let svc = Svc {
        store: MemoryStore::new(),
    };
    let email = "jane.doe@example.com".to_owned();
    svc.signup(email.clone(), 0).await.unwrap_err(); // released after error
    svc.signup(email.clone(), 1).await.unwrap(); // claimed, completed
    svc.signup(email.clone(), 1).await.unwrap(); // replayed
    svc.signup(email.clone(), 2).await.unwrap_err(); // key reused

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let digest = idem_runtime::Key::derive("signup", &email)
        .unwrap()
        .digest()
        .to_hex();
    for event in [
        "claimed",
        "completed",
        "released after error",
        "replayed",
        "key reused",
    ] {
        assert!(logs.contains(event), "no {event:?} event in:\n{logs}");
    }
    assert!(logs.contains("namespace=\"signup\""), "{logs}");
    assert!(
        logs.contains(&digest),
        "the digest identifies the call: {logs}"
    );
    assert!(
        !logs.contains("jane.doe"),
        "raw key material leaked into logs:\n{logs}"
    );
}
