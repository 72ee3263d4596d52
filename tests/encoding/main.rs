//! What keys and outcomes encode to: the canonical encoding's golden vectors
//! (a changed byte is a breaking change) and its properties, client keys, and
//! exact replays of every value a result can hold, on every store.

mod canonical;
mod client_keys;
mod exact;
mod golden;
