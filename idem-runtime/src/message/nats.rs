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
//! it has none, by its stream sequence in the stream's current incarnation (the
//! stream's creation time: a stream deleted and recreated under the same name
//! starts its sequences again, and they are new messages) — see
//! [`MessageId`]; then:
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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use futures_util::StreamExt as _;
use time::OffsetDateTime;

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
/// stream sequence in the incarnation of the stream created at
/// `stream_created` (the stream's `created` time, as
/// [`JetStream::message_id`] looks it up). `None` for a message that is not a
/// JetStream delivery.
pub fn message_id(message: &Message, stream_created: OffsetDateTime) -> Option<MessageId> {
    if let Some(id) = given_id(message) {
        return Some(MessageId::Given(id.to_owned()));
    }
    let info = message.info().ok()?;
    Some(MessageId::position(
        info.stream,
        stream_created.unix_timestamp_nanos().to_string(),
        info.stream_sequence.to_string(),
    ))
}

/// What [`JetStream`] last learned of a stream: when it was created, and the
/// publish time of the newest message it held then.
#[derive(Debug, Clone, Copy)]
struct Seen {
    created: OffsetDateTime,
    newest: OffsetDateTime,
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
    streams: Arc<Mutex<HashMap<String, Seen>>>,
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
            streams: Arc::default(),
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

    /// The id `message` is deduplicated by (see [`message_id`]): its
    /// `Nats-Msg-Id`, else its stream sequence qualified by the stream's
    /// creation time, so a stream deleted and recreated under the same name is a
    /// new stream. The creation time is looked up from the server and kept; it
    /// is looked up again for a message published after the newest one the
    /// stream held at the last look, so a stream recreated since is seen (one
    /// lookup serves a whole backlog). An error here is a failed lookup.
    pub async fn message_id(&self, message: &Message) -> Result<MessageId, crate::Error> {
        if let Some(id) = given_id(message) {
            return Ok(MessageId::Given(id.to_owned()));
        }
        let info = message.info().map_err(|_| crate::Error::MissingKey)?;
        let (stream, published) = (info.stream.to_owned(), info.published);
        let known = self
            .streams
            .lock()
            .ok()
            .and_then(|s| s.get(&stream).copied());
        let created = match known {
            // Published no later than a message the stream held when it was
            // looked up: it is in that incarnation (a newer one would only hold
            // messages published after the lookup).
            Some(seen) if published <= seen.newest => seen.created,
            _ => {
                let handle = message.context.get_stream(&stream).await.map_err(|e| {
                    crate::Error::store(format!("could not look the stream up: {e}"))
                })?;
                let found = handle.cached_info();
                let seen = Seen {
                    created: found.created,
                    newest: found.state.last_timestamp,
                };
                if let Ok(mut streams) = self.streams.lock() {
                    streams.insert(stream.clone(), seen);
                }
                seen.created
            }
        };
        message_id(message, created).ok_or(crate::Error::MissingKey)
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
        self.run_stream(consumer.messages().await?, handler).await
    }

    /// Like [`run`](Self::run), on a message stream the caller opened, for its
    /// own batch size, expiry or heartbeat:
    /// `consumer.stream().max_messages_per_batch(50).heartbeat(..).messages().await?`.
    pub async fn run_stream<T, E, F>(
        &self,
        messages: pull::Stream,
        handler: F,
    ) -> Result<(), async_nats::Error>
    where
        F: AsyncFn(&Message) -> Result<T, E>,
        E: std::fmt::Display,
    {
        let handler = &handler;
        let ended: Mutex<Option<async_nats::Error>> = Mutex::new(None);
        let ended_ref = &ended;
        messages
            .filter_map(|next| async move {
                match next {
                    Ok(message) => Some(message),
                    Err(err) => {
                        match err.kind() {
                            // The stream ends after these.
                            MessagesErrorKind::ConsumerDeleted
                            | MessagesErrorKind::PushBasedConsumer => {
                                tracing::warn!(error = %err, "the consumer is gone; stopping once in-flight messages are done");
                                if let Ok(mut ended) = ended_ref.lock() {
                                    *ended = Some(err.into());
                                }
                            }
                            _ => tracing::warn!(error = %err, "message stream error; still pulling"),
                        }
                        None
                    }
                }
            })
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
        let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
        let id = match self.message_id(message).await {
            Ok(id) => id,
            // Not a JetStream delivery (no reply subject to ack on): nothing to key.
            Err(err @ crate::Error::MissingKey) => return Err(ProcessError::Idempotency(err)),
            Err(err) => {
                tracing::warn!(delivered, error = %err, "message id unknown; redelivering");
                let delay = backoff(delivered, self.backoff_base, self.backoff_max);
                if let Err(err) = message.ack_with(AckKind::Nak(Some(delay))).await {
                    tracing::warn!(error = %err, "could not nak the message");
                }
                return Err(ProcessError::Idempotency(err));
            }
        };
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
