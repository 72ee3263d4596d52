//! A JetStream consumer that records payments into the order service's
//! database, effectively once: each payment event's row and its idempotency
//! record are written in one SQLite transaction, so a redelivered or
//! republished event is acknowledged without being recorded twice, and a
//! consumer that dies mid-event leaves nothing half-done.
//!
//! `cargo run -p consumer` runs [`demo`]: it publishes a batch of payment events
//! to the local NATS server (some of them twice, on purpose, and one whose first
//! delivery fails), consumes them, and prints what it processed and what it
//! skipped. `-- --broker kafka://127.0.0.1:9092` runs the same on Kafka
//! ([`kafka::demo`]).

use std::fmt;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::{self, stream, Message};
use futures_util::StreamExt as _;
use idem_runtime::message::nats::{given_id, JetStream};
use idem_runtime::message::{Deduplicator, MessageId, Outcome, ProcessError};
use idem_runtime::{Error, SqliteStore};
use order_service::Db;
use serde::{Deserialize, Serialize};

pub mod kafka;

/// The stream the payment events are published to.
pub const STREAM: &str = "PAYMENTS";
/// Its subject.
pub const SUBJECT: &str = "payments.recorded";
/// The durable consumer (and the deduplicator's namespace).
pub const CONSUMER: &str = "payment-recorder";

/// A payment event, as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentEvent {
    /// The payment's id (also its `Nats-Msg-Id`).
    pub payment_id: String,
    /// The order paid for.
    pub order_id: i64,
    /// The amount, in cents.
    pub amount_cents: i64,
}

/// Why the consumer stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// NATS failed.
    #[error("nats: {0}")]
    Nats(#[from] async_nats::Error),
    /// The database failed.
    #[error(transparent)]
    Order(#[from] order_service::OrderError),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Only SQLite databases are supported by this example.
    #[error("the consumer example records into SQLite (`sqlite://…`); got {0}")]
    NotSqlite(String),
    /// Kafka failed.
    #[error("kafka: {0}")]
    Kafka(String),
    /// The events did not all arrive in time.
    #[error("timed out waiting for {0} events")]
    Timeout(usize),
}

fn nats<E: Into<async_nats::Error>>(e: E) -> ConsumerError {
    ConsumerError::Nats(e.into())
}

/// Records payment events into `recorded_payments`, through a deduplicator.
pub struct Recorder {
    store: SqliteStore,
    consumer: JetStream,
    /// Set while the next delivery of `fail_once` should fail (a simulated
    /// outage), so the demo shows a redelivery.
    fail_once: Option<(String, AtomicBool)>,
}

impl Recorder {
    /// A recorder on the order service's database at `url` (creating
    /// `recorded_payments` if needed).
    pub async fn open(url: &str) -> Result<Self, ConsumerError> {
        let store = match Db::open(url).await? {
            Db::Sqlite(store) => store,
            Db::Postgres(_) => return Err(ConsumerError::NotSqlite(url.to_owned())),
        };
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS recorded_payments (
                payment_id TEXT NOT NULL, order_id INTEGER NOT NULL, amount_cents INTEGER NOT NULL)",
        )
        .execute(store.pool())
        .await?;
        let dedup = Deduplicator::new(store.clone(), CONSUMER);
        let consumer =
            JetStream::new(dedup).nak_backoff(Duration::from_millis(50), Duration::from_secs(5));
        Ok(Recorder {
            store,
            consumer,
            fail_once: None,
        })
    }

    /// Makes the first delivery of `payment_id` fail (for the demo).
    pub fn fail_first_delivery_of(mut self, payment_id: &str) -> Self {
        self.fail_once = Some((payment_id.to_owned(), AtomicBool::new(true)));
        self
    }

    /// How many rows `payment_id` has in `recorded_payments`.
    pub async fn recorded(&self, payment_id: &str) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT count(*) FROM recorded_payments WHERE payment_id = ?1")
            .bind(payment_id)
            .fetch_one(self.store.pool())
            .await
    }

    /// Handles one JetStream delivery: records it (see [`record`](Self::record)),
    /// then acks or naks it.
    pub async fn handle(&self, message: &Message) -> Result<Outcome<()>, ProcessError<String>> {
        self.consumer
            .handle_with(message, async |id: &MessageId| {
                self.record(id, &message.payload).await
            })
            .await
    }

    /// Records the payment event `payload` under the message id `id`, in one
    /// transaction with its idempotency record, or skips it as a duplicate;
    /// whatever the broker.
    pub async fn record(
        &self,
        id: &MessageId,
        payload: &[u8],
    ) -> Result<Outcome<()>, ProcessError<String>> {
        let db = |e: sqlx::Error| ProcessError::Idempotency(Error::store(e));
        let mut tx = self.store.pool().begin().await.map_err(db)?;
        let dedup = self.consumer.deduplicator();
        let claim = match dedup.begin_in_tx(&self.store, &mut tx, id).await {
            ControlFlow::Continue(claim) => claim,
            ControlFlow::Break(done) => return done,
        };
        let result = async {
            if let Some((failing, armed)) = &self.fail_once {
                if id.given() == Some(failing.as_str()) && armed.swap(false, Ordering::SeqCst) {
                    return Err("the ledger was briefly unavailable".to_owned());
                }
            }
            let event: PaymentEvent = serde_json::from_slice(payload)
                .map_err(|e| format!("not a payment event: {e}"))?;
            sqlx::query(
                "INSERT INTO recorded_payments (payment_id, order_id, amount_cents) VALUES (?1, ?2, ?3)",
            )
            .bind(&event.payment_id)
            .bind(event.order_id)
            .bind(event.amount_cents)
            .execute(&mut *tx)
            .await
            .map_err(|e| format!("could not record the payment: {e}"))?;
            Ok(())
        }
        .await;
        let out = dedup
            .finish_in_tx(&self.store, &mut tx, claim, result)
            .await;
        if let Ok(Outcome::Processed(())) = out {
            tx.commit().await.map_err(db)?;
        }
        out
    }

    /// The deduplicator (namespace [`CONSUMER`]), for other brokers' adapters.
    pub fn deduplicator(&self) -> &Deduplicator {
        self.consumer.deduplicator()
    }
}

/// The stream (created if missing, with a short duplicate window so the demo's
/// republished events reach the consumer) and the durable pull consumer.
pub async fn setup(js: &jetstream::Context) -> Result<PullConsumer, ConsumerError> {
    let stream = js
        .get_or_create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec![SUBJECT.into()],
            duplicate_window: Duration::from_millis(100),
            ..Default::default()
        })
        .await
        .map_err(nats)?;
    stream
        .get_or_create_consumer(
            CONSUMER,
            pull::Config {
                durable_name: Some(CONSUMER.into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(5),
                ..Default::default()
            },
        )
        .await
        .map_err(nats)
}

/// Publishes `event` with its payment id as `Nats-Msg-Id`.
pub async fn publish(js: &jetstream::Context, event: &PaymentEvent) -> Result<(), ConsumerError> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", event.payment_id.as_str());
    let payload = serde_json::to_vec(event).map_err(nats)?;
    js.publish_with_headers(SUBJECT, headers, payload.into())
        .await
        .map_err(nats)?
        .await
        .map_err(nats)?;
    Ok(())
}

/// One delivery and what became of it.
#[derive(Debug, Clone)]
pub struct Line {
    /// The payment id.
    pub payment_id: String,
    /// Which delivery of this stream message (1 = first).
    pub delivery: i64,
    /// What the consumer did.
    pub outcome: String,
}

/// What the demo did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The deliveries, in order.
    pub lines: Vec<Line>,
    /// Payments recorded (each must be exactly once).
    pub recorded: Vec<(String, i64)>,
}

impl Report {
    /// Whether every payment was recorded exactly once.
    pub fn all_once(&self) -> bool {
        !self.recorded.is_empty() && self.recorded.iter().all(|(_, n)| *n == 1)
    }
}

/// This run's id and its 8 payment events.
pub fn events() -> (u128, Vec<PaymentEvent>) {
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let events = (1..=8)
        .map(|i| PaymentEvent {
            payment_id: format!("pay-{run}-{i}"),
            order_id: i,
            amount_cents: 1_999 * i,
        })
        .collect();
    (run, events)
}

/// Runs the demo on the broker `url`: `nats://HOST:PORT` (or a bare
/// `HOST:PORT`) or `kafka://HOST:PORT`.
pub async fn demo_on(url: &str, db_url: &str) -> Result<Report, ConsumerError> {
    match url.strip_prefix("kafka://") {
        Some(bootstrap) => kafka::demo(bootstrap, db_url).await,
        None => demo(url, db_url).await,
    }
}

/// Publishes 8 payment events of this run, publishes 3 of them again (after
/// JetStream's duplicate window, so they reach the consumer), makes the first
/// delivery of one fail, and consumes until all 11 messages are done.
pub async fn demo(nats_url: &str, db_url: &str) -> Result<Report, ConsumerError> {
    let js = jetstream::new(async_nats::connect(nats_url).await.map_err(nats)?);
    let consumer = setup(&js).await?;
    let (run, events) = events();
    let recorder = Recorder::open(db_url)
        .await?
        .fail_first_delivery_of(&events[4].payment_id);
    for event in &events {
        publish(&js, event).await?;
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // past the duplicate window
    for event in [&events[1], &events[3], &events[6]] {
        publish(&js, event).await?;
    }

    let mut report = Report::default();
    let mut done = 0;
    let expected = 11;
    let mut messages = consumer.messages().await.map_err(nats)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while done < expected {
        let next = tokio::time::timeout_at(deadline, messages.next()).await;
        let message = match next {
            Ok(Some(message)) => message.map_err(nats)?,
            _ => return Err(ConsumerError::Timeout(expected - done)),
        };
        let id = given_id(&message).unwrap_or_default();
        if !id.starts_with(&format!("pay-{run}-")) {
            // An earlier run's leftover: handle it like any other, off the report.
            let _ = recorder.handle(&message).await;
            continue;
        }
        let delivery = message.info().map(|i| i.delivered).unwrap_or(1);
        let outcome = match recorder.handle(&message).await {
            Ok(Outcome::Processed(())) => {
                done += 1;
                "processed: recorded, acked".to_owned()
            }
            Ok(Outcome::Duplicate) => {
                done += 1;
                "skipped: already recorded, acked".to_owned()
            }
            Ok(Outcome::InProgress { .. }) => "in progress elsewhere: nak'ed".to_owned(),
            Ok(_) => "unknown".to_owned(),
            Err(e) => format!("failed ({e}): nak'ed, redelivered"),
        };
        report.lines.push(Line {
            payment_id: id.to_owned(),
            delivery,
            outcome,
        });
    }
    for event in &events {
        let n = recorder.recorded(&event.payment_id).await?;
        report.recorded.push((event.payment_id.clone(), n));
    }
    Ok(report)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id_w = self
            .lines
            .iter()
            .map(|l| l.payment_id.len())
            .max()
            .unwrap_or(10);
        writeln!(f, "{:id_w$} | delivery | outcome", "payment")?;
        writeln!(f, "{}-+----------+--------", "-".repeat(id_w))?;
        for l in &self.lines {
            writeln!(
                f,
                "{:id_w$} | {:>8} | {}",
                l.payment_id, l.delivery, l.outcome
            )?;
        }
        let processed = self
            .lines
            .iter()
            .filter(|l| l.outcome.starts_with("processed"))
            .count();
        let skipped = self
            .lines
            .iter()
            .filter(|l| l.outcome.starts_with("skipped"))
            .count();
        writeln!(f)?;
        writeln!(
            f,
            "{} deliveries: {processed} processed, {skipped} skipped as duplicates, {} redelivered after a failure",
            self.lines.len(),
            self.lines.iter().filter(|l| l.outcome.starts_with("failed")).count()
        )?;
        writeln!(
            f,
            "recorded_payments: {} — {}",
            self.recorded
                .iter()
                .map(|(id, n)| format!("{}×{n}", id.rsplit('-').next().unwrap_or(id)))
                .collect::<Vec<_>>()
                .join(" "),
            if self.all_once() {
                "every payment recorded exactly once"
            } else {
                "SOMETHING WAS RECORDED TWICE OR NOT AT ALL"
            }
        )
    }
}
