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
