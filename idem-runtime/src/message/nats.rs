//! NATS JetStream pull consumers, effectively once (feature `nats`).
//!
//! ```no_run
//! use idem_runtime::message::{nats::JetStream, Deduplicator};
//! use idem_runtime::MemoryStore;
//!
//! # async fn demo() -> Result<(), async_nats::Error> {
//! let client = async_nats::connect("127.0.0.1:4222").await?;
//! let js = async_nats::jetstream::new(client);
//! let consumer: async_nats::jetstream::consumer::PullConsumer =
//!     js.get_stream("PAYMENTS").await?.get_consumer("recorder").await?;
//!
//! let consumer_side = JetStream::new(Deduplicator::new(MemoryStore::new(), "recorder"));
//! consumer_side
//!     .run(&consumer, async |message: &async_nats::jetstream::Message| {
//!         println!("paying {:?}", message.payload);
//!         Ok::<_, std::io::Error>(())
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Each message is keyed by its `Nats-Msg-Id` header (the publisher's id, which
//! JetStream also uses to drop duplicate publishes within its window), or by
//! `stream:sequence` when it has none; then:
//!
//! | outcome | ack |
//! |---|---|
//! | processed | `+ACK` |
//! | duplicate | `+ACK`, the handler does not run |
//! | in progress elsewhere | `-NAK` with the other claim's remaining lease as delay |
//! | handler error | `-NAK` with exponential backoff by delivery count (the key is released) |
//! | store error | `-NAK` with backoff (the handler did not run) |
//!
//! While a handler runs, `+WPI` (work in progress) is sent every
//! [`progress_every`](JetStream::progress_every), so a long handler is not
//! redelivered to another consumer when the consumer's `ack_wait` passes.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use futures_util::StreamExt as _;

use super::{backoff, Deduplicator, Outcome, ProcessError};

/// The id a message is deduplicated by: its `Nats-Msg-Id` header, or
/// `stream:sequence` (unique within the stream) when it has none.
pub fn message_id(message: &Message) -> Option<String> {
    let header = message
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|v| v.as_str())
        .filter(|v| !v.is_empty());
    match header {
        Some(id) => Some(id.to_owned()),
        None => message
            .info()
            .ok()
            .map(|info| format!("{}:{}", info.stream, info.stream_sequence)),
    }
}

/// Consumes JetStream messages through a [`Deduplicator`], acknowledging each
/// delivery by what became of it (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct JetStream {
    dedup: Deduplicator,
    progress_every: Option<Duration>,
    backoff_base: Duration,
    backoff_max: Duration,
    concurrency: usize,
}

impl JetStream {
    /// Handles messages with `dedup`; progress every 10 s, naks backed off from
    /// 100 ms to 30 s.
    pub fn new(dedup: Deduplicator) -> Self {
        JetStream {
            dedup,
            progress_every: Some(Duration::from_secs(10)),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            concurrency: 1,
        }
    }

    /// How often `+WPI` is sent while a handler runs (default 10 s; keep it
    /// under the consumer's `ack_wait`). `None` sends none.
    pub fn progress_every(mut self, every: Option<Duration>) -> Self {
        self.progress_every = every;
        self
    }

    /// The redelivery delay after a failure: `base × 2^(delivery − 1)`, at most `max`.
    pub fn nak_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max;
        self
    }

    /// How many messages [`run`](Self::run) handles at once (default 1: in
    /// order). Each is acked on its own, so more than one finishes out of order;
    /// keep the consumer's `max_ack_pending` above it.
    pub fn concurrency(mut self, messages: usize) -> Self {
        self.concurrency = messages.max(1);
        self
    }

    /// The deduplicator.
    pub fn deduplicator(&self) -> &Deduplicator {
        &self.dedup
    }

    /// Pulls messages from `consumer` and [`handle`](Self::handle)s each
    /// ([`concurrency`](Self::concurrency) at a time), until the subscription
    /// fails. Handler errors do not stop it (they are nak'ed).
    pub async fn run<T, E, F>(
        &self,
        consumer: &PullConsumer,
        handler: F,
    ) -> Result<(), async_nats::Error>
    where
        F: AsyncFn(&Message) -> Result<T, E>,
        E: std::fmt::Display,
    {
        let messages = consumer.messages().await?;
        let handler = &handler;
        let mut handled = std::pin::pin!(messages
            .map(|message| async move {
                let message = message?;
                let _ = self.handle(&message, || handler(&message)).await;
                Ok::<_, async_nats::Error>(())
            })
            .buffer_unordered(self.concurrency));
        while let Some(result) = handled.next().await {
            result?;
        }
        Ok(())
    }

    /// Handles one delivery: runs `handler` through the deduplicator, then
    /// acks or naks it. Returns what happened (already acknowledged).
    pub async fn handle<T, E, F, Fut>(
        &self,
        message: &Message,
        handler: F,
    ) -> Result<Outcome<T>, ProcessError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        self.handle_with(message, async |id: &str| {
            self.dedup.process(id, handler).await
        })
        .await
    }

    /// Like [`handle`](Self::handle), but `process` drives the deduplicator
    /// itself, given the message id: for
    /// [`process_in_tx`](Deduplicator::process_in_tx), where the caller opens
    /// and commits the transaction.
    pub async fn handle_with<T, E>(
        &self,
        message: &Message,
        process: impl AsyncFnOnce(&str) -> Result<Outcome<T>, ProcessError<E>>,
    ) -> Result<Outcome<T>, ProcessError<E>>
    where
        E: std::fmt::Display,
    {
        let Some(id) = message_id(message) else {
            // Not a JetStream delivery (no reply subject to ack on): nothing to key.
            return Err(ProcessError::Idempotency(crate::Error::MissingKey));
        };
        let outcome = self.with_progress(message, process(&id)).await;
        let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
        let ack = match &outcome {
            Ok(Outcome::Processed(_)) | Ok(Outcome::Duplicate) => AckKind::Ack,
            Ok(Outcome::InProgress { retry_after }) => {
                AckKind::Nak(Some((*retry_after).max(self.backoff_base)))
            }
            Err(err) => {
                tracing::warn!(digest = %self.dedup.log_digest(&id), delivered, error = %err, "message not processed; redelivering");
                AckKind::Nak(Some(backoff(
                    delivered,
                    self.backoff_base,
                    self.backoff_max,
                )))
            }
        };
        if let Err(err) = message.ack_with(ack).await {
            // The delivery is redelivered after `ack_wait`; a processed message
            // then meets its record and is acked as a duplicate.
            tracing::warn!(digest = %self.dedup.log_digest(&id), error = %err, "could not acknowledge the message");
        }
        outcome
    }

    /// Runs `work`, sending `+WPI` every `progress_every` until it finishes.
    async fn with_progress<F: std::future::Future>(&self, message: &Message, work: F) -> F::Output {
        let Some(every) = self.progress_every else {
            return work.await;
        };
        let mut work = std::pin::pin!(work);
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = ticks.tick() => {
                    if let Err(err) = message.ack_with(AckKind::Progress).await {
                        tracing::debug!(error = %err, "could not send +WPI");
                    }
                }
            }
        }
    }
}
