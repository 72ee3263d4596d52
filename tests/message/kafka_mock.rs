//! What a real broker process cannot be made to do on cue, on librdkafka's
//! in-process mock cluster: every offset commit fails for a while (nothing is
//! lost or done twice — the consumer that comes next re-reads from the last
//! commit that landed and finds those messages done); the broker goes down
//! and comes back, and a handler outlasts `max.poll.interval.ms` (`run` keeps
//! consuming through both; found by the break-it review of issue 13).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_runtime::message::kafka::Kafka;
use idem_runtime::message::Deduplicator;
use idem_runtime::MemoryStore;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Message as _, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

fn consumer(bootstrap: &str) -> StreamConsumer {
    let consumer = member(bootstrap);
    consumer.subscribe(&["t"]).unwrap();
    consumer
}

/// A client of the group that has not joined it (to read its commits).
fn member(bootstrap: &str) -> StreamConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "mock-group")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .unwrap()
}

fn committed(consumer: &StreamConsumer) -> Option<i64> {
    let mut list = TopicPartitionList::new();
    list.add_partition("t", 0);
    let offsets = consumer
        .committed_offsets(list, Duration::from_secs(5))
        .ok()?;
    match offsets.elements()[0].offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// Runs `side` on a new consumer until `done` holds.
async fn consume_until(
    side: &Kafka,
    bootstrap: &str,
    runs: &Mutex<Vec<String>>,
    done: impl Fn(&StreamConsumer) -> bool,
) {
    let consumer = consumer(bootstrap);
    let run = side.run(&consumer, async |m: &BorrowedMessage<'_>| {
        let text = m.payload_view::<str>().and_then(Result::ok).unwrap_or("");
        runs.lock().unwrap().push(text.to_owned());
        Ok::<_, std::io::Error>(())
    });
    let watch = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !done(&consumer) {
            assert!(tokio::time::Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        out = run => panic!("the consumer stopped: {out:?}"),
        () = watch => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commits_lose_nothing_and_rerun_nothing() {
    let _turn = crate::KAFKA.lock().await;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("t", 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    produce_range(&bootstrap, 0..20).await;
    // Every commit fails (the coordinator is "not available") until 10,000
    // have been tried.
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 10_000],
    );
    let side = Kafka::new(Deduplicator::new(MemoryStore::new(), "mock"));
    let runs = Arc::new(Mutex::new(Vec::new()));
    consume_until(&side, &bootstrap, &runs, |_| {
        runs.lock().unwrap().len() == 20
    })
    .await;
    assert_eq!(runs.lock().unwrap().len(), 20, "every message ran");
    assert_ne!(
        committed(&member(&bootstrap)),
        Some(20),
        "the commits failed"
    );

    // The commits come back; a new consumer of the group re-reads what was not
    // committed, finds it done, and commits past it.
    cluster.clear_request_errors(RDKafkaApiKey::OffsetCommit);
    consume_until(&side, &bootstrap, &runs, |c| committed(c) == Some(20)).await;
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 20, "nothing ran twice: {runs:?}");
    let mut distinct = runs.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 20);
}

async fn produce_range(bootstrap: &str, range: std::ops::Range<u32>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    for n in range {
        let id = format!("m-{n}");
        let record =
            FutureRecord::<str, str>::to("t")
                .payload(&id)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "idempotency-key",
                    value: Some(id.as_str()),
                }));
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// A consumer of the topic in the group `mock-outage`, with `extra` settings.
fn consumer_with(bootstrap: &str, extra: &[(&str, &str)]) -> StreamConsumer {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "mock-outage")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    for (k, v) in extra {
        config.set(*k, *v);
    }
    let consumer: StreamConsumer = config.create().unwrap();
    consumer.subscribe(&["t"]).unwrap();
    consumer
}

async fn until_true(secs: u64, what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The only broker goes down for a few seconds and comes back. librdkafka
/// reconnects by itself; its "Disconnected" / "all brokers down" events are
/// informational, but `run` returns on the first one (`consumer.recv().await?`,
/// idem-runtime/src/message/kafka.rs:271), so the consumer stops for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_keeps_consuming_through_a_broker_outage() {
    let _turn = crate::KAFKA.lock().await;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("t", 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    produce_range(&bootstrap, 0..5).await;
    let side = Kafka::new(Deduplicator::new(MemoryStore::new(), "outage"));
    let runs = Arc::new(Mutex::new(Vec::<String>::new()));
    let consumer = consumer_with(&bootstrap, &[]);
    let run = side.run(&consumer, async |m: &BorrowedMessage<'_>| {
        let text = m.payload_view::<str>().and_then(Result::ok).unwrap_or("");
        runs.lock().unwrap().push(text.to_owned());
        Ok::<_, std::io::Error>(())
    });
    let script = async {
        until_true(60, "the first five", || runs.lock().unwrap().len() == 5).await;
        cluster.broker_down(1).unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        cluster.broker_up(1).unwrap();
        produce_range(&bootstrap, 5..10).await;
        until_true(60, "the next five", || runs.lock().unwrap().len() == 10).await;
    };
    tokio::select! {
        out = run => panic!("run ended during a transient outage: {out:?}"),
        () = script => {}
    }
}

/// A handler that takes longer than `max.poll.interval.ms` (a slow downstream
/// call). librdkafka leaves the group and rejoins on the next poll, reporting
/// `MaxPollExceeded` on the way; `run` returns on it instead of going on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_keeps_consuming_after_a_handler_slower_than_max_poll_interval() {
    let _turn = crate::KAFKA.lock().await;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("t", 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    produce_range(&bootstrap, 0..3).await;
    let side = Kafka::new(Deduplicator::new(MemoryStore::new(), "slow"));
    let runs = Arc::new(Mutex::new(Vec::<String>::new()));
    let consumer = consumer_with(
        &bootstrap,
        &[
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "500"),
            ("max.poll.interval.ms", "6000"),
        ],
    );
    let run = side.run(&consumer, async |m: &BorrowedMessage<'_>| {
        let text = m.payload_view::<str>().and_then(Result::ok).unwrap_or("");
        let first = {
            let mut runs = runs.lock().unwrap();
            runs.push(text.to_owned());
            runs.len() == 1
        };
        if first {
            tokio::time::sleep(Duration::from_secs(8)).await;
        }
        Ok::<_, std::io::Error>(())
    });
    let script = async {
        until_true(60, "all three", || {
            let mut r = runs.lock().unwrap().clone();
            r.sort();
            r.dedup();
            r.len() == 3
        })
        .await;
    };
    tokio::select! {
        out = run => panic!("run ended after one slow handler: {out:?}"),
        () = script => {}
    }
}
