//! Kafka consumers, effectively once (feature `kafka`, `rdkafka`).
//!
//! ```no_run
//! use idem_runtime::message::{kafka::Kafka, Deduplicator};
//! use idem_runtime::MemoryStore;
//! use rdkafka::consumer::{Consumer, StreamConsumer};
//! use rdkafka::ClientConfig;
//!
//! # async fn demo() -> Result<(), rdkafka::error::KafkaError> {
//! let consumer: StreamConsumer = ClientConfig::new()
//!     .set("bootstrap.servers", "127.0.0.1:9092")
//!     .set("group.id", "payments-recorder")
//!     .set("enable.auto.commit", "false") // the adapter commits
//!     .create()?;
//! consumer.subscribe(&["payments"])?;
//! let side = Kafka::new(Deduplicator::new(MemoryStore::new(), "payments-recorder"));
//! side.run(&consumer, async |message: &rdkafka::message::BorrowedMessage<'_>| {
//!     Ok::<_, std::io::Error>(())
//! })
//! .await
//! # }
//! ```
//!
//! Each message is keyed by a business-id header (`idempotency-key` unless set
//! with [`Kafka::id_header`]), falling back to its position — topic, partition
//! and offset, qualified by the message's timestamp so that a recreated topic's
//! offsets are new messages ([`message_id`]). The one gap of the fallback: a
//! producer that sets old `CreateTime` timestamps explicitly and republishes
//! into a recreated topic could land a message at the offset *and*
//! millisecond of an old one; give such messages a business id, or set the
//! topic's `message.timestamp.type=LogAppendTime`. An
//! offset is committed only once the message is processed or known to be a
//! duplicate, and only as far as every earlier message of its partition is too
//! ([`OffsetTracker`]); a message whose handler failed, or that is in progress
//! elsewhere, is re-read by seeking its partition back to it after a backoff
//! (Kafka has no per-message nak).
//!
//! Tested against a real Kafka-protocol broker process (see the README's
//! Messages section for which one, and what it does and does not cover).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::{backoff, Deduplicator, MessageId, Outcome, ProcessError};

/// The id a Kafka message is deduplicated by: the value of the id header
/// (when present, non-empty and UTF-8), or its position: `partition:offset`
/// in `topic`, qualified by the message's timestamp (milliseconds, `CreateTime`
/// or `LogAppendTime`; `-` when the message has none).
///
/// The timestamp stands in for the topic's identity: a topic deleted and
/// recreated under the same name starts its offsets again at 0, and its new
/// messages carry their own, later timestamps, so they are never taken for the
/// old ones. (Kafka's topic ids would be the exact identity; librdkafka offers
/// them only through a C interface this crate does not call, having no unsafe
/// code. See the module docs for the one gap.)
pub fn message_id(
    header_value: Option<&[u8]>,
    topic: &str,
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
) -> MessageId {
    match header_value
        .and_then(|v| std::str::from_utf8(v).ok())
        .filter(|v| !v.is_empty())
    {
        Some(id) => MessageId::Given(id.to_owned()),
        None => MessageId::position(
            topic,
            format!("{partition}:{offset}"),
            timestamp.map_or_else(|| "-".to_owned(), |ms| ms.to_string()),
        ),
    }
}

/// [`message_id`] of a received message.
pub fn id_of<M: Message>(message: &M, header: &str) -> MessageId {
    let value = message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(header))
            .and_then(|h| h.value)
    });
    message_id(
        value,
        message.topic(),
        message.partition(),
        message.offset(),
        message.timestamp().to_millis(),
    )
}

/// What to do with a delivery once it has been through the deduplicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Done (processed, or a duplicate): its offset may be committed.
    Done,
    /// Not done: read it again after this delay.
    Redeliver(Duration),
}

/// The action for an outcome: done when processed or a duplicate; otherwise
/// redeliver, after the other claim's lease for one in progress, or after
/// `backoff` for a failure.
pub fn action<T, E>(outcome: &Result<Outcome<T>, ProcessError<E>>, backoff: Duration) -> Action {
    match outcome {
        Ok(Outcome::Processed(_)) | Ok(Outcome::Duplicate) => Action::Done,
        Ok(Outcome::InProgress { retry_after }) => Action::Redeliver(*retry_after),
        Err(_) => Action::Redeliver(backoff),
    }
}

/// Which offsets may be committed, per partition: the position after the
/// longest run of finished messages from the last commit, so a message is
/// never committed past while an earlier one is unfinished (even when they
/// finish out of order).
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// By topic, then partition (looked up by `&str`: no key is allocated
    /// per message).
    partitions: HashMap<String, HashMap<i32, Partition>>,
}

#[derive(Debug, Default)]
struct Partition {
    /// The committed position: every offset below it is finished.
    committed: Option<i64>,
    /// Offsets received and not finished.
    pending: BTreeSet<i64>,
    /// Offsets finished above an unfinished one.
    finished: BTreeSet<i64>,
}

impl OffsetTracker {
    /// A tracker with nothing received.
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes that `offset` was received and is being processed.
    ///
    /// An offset below the position this tracker last committed means the
    /// partition is read again from an earlier committed offset (it went to
    /// another consumer of the group and came back, or the broker's offsets
    /// were reset): what the tracker knew of it is stale and is forgotten.
    pub fn received(&mut self, topic: &str, partition: i32, offset: i64) {
        if !self.partitions.contains_key(topic) {
            self.partitions.insert(topic.to_owned(), HashMap::new());
        }
        let p = self
            .partitions
            .get_mut(topic)
            .expect("inserted above")
            .entry(partition)
            .or_default();
        if p.committed.is_some_and(|c| offset < c) {
            *p = Partition::default();
        }
        p.pending.insert(offset);
    }

    /// Notes that `offset` is finished; returns the new position to commit
    /// (the next offset to read) if it advanced.
    pub fn finished(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let p = self.partitions.get_mut(topic)?.get_mut(&partition)?;
        if !p.pending.remove(&offset) {
            return None;
        }
        p.finished.insert(offset);
        // Everything finished below the lowest unfinished offset can be committed.
        let limit = p.pending.first().copied().unwrap_or(i64::MAX);
        let done_below: Vec<i64> = p.finished.range(..limit).copied().collect();
        let next = done_below.last()? + 1;
        for o in done_below {
            p.finished.remove(&o);
        }
        if p.committed.is_some_and(|c| c >= next) {
            return None;
        }
        p.committed = Some(next);
        Some(next)
    }

    /// Notes that the partition is re-read from `offset` (a failed message):
    /// it and everything received after it are unfinished and will arrive again.
    pub fn rewind(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(p) = self
            .partitions
            .get_mut(topic)
            .and_then(|t| t.get_mut(&partition))
        {
            p.pending.retain(|&o| o < offset);
            p.finished.retain(|&o| o < offset);
        }
    }
}

/// Consumes Kafka messages through a [`Deduplicator`], committing each offset
/// only after its message is done (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct Kafka {
    dedup: Deduplicator,
    id_header: String,
    backoff_base: Duration,
    backoff_max: Duration,
}

impl Kafka {
    /// Keys by the `idempotency-key` header; failures re-read after 100 ms,
    /// doubling to 30 s.
    pub fn new(dedup: Deduplicator) -> Self {
        Kafka {
            dedup,
            id_header: "idempotency-key".into(),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
        }
    }

    /// The header holding the message's business id (matched case-insensitively).
    pub fn id_header(mut self, header: impl Into<String>) -> Self {
        self.id_header = header.into();
        self
    }

    /// The delay before a failed message is read again: `base × 2^(n − 1)` for
    /// its n-th consecutive failure, at most `max`.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max;
        self
    }

    /// The deduplicator.
    pub fn deduplicator(&self) -> &Deduplicator {
        &self.dedup
    }

    /// Receives messages from `consumer` (created with `enable.auto.commit=false`)
    /// and processes each through the deduplicator, committing offsets as
    /// messages are done and re-reading those that are not. Keeps going
    /// through the errors librdkafka recovers from (brokers down for a while,
    /// a handler slower than `max.poll.interval.ms`), logging them; ends on a
    /// fatal one.
    pub async fn run<T, E, F>(
        &self,
        consumer: &StreamConsumer,
        handler: F,
    ) -> Result<(), KafkaError>
    where
        F: AsyncFn(&BorrowedMessage<'_>) -> Result<T, E>,
        E: std::fmt::Display,
    {
        self.run_with(consumer, async |message, id| {
            self.dedup.process(id, || handler(message)).await
        })
        .await
    }

    /// Like [`run`](Self::run), but `process` drives the deduplicator itself,
    /// given the message and its id: for
    /// [`process_in_tx`](Deduplicator::process_in_tx), where the handler's
    /// writes and the processed record commit in one transaction the caller
    /// opens and commits. Its outcome decides as in `run`: `Processed` and
    /// `Duplicate` are done (committed in order), anything else is read again.
    pub async fn run_with<T, E, F>(
        &self,
        consumer: &StreamConsumer,
        process: F,
    ) -> Result<(), KafkaError>
    where
        F: AsyncFn(&BorrowedMessage<'_>, &MessageId) -> Result<Outcome<T>, ProcessError<E>>,
        E: std::fmt::Display,
    {
        let mut tracker = OffsetTracker::new();
        // Consecutive failures of a message, by topic, then (partition, offset).
        let mut failures: HashMap<String, HashMap<(i32, i64), u32>> = HashMap::new();
        let mut errors_in_a_row: i64 = 0;
        loop {
            let message = match consumer.recv().await {
                Ok(message) => {
                    errors_in_a_row = 0;
                    message
                }
                // librdkafka reports and then recovers from these itself: a
                // broker gone or unreachable for a while, a handler slower
                // than `max.poll.interval.ms` (the consumer rejoins on its next
                // poll). Keep polling, with a growing pause.
                Err(err @ KafkaError::MessageConsumption(_)) => {
                    errors_in_a_row += 1;
                    tracing::warn!(error = %err, "consumer error; still consuming");
                    let pause = backoff(
                        errors_in_a_row,
                        Duration::from_millis(50),
                        Duration::from_secs(5),
                    );
                    tokio::time::sleep(pause).await;
                    continue;
                }
                Err(err) => return Err(err),
            };
            let (partition, offset) = (message.partition(), message.offset());
            let id = id_of(&message, &self.id_header);
            tracker.received(message.topic(), partition, offset);
            let outcome = process(&message, &id).await;
            let failed_before = failures
                .get(message.topic())
                .and_then(|f| f.get(&(partition, offset)))
                .copied()
                .unwrap_or(0);
            let backoff = backoff(
                i64::from(failed_before) + 1,
                self.backoff_base,
                self.backoff_max,
            );
            match action(&outcome, backoff) {
                Action::Done => {
                    let topic = message.topic();
                    if failed_before > 0 {
                        if let Some(f) = failures.get_mut(topic) {
                            f.remove(&(partition, offset));
                        }
                    }
                    if let Some(next) = tracker.finished(topic, partition, offset) {
                        let mut list = TopicPartitionList::new();
                        list.add_partition_offset(topic, partition, Offset::Offset(next))?;
                        if let Err(err) = consumer.commit(&list, CommitMode::Async) {
                            // The next commit covers this one; until then a
                            // restart re-reads (and skips) what is done.
                            tracing::warn!(error = %err, partition, "could not commit an offset");
                        }
                    }
                }
                Action::Redeliver(delay) => {
                    let topic = message.topic().to_owned();
                    *failures
                        .entry(topic.clone())
                        .or_default()
                        .entry((partition, offset))
                        .or_default() += 1;
                    if let Err(err) = &outcome {
                        tracing::warn!(digest = %self.dedup.log_digest(&id), error = %err, "message not processed; re-reading it");
                    }
                    drop(message);
                    tokio::time::sleep(delay).await;
                    match consumer.seek(
                        &topic,
                        partition,
                        Offset::Offset(offset),
                        Duration::from_secs(10),
                    ) {
                        Ok(()) => tracker.rewind(&topic, partition, offset),
                        // The message stays unfinished, so no commit passes
                        // it: whoever reads the partition next (this consumer
                        // after a rebalance or a restart, or another) resumes
                        // from the committed offset, which is never past it.
                        Err(err) => tracing::warn!(
                            error = %err, partition,
                            "could not seek back to a message not processed; \
                             commits of its partition wait for it"
                        ),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_business_id_header_wins_else_topic_partition_offset_and_timestamp() {
        let at = |ts: Option<i64>, p: &str| {
            MessageId::position("payments", p, ts.map_or("-".into(), |t| t.to_string()))
        };
        assert_eq!(
            message_id(Some(b"order-7"), "payments", 3, 42, Some(1)),
            MessageId::Given("order-7".into())
        );
        assert_eq!(
            message_id(Some(b""), "payments", 3, 42, Some(5)),
            at(Some(5), "3:42")
        );
        assert_eq!(
            message_id(Some(b"\xff\xfe"), "payments", 3, 42, Some(5)),
            at(Some(5), "3:42")
        );
        assert_eq!(message_id(None, "payments", 0, 0, None), at(None, "0:0"));
        // The same offset of a recreated topic, a message of its own: another id.
        assert_ne!(
            message_id(None, "payments", 0, 0, Some(1_700_000_000_000)),
            message_id(None, "payments", 0, 0, Some(1_700_000_100_000))
        );
    }

    #[test]
    fn offsets_are_committed_in_order_only() {
        let mut t = OffsetTracker::new();
        for o in 10..15 {
            t.received("t", 0, o);
        }
        assert_eq!(t.finished("t", 0, 11), None, "10 is not finished yet");
        assert_eq!(t.finished("t", 0, 12), None);
        assert_eq!(t.finished("t", 0, 10), Some(13), "10, 11 and 12 are done");
        assert_eq!(t.finished("t", 0, 14), None, "13 is not finished yet");
        assert_eq!(t.finished("t", 0, 13), Some(15));
        assert_eq!(
            t.finished("t", 0, 13),
            None,
            "finishing twice commits nothing"
        );
        assert_eq!(
            t.finished("t", 1, 13),
            None,
            "another partition was never received"
        );
    }

    #[test]
    fn a_partition_read_again_from_an_earlier_offset_starts_afresh() {
        let mut t = OffsetTracker::new();
        for o in 0..3 {
            t.received("t", 0, o);
        }
        assert_eq!(t.finished("t", 0, 0), Some(1));
        assert_eq!(t.finished("t", 0, 1), Some(2));
        // The partition came back from another consumer at committed offset 1
        // (this consumer's commit of 2 never landed): 1 commits again.
        t.received("t", 0, 1);
        assert_eq!(t.finished("t", 0, 1), Some(2));
        assert_eq!(t.finished("t", 0, 2), None, "2 was forgotten with the rest");
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::new();
        t.received("t", 0, 5);
        t.received("t", 1, 5);
        t.received("u", 0, 5);
        assert_eq!(t.finished("t", 1, 5), Some(6));
        assert_eq!(t.finished("u", 0, 5), Some(6));
        assert_eq!(t.finished("t", 0, 5), Some(6));
    }

    #[test]
    fn a_failed_message_is_re_read_and_nothing_after_it_is_committed() {
        let mut t = OffsetTracker::new();
        for o in 0..4 {
            t.received("t", 0, o);
        }
        assert_eq!(t.finished("t", 0, 0), Some(1));
        assert_eq!(t.finished("t", 0, 2), None);
        t.rewind("t", 0, 1); // 1 failed: re-read from 1; 2 and 3 come again
        for o in 1..4 {
            t.received("t", 0, o);
        }
        assert_eq!(t.finished("t", 0, 2), None, "1 is still unfinished");
        assert_eq!(t.finished("t", 0, 1), Some(3));
        assert_eq!(t.finished("t", 0, 3), Some(4));
    }

    #[test]
    fn only_processed_and_duplicates_are_done() {
        let backoff = Duration::from_millis(250);
        let done = |o: Result<Outcome<()>, ProcessError<&str>>| action(&o, backoff);
        assert_eq!(done(Ok(Outcome::Processed(()))), Action::Done);
        assert_eq!(done(Ok(Outcome::Duplicate)), Action::Done);
        assert_eq!(
            done(Ok(Outcome::InProgress {
                retry_after: Duration::from_millis(40)
            })),
            Action::Redeliver(Duration::from_millis(40))
        );
        assert_eq!(
            done(Err(ProcessError::Handler("boom"))),
            Action::Redeliver(backoff)
        );
        assert_eq!(
            done(Err(ProcessError::Idempotency(crate::Error::MissingKey))),
            Action::Redeliver(backoff)
        );
    }
}
