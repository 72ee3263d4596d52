//! Per-function settings: ttl, lease and what a duplicate does while the first call runs.

use std::time::Duration;

/// What to do when a duplicate arrives while the first call is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InProgress {
    /// Fail at once with [`Error::InProgress`](crate::Error::InProgress).
    Reject,
    /// Wait up to this long for the first call's outcome (then replay it, or run
    /// if the first call released its claim); after that, [`Error::InProgress`](crate::Error::InProgress).
    Wait(Duration),
}

/// What a call does when it continues an earlier attempt that did not finish
/// ([`Attempt::took_over`](crate::Attempt::took_over)): a crash, a stall past
/// the lease, or an error or cancellation after recorded steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnTakeover {
    /// Run the body (the default): recorded steps replay, the rest run.
    #[default]
    Run,
    /// Do not run it: fail with [`Error::TakenOver`](crate::Error::TakenOver),
    /// and keep failing every retry of the call until a person has reconciled
    /// what the earlier attempt did (a kept mark, on stores that keep steps,
    /// until the call's ttl passes or the record is removed).
    Fail,
}

/// Per-function settings: ttl, lease and in-progress policy. (The namespace is
/// the key's own: [`Key::namespace`](crate::Key::namespace).)
///
/// Durations are kept between 1 ms and [`MAX_DURATION`](crate::store::MAX_DURATION)
/// (100 years, the attribute's own limit): the builder methods cap them, and the
/// engine caps fields set directly, so `Duration::MAX` means "as long as idem allows"
/// on every store instead of an overflow.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// How long a completed outcome is replayed.
    pub ttl: Duration,
    /// How long a claim is held without renewal.
    pub lease: Duration,
    /// What a duplicate does while the first call runs.
    pub in_progress: InProgress,
    /// What a call that continues an unfinished attempt does.
    pub on_takeover: OnTakeover,
}

impl Default for Options {
    fn default() -> Self {
        Options::new()
    }
}

impl Options {
    /// The defaults: ttl 24 h, lease 30 s, reject duplicates in progress.
    pub const fn new() -> Self {
        Options {
            ttl: Duration::from_secs(24 * 60 * 60),
            lease: Duration::from_secs(30),
            in_progress: InProgress::Reject,
            on_takeover: OnTakeover::Run,
        }
    }

    /// Sets the ttl (capped to 1 ms – 100 years).
    pub const fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = bounded(ttl);
        self
    }

    /// Sets the lease (capped to 1 ms – 100 years).
    pub const fn lease(mut self, lease: Duration) -> Self {
        self.lease = bounded(lease);
        self
    }

    /// Sets the in-progress policy (a wait is capped to 100 years).
    pub const fn in_progress(mut self, policy: InProgress) -> Self {
        self.in_progress = match policy {
            InProgress::Wait(d) if d.as_secs() >= crate::store::MAX_DURATION.as_secs() => {
                InProgress::Wait(crate::store::MAX_DURATION)
            }
            other => other,
        };
        self
    }

    /// Sets what a call that continues an unfinished attempt does.
    pub const fn on_takeover(mut self, policy: OnTakeover) -> Self {
        self.on_takeover = policy;
        self
    }

    /// These options with every duration within idem's limits (fields are public,
    /// so the engine applies the builder's caps once more before using them).
    pub fn bounded(&self) -> Options {
        Options::new()
            .ttl(self.ttl)
            .lease(self.lease)
            .in_progress(self.in_progress)
            .on_takeover(self.on_takeover)
    }
}

/// `d` within 1 ms – [`MAX_DURATION`](crate::store::MAX_DURATION), in a `const fn`.
const fn bounded(d: Duration) -> Duration {
    if d.as_secs() >= crate::store::MAX_DURATION.as_secs() {
        crate::store::MAX_DURATION
    } else if d.as_secs() == 0 && d.subsec_nanos() < 1_000_000 {
        Duration::from_millis(1)
    } else {
        d
    }
}
