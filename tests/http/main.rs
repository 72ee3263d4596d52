//! `IdempotencyLayer` end to end: an axum app on a real socket, a real HTTP
//! client, and every answer of CONTRACT §6.

mod answers;
mod app;
mod bodies;
mod clients;
mod headers;
mod protocol;
mod steps;
mod withheld;
