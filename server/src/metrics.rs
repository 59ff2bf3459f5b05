//! Prometheus metrics. One registry per server instance (not the global one), so that several
//! in-process servers in one test binary do not share counters.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Finished HTTP requests by matched route and status code.
    pub requests: IntCounterVec,
    /// Whole-request latency by route.
    pub request_duration: HistogramVec,
    /// Time one request spent in tokenization.
    pub tokenization_duration: Histogram,
    /// Time one input waited between entering the queue and its batch starting.
    pub queue_duration: Histogram,
    /// Time one batch spent in the backend.
    pub inference_duration: Histogram,
    /// Inputs per batch.
    pub batch_size: Histogram,
    /// Tokens per batch (longest input x inputs): what the backend computes.
    pub batch_tokens: Histogram,
    /// Inputs waiting in the queue, not yet in a batch.
    pub queue_depth: IntGauge,
    /// API requests received and not yet answered (probes and /metrics not counted): the
    /// signal the operator's autoscaler scales on.
    pub in_flight: IntGauge,
    /// Inputs dropped before compute because their client went away or timed out.
    pub cancelled_inputs: IntCounter,
}

/// Latency buckets from 0.5 ms to ~30 s.
fn duration_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0005, 2.0, 17).expect("static bucket parameters are valid")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "qmodel_requests_total",
                "Requests (HTTP routes, gRPC methods) by route and status",
            ),
            &["route", "status"],
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "qmodel_request_duration_seconds",
                "Request latency by route (HTTP route or gRPC method)",
            )
            .buckets(duration_buckets()),
            &["route"],
        )
        .expect("valid metric");
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric")
        };
        let tokenization_duration = histogram(
            "qmodel_tokenization_duration_seconds",
            "Tokenization time per request",
            duration_buckets(),
        );
        let queue_duration = histogram(
            "qmodel_queue_duration_seconds",
            "Time an input waited in the queue before its batch started",
            duration_buckets(),
        );
        let inference_duration = histogram(
            "qmodel_inference_duration_seconds",
            "Backend time per batch",
            duration_buckets(),
        );
        let batch_size = histogram(
            "qmodel_batch_size",
            "Inputs per batch",
            prometheus::exponential_buckets(1.0, 2.0, 11).expect("static bucket parameters"),
        );
        let batch_tokens = histogram(
            "qmodel_batch_tokens",
            "Tokens per batch, padding included",
            prometheus::exponential_buckets(8.0, 2.0, 14).expect("static bucket parameters"),
        );
        let queue_depth =
            IntGauge::new("qmodel_queue_depth", "Inputs waiting for a batch").expect("valid");
        let in_flight = IntGauge::new(
            "qmodel_requests_in_flight",
            "API requests being served (probes and /metrics excluded)",
        )
        .expect("valid");
        let cancelled_inputs = IntCounter::new(
            "qmodel_cancelled_inputs_total",
            "Inputs skipped before compute because their request was gone",
        )
        .expect("valid metric");

        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(tokenization_duration.clone()),
            Box::new(queue_duration.clone()),
            Box::new(inference_duration.clone()),
            Box::new(batch_size.clone()),
            Box::new(batch_tokens.clone()),
            Box::new(queue_depth.clone()),
            Box::new(in_flight.clone()),
            Box::new(cancelled_inputs.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            request_duration,
            tokenization_duration,
            queue_duration,
            inference_duration,
            batch_size,
            batch_tokens,
            queue_depth,
            in_flight,
            cancelled_inputs,
        }
    }

    /// One finished request (HTTP or gRPC): its latency by route, and its count by route and
    /// status.
    pub fn observe_request(&self, route: &str, status: &str, started: std::time::Instant) {
        self.request_duration
            .with_label_values(&[route])
            .observe(started.elapsed().as_secs_f64());
        self.requests.with_label_values(&[route, status]).inc();
    }

    /// Counts one API request in flight until the returned guard drops (also when the client
    /// goes away and the request's future is dropped).
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One request counted in `qmodel_requests_in_flight`.
pub struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
