//! The operator's autoscaler: desired replicas from the server's own load signal (requests in
//! flight or queue depth, read from every Ready pod's `/metrics`), as pure state updates.
//!
//! Each scrape:
//! 1. total = the signal summed over Ready pods; smoothed = an exponential moving average with
//!    a 10 s time constant (`s += (1 - e^(-dt/10s)) * (total - s)`), so one burst between two
//!    scrapes does not add a replica;
//! 2. recommendation = ceil(smoothed / targetPerReplica), kept at the current count while
//!    smoothed is within 10% of current * target (no flapping at the boundary), then clamped
//!    to [minReplicas, maxReplicas];
//! 3. up: at once; down: only to the highest recommendation of the last
//!    `scaleDownDelaySeconds` (as the HPA's stabilization window), so the load has to stay low
//!    for the whole delay before a replica goes.
//!
//! The state lives in the operator's memory; after a restart it resumes from
//! `status.autoscaling.desiredReplicas` with an empty history, counted as a recommendation of
//! that count at the restart, so a restart never scales down early.

use std::collections::VecDeque;

use crate::crd::AutoscalingSpec;

/// Time constant of the smoothing, in seconds.
const SMOOTHING_SECONDS: f64 = 10.0;
/// Relative distance from the current load per replica within which the count stays.
const TOLERANCE: f64 = 0.1;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Autoscaler {
    smoothed: Option<f64>,
    /// When the signal was last sampled (seconds).
    sampled_at: Option<f64>,
    /// Recommendations of the scale-down window: (seconds, replicas), oldest first.
    recommendations: VecDeque<(f64, i32)>,
}

/// What one sample decided.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    pub desired: i32,
    /// The smoothed signal summed over Ready pods; `None` before the first sample.
    pub signal: Option<f64>,
    pub message: String,
}

impl Autoscaler {
    /// Whether a sample at `now` is due: none yet, or `interval` seconds since the last one.
    pub fn due(&self, now: f64, interval: f64) -> bool {
        self.sampled_at.is_none_or(|at| now - at >= interval)
    }

    /// Takes one sample (`total`: the signal summed over Ready pods; `None` when no pod could be
    /// read) with `current` replicas applied, and decides the count.
    pub fn sample(
        &mut self,
        spec: &AutoscalingSpec,
        current: i32,
        total: Option<f64>,
        now: f64,
    ) -> Decision {
        let (min, max) = bounds(spec);
        if self.recommendations.is_empty() {
            // A fresh state (first sample, or after a restart): the count in force counts as
            // recommended now, so no scale-down happens before a whole delay of low load.
            self.recommendations
                .push_back((now, current.clamp(min, max)));
        }
        let Some(total) = total else {
            let desired = current.clamp(min, max);
            return Decision {
                desired,
                signal: self.smoothed,
                message: format!("no pod metrics readable; keeping {desired} replicas"),
            };
        };
        let smoothed = match (self.smoothed, self.sampled_at) {
            (Some(previous), Some(at)) => {
                let alpha = 1.0 - (-(now - at).max(0.0) / SMOOTHING_SECONDS).exp();
                previous + alpha * (total - previous)
            }
            _ => total,
        };
        self.smoothed = Some(smoothed);
        self.sampled_at = Some(now);

        let target = spec.target_per_replica;
        let within_tolerance =
            current > 0 && (smoothed / (f64::from(current) * target) - 1.0).abs() <= TOLERANCE;
        let raw = if within_tolerance {
            current
        } else {
            (smoothed / target).ceil() as i32
        };
        let recommendation = raw.clamp(min, max);
        let window = f64::from(spec.scale_down_delay_seconds);
        while self
            .recommendations
            .front()
            .is_some_and(|(at, _)| now - at > window)
        {
            self.recommendations.pop_front();
        }
        self.recommendations.push_back((now, recommendation));
        let highest_recent = self
            .recommendations
            .iter()
            .map(|(_, replicas)| *replicas)
            .max()
            .unwrap_or(recommendation);
        let load = format!(
            "{} {} over {current} replicas (target {} per replica)",
            crate::canary::figure(smoothed),
            spec.metric.as_str(),
            crate::canary::figure(target)
        );
        let (desired, message) = if recommendation >= current {
            let bound = if raw > max {
                " (at maxReplicas)"
            } else if raw < min {
                " (at minReplicas)"
            } else {
                ""
            };
            (
                recommendation,
                format!("{load}: {recommendation} replicas{bound}"),
            )
        } else {
            let desired = highest_recent.min(current).max(recommendation);
            if desired > recommendation {
                (
                    desired,
                    format!(
                        "{load}: {recommendation} would do; holding {desired} for the {}s scale-down delay",
                        spec.scale_down_delay_seconds
                    ),
                )
            } else {
                (desired, format!("{load}: scaling down to {desired}"))
            }
        };
        Decision {
            desired,
            signal: Some(smoothed),
            message,
        }
    }
}

/// `[minReplicas, maxReplicas]`, the maximum never below the minimum.
pub fn bounds(spec: &AutoscalingSpec) -> (i32, i32) {
    let min = spec.min_replicas.max(1);
    (min, spec.max_replicas.unwrap_or(min).max(min))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec(delay: i32) -> AutoscalingSpec {
        serde_json::from_value(json!({
            "enabled": true, "minReplicas": 1, "maxReplicas": 4,
            "targetPerReplica": 2.0, "scaleDownDelaySeconds": delay,
        }))
        .unwrap()
    }

    /// Samples `totals` every 5 s from `start`, applying each decision; the counts decided.
    fn run(
        scaler: &mut Autoscaler,
        spec: &AutoscalingSpec,
        current: &mut i32,
        start: f64,
        totals: &[f64],
    ) -> Vec<i32> {
        totals
            .iter()
            .enumerate()
            .map(|(step, total)| {
                let decision =
                    scaler.sample(spec, *current, Some(*total), start + 5.0 * step as f64);
                *current = decision.desired;
                decision.desired
            })
            .collect()
    }

    #[test]
    fn a_load_step_scales_up_within_a_few_samples_up_to_the_maximum() {
        let spec = spec(60);
        let (mut scaler, mut current) = (Autoscaler::default(), 1);
        let counts = run(
            &mut scaler,
            &spec,
            &mut current,
            0.0,
            &[0.0, 8.0, 8.0, 8.0, 8.0],
        );
        // 8 in flight at 2 per replica wants 4; smoothed 0 -> 3.1 -> 5.1 -> 6.2 -> 6.9, and
        // 6.2 is within 10% of 3 replicas' 6.
        assert_eq!(counts, [1, 2, 3, 3, 4]);
        let counts = run(&mut scaler, &spec, &mut current, 25.0, &[40.0, 40.0]);
        assert_eq!(counts, [4, 4], "never above maxReplicas");
        let decision = scaler.sample(&spec, 4, Some(40.0), 40.0);
        assert!(
            decision.message.ends_with("(at maxReplicas)"),
            "{}",
            decision.message
        );
    }

    #[test]
    fn scale_down_waits_for_the_whole_delay_of_low_load() {
        let spec = spec(30);
        let (mut scaler, mut current) = (Autoscaler::default(), 4);
        run(&mut scaler, &spec, &mut current, 0.0, &[8.0, 8.0]);
        assert_eq!(current, 4);
        // Load gone at t=10: the count holds while a recommendation of 4 is within 30 s.
        let counts = run(&mut scaler, &spec, &mut current, 10.0, &[0.0; 9]);
        assert_eq!(counts[..5], [4, 4, 4, 4, 4]);
        assert_eq!(*counts.last().unwrap(), 1, "{counts:?}");
        let held = Autoscaler {
            recommendations: VecDeque::from([(0.0, 4)]),
            smoothed: Some(0.0),
            sampled_at: Some(0.0),
        }
        .sample(&spec, 4, Some(0.0), 5.0);
        assert!(
            held.message
                .contains("holding 4 for the 30s scale-down delay"),
            "{}",
            held.message
        );
    }

    #[test]
    fn a_burst_between_scrapes_is_smoothed_and_the_boundary_does_not_flap() {
        let spec = spec(0);
        let (mut scaler, mut current) = (Autoscaler::default(), 2);
        // A steady 4 in flight is exactly 2 replicas' target; one spike of 5 is within 10%
        // only after smoothing: 4 + 0.39 = 4.39 is 9.8% over.
        let counts = run(
            &mut scaler,
            &spec,
            &mut current,
            0.0,
            &[4.0, 5.0, 4.0, 4.2, 3.9],
        );
        assert_eq!(counts, [2, 2, 2, 2, 2]);
    }

    #[test]
    fn without_metrics_the_count_stays_within_bounds() {
        let spec = spec(60);
        let decision = Autoscaler::default().sample(&spec, 7, None, 0.0);
        assert_eq!(decision.desired, 4);
        assert!(decision.message.starts_with("no pod metrics"));
        assert_eq!(Autoscaler::default().sample(&spec, 0, None, 0.0).desired, 1);
    }

    #[test]
    fn a_restarted_operator_does_not_scale_down_before_the_delay() {
        let spec = spec(30);
        let mut scaler = Autoscaler::default();
        // Resumed at 3 replicas with no load at all.
        assert_eq!(scaler.sample(&spec, 3, Some(0.0), 100.0).desired, 3);
        assert_eq!(scaler.sample(&spec, 3, Some(0.0), 125.0).desired, 3);
        assert_eq!(scaler.sample(&spec, 3, Some(0.0), 131.0).desired, 1);
    }

    #[test]
    fn sampling_is_due_once_per_interval() {
        let mut scaler = Autoscaler::default();
        assert!(scaler.due(0.0, 5.0));
        scaler.sample(&spec(0), 1, Some(0.0), 0.0);
        assert!(!scaler.due(4.9, 5.0));
        assert!(scaler.due(5.0, 5.0));
    }
}
