//! What a test reads back from the log: a global `tracing` subscriber (one
//! per test binary — tracing caches per-callsite interest, which a scoped
//! subscriber shares unreliably with tests on other threads) writing here.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Everything logged at `DEBUG` and above since [`Captured::install`].
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
    /// Installs the global subscriber; call it once, first, in a test binary
    /// of its own.
    pub fn install() -> Captured {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("one global subscriber per test binary");
        captured
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
