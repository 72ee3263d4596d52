//! The stores against real servers (PostgreSQL, Redis and a Redis Cluster,
//! SQLite files): the conformance suite on each, then what a suite cannot say
//! alone — `tx =` transactions, several OS processes, cancellation, lost
//! replies and outages through a TCP proxy that cuts connections, Redis
//! faults, the replay cache, and durations at their limits.

mod cancellation;
mod conformance;
mod durations;
mod layout_review;
mod lost_replies;
mod multiprocess;
mod pg_durability;
mod proxy;
mod redis_faults;
mod replay_cache;
mod replica_ack;
mod replica_ack_review;
mod sql;
mod steps;
mod transactions;
mod tx_refused_outcome;
mod uncommitted_claims;
