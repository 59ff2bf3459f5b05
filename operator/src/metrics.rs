//! Prometheus metrics and the small HTTP server for `/metrics`, `/healthz` and `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub reconciliations: IntCounter,
    pub failures: IntCounterVec,
    pub invalid_specs: IntCounter,
    pub rollbacks: IntCounter,
    /// Canary verdicts by result (`promoted`, `rolled_back`).
    pub canary_verdicts: IntCounterVec,
    /// The autoscaler's replica count, per model.
    pub autoscaler_desired_replicas: IntGaugeVec,
    /// The autoscaler's smoothed signal summed over Ready pods, per model.
    pub autoscaler_signal: GaugeVec,
    pub reconcile_duration: Histogram,
    pub leader: IntGauge,
    /// Set once start-up finished (client built, leader election running).
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new_custom(Some("qmodel_operator".to_owned()), None)
            .expect("static prefix is valid");
        let reconciliations = IntCounter::new("reconciliations_total", "Reconciliations started")
            .expect("valid metric");
        let failures = IntCounterVec::new(
            Opts::new(
                "reconcile_errors_total",
                "Reconciliations that failed, by error kind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let invalid_specs = IntCounter::new(
            "invalid_specs_total",
            "Reconciliations that found a spec it cannot serve",
        )
        .expect("valid metric");
        let rollbacks = IntCounter::new(
            "rollbacks_total",
            "Failed rollouts put back on the model's last good version",
        )
        .expect("valid metric");
        let canary_verdicts = IntCounterVec::new(
            Opts::new("canary_verdicts_total", "Canary analyses ended, by result"),
            &["result"],
        )
        .expect("valid metric");
        let autoscaler_desired_replicas = IntGaugeVec::new(
            Opts::new(
                "autoscaler_desired_replicas",
                "Replicas the autoscaler set, by model",
            ),
            &["namespace", "model"],
        )
        .expect("valid metric");
        let autoscaler_signal = GaugeVec::new(
            Opts::new(
                "autoscaler_signal",
                "The autoscaler's smoothed load signal summed over Ready pods, by model",
            ),
            &["namespace", "model"],
        )
        .expect("valid metric");
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new("reconcile_duration_seconds", "Duration of reconciliations")
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .expect("valid metric");
        let leader = IntGauge::new("leader", "1 while this replica holds the leader Lease")
            .expect("valid metric");
        for collector in [
            Box::new(reconciliations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(invalid_specs.clone()),
            Box::new(rollbacks.clone()),
            Box::new(canary_verdicts.clone()),
            Box::new(autoscaler_desired_replicas.clone()),
            Box::new(autoscaler_signal.clone()),
            Box::new(reconcile_duration.clone()),
            Box::new(leader.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            reconciliations,
            failures,
            invalid_specs,
            rollbacks,
            canary_verdicts,
            autoscaler_desired_replicas,
            autoscaler_signal,
            reconcile_duration,
            leader,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(metrics)
}

async fn serve_metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        metrics.render(),
    )
}

async fn readyz(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    async fn get(metrics: &Arc<Metrics>, path: &str) -> (StatusCode, String) {
        let response = router(metrics.clone())
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn serves_metrics_and_probes() {
        let metrics = Arc::new(Metrics::default());
        metrics.reconciliations.inc();
        metrics.failures.with_label_values(&["kube"]).inc();
        let (status, body) = get(&metrics, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("qmodel_operator_reconciliations_total 1"),
            "{body}"
        );
        assert!(
            body.contains(r#"qmodel_operator_reconcile_errors_total{kind="kube"} 1"#),
            "{body}"
        );
        assert_eq!(get(&metrics, "/healthz").await.0, StatusCode::OK);
        assert_eq!(
            get(&metrics, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        metrics.ready.store(true, Ordering::Relaxed);
        assert_eq!(get(&metrics, "/readyz").await.0, StatusCode::OK);
    }
}
