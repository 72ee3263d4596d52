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

/// The chance that an attempt is sent to two services at once.
const HEDGED: f64 = 0.2;

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
    /// What an operation is.
    pub workload: Workload,
}

/// What one logical operation sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// `POST /op/{id}` to `idem-chaos serve`.
    Direct,
    /// An order through `order-service` (`POST /orders`, `Idempotency-Key: {id}`),
    /// then its payment (`POST /payments`, `Idempotency-Key: {id}-pay`), each
    /// a logical operation of its own in the history.
    Orders,
}

impl Workload {
    /// The logical operations (history ids) of operation `op`.
    pub fn ops(self, op: &str) -> Vec<String> {
        match self {
            Workload::Direct => vec![op.to_owned()],
            Workload::Orders => vec![op.to_owned(), format!("{op}-pay")],
        }
    }
}

/// One request of a logical operation: where, with which key and body.
struct Call {
    path: &'static str,
    key: String,
    body: Option<String>,
}

/// Call number `step` of operation `op`, built from the answer to the one
/// before (the payment names the order's id and total); `None` after the last.
fn call(
    workload: Workload,
    op: &str,
    step: usize,
    previous: Option<&str>,
    product: usize,
) -> Option<Call> {
    match (workload, step, previous) {
        (Workload::Direct, 0, _) => Some(Call {
            path: "op",
            key: op.to_owned(),
            body: None,
        }),
        (Workload::Orders, 0, _) => Some(Call {
            path: "orders",
            key: op.to_owned(),
            body: Some(
                serde_json::json!({
                    "user_id": op,
                    "product_id": format!("SKU-{:04}", product % 10 + 1),
                    "quantity": 1,
                })
                .to_string(),
            ),
        }),
        (Workload::Orders, 1, Some(order)) => {
            let order: serde_json::Value = serde_json::from_str(order).ok()?;
            Some(Call {
                path: "payments",
                key: format!("{op}-pay"),
                body: Some(
                    serde_json::json!({
                        "order_id": order.get("id")?,
                        "amount_cents": order.get("total_cents")?,
                        "card": "4242424242424242",
                    })
                    .to_string(),
                ),
            })
        }
        _ => None,
    }
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
async fn send(http: &reqwest::Client, base: &str, call: &Call) -> (u16, Option<String>) {
    let request = match &call.body {
        None => http.post(format!("{base}/{}/{}", call.path, call.key)),
        Some(body) => http
            .post(format!("{base}/{}", call.path))
            .header("idempotency-key", &call.key)
            .header("authorization", "Bearer chaos")
            .header("content-type", "application/json")
            .body(body.clone()),
    };
    match request.send().await {
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
            let mut previous: Option<String> = None;
            let mut step = 0;
            while let Some(call) = call(settings.workload, &op, step, previous.as_deref(), i) {
                step += 1;
                let mut attempt = 0u32;
                previous = loop {
                    if now_us() >= settings.deadline_us {
                        return;
                    }
                    attempt += 1;
                    let service = rng.below(settings.services.len());
                    // Now and then the same request goes to two services at
                    // once (a hedged request, or a retry sent before the first
                    // answer came): duplicates that meet a live claim.
                    let hedge = settings.phase == Phase::Work
                        && settings.services.len() > 1
                        && rng.chance(HEDGED);
                    let other = (service + 1 + rng.below(settings.services.len() - 1))
                        % settings.services.len();
                    let one = |service: usize| {
                        let (http, settings, call) = (&http, &settings, &call);
                        async move {
                            let start_us = now_us();
                            let (status, body) =
                                send(http, &settings.services[service], call).await;
                            Request {
                                op: call.key.clone(),
                                attempt,
                                client: settings.id,
                                service,
                                start_us,
                                end_us: now_us(),
                                status,
                                body,
                                phase: settings.phase,
                            }
                        }
                    };
                    let events = if hedge {
                        let (a, b) = tokio::join!(one(service), one(other));
                        vec![a, b]
                    } else {
                        vec![one(service).await]
                    };
                    let mut answer = None;
                    for event in events {
                        history::append(&mut file.lock().unwrap(), &event)
                            .expect("the history file is writable");
                        answer = answer.or(event.body);
                    }
                    if answer.is_some() {
                        break answer;
                    }
                    // Exponential backoff with full jitter, 20 ms to 1 s.
                    let cap = (20u64 << attempt.min(6)).min(1000);
                    tokio::time::sleep(Duration::from_millis(rng.range(cap / 2, cap))).await;
                };
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}
