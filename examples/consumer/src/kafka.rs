//! The same demo on Kafka: payment events on the topic [`TOPIC`], keyed by
//! the `idempotency-key` header, consumed by the group [`CONSUMER`] through
//! idem's Kafka adapter, which commits each offset only once its message is
//! recorded (or known to be a duplicate), in order.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use idem_runtime::message::kafka::Kafka;
use idem_runtime::message::{MessageId, Outcome};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Header, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::{events, ConsumerError, Line, PaymentEvent, Recorder, Report, CONSUMER};

/// The topic the payment events are published to.
pub const TOPIC: &str = "payments-recorded";

fn kafka(e: impl std::fmt::Display) -> ConsumerError {
    ConsumerError::Kafka(e.to_string())
}

/// Creates [`TOPIC`] (one partition) unless it exists.
async fn setup(bootstrap: &str) -> Result<(), ConsumerError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(kafka)?;
    let created = admin
        .create_topics(
            &[NewTopic::new(TOPIC, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(kafka)?;
    for result in created {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(kafka(code)),
        }
    }
    Ok(())
}

/// Sends `event` with its payment id in the `idempotency-key` header.
async fn publish(producer: &FutureProducer, event: &PaymentEvent) -> Result<(), ConsumerError> {
    let payload = serde_json::to_vec(event).map_err(kafka)?;
    let record = FutureRecord::to(TOPIC)
        .key(event.payment_id.as_str())
        .payload(&payload)
        .headers(OwnedHeaders::new().insert(Header {
            key: "idempotency-key",
            value: Some(event.payment_id.as_str()),
        }));
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| kafka(e))?;
    Ok(())
}

/// Publishes 8 payment events of this run and 3 of them again, makes the
/// first delivery of one fail, and consumes until all 11 messages are done.
pub async fn demo(bootstrap: &str, db_url: &str) -> Result<Report, ConsumerError> {
    setup(bootstrap).await?;
    let (run, events) = events();
    let recorder = Recorder::open(db_url)
        .await?
        .fail_first_delivery_of(&events[4].payment_id);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "30000")
        .create()
        .map_err(kafka)?;
    for event in events.iter().chain([&events[1], &events[3], &events[6]]) {
        publish(&producer, event).await?;
    }
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", CONSUMER)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(kafka)?;
    consumer.subscribe(&[TOPIC]).map_err(kafka)?;

    let side = Kafka::new(recorder.deduplicator().clone())
        .backoff(Duration::from_millis(50), Duration::from_secs(5));
    let lines = Mutex::new(Vec::<Line>::new());
    let readings = Mutex::new(HashMap::<i64, i64>::new());
    let expected = 11;
    // Done: recorded or skipped, and committed.
    let done = || {
        lines
            .lock()
            .map(|l| {
                l.iter()
                    .filter(|l| {
                        l.outcome.starts_with("processed") || l.outcome.starts_with("skipped")
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    let consume = side.run_with(
        &consumer,
        async |message: &BorrowedMessage<'_>, id: &MessageId| {
            let out = recorder
                .record(id, message.payload().unwrap_or_default())
                .await;
            let payment_id = id.given().unwrap_or_default().to_owned();
            if payment_id.starts_with(&format!("pay-{run}-")) {
                let delivery = {
                    let mut readings = readings.lock().expect("readings");
                    let n = readings.entry(message.offset()).or_default();
                    *n += 1;
                    *n
                };
                let outcome = match &out {
                    Ok(Outcome::Processed(())) => "processed: recorded, committed".to_owned(),
                    Ok(Outcome::Duplicate) => "skipped: already recorded, committed".to_owned(),
                    Ok(_) => "in progress elsewhere: read again".to_owned(),
                    Err(e) => format!("failed ({e}): read again"),
                };
                lines.lock().expect("lines").push(Line {
                    payment_id,
                    delivery,
                    outcome,
                });
            }
            out
        },
    );
    let finished = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while done() < expected {
            if tokio::time::Instant::now() > deadline {
                return Err(ConsumerError::Timeout(expected - done()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    };
    tokio::select! {
        out = consume => return Err(out.map_or_else(kafka, |()| kafka("the consumer stopped"))),
        out = finished => out?,
    }
    let mut report = Report {
        lines: lines.into_inner().unwrap_or_default(),
        recorded: Vec::new(),
    };
    for event in &events {
        let n = recorder.recorded(&event.payment_id).await?;
        report.recorded.push((event.payment_id.clone(), n));
    }
    Ok(report)
}
