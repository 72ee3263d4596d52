//! What a test reads back from the log: a global `tracing` subscriber (tracing
//! caches per-callsite interest, which a scoped subscriber shares unreliably
//! with tests on other threads) writing here. The tests that read logs share
//! one test binary (`tests/logs`), and with it this one capture: each reads
//! the lines of its own namespace, key or message.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

/// Everything logged at `DEBUG` and above since [`Captured::global`] was
/// first called in this process.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// The process's capture, installed as the global subscriber by the
    /// first call. Panics if another global subscriber is installed.
    pub fn global() -> Captured {
        static GLOBAL: OnceLock<Captured> = OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                let captured = Captured::default();
                let writer = captured.clone();
                let subscriber = tracing_subscriber::fmt()
                    .with_max_level(tracing::Level::DEBUG)
                    .with_ansi(false)
                    .with_writer(move || writer.clone())
                    .finish();
                tracing::subscriber::set_global_default(subscriber)
                    .expect("no other global subscriber in this test binary");
                captured
            })
            .clone()
    }

    /// The whole log so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().map(|b| b.clone()).unwrap_or_default()).into_owned()
    }

    /// The lines idem itself logged.
    pub fn idem_lines(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains("idem_runtime"))
            .map(str::to_owned)
            .collect()
    }
}
