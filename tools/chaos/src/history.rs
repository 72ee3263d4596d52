//! What a run records: every request a client sent and what came back, every
//! fault the nemesis injected, every execution of a body. All times are
//! microseconds since the Unix epoch, read from the one machine's clock by
//! every process of the run, so the controller can line them up.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One request of one logical operation, and its answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// The logical operation's id (the idempotency key).
    pub op: String,
    /// 1 for the first try, then one more per retry.
    pub attempt: u32,
    /// Which client process sent it.
    pub client: u32,
    /// Which service process it went to.
    pub service: usize,
    /// When it was sent.
    pub start_us: u64,
    /// When the answer (or the failure) came.
    pub end_us: u64,
    /// The HTTP status, or 0 when no answer came (refused, reset, timed out).
    pub status: u16,
    /// The body of a 2xx answer, byte for byte.
    pub body: Option<String>,
    /// `work` while the nemesis runs, `verify` for the check after it healed.
    pub phase: Phase,
}

/// When a request was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The workload, under faults.
    Work,
    /// The replay of every operation once faults healed.
    Verify,
}

/// A fault the nemesis held for a while.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fault {
    /// What it was (`kill service 1`, `pause service 0`, `blackhole`, …).
    pub what: String,
    /// When it began.
    pub start_us: u64,
    /// When it was healed.
    pub end_us: u64,
}

/// One execution of the body (the line a service appends before its effect).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Execution {
    /// The operation.
    pub op: String,
    /// The claim's fencing token.
    pub token: u64,
    /// This execution's id (`pid-n`), also in the answer it produces.
    pub exec: String,
    /// When the body reached its effect, by the service's clock (under `skew`
    /// the file is off by the service's offset; the controller corrects it
    /// before checking).
    pub at_us: u64,
}

/// Appends `value` as one JSON line.
pub fn append<T: Serialize>(file: &mut File, value: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    // One write of one line to a file opened for appending: lines of
    // concurrent writers never interleave, and a SIGKILL loses none that
    // returned.
    file.write_all(&line)
}

/// Reads every JSON line of `path` (none if it does not exist). A last line
/// cut short by a kill is skipped.
pub fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Vec<T>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        if let Ok(v) = serde_json::from_str(&line) {
            out.push(v);
        }
    }
    Ok(out)
}

/// Opens `path` for appending, creating it.
pub fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}
