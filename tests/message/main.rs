//! The message adapters against a real NATS JetStream server: effects exactly
//! once in PostgreSQL (`process_in_tx`) across redeliveries, failures and a
//! SIGKILLed consumer process; fallback ids across recreated streams; a
//! server of the test's own restarted under a running consumer.

mod kafka;
mod kafka_mock;
mod nats;
mod records;
mod recreated;
mod restart;
mod steps;

/// The Kafka tests take turns. librdkafka 2.12 crashed once (SIGSEGV in its
/// metadata cache) with several tests' clients alive in this process while a
/// topic was deleted; one test's clients at a time keeps that out of the way.
static KAFKA: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
