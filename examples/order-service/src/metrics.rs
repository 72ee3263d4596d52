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
            let labels = labels_of(labels)?;
            let label = |name: &str| {
                labels
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
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

/// `name="value",…` as the text format writes labels: values quoted, with
/// `\\`, `\"` and `\n` escaped (a namespace may hold commas or quotes).
fn labels_of(text: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((name.trim_start_matches(',').to_owned(), value));
        rest = &after[end + 1..];
    }
    Some(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_with_commas_and_quotes_are_read_whole() {
        let text = "# TYPE idem_outcomes_total counter\n\
            idem_outcomes_total{namespace=\"a::f<u8, \\\"x\\\">\",store=\"sqlite\",outcome=\"claimed\"} 3\n\
            idem_outcomes_total{namespace=\"b\",store=\"redis\",outcome=\"replayed\"} 1\n";
        let got = outcomes(text);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].namespace, "a::f<u8, \"x\">");
        assert_eq!(
            (got[0].store.as_str(), got[0].outcome.as_str(), got[0].value),
            ("sqlite", "claimed", 3.0)
        );
        assert_eq!((got[1].namespace.as_str(), got[1].value), ("b", 1.0));
    }
}
