//! What idem logs, read back: the tests that install the global `tracing`
//! subscriber share this binary (one subscriber per process) and its capture,
//! each reading the lines of its own namespace, key or message. One module a
//! part: the attribute, the HTTP layer, a message consumer.

mod attribute;
mod http;
mod message;
