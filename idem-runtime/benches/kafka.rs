//! Messages per second through `message::kafka::Kafka` (deduplicator + ordered
//! commits) next to the raw consumer on the same topic, in one run against the
//! local Kafka-protocol broker (`IDEM_KAFKA_BOOTSTRAP`, default 127.0.0.1:9092).
//!
//! One topic (one partition) holds `IDEM_BENCH_MESSAGES` messages (default
//! 20,000), each with its own `idempotency-key` header. Each figure is a new
//! consumer group reading the whole topic once:
//!
//! - `raw`: the handler does nothing; each offset is committed asynchronously
//!   as the adapter does (the floor);
//! - `dedup, memory` / `redis` / `postgres`: the same handler through
//!   `Kafka::run` and a `Deduplicator` on that store (one claim and one
//!   completion per message; the adapter handles one message at a time).
//!
//! Rounds alternate the cases (`IDEM_BENCH_ROUNDS`, default 3); the best round
//! of each is kept. Run:
//! `cargo bench -p idem-runtime --bench kafka --features kafka,redis,postgres`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_runtime::message::kafka::Kafka;
use idem_runtime::message::Deduplicator;
use idem_runtime::{MemoryStore, PostgresStore, RedisStore, Store};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn consumer(bootstrap: &str, group: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

/// Reads `count` messages, committing each offset; returns messages per second
/// (timed from the first message, so joining the group is not counted).
async fn raw(consumer: &StreamConsumer, count: usize) -> f64 {
    let first = consumer.recv().await.unwrap();
    consumer.commit_message(&first, CommitMode::Async).unwrap();
    drop(first);
    let started = Instant::now();
    for _ in 1..count {
        let message = consumer.recv().await.unwrap();
        consumer
            .commit_message(&message, CommitMode::Async)
            .unwrap();
    }
    (count - 1) as f64 / started.elapsed().as_secs_f64()
}

/// Reads `count` messages through `Kafka::run`; returns messages per second
/// (timed from the first message).
async fn dedup(consumer: &StreamConsumer, count: usize, side: &Kafka) -> f64 {
    let done = AtomicUsize::new(0);
    let started = std::sync::Mutex::new(None::<Instant>);
    let finished = tokio::sync::Notify::new();
    let run = side.run(consumer, async |_message: &BorrowedMessage<'_>| {
        let n = done.fetch_add(1, Ordering::SeqCst) + 1;
        if n == 1 {
            *started.lock().unwrap() = Some(Instant::now());
        }
        if n == count {
            finished.notify_one();
        }
        Ok::<_, std::io::Error>(())
    });
    tokio::select! {
        out = run => panic!("the consumer stopped: {out:?}"),
        _ = finished.notified() => {}
        _ = tokio::time::sleep(Duration::from_secs(300)) => {
            panic!("stalled after {} of {count} messages", done.load(Ordering::SeqCst))
        }
    }
    let started = started.lock().unwrap().unwrap();
    (count - 1) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let count = env("IDEM_BENCH_MESSAGES", 20_000);
    let rounds = env("IDEM_BENCH_ROUNDS", 3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let bootstrap =
            std::env::var("IDEM_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let topic = format!("idem-bench-{run}");
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .unwrap();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for created in admin
            .create_topics(
                &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
                &options,
            )
            .await
            .unwrap()
        {
            created.unwrap();
        }
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("linger.ms", "5")
            .create()
            .unwrap();
        // Deliveries are awaited in batches, so the producer batches the sends.
        let mut pending = Vec::with_capacity(500);
        for i in 0..count {
            let id = format!("m-{i}");
            let payload = i.to_string();
            let record = FutureRecord::<str, str>::to(&topic)
                .payload(&payload)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "idempotency-key",
                    value: Some(id.as_str()),
                }));
            pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
            if pending.len() == 500 {
                for delivery in pending.drain(..) {
                    delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
                }
            }
        }
        for delivery in pending {
            delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
        }

        let pg = std::env::var("IDEM_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let redis =
            std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let stores: Vec<(&str, Arc<dyn Store>)> = vec![
            ("memory", MemoryStore::new().handle()),
            ("redis", RedisStore::connect(&redis).await.unwrap().handle()),
            (
                "postgres",
                PostgresStore::connect(&pg).await.unwrap().handle(),
            ),
        ];
        let mut best_raw: f64 = 0.0;
        let mut best: Vec<f64> = vec![0.0; stores.len()];
        for round in 0..rounds {
            let c = consumer(&bootstrap, &format!("{topic}-raw-{round}"), &topic);
            let r = raw(&c, count).await;
            println!("round {}: raw              {r:>9.0} msg/s", round + 1);
            best_raw = best_raw.max(r);
            for (i, (label, store)) in stores.iter().enumerate() {
                let c = consumer(&bootstrap, &format!("{topic}-dedup-{i}-{round}"), &topic);
                // A namespace per round and case, so every message is fresh to the store.
                let side = Kafka::new(Deduplicator::with_store(
                    store.clone(),
                    format!("bench-{run}-{round}-{i}"),
                ));
                let d = dedup(&c, count, &side).await;
                println!("round {}: dedup, {label:<9} {d:>9.0} msg/s", round + 1);
                best[i] = best[i].max(d);
            }
        }
        println!();
        println!("best of {rounds} rounds, {count} messages per figure, one consumer at a time");
        println!("{:<20} {:>10} {:>9}", "consumer", "msg/s", "vs raw");
        println!("{:<20} {:>10.0} {:>9.3}", "raw", best_raw, 1.0);
        for ((label, _), b) in stores.iter().zip(&best) {
            println!(
                "{:<20} {:>10.0} {:>9.3}",
                format!("dedup, {label}"),
                b,
                b / best_raw
            );
        }
        let _ = admin.delete_topics(&[&topic], &options).await;
    });
}
