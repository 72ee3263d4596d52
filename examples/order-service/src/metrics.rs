//! `GET /metrics`: idem's counters and latency histograms (and anything else
//! recorded through the `metrics` facade) in the Prometheus text format, by
//! `metrics-exporter-prometheus`.
//!
//! The recorder is process-wide: the first server started in a process installs
//! it, and every server in the process serves the same numbers. If another
//! recorder was installed first (an application embedding this service with
//! its own exporter), `/metrics` answers 404 and the numbers go to that one.

use std::sync::OnceLock;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets, in seconds: 100 µs to 2.5 s (an embedded SQLite claim is
/// tens of microseconds, a networked store's a fraction of a millisecond to a
/// few, and a completion that retries takes up to a few hundred).
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and describes idem's
/// metrics to it. Returns the handle that renders them, or `None` when
/// another recorder was installed first.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), BUCKETS)
                .expect("the buckets are not empty");
            match builder.install_recorder() {
                Ok(handle) => {
                    idem_runtime::metrics::describe();
                    Some(handle)
                }
                Err(err) => {
                    tracing::warn!(error = %err, "metrics: another recorder is installed; /metrics is off");
                    None
                }
            }
        })
        .as_ref()
}

/// The `GET /metrics` handler.
pub async fn serve() -> Response {
    match install() {
        Some(handle) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
            .into_response(),
        None => crate::server::problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "metrics go to the application's own recorder",
        ),
    }
}

/// One sample of `idem_outcomes_total` read back from the text format.
#[derive(Debug, Clone, PartialEq)]
pub struct OutcomeSample {
    /// The `namespace` label.
    pub namespace: String,
    /// The `store` label.
    pub store: String,
    /// The `outcome` label.
    pub outcome: String,
    /// The count.
    pub value: f64,
}

/// The `idem_outcomes_total` samples in a Prometheus text exposition (what
/// `GET /metrics` answers), for the demo and tests.
pub fn outcomes(text: &str) -> Vec<OutcomeSample> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(idem_runtime::metrics::OUTCOMES)?;
            let (labels, value) = rest.strip_prefix('{')?.rsplit_once("} ")?;
            let label = |name: &str| {
                labels.split(',').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    (k == name).then(|| v.trim_matches('"').to_owned())
                })
            };
            Some(OutcomeSample {
                namespace: label("namespace")?,
                store: label("store")?,
                outcome: label("outcome")?,
                value: value.trim().parse().ok()?,
            })
        })
        .collect()
}
