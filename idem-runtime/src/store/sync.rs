//! The locks and atomics of the in-process stores (`MemoryStore`,
//! `ReplayCache`): std's, or loom's when built with `--cfg idem_loom`, so the loom
//! tests explore every interleaving of their shard locks and token counter:
//!
//! ```text
//! RUSTFLAGS="--cfg idem_loom" CARGO_TARGET_DIR=target/loom cargo test -p idem-runtime --release --lib loom
//! ```
//!
//! A cfg and never a cargo feature: builds with `--all-features` (the test
//! script's) must keep std's types, and loom's work only inside `loom::model`.
//! Not the customary `--cfg loom`: RUSTFLAGS reach every crate, and Tokio
//! compiles out `tokio::net` under `loom`, which breaks axum (a dev-dependency)
//! and anything else built on it; `idem_loom` is read by this crate alone.

#[cfg(idem_loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(idem_loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(not(idem_loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(idem_loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

/// What picks a key's shard: seeded anew for each store, except under loom,
/// where every run of a test must lock the same shards in the same order.
#[cfg(not(idem_loom))]
pub(crate) type ShardHasher = foldhash::fast::RandomState;
#[cfg(idem_loom)]
pub(crate) type ShardHasher = foldhash::fast::FixedState;

/// Runs `f` under loom, in every interleaving of the threads it spawns, and
/// prints how many it explored.
#[cfg(all(test, idem_loom))]
pub(crate) fn explore(name: &str, f: impl Fn() + Send + Sync + 'static) {
    // std's counter on purpose: it counts loom's runs from outside them.
    use std::sync::atomic::{AtomicUsize, Ordering};
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&runs);
    loom::model(move || {
        counted.fetch_add(1, Ordering::Relaxed);
        f();
    });
    println!(
        "loom: {name}: {} interleavings",
        runs.load(Ordering::Relaxed)
    );
}
