//! The attribute: `#[idempotent]` on `MemoryStore` (or a store that fails on
//! purpose), one module per topic. Each test asserts how many times the body
//! ran and what every caller got. `ui` holds the trybuild cases: what the
//! attribute refuses at compile time, and the signatures it must accept.

mod async_trait_self_path;
mod cancellation;
mod concurrency;
mod corrupt;
mod current;
mod dyn_traits;
mod engine_edges;
mod errors;
mod faults;
mod fingerprint;
mod lease;
mod missing_key;
mod namespaces;
mod nesting;
mod outage;
mod reentrancy;
mod replay;
mod signatures;
mod steps;
mod ui;
mod unordered;

use std::sync::atomic::{AtomicUsize, Ordering};

pub use idem_tests::FaultyStore;
use serde::{Deserialize, Serialize};

/// The error type the test services return.
#[derive(Debug, Serialize, Deserialize)]
pub enum AppError {
    /// idem's own error (never stored).
    #[serde(skip)]
    Idem(idem_runtime::Error),
    /// A business failure that may be cached.
    Declined(String),
    /// A transient business failure.
    Unavailable,
}

impl From<idem_runtime::Error> for AppError {
    fn from(e: idem_runtime::Error) -> Self {
        AppError::Idem(e)
    }
}

impl AppError {
    /// Whether this is idem's `InProgress`.
    pub fn is_in_progress(&self) -> bool {
        matches!(self, AppError::Idem(idem_runtime::Error::InProgress { .. }))
    }

    /// Only declines are final and worth caching.
    pub fn is_final(&self) -> bool {
        matches!(self, AppError::Declined(_))
    }
}

/// A counter of body executions.
#[derive(Default)]
pub struct Runs(AtomicUsize);

impl Runs {
    /// Records one execution and returns its number (1-based).
    pub fn hit(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// How many times the body ran.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}
