//! `idem-chaos client`: one client process of the workload. It runs its
//! operations a few at a time; each is sent to a service chosen at random and
//! retried, with backoff, on every failure (no answer, an error status), on
//! any service, until it gets a 2xx answer or the deadline passes. Every
//! request is appended to the client's history file as it ends.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::history::{self, now_us, Phase, Request};
use crate::rng::Rng;

/// Settings of one client process.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This client's number.
    pub id: u32,
    /// The services' base URLs (`http://127.0.0.1:PORT`).
    pub services: Vec<String>,
    /// The operations to run (their ids).
    pub ops: Vec<String>,
    /// How many run at once.
    pub concurrency: usize,
    /// Where the history goes.
    pub out: PathBuf,
    /// Seed of this client's choices.
    pub seed: u64,
    /// No new attempt starts after this time (µs since the epoch).
    pub deadline_us: u64,
    /// How long one request may take before it counts as failed.
    pub timeout: Duration,
    /// `work`, or `verify` for the replay after the faults healed.
    pub phase: Phase,
    /// Operations start spread evenly over this time (from the client's start),
    /// so the workload spans the nemesis's schedule.
    pub spread: std::time::Duration,
}

/// An HTTP client that opens a fresh connection per request: a connection
/// kept alive to a service that was killed would only add failures no real
/// client would see twice.
pub fn http(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(1))
        .pool_max_idle_per_host(0)
        .build()
        .expect("an HTTP client")
}

/// Sends one request; status 0 and no body when no answer came.
pub async fn send(http: &reqwest::Client, url: &str) -> (u16, Option<String>) {
    match http.post(url).send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match resp.text().await {
                Ok(body) if (200..300).contains(&status) => (status, Some(body)),
                Ok(_) => (status, None),
                // The head came but the body did not: no answer.
                Err(_) => (0, None),
            }
        }
        Err(_) => (0, None),
    }
}

/// Runs every operation to a 2xx answer (or the deadline).
pub async fn run(settings: Settings) -> std::io::Result<()> {
    let file = Arc::new(Mutex::new(history::open_append(&settings.out)?));
    let http = http(settings.timeout);
    let limit = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let settings = Arc::new(settings);
    let mut tasks = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now();
    let n = settings.ops.len().max(1) as u32;
    for (i, op) in settings.ops.iter().enumerate() {
        tokio::time::sleep_until(start + settings.spread * i as u32 / n).await;
        let permit = limit.clone().acquire_owned().await.expect("never closed");
        let (settings, http, file, op) = (settings.clone(), http.clone(), file.clone(), op.clone());
        let mut rng = Rng::new(settings.seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
        tasks.spawn(async move {
            let _permit = permit;
            let mut attempt = 0u32;
            while now_us() < settings.deadline_us {
                attempt += 1;
                let service = rng.below(settings.services.len());
                let url = format!("{}/op/{op}", settings.services[service]);
                let start_us = now_us();
                let (status, body) = send(&http, &url).await;
                let done = (200..300).contains(&status);
                let event = Request {
                    op: op.clone(),
                    attempt,
                    client: settings.id,
                    service,
                    start_us,
                    end_us: now_us(),
                    status,
                    body,
                    phase: settings.phase,
                };
                history::append(&mut file.lock().unwrap(), &event)
                    .expect("the history file is writable");
                if done {
                    return;
                }
                // Exponential backoff with full jitter, 20 ms to 1 s.
                let cap = (20u64 << attempt.min(6)).min(1000);
                tokio::time::sleep(Duration::from_millis(rng.range(cap / 2, cap))).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}
