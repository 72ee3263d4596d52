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
//! JetStream also uses to drop duplicate publishes within its window), or, when
//! it has none, by its place in the stream: the stream sequence and the time
//! the stream stored the message (a stream deleted and recreated under the same
//! name starts its sequences again, and its messages are new) — see
//! [`message_id`] and [`MessageId`]; then:
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

use std::sync::Mutex;

use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{AckKind, Message};
use futures_util::StreamExt as _;

use super::{backoff, Deduplicator, MessageId, Outcome, ProcessError};

/// The message's `Nats-Msg-Id` header (the publisher's id), if it has a
/// non-empty one.
pub fn given_id(message: &Message) -> Option<&str> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|v| v.as_str())
        .filter(|v| !v.is_empty())
}

/// The id a message is deduplicated by: its `Nats-Msg-Id` header, or its
/// place in the stream — the stream, the sequence, and the time the stream
/// stored it (nanoseconds). A stream deleted and recreated under its name
/// starts its sequences again, but each new message is stored at its own time,
/// so it is never taken for the old one at that sequence; the stamp travels
/// with every delivery (it is in the ack subject), so it needs no lookup and
/// is right for a late delivery of a deleted stream, and for a mirror, whose
/// messages keep their origin's times. `None` for a message that is not a
/// JetStream delivery.
pub fn message_id(message: &Message) -> Option<MessageId> {
    if let Some(id) = given_id(message) {
        return Some(MessageId::Given(id.to_owned()));
    }
    let info = message.info().ok()?;
    Some(MessageId::position(
        info.stream,
        info.stream_sequence.to_string(),
        info.published.unix_timestamp_nanos().to_string(),
    ))
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
    /// ([`concurrency`](Self::concurrency) at a time), until the consumer is
    /// deleted or the client closes. Handler errors do not stop it (they are
    /// nak'ed), nor do the stream's transient errors — a missed heartbeat, a
    /// failed pull while the server restarts — which are logged while the
    /// client reconnects and pulling resumes. Messages being handled when it
    /// ends are finished and acknowledged first.
    pub async fn run<T, E, F>(
        &self,
        consumer: &PullConsumer,
        handler: F,
    ) -> Result<(), async_nats::Error>
    where
        F: AsyncFn(&Message) -> Result<T, E>,
        E: std::fmt::Display,
    {
        self.run_stream(consumer, consumer.messages().await?, handler)
            .await
    }

    /// Like [`run`](Self::run), on a message stream of `consumer` the caller
    /// opened, for its own batch size, expiry or heartbeat:
    /// `consumer.stream().max_messages_per_batch(50).heartbeat(..).messages().await?`.
    ///
    /// After each transient error the consumer is looked up, so one that is gone
    /// — deleted while the client was disconnected, reaped by its
    /// `inactive_threshold`, lost with the server's store — ends the run with
    /// an error instead of pulling from nothing forever.
    pub async fn run_stream<T, E, F>(
        &self,
        consumer: &PullConsumer,
        messages: pull::Stream,
        handler: F,
    ) -> Result<(), async_nats::Error>
    where
        F: AsyncFn(&Message) -> Result<T, E>,
        E: std::fmt::Display,
    {
        use futures_util::future::ready;

        let handler = &handler;
        let ended: Mutex<Option<async_nats::Error>> = Mutex::new(None);
        let end = |err: async_nats::Error| {
            if let Ok(mut ended) = ended.lock() {
                *ended = Some(err);
            }
        };
        let end = &end;
        messages
            // `Some(Some(m))`: a message; `Some(None)`: an error survived; `None`: the end.
            .then(|next| async move {
                let err = match next {
                    Ok(message) => return Some(Some(message)),
                    Err(err) => err,
                };
                if matches!(
                    err.kind(),
                    MessagesErrorKind::ConsumerDeleted | MessagesErrorKind::PushBasedConsumer
                ) {
                    tracing::warn!(error = %err, "the consumer is gone; stopping once in-flight messages are done");
                    end(err.into());
                    return None;
                }
                match consumer.get_info().await {
                    Err(gone)
                        if matches!(
                            gone.kind(),
                            ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
                        ) =>
                    {
                        tracing::warn!(error = %err, "the consumer no longer exists; stopping once in-flight messages are done");
                        end(gone.into());
                        None
                    }
                    _ => {
                        tracing::warn!(error = %err, "message stream error; still pulling");
                        Some(None)
                    }
                }
            })
            .take_while(|next| ready(next.is_some()))
            .filter_map(|next| ready(next.flatten()))
            .map(|message| async move {
                let _ = self.handle(&message, || handler(&message)).await;
            })
            .buffer_unordered(self.concurrency)
            .for_each(|()| async {})
            .await;
        match ended.into_inner() {
            Ok(Some(err)) => Err(err),
            _ => Ok(()),
        }
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
        self.handle_with(message, async |id: &MessageId| {
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
        process: impl AsyncFnOnce(&MessageId) -> Result<Outcome<T>, ProcessError<E>>,
    ) -> Result<Outcome<T>, ProcessError<E>>
    where
        E: std::fmt::Display,
    {
        let Some(id) = message_id(message) else {
            // Not a JetStream delivery (no reply subject to ack on): nothing to key.
            return Err(ProcessError::Idempotency(crate::Error::MissingKey));
        };
        let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
        let outcome = self.with_progress(message, process(&id)).await;
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
