//! A four-step checkout shared by the tests and the worker process, for the
//! kills between steps: each step's effect is a line appended to a file (what
//! a downstream system would see), and its value names the process that ran
//! it, so a resumed call shows which steps it replayed.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use idem_runtime::{idempotent, step, Store};

/// The steps, in order.
pub const STEPS: [&str; 4] = ["reserve", "charge", "ship", "mail"];

/// The flow's error: idem's, or a step's I/O.
#[derive(Debug)]
pub enum FlowError {
    /// idem's own error.
    Idem(idem_runtime::Error),
    /// The effects file could not be written.
    Io(String),
}

impl From<idem_runtime::Error> for FlowError {
    fn from(e: idem_runtime::Error) -> Self {
        FlowError::Idem(e)
    }
}

/// The checkout, on any store.
pub struct Flow {
    /// Where records and steps live.
    pub store: Arc<dyn Store>,
    /// One line per effect: `<step> <key>`.
    pub effects: PathBuf,
    /// After this step returns, say `ready` on stdout and hang (to be killed).
    pub stop_after: Option<usize>,
}

impl Flow {
    /// Runs the four steps; the outcome lists each step's value.
    #[idempotent(key = key, name = "kill-steps", lease = "1s", ttl = "1h", in_progress = wait("60s"), store = self.store)]
    pub async fn run(&self, key: String) -> Result<String, FlowError> {
        let mut done = Vec::new();
        for (i, name) in STEPS.into_iter().enumerate() {
            let value = step(name, async {
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.effects)
                    .map_err(|e| FlowError::Io(e.to_string()))?;
                file.write_all(format!("{name} {key}\n").as_bytes())
                    .map_err(|e| FlowError::Io(e.to_string()))?;
                Ok::<_, FlowError>(format!("{name}@{}", std::process::id()))
            })
            .await?;
            done.push(value);
            if self.stop_after == Some(i) {
                println!("ready");
                std::io::stdout().flush().ok();
                std::future::pending::<()>().await;
            }
        }
        Ok(done.join("/"))
    }
}
