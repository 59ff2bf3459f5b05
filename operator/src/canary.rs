//! Canary analysis verdicts: a pure function from the canary's settings, its previous status
//! and what this reconcile measured (its pods' readiness, the canary's and the stable pods'
//! own `/metrics`, the quality gate) to continue, promote or fail.
//!
//! Phases (the operator README draws them): `Starting` until every canary pod is Ready, then
//! `Analysing` for `analysisSeconds`; the quality gate runs once at the start of the analysis
//! and fails it at once; the error rate and latency checks decide at its end, on everything
//! the canary pods answered. Pass: `Promoting` (the stable Deployment rolls out the version)
//! and `Promoted` once it has. Fail: `RolledBack`, the failing check and its value in the
//! rollback's message.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{CanaryCheck, CanaryPhase, CanarySpec, CanaryStatus};
use crate::pod_metrics::PodMetrics;

pub const QUALITY_GATE_FAILED: &str = "QualityGateFailed";
pub const ERROR_RATE_EXCEEDED: &str = "ErrorRateExceeded";
pub const LATENCY_EXCEEDED: &str = "LatencyExceeded";
pub const INSUFFICIENT_TRAFFIC: &str = "InsufficientTraffic";
pub const METRICS_UNAVAILABLE: &str = "MetricsUnavailable";
/// A canary pod that cannot run for another reason than the rollout's named ones.
pub const CANARY_POD_FAILED: &str = "CanaryPodFailed";
/// Every reason a canary fails with of its own (the pods' causes are the rollout's).
pub const REASONS: [&str; 6] = [
    QUALITY_GATE_FAILED,
    ERROR_RATE_EXCEEDED,
    LATENCY_EXCEEDED,
    INSUFFICIENT_TRAFFIC,
    METRICS_UNAVAILABLE,
    CANARY_POD_FAILED,
];

pub const ERROR_RATE: &str = "errorRate";
pub const P99_SECONDS: &str = "p99Seconds";
pub const P99_RATIO: &str = "p99Ratio";
pub const MIN_COSINE: &str = "minCosine";
pub const MIN_RANK_AGREEMENT: &str = "minRankAgreement";

/// What one reconcile measured of a canary.
pub struct Observed<'a> {
    pub ready_pods: i32,
    /// Once the window is over ([`window_over`]): the canary pods' metrics and the stable
    /// pods' (the latency baseline), each summed, or why the canary's could not be read.
    pub metrics: Option<Result<(&'a PodMetrics, &'a PodMetrics), String>>,
    /// The quality gate, when it ran in this reconcile ([`needs_quality_gate`]): the measured
    /// minimum (cosine or rank agreement) or why it could not be measured.
    pub quality: Option<Result<f64, String>>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Continue(CanaryStatus),
    Promote(CanaryStatus),
    Fail {
        status: CanaryStatus,
        reason: &'static str,
        message: String,
    },
}

/// A measured value as status shows it: four decimals at most.
pub fn figure(value: f64) -> String {
    let text = format!("{value:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text.is_empty() || text == "-" || text == "-0" {
        "0".to_owned()
    } else {
        text.to_owned()
    }
}

fn check(name: &str, value: Option<f64>, limit: f64, at_most: bool) -> CanaryCheck {
    let (value, passed) = match value {
        Some(value) if at_most => (figure(value), value <= limit),
        Some(value) => (figure(value), value >= limit),
        None => ("n/a".to_owned(), true),
    };
    CanaryCheck {
        name: name.to_owned(),
        value,
        limit: format!("{} {}", if at_most { "<=" } else { ">=" }, figure(limit)),
        passed,
    }
}

/// The quality gate's check: rankings for a reranker, embeddings otherwise.
fn quality_check_name(rerank: bool) -> &'static str {
    if rerank {
        MIN_RANK_AGREEMENT
    } else {
        MIN_COSINE
    }
}

/// The canary of `status` failed for `reason`: it ends `RolledBack` with `message`.
pub fn fail(mut status: CanaryStatus, reason: &'static str, message: String) -> Verdict {
    status.phase = CanaryPhase::RolledBack;
    status.message = message.clone();
    Verdict::Fail {
        status,
        reason,
        message,
    }
}

/// Whether this reconcile has to run the quality gate: one is configured, every canary pod is
/// Ready, and it has not run for this canary yet.
pub fn needs_quality_gate(spec: &CanarySpec, status: &CanaryStatus, ready_pods: i32) -> bool {
    spec.quality_gate.is_some()
        && ready_pods >= spec.replicas
        && !status
            .checks
            .iter()
            .any(|c| c.name == MIN_COSINE || c.name == MIN_RANK_AGREEMENT)
}

/// Whether the analysis window of `status` is over at `now`: the metrics decide.
pub fn window_over(spec: &CanarySpec, status: &CanaryStatus, now: &Time) -> bool {
    status.analysis_started.as_ref().is_some_and(|started| {
        now.0.as_second() - started.0.as_second() >= i64::from(spec.analysis_seconds)
    })
}

/// Seconds until the window of `status` is over (0 once it is); `None` before it started.
pub fn seconds_left(spec: &CanarySpec, status: &CanaryStatus, now: &Time) -> Option<i64> {
    let started = status.analysis_started.as_ref()?;
    Some((started.0.as_second() + i64::from(spec.analysis_seconds) - now.0.as_second()).max(0))
}

/// Judges the canary of `previous.version`; `rerank`: its quality gate compares rankings
/// (minRankAgreement), not embeddings (minCosine). Messages of a continuing canary stay the
/// same from one reconcile to the next, so waiting writes no status.
pub fn judge(
    spec: &CanarySpec,
    ready_timeout_seconds: i32,
    rerank: bool,
    previous: &CanaryStatus,
    observed: &Observed,
    now: &Time,
) -> Verdict {
    let mut status = previous.clone();
    let started = match &status.analysis_started {
        Some(started) => started.clone(),
        None if observed.ready_pods >= spec.replicas => {
            status.analysis_started = Some(now.clone());
            now.clone()
        }
        None => {
            status.phase = CanaryPhase::Starting;
            status.message = format!("waiting for {} canary pods to be Ready", spec.replicas);
            return Verdict::Continue(status);
        }
    };
    status.phase = CanaryPhase::Analysing;

    // The gate's figure is kept from the reconcile that measured it.
    let quality_name = quality_check_name(rerank);
    match (&observed.quality, &spec.quality_gate) {
        (Some(Err(why)), _) => {
            return fail(
                status,
                QUALITY_GATE_FAILED,
                format!("quality gate could not be measured: {why}"),
            );
        }
        (Some(Ok(value)), Some(gate)) => {
            let limit = if rerank {
                gate.min_rank_agreement
            } else {
                gate.min_cosine
            };
            let measured = check(quality_name, Some(*value), limit, false);
            status.checks.retain(|c| c.name != quality_name);
            status.checks.push(measured.clone());
            if !measured.passed {
                return fail(
                    status,
                    QUALITY_GATE_FAILED,
                    format!(
                        "quality gate failed: {} {} (limit {})",
                        measured.name, measured.value, measured.limit
                    ),
                );
            }
        }
        _ => {}
    }
    let gate_pending =
        spec.quality_gate.is_some() && !status.checks.iter().any(|c| c.name == quality_name);
    let elapsed = now.0.as_second() - started.0.as_second();
    let window = i64::from(spec.analysis_seconds);
    if elapsed < window || gate_pending {
        status.message = format!(
            "analysing for {window} s from {}",
            started.0.strftime("%Y-%m-%dT%H:%M:%SZ")
        );
        return Verdict::Continue(status);
    }
    let grace = window + i64::from(ready_timeout_seconds);
    let (canary, stable) = match &observed.metrics {
        Some(Ok(metrics)) => *metrics,
        Some(Err(why)) if elapsed >= grace => {
            return fail(
                status,
                METRICS_UNAVAILABLE,
                format!("the canary's metrics could not be read: {why}"),
            );
        }
        Some(Err(_)) | None => {
            status.message = "reading the canary's metrics".to_owned();
            return Verdict::Continue(status);
        }
    };
    let requests = canary.requests as i64;
    if requests < spec.min_requests {
        let message = format!(
            "waiting for traffic: the checks need {} canary requests",
            spec.min_requests
        );
        if elapsed < grace {
            status.message = message;
            return Verdict::Continue(status);
        }
        return fail(
            status,
            INSUFFICIENT_TRAFFIC,
            format!("{message}, it answered {requests}"),
        );
    }
    let canary_p99 = canary.latency_quantile(0.99);
    let ratio = canary_p99
        .zip(stable.latency_quantile(0.99))
        .filter(|(_, stable)| *stable > 0.0)
        .map(|(canary, stable)| canary / stable);
    let mut checks = vec![check(
        ERROR_RATE,
        canary.error_rate(),
        spec.max_error_rate,
        true,
    )];
    if let Some(limit) = spec.max_p99_seconds {
        checks.push(check(P99_SECONDS, canary_p99, limit, true));
    }
    checks.push(check(P99_RATIO, ratio, spec.max_p99_ratio, true));
    checks.extend(
        status
            .checks
            .iter()
            .filter(|c| c.name == quality_name)
            .cloned(),
    );
    status.checks = checks;
    if let Some(failed) = status.checks.iter().find(|c| !c.passed).cloned() {
        let reason = if failed.name == ERROR_RATE {
            ERROR_RATE_EXCEEDED
        } else {
            LATENCY_EXCEEDED
        };
        return fail(
            status,
            reason,
            format!(
                "{} {} (limit {}) over {requests} canary requests",
                failed.name, failed.value, failed.limit
            ),
        );
    }
    status.phase = CanaryPhase::Promoting;
    status.message = format!(
        "passed after {elapsed} s and {requests} requests: {}",
        status
            .checks
            .iter()
            .map(|c| format!("{} {}", c.name, c.value))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Verdict::Promote(status)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    use super::*;
    use crate::pod_metrics::parse;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    fn spec(extra: serde_json::Value) -> CanarySpec {
        let mut spec = json!({"replicas": 1, "analysisSeconds": 30});
        crate::testing::merge(&mut spec, extra);
        serde_json::from_value(spec).unwrap()
    }

    fn starting() -> CanaryStatus {
        CanaryStatus {
            phase: CanaryPhase::Starting,
            version: "2".into(),
            spec_hash: "h".into(),
            analysis_started: None,
            checks: Vec::new(),
            message: String::new(),
        }
    }

    fn analysing(since: i64) -> CanaryStatus {
        CanaryStatus {
            phase: CanaryPhase::Analysing,
            analysis_started: Some(at(since)),
            ..starting()
        }
    }

    /// `ok` requests answered 200 and `errors` 503, all within `seconds`.
    fn served(ok: u32, errors: u32, seconds: f64) -> PodMetrics {
        parse(&format!(
            "qmodel_requests_total{{route=\"/embed\",status=\"200\"}} {ok}\n\
             qmodel_requests_total{{route=\"/embed\",status=\"503\"}} {errors}\n\
             qmodel_request_duration_seconds_bucket{{route=\"/embed\",le=\"{seconds}\"}} {n}\n\
             qmodel_request_duration_seconds_bucket{{route=\"/embed\",le=\"+Inf\"}} {n}\n",
            n = ok + errors
        ))
    }

    fn judged(
        spec: &CanarySpec,
        previous: &CanaryStatus,
        canary: &PodMetrics,
        quality: Option<Result<f64, String>>,
        now: i64,
    ) -> Verdict {
        let stable = served(1000, 0, 0.01);
        let observed = Observed {
            ready_pods: 1,
            metrics: window_over(spec, previous, &at(now)).then_some(Ok((canary, &stable))),
            quality,
        };
        judge(spec, 60, false, previous, &observed, &at(now))
    }

    #[test]
    fn the_window_starts_when_every_canary_pod_is_ready() {
        let spec = spec(json!({"replicas": 2}));
        let observed = Observed {
            ready_pods: 1,
            metrics: None,
            quality: None,
        };
        let Verdict::Continue(status) = judge(&spec, 60, false, &starting(), &observed, &at(10))
        else {
            panic!("a canary still starting continues");
        };
        assert_eq!(status.phase, CanaryPhase::Starting);
        assert_eq!(status.message, "waiting for 2 canary pods to be Ready");
        let observed = Observed {
            ready_pods: 2,
            ..observed
        };
        let Verdict::Continue(status) = judge(&spec, 60, false, &starting(), &observed, &at(10))
        else {
            panic!("a canary that just became Ready continues");
        };
        assert_eq!(status.phase, CanaryPhase::Analysing);
        assert_eq!(status.analysis_started, Some(at(10)));
    }

    #[test]
    fn a_healthy_canary_is_promoted_at_the_end_of_its_window_not_before() {
        let spec = spec(json!({}));
        let canary = served(500, 0, 0.01);
        assert!(matches!(
            judged(&spec, &analysing(100), &canary, None, 129),
            Verdict::Continue(_)
        ));
        let Verdict::Promote(status) = judged(&spec, &analysing(100), &canary, None, 130) else {
            panic!("expected a promotion");
        };
        assert_eq!(status.phase, CanaryPhase::Promoting);
        let rate = status.checks.iter().find(|c| c.name == ERROR_RATE).unwrap();
        assert_eq!((rate.value.as_str(), rate.limit.as_str()), ("0", "<= 0.01"));
        assert!(
            status
                .message
                .starts_with("passed after 30 s and 500 requests"),
            "{}",
            status.message
        );
    }

    #[test]
    fn errors_over_the_limit_fail_with_the_measured_rate() {
        let Verdict::Fail {
            reason, message, ..
        } = judged(
            &spec(json!({})),
            &analysing(0),
            &served(95, 5, 0.01),
            None,
            60,
        )
        else {
            panic!("expected a failure");
        };
        assert_eq!(reason, ERROR_RATE_EXCEEDED);
        assert_eq!(
            message,
            "errorRate 0.05 (limit <= 0.01) over 100 canary requests"
        );
    }

    #[test]
    fn a_slow_canary_fails_on_latency_absolute_or_relative_to_stable() {
        // Stable answers within 10 ms; the canary within 80 ms: 8x the baseline.
        let slow = served(100, 0, 0.08);
        let Verdict::Fail {
            reason, message, ..
        } = judged(&spec(json!({})), &analysing(0), &slow, None, 60)
        else {
            panic!("expected a failure");
        };
        assert_eq!(reason, LATENCY_EXCEEDED);
        assert_eq!(message, "p99Ratio 8 (limit <= 2) over 100 canary requests");
        let absolute = spec(json!({"maxP99Seconds": 0.05, "maxP99Ratio": 100.0}));
        let Verdict::Fail { message, .. } = judged(&absolute, &analysing(0), &slow, None, 60)
        else {
            panic!("expected a failure");
        };
        assert!(message.starts_with("p99Seconds 0.079"), "{message}");
    }

    #[test]
    fn the_quality_gate_fails_at_once_and_its_figure_is_kept() {
        let gated = spec(json!({"qualityGate": {"configMap": "golden", "minCosine": 0.99}}));
        let canary = served(10, 0, 0.01);
        let Verdict::Fail {
            reason,
            message,
            status,
        } = judged(&gated, &analysing(0), &canary, Some(Ok(0.71)), 1)
        else {
            panic!("expected a failure");
        };
        assert_eq!(reason, QUALITY_GATE_FAILED);
        assert_eq!(
            message,
            "quality gate failed: minCosine 0.71 (limit >= 0.99)"
        );
        assert!(
            status
                .checks
                .iter()
                .any(|c| c.name == MIN_COSINE && !c.passed)
        );
        assert_eq!(status.phase, CanaryPhase::RolledBack);

        let Verdict::Continue(passed) = judged(&gated, &analysing(0), &canary, Some(Ok(0.9991)), 1)
        else {
            panic!("a passing gate continues the analysis");
        };
        assert!(!needs_quality_gate(&gated, &passed, 1));
        // Later reconciles keep the measured figure and promote at the end.
        let Verdict::Promote(promoted) = judged(&gated, &passed, &canary, None, 30) else {
            panic!("expected a promotion");
        };
        let kept = promoted
            .checks
            .iter()
            .find(|c| c.name == MIN_COSINE)
            .unwrap();
        assert_eq!(kept.value, "0.9991");
    }

    #[test]
    fn a_gate_that_cannot_run_fails_closed() {
        let gated = spec(json!({"qualityGate": {"configMap": "golden"}}));
        let Verdict::Fail {
            reason, message, ..
        } = judged(
            &gated,
            &analysing(0),
            &served(1, 0, 0.01),
            Some(Err("ConfigMap golden not found".into())),
            1,
        )
        else {
            panic!("expected a failure");
        };
        assert_eq!(reason, QUALITY_GATE_FAILED);
        assert!(message.contains("ConfigMap golden not found"));
    }

    #[test]
    fn a_gated_canary_is_not_promoted_before_its_gate_ran() {
        let gated = spec(json!({"qualityGate": {"configMap": "golden"}}));
        assert!(needs_quality_gate(&gated, &analysing(0), 1));
        assert!(
            !needs_quality_gate(&gated, &starting(), 0),
            "pods not Ready yet"
        );
        assert!(matches!(
            judged(&gated, &analysing(0), &served(10, 0, 0.01), None, 300),
            Verdict::Continue(_)
        ));
    }

    #[test]
    fn too_little_traffic_waits_then_fails() {
        let spec = spec(json!({"minRequests": 50}));
        let quiet = served(3, 0, 0.01);
        let Verdict::Continue(status) = judged(&spec, &analysing(0), &quiet, None, 60) else {
            panic!("a quiet canary waits for traffic");
        };
        assert!(
            status.message.contains("need 50 canary requests"),
            "{}",
            status.message
        );
        let Verdict::Fail {
            reason, message, ..
        } = judged(&spec, &analysing(0), &quiet, None, 91)
        else {
            panic!("expected a failure past the window and the ready timeout");
        };
        assert_eq!(reason, INSUFFICIENT_TRAFFIC);
        assert!(message.ends_with("it answered 3"), "{message}");
    }

    #[test]
    fn a_canary_without_requests_passes_the_metric_checks_as_not_measured() {
        let Verdict::Promote(status) = judged(
            &spec(json!({})),
            &analysing(0),
            &PodMetrics::default(),
            None,
            30,
        ) else {
            panic!("expected a promotion");
        };
        assert!(status.checks.iter().all(|c| c.value == "n/a" && c.passed));
    }

    #[test]
    fn unreadable_metrics_wait_then_fail_closed() {
        let spec = spec(json!({}));
        let unreadable = |now| {
            Observed {
                ready_pods: 1,
                metrics: Some(Err("pod c: no answer within 5 s".to_owned())),
                quality: None,
            }
            .judge_at(&spec, now)
        };
        assert!(matches!(unreadable(30), Verdict::Continue(_)));
        let Verdict::Fail {
            reason, message, ..
        } = unreadable(90)
        else {
            panic!("expected a failure");
        };
        assert_eq!(reason, METRICS_UNAVAILABLE);
        assert!(message.contains("no answer within 5 s"));
    }

    impl Observed<'_> {
        fn judge_at(&self, spec: &CanarySpec, now: i64) -> Verdict {
            judge(spec, 60, false, &analysing(0), self, &at(now))
        }
    }

    #[test]
    fn the_window_closes_on_time() {
        let spec = spec(json!({}));
        assert!(!window_over(&spec, &starting(), &at(1000)));
        assert!(!window_over(&spec, &analysing(0), &at(29)));
        assert!(window_over(&spec, &analysing(0), &at(30)));
        assert_eq!(seconds_left(&spec, &analysing(0), &at(12)), Some(18));
        assert_eq!(seconds_left(&spec, &starting(), &at(12)), None);
    }

    #[test]
    fn figures_are_short() {
        assert_eq!(figure(0.05), "0.05");
        assert_eq!(figure(2.0), "2");
        assert_eq!(figure(0.123456), "0.1235");
        assert_eq!(figure(0.0), "0");
    }
}
