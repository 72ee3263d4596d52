//! Every outcome of the attribute is traced with the namespace and digest,
//! never the raw key.

use idem_runtime::{idempotent, MemoryStore};
use idem_tests::logs::Captured;

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
    let captured = Captured::global();

    let svc = Svc {
        store: MemoryStore::new(),
    };
    let email = "jane.doe@example.com".to_owned();
    svc.signup(email.clone(), 0).await.unwrap_err(); // released after error
    svc.signup(email.clone(), 1).await.unwrap(); // claimed, completed
    svc.signup(email.clone(), 1).await.unwrap(); // replayed
    svc.signup(email.clone(), 2).await.unwrap_err(); // key reused

    // This test's own lines: other tests log into the same capture.
    let all = captured.text();
    let logs: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("namespace=\"signup\""))
        .collect();
    let logs = logs.join("\n");
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
    assert!(
        logs.contains(&digest),
        "the digest identifies the call: {logs}"
    );
    assert!(
        !all.contains("jane.doe"),
        "raw key material leaked into logs:\n{all}"
    );
}
