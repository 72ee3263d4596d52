//! Effectively-once processing on at-least-once brokers (docs/CONTRACT.md §7).
//!
//! Brokers redeliver: after a crash, a slow ack, a rebalance. A [`Deduplicator`]
//! keys each message by its id (a business id, the JetStream `Nats-Msg-Id`, or
//! `topic:partition:offset` for Kafka), runs the handler once per id, and tells
//! the consumer what to do with the delivery:
//!
//! ```
//! use idem_runtime::message::{Deduplicator, Outcome};
//! use idem_runtime::MemoryStore;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let dedup = Deduplicator::new(MemoryStore::new(), "payments-consumer");
//! let first = dedup.process("msg-1", || async { Ok::<_, std::io::Error>("charged") }).await;
//! let again = dedup.process("msg-1", || async { Ok::<_, std::io::Error>("charged twice!") }).await;
//! assert!(matches!(first, Ok(Outcome::Processed("charged"))));
//! assert!(matches!(again, Ok(Outcome::Duplicate))); // acknowledge it, do not run it
//! # }
//! ```
//!
//! | outcome | what the consumer does |
//! |---|---|
//! | `Ok(Processed(v))` | acknowledge (commit the offset) |
//! | `Ok(Duplicate)` | acknowledge: it was processed before |
//! | `Ok(InProgress { retry_after })` | redeliver later (another consumer is on it; it may still fail) |
//! | `Err(Handler(e))` | the key was released: redeliver, the retry runs |
//! | `Err(Idempotency(e))` | the store failed and the handler did not run (or, for [`Error::NotReplicated`], it ran and its mark awaits the store's replicas): redeliver later; it does not run again |
//!
//! A handler's side effects and the record can commit together:
//! [`Deduplicator::process_in_tx`] writes the claim and the completed record in
//! the caller's SQL transaction, so a consumer killed mid-message leaves neither
//! the effect nor the record, and the redelivery runs it once. With
//! [`process`](Deduplicator::process) (any store), a crash between the handler's
//! effect and the record lets the redelivery run it again once the lease lapses:
//! make such handlers idempotent downstream (derive a key from
//! [`current`](crate::current)).
//!
//! Adapters: [`nats`] (JetStream pull consumers, feature `nats`) and `kafka`
//! (feature `kafka`).

use std::fmt;
use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::{claim, claim_in_tx, Claimed, HeldInTx, InProgress, OnTakeover, Options};
use crate::key::{Key, KeyBuilder};
use crate::{Error, Store, TransactionalStore};

#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub mod kafka;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats;

/// What became of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome<T> {
    /// The handler ran now and succeeded; its result.
    Processed(T),
    /// The message was processed before: acknowledge it without running the handler.
    Duplicate,
    /// Another delivery of the message is being processed now; redeliver this one
    /// later (the other may still fail).
    InProgress {
        /// How long until the other claim's lease lapses, at most 1 s.
        retry_after: Duration,
    },
}

/// Why a delivery was not processed. Either way, nothing was recorded: redeliver it.
#[derive(Debug)]
#[non_exhaustive]
pub enum ProcessError<E> {
    /// The handler failed; its key was released, so the redelivery runs it again.
    Handler(E),
    /// The store failed (or the message id was empty); the handler did not run.
    Idempotency(Error),
}

impl<E: fmt::Display> fmt::Display for ProcessError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessError::Handler(e) => write!(f, "the message handler failed: {e}"),
            ProcessError::Idempotency(e) => write!(f, "the message was not processed: {e}"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for ProcessError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProcessError::Handler(e) => Some(e),
            ProcessError::Idempotency(e) => Some(e),
        }
    }
}

/// What a message is deduplicated by.
///
/// A publisher's own id ([`Given`](MessageId::Given)) names the message wherever
/// it lands; without one, the broker's position does, with the time the broker
/// stored the message ([`Position`](MessageId::Position)), so that a message of a
/// stream or topic deleted and recreated under the same name — whose positions
/// start again — is never taken for the old one at its position. The two forms never
/// share a key, whatever their text: a business id `"ORDERS:7"` is not the
/// position 7 of stream `ORDERS`.
///
/// `&str` and `String` convert into `Given`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageId {
    /// An id the publisher gave the message: a business id, JetStream's
    /// `Nats-Msg-Id`, a Kafka id header.
    Given(String),
    /// Where the broker keeps a message that has no id.
    Position {
        /// The stream or topic.
        log: String,
        /// The place in the log: the stream sequence; `partition:offset`.
        position: String,
        /// When the broker stored the message there, which tells it from a
        /// message a recreated log put at the same place: the JetStream
        /// stored time (ns), the Kafka message timestamp (ms).
        stamp: String,
    },
}

impl MessageId {
    /// The message stored in `log` at `position` at time `stamp`.
    pub fn position(
        log: impl Into<String>,
        position: impl Into<String>,
        stamp: impl Into<String>,
    ) -> Self {
        MessageId::Position {
            log: log.into(),
            position: position.into(),
            stamp: stamp.into(),
        }
    }

    /// The publisher's id, if the message has one.
    pub fn given(&self) -> Option<&str> {
        match self {
            MessageId::Given(id) => Some(id),
            MessageId::Position { .. } => None,
        }
    }
}

impl fmt::Display for MessageId {
    /// The id, or `log:position@stamp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageId::Given(id) => f.write_str(id),
            MessageId::Position {
                log,
                position,
                stamp,
            } => write!(f, "{log}:{position}@{stamp}"),
        }
    }
}

impl From<&str> for MessageId {
    fn from(id: &str) -> Self {
        MessageId::Given(id.to_owned())
    }
}

impl From<String> for MessageId {
    fn from(id: String) -> Self {
        MessageId::Given(id)
    }
}

impl From<&String> for MessageId {
    fn from(id: &String) -> Self {
        MessageId::Given(id.clone())
    }
}

impl From<&MessageId> for MessageId {
    fn from(id: &MessageId) -> Self {
        id.clone()
    }
}

/// What a processed message's record holds: only that it was processed (the
/// handler's result is not replayed to a duplicate, it is acknowledged).
const PROCESSED: &[u8] = b"{\"ok\":null}";

/// Runs each message's handler at most once per message id (see the
/// [module docs](self)).
///
/// Defaults: ttl 7 days (set it to at least how long the broker may redeliver
/// a message: JetStream's `max_age`, Kafka's retention), lease 30 s, a duplicate
/// in flight answered with [`Outcome::InProgress`] at once.
#[derive(Clone)]
pub struct Deduplicator {
    store: Arc<dyn Store>,
    namespace: String,
    options: Options,
}

impl fmt::Debug for Deduplicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deduplicator")
            .field("namespace", &self.namespace)
            .field("ttl", &self.options.ttl)
            .field("lease", &self.options.lease)
            .field("in_progress", &self.options.in_progress)
            .finish_non_exhaustive()
    }
}

impl Deduplicator {
    /// A deduplicator for `consumer`, keeping records in `store`. Each consumer
    /// has its own namespace: two consumers of one stream each process every message.
    pub fn new<S: Store>(store: S, consumer: impl Into<String>) -> Self {
        Self::with_store(store.handle(), consumer)
    }

    /// A deduplicator on an already shared store.
    pub fn with_store(store: Arc<dyn Store>, consumer: impl Into<String>) -> Self {
        Deduplicator {
            store,
            namespace: format!("idem::message::{}", consumer.into()),
            options: Options::new()
                .ttl(Duration::from_secs(7 * 24 * 60 * 60))
                .lease(Duration::from_secs(30)),
        }
    }

    /// How long a processed message is remembered (default 7 days; capped to 1 ms – 100 years).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.options = self.options.ttl(ttl);
        self
    }

    /// How long a claim is held without renewal while the handler runs (default
    /// 30 s, renewed every third of it). A consumer that dies mid-message frees
    /// the message after this.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.options = self.options.lease(lease);
        self
    }

    /// What a delivery does when another delivery of the same message is being
    /// processed: [`InProgress::Reject`] (the default) answers
    /// [`Outcome::InProgress`] at once; [`InProgress::Wait`] waits for it.
    pub fn in_progress(mut self, policy: InProgress) -> Self {
        self.options = self.options.in_progress(policy);
        self
    }

    /// What a delivery does that continues an earlier one that did not finish
    /// (the consumer crashed or stalled mid-handler, or recorded steps and
    /// failed): run the handler ([`OnTakeover::Run`], the default), or answer
    /// [`Error::TakenOver`] without running it, on every redelivery, until
    /// reconciled ([`OnTakeover::Fail`]).
    pub fn on_takeover(mut self, policy: OnTakeover) -> Self {
        self.options = self.options.on_takeover(policy);
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The namespace of this consumer's keys (`idem::message::<consumer>`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The digest that stands for `message_id` in logs (the record's own
    /// digest; the raw id never reaches a log line).
    #[cfg(any(feature = "nats", feature = "kafka"))]
    pub(crate) fn log_digest(&self, message_id: &MessageId) -> String {
        match self.key(message_id) {
            Ok(key) => key.digest().to_hex(),
            Err(_) => "(no key)".to_owned(),
        }
    }

    /// The key of a message id in this consumer's namespace. A given id is the
    /// key's one part (as it always was); a position is four (a marker, the
    /// log, the position, the stamp), so the two never meet.
    pub fn key(&self, message_id: impl Into<MessageId>) -> Result<Key, Error> {
        let builder = KeyBuilder::new(&self.namespace);
        match message_id.into() {
            MessageId::Given(id) => builder.part(&id),
            MessageId::Position {
                log,
                position,
                stamp,
            } => builder
                .part("@position")
                .part(&log)
                .part(&position)
                .part(&stamp),
        }
        .finish()
    }

    /// Runs `handler` unless `message_id` was processed before (or is being
    /// processed now). A handler error releases the key, so the redelivery runs
    /// it again. An empty id is [`Error::MissingKey`].
    pub async fn process<T, E, F, Fut>(
        &self,
        message_id: impl Into<MessageId>,
        handler: F,
    ) -> Result<Outcome<T>, ProcessError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let key = self.key(message_id).map_err(ProcessError::Idempotency)?;
        let held = match claim(Arc::clone(&self.store), &self.options, key, None).await {
            Ok(Claimed::Run(held)) => held,
            Ok(Claimed::Replay(stored)) => return duplicate(&stored),
            Err(err) => return claim_error(err),
        };
        match held.run(handler()).await {
            Ok(value) => {
                // The handler's effects happened: acknowledge whatever the store
                // says. A failed completion is logged by `complete`; the record
                // then lapses with its lease, and a redelivery after that would
                // rerun. A store that answers only once the mark is safely stored
                // (replicas) says so with an error: then the message is not
                // acknowledged, and its redelivery finds the mark, not the handler.
                // A handler whose steps differ from the recorded ones is not
                // marked (the claim is released, its steps kept): not acknowledged.
                match held.complete(PROCESSED, self.options.ttl).await {
                    Err(
                        err @ (Error::NotReplicated { .. }
                        | Error::Store(_)
                        | Error::StepMismatch { .. }),
                    ) => Err(ProcessError::Idempotency(err)),
                    _ => Ok(Outcome::Processed(value)),
                }
            }
            Err(err) => {
                held.release_because("released after a handler error").await;
                Err(ProcessError::Handler(err))
            }
        }
    }

    /// Like [`process`](Self::process), inside the caller's open transaction
    /// `tx`: the claim, the handler's writes (the handler gets `tx`) and the
    /// processed record are all written in `tx`, which the caller commits (after
    /// `Processed`) or rolls back. A consumer that dies before the commit leaves
    /// nothing behind, so the redelivery runs the handler at once, and exactly
    /// once.
    ///
    /// In a task that must be `Send` (a spawned consumer), use the two halves,
    /// [`begin_in_tx`](Self::begin_in_tx) and [`finish_in_tx`](Self::finish_in_tx),
    /// with the handler's writes in between: an async closure over a borrowed
    /// transaction does not always satisfy the compiler there.
    pub async fn process_in_tx<S, X, T, E>(
        &self,
        store: &S,
        tx: &mut X,
        message_id: impl Into<MessageId>,
        handler: impl AsyncFnOnce(&mut X) -> Result<T, E>,
    ) -> Result<Outcome<T>, ProcessError<E>>
    where
        S: TransactionalStore<X> + ?Sized,
        X: Send + ?Sized,
    {
        let held = match self.begin_in_tx(store, tx, message_id).await {
            ControlFlow::Continue(held) => held,
            ControlFlow::Break(done) => return done,
        };
        let result = held.run(handler(tx)).await;
        self.finish_in_tx(store, tx, held, result).await
    }

    /// The first half of [`process_in_tx`](Self::process_in_tx): claims the
    /// message inside `tx`. On `Continue`, do the handler's writes in `tx`,
    /// then call [`finish_in_tx`](Self::finish_in_tx) with their result;
    /// `Break` carries the answer without running the handler (`Duplicate`,
    /// `InProgress`, or the error).
    pub async fn begin_in_tx<S, X, T, E>(
        &self,
        store: &S,
        tx: &mut X,
        message_id: impl Into<MessageId>,
    ) -> ControlFlow<Result<Outcome<T>, ProcessError<E>>, HeldInTx>
    where
        S: TransactionalStore<X> + ?Sized,
        X: Send + ?Sized,
    {
        let key = match self.key(message_id) {
            Ok(key) => key,
            Err(err) => return ControlFlow::Break(Err(ProcessError::Idempotency(err))),
        };
        match claim_in_tx(store, tx, &self.options, key, None).await {
            Ok(Claimed::Run(held)) => ControlFlow::Continue(held),
            Ok(Claimed::Replay(stored)) => ControlFlow::Break(duplicate(&stored)),
            Err(err) => ControlFlow::Break(claim_error(err)),
        }
    }

    /// The second half of [`process_in_tx`](Self::process_in_tx): records the
    /// message as processed in `tx` (or, after a handler error, deletes the
    /// claim there). Commit `tx` after `Ok(Processed(_))`; roll it back otherwise.
    pub async fn finish_in_tx<S, X, T, E>(
        &self,
        store: &S,
        tx: &mut X,
        held: HeldInTx,
        result: Result<T, E>,
    ) -> Result<Outcome<T>, ProcessError<E>>
    where
        S: TransactionalStore<X> + ?Sized,
        X: Send + ?Sized,
    {
        match result {
            Ok(value) => {
                held.complete(store, tx, PROCESSED, self.options.ttl)
                    .await
                    .map_err(ProcessError::Idempotency)?;
                Ok(Outcome::Processed(value))
            }
            Err(err) => {
                held.release_because(store, tx, "released after a handler error")
                    .await;
                Err(ProcessError::Handler(err))
            }
        }
    }
}

/// The delay before a message that failed its `attempt`-th delivery is read
/// again: `base × 2^(attempt − 1)`, at most `max`.
pub fn backoff(attempt: i64, base: Duration, max: Duration) -> Duration {
    let doublings = attempt.saturating_sub(1).clamp(0, 30) as u32;
    base.saturating_mul(1 << doublings).min(max)
}

/// A message met its completed record: a duplicate, if the record is the
/// processed mark. Any other record (corrupt, or written by something else
/// under this consumer's keys) is `Error::Codec` (CONTRACT §3.3): the message
/// is neither run again nor taken for done.
fn duplicate<T, E>(stored: &[u8]) -> Result<Outcome<T>, ProcessError<E>> {
    match crate::codec::decode_ok::<()>(stored) {
        Ok(()) => {
            tracing::debug!("duplicate");
            Ok(Outcome::Duplicate)
        }
        Err(err) => {
            tracing::error!(error = %err, "stored outcome could not be decoded");
            Err(ProcessError::Idempotency(err))
        }
    }
}

fn claim_error<T, E>(err: Error) -> Result<Outcome<T>, ProcessError<E>> {
    match err {
        Error::InProgress { retry_after } => Ok(Outcome::InProgress { retry_after }),
        other => Err(ProcessError::Idempotency(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_id_never_meets_a_position_whatever_its_text() {
        let dedup = Deduplicator::new(crate::MemoryStore::new(), "k");
        let position = MessageId::position("ORDERS", "7", "1700000000000000000");
        for spelled in [
            position.to_string(),
            "ORDERS:7".to_owned(),
            "ORDERS".to_owned(),
        ] {
            assert_ne!(
                dedup.key(&position).unwrap().as_str(),
                dedup.key(spelled.as_str()).unwrap().as_str()
            );
        }
        // The same place of a recreated stream, stored at another time: another message.
        assert_ne!(
            dedup.key(&position).unwrap().as_str(),
            dedup
                .key(MessageId::position("ORDERS", "7", "1700000000000000001"))
                .unwrap()
                .as_str()
        );
        // A given id keys as it always did: one part, the id.
        assert_eq!(
            dedup.key("m-1").unwrap().as_str(),
            KeyBuilder::new(dedup.namespace())
                .part("m-1")
                .finish()
                .unwrap()
                .as_str()
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<_> = (0..8).map(|d| backoff(d, base, max).as_millis()).collect();
        assert_eq!(delays, [100, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(backoff(i64::MAX, base, max), max);
    }
}
