//! What the operator reads from its server pods' own `/metrics` (the Prometheus text format of
//! `qmodel-server`): API request counts by status, the request-latency histogram, and the load
//! gauges. Parsing and aggregation are pure; [`crate::pod_client`] fetches the text.

use std::collections::BTreeMap;

/// Routes that are not API traffic: probes and the scrape itself.
const NOT_API_ROUTES: [&str; 3] = ["/health", "/ready", "/metrics"];

/// One pod's figures, or several pods' summed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodMetrics {
    /// API requests answered (all statuses).
    pub requests: f64,
    /// API requests answered with a 5xx.
    pub errors: f64,
    /// Cumulative request-latency histogram of the API routes: upper bound (seconds, the last
    /// one infinite) to the count of requests at most that slow.
    pub latency_buckets: BTreeMap<Bound, f64>,
    pub in_flight: f64,
    pub queue_depth: f64,
}

/// A histogram bucket's upper bound, ordered (`le` is never NaN).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bound(pub f64);

impl Eq for Bound {}

impl PartialOrd for Bound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// One sample line: `name{label="value",...} number`.
fn sample(line: &str) -> Option<(&str, BTreeMap<&str, &str>, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        number => number.parse().ok()?,
    };
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    // qmodel-server's label values are routes, statuses and numbers: no commas or quotes.
    let labels = labels
        .split(',')
        .filter(|pair| !pair.is_empty())
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key, value.trim_matches('"')))
        })
        .collect();
    Some((name, labels, value))
}

/// The figures of one `/metrics` text; series it does not know are ignored.
pub fn parse(text: &str) -> PodMetrics {
    let mut metrics = PodMetrics::default();
    for (name, labels, value) in text.lines().filter_map(sample) {
        let api = labels
            .get("route")
            .is_some_and(|route| !NOT_API_ROUTES.contains(route));
        match name {
            "qmodel_requests_total" if api => {
                metrics.requests += value;
                if labels.get("status").is_some_and(|s| s.starts_with('5')) {
                    metrics.errors += value;
                }
            }
            "qmodel_request_duration_seconds_bucket" if api => {
                let bound = match labels.get("le") {
                    Some(&"+Inf") => f64::INFINITY,
                    Some(le) => match le.parse() {
                        Ok(bound) => bound,
                        Err(_) => continue,
                    },
                    None => continue,
                };
                *metrics.latency_buckets.entry(Bound(bound)).or_default() += value;
            }
            "qmodel_requests_in_flight" => metrics.in_flight += value,
            "qmodel_queue_depth" => metrics.queue_depth += value,
            _ => {}
        }
    }
    metrics
}

impl PodMetrics {
    /// The figures of several pods together.
    pub fn sum<'a>(pods: impl IntoIterator<Item = &'a PodMetrics>) -> PodMetrics {
        let mut total = PodMetrics::default();
        for pod in pods {
            total.requests += pod.requests;
            total.errors += pod.errors;
            total.in_flight += pod.in_flight;
            total.queue_depth += pod.queue_depth;
            for (bound, count) in &pod.latency_buckets {
                *total.latency_buckets.entry(*bound).or_default() += count;
            }
        }
        total
    }

    /// Share of API requests answered with a 5xx; `None` without requests.
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0.0).then(|| self.errors / self.requests)
    }

    /// The latency quantile `q` (0..1) as Prometheus' `histogram_quantile` estimates it:
    /// linear within the bucket it falls in, the highest finite bound if it falls in the
    /// infinite one; `None` without requests.
    pub fn latency_quantile(&self, q: f64) -> Option<f64> {
        let total = *self.latency_buckets.values().last()?;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for (Bound(upper), count) in &self.latency_buckets {
            if *count >= rank {
                if upper.is_infinite() {
                    return Some(lower);
                }
                let within = count - below;
                let fraction = if within > 0.0 {
                    (rank - below) / within
                } else {
                    1.0
                };
                return Some(lower + (upper - lower) * fraction);
            }
            (lower, below) = (*upper, *count);
        }
        Some(lower)
    }

    /// The load gauge an autoscaler reads.
    pub fn gauge(&self, metric: crate::crd::ScaleMetric) -> f64 {
        match metric {
            crate::crd::ScaleMetric::InFlight => self.in_flight,
            crate::crd::ScaleMetric::QueueDepth => self.queue_depth,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP qmodel_requests_total Requests
# TYPE qmodel_requests_total counter
qmodel_requests_total{route="/embed",status="200"} 95
qmodel_requests_total{route="/embed",status="503"} 3
qmodel_requests_total{route="/embed",status="422"} 2
qmodel_requests_total{route="/ready",status="503"} 40
qmodel_requests_total{route="/metrics",status="200"} 7
qmodel_request_duration_seconds_bucket{route="/embed",le="0.01"} 50
qmodel_request_duration_seconds_bucket{route="/embed",le="0.02"} 90
qmodel_request_duration_seconds_bucket{route="/embed",le="0.04"} 100
qmodel_request_duration_seconds_bucket{route="/embed",le="+Inf"} 100
qmodel_request_duration_seconds_bucket{route="/ready",le="0.01"} 47
qmodel_request_duration_seconds_bucket{route="/ready",le="0.02"} 47
qmodel_request_duration_seconds_bucket{route="/ready",le="0.04"} 47
qmodel_request_duration_seconds_bucket{route="/ready",le="+Inf"} 47
qmodel_request_duration_seconds_sum{route="/embed"} 1.5
qmodel_requests_in_flight 3
qmodel_queue_depth 12
"#;

    #[test]
    fn api_requests_errors_and_gauges_leave_probes_out() {
        let pod = parse(TEXT);
        assert_eq!((pod.requests, pod.errors), (100.0, 3.0));
        assert_eq!(pod.error_rate(), Some(0.03));
        assert_eq!((pod.in_flight, pod.queue_depth), (3.0, 12.0));
        assert_eq!(pod.latency_buckets.len(), 4);
        assert_eq!(pod.latency_buckets[&Bound(f64::INFINITY)], 100.0);
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let pod = parse(TEXT);
        // The 99th request of 100 lies in (0.02, 0.04], 9 of its 10: 0.02 + 0.9 * 0.02.
        let p99 = pod.latency_quantile(0.99).unwrap();
        assert!((p99 - 0.038).abs() < 1e-9, "{p99}");
        let p50 = pod.latency_quantile(0.5).unwrap();
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
    }

    #[test]
    fn a_quantile_in_the_infinite_bucket_is_the_highest_finite_bound() {
        let pod = parse(
            "qmodel_request_duration_seconds_bucket{route=\"/embed\",le=\"0.5\"} 1\n\
             qmodel_request_duration_seconds_bucket{route=\"/embed\",le=\"+Inf\"} 10\n",
        );
        assert_eq!(pod.latency_quantile(0.99), Some(0.5));
    }

    #[test]
    fn no_requests_means_no_rate_and_no_quantile() {
        let pod = parse("qmodel_requests_in_flight 0\n");
        assert_eq!(pod.error_rate(), None);
        assert_eq!(pod.latency_quantile(0.99), None);
    }

    #[test]
    fn pods_sum_bucket_by_bucket() {
        let one = parse(TEXT);
        let both = PodMetrics::sum([&one, &one]);
        assert_eq!(
            (both.requests, both.errors, both.in_flight),
            (200.0, 6.0, 6.0)
        );
        assert_eq!(both.latency_buckets[&Bound(0.02)], 180.0);
        assert_eq!(both.latency_quantile(0.99), one.latency_quantile(0.99));
    }

    #[test]
    fn garbage_lines_are_ignored() {
        let pod = parse("not a metric\nqmodel_queue_depth NaNx\n{}\nqmodel_queue_depth 2\n");
        assert_eq!(pod.queue_depth, 2.0);
    }
}
