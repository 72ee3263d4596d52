//! Messages per second through `message::nats::JetStream` (deduplicator + acks)
//! next to the raw consumer on the same stream, in one run against the local
//! JetStream server.
//!
//! One stream holds `IDEM_BENCH_MESSAGES` messages (default 20,000), each with
//! its own `Nats-Msg-Id`. Each figure is a new durable pull consumer reading the
//! whole stream once:
//!
//! - `raw`: the handler does nothing; each message is acked (the floor);
//! - `dedup, memory`: the same handler through a `Deduplicator` on a `MemoryStore`;
//! - `dedup, redis` / `dedup, postgres`: on `RedisStore` / `PostgresStore`
//!   (one claim and one completion round trip per message), one message at a
//!   time and 32 at a time (`JetStream::concurrency`).
//!
//! The deduplicated consumers run through `JetStream::run`; the raw one is the
//! same loop without it.
//!
//! Rounds alternate the cases (`IDEM_BENCH_ROUNDS`, default 3); the best round
//! of each is kept. Run: `cargo bench -p idem-runtime --bench messages --features nats,redis,postgres`.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::{self, stream};
use futures_util::StreamExt as _;
use idem_runtime::message::nats::JetStream;
use idem_runtime::message::Deduplicator;
use idem_runtime::{MemoryStore, PostgresStore, RedisStore, Store};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn consumer(js: &jetstream::Context, stream: &str, name: &str) -> PullConsumer {
    js.create_consumer_on_stream(
        pull::Config {
            durable_name: Some(name.to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(60),
            max_ack_pending: 10_000,
            ..Default::default()
        },
        stream,
    )
    .await
    .unwrap()
}

/// Reads `count` messages, acking each; returns messages per second.
async fn raw(consumer: &PullConsumer, count: usize) -> f64 {
    let started = Instant::now();
    let mut messages = consumer.messages().await.unwrap();
    for _ in 0..count {
        let message = messages.next().await.unwrap().unwrap();
        message.ack().await.unwrap();
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// Reads `count` messages through `JetStream::run`; returns messages per second.
async fn dedup(consumer: &PullConsumer, count: usize, side: &JetStream) -> f64 {
    let started = Instant::now();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let finished = tokio::sync::Notify::new();
    let run = side.run(
        consumer,
        async |_message: &async_nats::jetstream::Message| {
            if done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == count {
                finished.notify_one();
            }
            Ok::<_, std::io::Error>(())
        },
    );
    tokio::select! {
        out = run => panic!("the consumer stopped: {out:?}"),
        _ = finished.notified() => {}
        _ = tokio::time::sleep(std::time::Duration::from_secs(120)) => {
            panic!("stalled after {} of {count} messages", done.load(std::sync::atomic::Ordering::SeqCst))
        }
    }
    count as f64 / started.elapsed().as_secs_f64()
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
        let nats = std::env::var("IDEM_NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".into());
        let js = jetstream::new(async_nats::connect(nats).await.unwrap());
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let name = format!("IDEM-BENCH-{run}");
        let subject = format!("idem.bench.{run}");
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
        // Publish acks are awaited in batches: the client bounds how many may be
        // outstanding, so awaiting none until the end would stall.
        let mut acks = Vec::with_capacity(500);
        for i in 0..count {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("m-{i}").as_str());
            acks.push(
                js.publish_with_headers(subject.clone(), headers, format!("{i}").into())
                    .await
                    .unwrap(),
            );
            if acks.len() == 500 {
                for ack in acks.drain(..) {
                    ack.await.unwrap();
                }
            }
        }
        for ack in acks {
            ack.await.unwrap();
        }

        let pg = std::env::var("IDEM_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let redis =
            std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let redis_store = RedisStore::connect(&redis).await.unwrap().handle();
        let pg_store = PostgresStore::connect(&pg).await.unwrap().handle();
        // (label, store, messages handled at once)
        let stores: Vec<(&str, std::sync::Arc<dyn Store>, usize)> = vec![
            ("memory x32", MemoryStore::new().handle(), 32),
            ("memory", MemoryStore::new().handle(), 1),
            ("redis", redis_store.clone(), 1),
            ("redis x32", redis_store, 32),
            ("postgres", pg_store.clone(), 1),
            ("postgres x32", pg_store, 32),
        ];
        let mut best_raw: f64 = 0.0;
        let mut best: Vec<f64> = vec![0.0; stores.len()];
        for round in 0..rounds {
            let c = consumer(&js, &name, &format!("raw-{round}")).await;
            let r = raw(&c, count).await;
            println!("round {}: raw            {r:>9.0} msg/s", round + 1);
            best_raw = best_raw.max(r);
            for (i, (label, store, concurrency)) in stores.iter().enumerate() {
                let c = consumer(&js, &name, &format!("dedup-{i}-{round}")).await;
                // A namespace per round and case, so every message is fresh to the store.
                let side = JetStream::new(Deduplicator::with_store(
                    store.clone(),
                    format!("bench-{run}-{round}-{i}"),
                ))
                .progress_every(None)
                .concurrency(*concurrency);
                let d = dedup(&c, count, &side).await;
                println!("round {}: dedup, {label:<12} {d:>9.0} msg/s", round + 1);
                best[i] = best[i].max(d);
            }
        }
        println!();
        println!("best of {rounds} rounds, {count} messages per figure, one consumer at a time");
        println!("{:<20} {:>10} {:>9}", "consumer", "msg/s", "vs raw");
        println!("{:<20} {:>10.0} {:>9.3}", "raw", best_raw, 1.0);
        for ((label, _, _), b) in stores.iter().zip(&best) {
            println!(
                "{:<16} {:>10.0} {:>9.3}",
                format!("dedup, {label}"),
                b,
                b / best_raw
            );
        }
        js.delete_stream(&name).await.unwrap();
    });
}
