//! Kafka for the tests: topics, a producer that reports where each message
//! landed, consumers in a group, the group's committed offsets read back from
//! the broker, and a consumer whose effects are counted in PostgreSQL
//! (`process_in_tx` under the adapter's commits). Used in-process and, to be
//! SIGKILLed mid-batch, in `idem-test-worker`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use idem_runtime::message::kafka::Kafka;
use idem_runtime::message::{Deduplicator, MessageId, Outcome, ProcessError};
use idem_runtime::{Error, PostgresStore};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::effects::{self, Tally};

/// The broker the tests use: `IDEM_KAFKA_BOOTSTRAP`, or the local one.
pub fn bootstrap() -> String {
    std::env::var("IDEM_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap());
    config
}

fn admin() -> AdminClient<DefaultClientContext> {
    config().create().expect("admin client")
}

fn options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))
}

/// Asks the broker to create `topic`; what it answered.
async fn try_create(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    partitions: i32,
) -> rdkafka::admin::TopicResult {
    admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &options(),
        )
        .await
        .expect("create topic")
        .into_iter()
        .next()
        .expect("one result for one topic")
}

/// Creates `topic` with `partitions` partitions (waiting until it is there).
pub async fn create_topic(topic: &str, partitions: i32) {
    try_create(&admin(), topic, partitions)
        .await
        .expect("topic created");
}

/// Creates `topic` again once its deletion is done (the broker deletes
/// asynchronously), trying for up to 30 s.
pub async fn recreate_topic(topic: &str, partitions: i32) {
    let admin = admin();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let created = try_create(&admin, topic, partitions).await;
        if created.is_ok() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "could not recreate {topic}: {created:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deletes `topic`.
pub async fn delete_topic(topic: &str) {
    for result in admin()
        .delete_topics(&[topic], &options())
        .await
        .expect("delete topic")
    {
        result.expect("topic deleted");
    }
}

/// A producer that waits for every message to be acknowledged.
pub fn producer() -> FutureProducer {
    config()
        .set("message.timeout.ms", "30000")
        .set("linger.ms", "1")
        .create()
        .expect("producer")
}

/// Sends `payload` to `topic` (with the business id `id` in the
/// `idempotency-key` header if given); returns where it landed.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    id: Option<&str>,
    payload: &str,
) -> (i32, i64) {
    let mut record = FutureRecord::<str, str>::to(topic).payload(payload);
    if let Some(id) = id {
        record = record.key(id).headers(OwnedHeaders::new().insert(Header {
            key: "idempotency-key",
            value: Some(id),
        }));
    }
    let delivery = producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .expect("message acknowledged");
    (delivery.partition, delivery.offset)
}

/// A consumer in `group` subscribed to `topic`, reading from the start, with
/// offsets committed by the adapter alone.
pub fn consumer(group: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .set("max.poll.interval.ms", "60000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

/// The offsets `group` has committed for `topic`'s `partitions`, read back from
/// the broker (`None` where nothing is committed).
pub fn committed(group: &str, topic: &str, partitions: i32) -> HashMap<i32, Option<i64>> {
    let reader: StreamConsumer = config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("offset reader");
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let offsets = reader
        .committed_offsets(list, Duration::from_secs(10))
        .expect("committed offsets");
    offsets
        .elements()
        .iter()
        .map(|e| {
            let at = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (e.partition(), at)
        })
        .collect()
}

/// A Kafka consumer whose side effect is a row in PostgreSQL, written in the
/// same transaction as its idempotency record; misbehaves on purpose on the
/// first delivery this process sees of message `n` (its payload): `n % 10 == 3`
/// fails, `n % 50 == 7` takes 1.5 s.
pub struct Effects {
    /// Where records and effects live.
    pub store: PostgresStore,
    /// The table of effects (`msg_id`, `pid`).
    pub table: String,
    /// The consumer side: deduplicator and commits.
    pub side: Kafka,
    /// What became of the deliveries this process handled.
    pub tally: Tally,
    seen: Mutex<HashSet<u64>>,
}

impl Effects {
    /// Connects, creates `table`, and keys messages in `namespace`.
    pub async fn setup(table: &str, namespace: &str) -> Self {
        let store = effects::table(table).await;
        let dedup = Deduplicator::new(store.clone(), namespace).lease(Duration::from_secs(5));
        Effects {
            store,
            table: table.to_owned(),
            side: Kafka::new(dedup).backoff(Duration::from_millis(50), Duration::from_millis(400)),
            tally: Tally::default(),
            seen: Mutex::default(),
        }
    }

    async fn handle(
        &self,
        message: &BorrowedMessage<'_>,
        id: &MessageId,
    ) -> Result<Outcome<()>, ProcessError<Error>> {
        let n: u64 = message
            .payload_view::<str>()
            .and_then(Result::ok)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let first = self.seen.lock().map(|mut s| s.insert(n)).unwrap_or(false);
        let dedup = self.side.deduplicator();
        let out = effects::apply(&self.store, &self.table, dedup, id, n, first).await;
        self.tally.record(&out);
        out
    }

    /// Consumes `consumer` until it fails.
    pub async fn consume(
        &self,
        consumer: &StreamConsumer,
    ) -> Result<(), rdkafka::error::KafkaError> {
        self.side
            .run_with(consumer, async |message, id| self.handle(message, id).await)
            .await
    }

    /// `(distinct messages with an effect, most effects of one message, effects)`.
    pub async fn counts(&self) -> (i64, i64, i64) {
        effects::counts(&self.store, &self.table).await
    }
}
