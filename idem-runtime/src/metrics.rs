//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`).
//!
//! idem records what it decides and how long the store took; the application
//! picks where the numbers go by installing a recorder (a Prometheus exporter,
//! `metrics-exporter-opentelemetry` for OpenTelemetry, a statsd sink). Without
//! a recorder the facade drops every event; without the feature the calls are
//! compiled out.
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | [`idem_outcomes_total`](OUTCOMES) | counter | `namespace`, `store`, `outcome` | one per decision, below |
//! | [`idem_claim_duration_seconds`](CLAIM_DURATION) | histogram | `namespace`, `store` | each claim round trip to the store |
//! | [`idem_complete_duration_seconds`](COMPLETE_DURATION) | histogram | `namespace`, `store` | each completion, retries included |
//!
//! `namespace` is the key's namespace (the function's path for `#[idempotent]`,
//! the layer's or consumer's namespace), `store` is [`Store::kind`](crate::Store::kind)
//! (`memory`, `sqlite`, `postgres`, `redis`, `redis-cluster`).
//!
//! `outcome` is one of:
//!
//! | outcome | counted when |
//! |---|---|
//! | `claimed` | a claim was won on a fresh key: the work runs |
//! | `taken_over` | a claim was won on a key an earlier attempt did not finish (its lease lapsed, or it kept steps) |
//! | `replayed` | the key was completed: the stored outcome is replayed |
//! | `in_progress` | another call holds the key (after any wait): the caller is refused |
//! | `key_reused` | the key is held or completed with another request's fingerprint |
//! | `completed` | the outcome was recorded |
//! | `released_after_error` | the claim was released instead of recorded (an error the codec does not cache, a status not stored, an outcome that cannot be encoded, a step mismatch) |
//! | `cancelled` | the caller went away (dropped or panicked) and the claim was released |
//! | `lease_lost` | the completion found another caller holding the key: nothing was recorded |
//! | `store_error` | the store failed a claim (the work did not run) or a completion |
//!
//! A duplicate that waits for the running call and then replays counts once,
//! as `replayed`. Every call is thus counted once by its claim (`claimed`,
//! `taken_over`, `replayed`, `in_progress`, `key_reused`, `store_error`), and
//! every claim won once more by how it ended.
//!
//! Why `metrics` rather than OpenTelemetry: it is a facade in the manner of
//! `log` and `tracing` — a library depends on it alone (one small crate), the
//! application chooses the exporter, and OpenTelemetry is one of them. Depending
//! on the OpenTelemetry SDK would make that choice for every user.

use std::time::Duration;

/// The counter of decisions: `idem_outcomes_total{namespace, store, outcome}`.
pub const OUTCOMES: &str = "idem_outcomes_total";
/// The claim latency histogram: `idem_claim_duration_seconds{namespace, store}`.
pub const CLAIM_DURATION: &str = "idem_claim_duration_seconds";
/// The completion latency histogram: `idem_complete_duration_seconds{namespace, store}`.
pub const COMPLETE_DURATION: &str = "idem_complete_duration_seconds";

/// What a claim or an attempt came to, as the `outcome` label spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Claimed,
    TakenOver,
    Replayed,
    InProgress,
    KeyReused,
    Completed,
    ReleasedAfterError,
    Cancelled,
    LeaseLost,
    StoreError,
}

impl Outcome {
    #[cfg(feature = "metrics")]
    fn label(self) -> &'static str {
        match self {
            Outcome::Claimed => "claimed",
            Outcome::TakenOver => "taken_over",
            Outcome::Replayed => "replayed",
            Outcome::InProgress => "in_progress",
            Outcome::KeyReused => "key_reused",
            Outcome::Completed => "completed",
            Outcome::ReleasedAfterError => "released_after_error",
            Outcome::Cancelled => "cancelled",
            Outcome::LeaseLost => "lease_lost",
            Outcome::StoreError => "store_error",
        }
    }
}

/// Describes idem's metrics (help text and units) to the installed recorder.
/// Call it once after installing the recorder; exporters that print help text
/// (Prometheus) show it. Without the `metrics` feature it does nothing.
pub fn describe() {
    #[cfg(feature = "metrics")]
    {
        metrics::describe_counter!(
            OUTCOMES,
            metrics::Unit::Count,
            "idempotent calls by what idem decided: claimed, taken_over, replayed, in_progress, \
             key_reused, completed, released_after_error, cancelled, lease_lost, store_error"
        );
        metrics::describe_histogram!(
            CLAIM_DURATION,
            metrics::Unit::Seconds,
            "time of one claim round trip to the store"
        );
        metrics::describe_histogram!(
            COMPLETE_DURATION,
            metrics::Unit::Seconds,
            "time to record an outcome, retries included"
        );
    }
}

/// Counts one `outcome` for a key of `namespace` on a store of kind `store`.
#[inline]
pub(crate) fn outcome(namespace: &str, store: &'static str, outcome: Outcome) {
    #[cfg(feature = "metrics")]
    metrics::counter!(
        OUTCOMES,
        "namespace" => namespace.to_owned(),
        "store" => store,
        "outcome" => outcome.label(),
    )
    .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (namespace, store, outcome);
}

/// Records one claim round trip.
#[inline]
pub(crate) fn claim_duration(namespace: &str, store: &'static str, took: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!(CLAIM_DURATION, "namespace" => namespace.to_owned(), "store" => store)
        .record(took.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = (namespace, store, took);
}

/// Records one completion (its retries included).
#[inline]
pub(crate) fn complete_duration(namespace: &str, store: &'static str, took: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!(COMPLETE_DURATION, "namespace" => namespace.to_owned(), "store" => store)
        .record(took.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = (namespace, store, took);
}

/// A timer that costs nothing without the `metrics` feature.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timer {
    #[cfg(feature = "metrics")]
    started: std::time::Instant,
}

impl Timer {
    #[inline]
    pub(crate) fn start() -> Self {
        Timer {
            #[cfg(feature = "metrics")]
            started: std::time::Instant::now(),
        }
    }

    #[inline]
    pub(crate) fn elapsed(self) -> Duration {
        #[cfg(feature = "metrics")]
        return self.started.elapsed();
        #[cfg(not(feature = "metrics"))]
        Duration::ZERO
    }
}
