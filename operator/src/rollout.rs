//! Rollout decisions: pure functions from a model, its status and what the controller observed
//! to what it applies — the spec's version, or the last good one after a failed rollout — and
//! how pods are replaced when a GPU rollout finds no spare GPU.
//!
//! A rollout moves through these states (the operator README draws them):
//! - rolling out the spec (surge pods beside the old ones, the spec's `maxSurge`);
//! - rolling out one at a time, when a GPU model's surge pod cannot get a GPU and
//!   `noSpareGpu: ReplaceOneAtATime` (`status.rolloutStrategy`), until it completes;
//! - complete: `status.lastGoodVersion`/`lastGoodSpec` take the spec;
//! - failed, then rolled back: the last good spec is applied again (`status.rollback`), and
//!   stays applied until the spec or the retry annotation changes.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde_json::Value;

use crate::crd::{
    CanaryPhase, CanarySpec, CanaryStatus, Device, NoSpareGpu, QuantizedModel, QuantizedModelSpec,
    RollbackStatus,
};
use crate::resources::MODEL_VERSION_KEY;
use crate::status::{self, Rollout};

/// Changing this annotation's value retries a spec that was rolled back.
pub const RETRY_ANNOTATION: &str = "serving.qmodel.dev/retry-rollout";
/// `status.rolloutStrategy` while pods are replaced one at a time for lack of a spare GPU.
pub const ONE_AT_A_TIME: &str = "OneAtATime";
/// Why a rollout failed when a started pod of the new version never became Ready.
pub const NOT_READY: &str = "NotReady";

/// Spec fields that only size the Deployment: a change to them is no new version to roll out,
/// and a rollback keeps their current values.
const SCALE_FIELDS: [&str; 2] = ["replicas", "autoscaling"];

/// The spec as a rollout sees it: everything that shapes the pods, without the scale.
/// Compared with snapshots the apiserver stored, so numbers are in its form (below).
pub fn template_spec(spec: &QuantizedModelSpec) -> Value {
    let mut value = serde_json::to_value(spec).expect("a spec serializes to JSON");
    if let Some(fields) = value.as_object_mut() {
        for field in SCALE_FIELDS {
            fields.remove(field);
        }
    }
    integral_floats_as_integers(&mut value);
    value
}

/// A whole float (`10.0`) comes back from the apiserver as an integer (`10`): written that way,
/// a snapshot equals the spec it was taken of after the round trip.
fn integral_floats_as_integers(value: &mut Value) {
    match value {
        Value::Number(number) if number.is_f64() => {
            if let Some(float) = number.as_f64()
                && float.fract() == 0.0
                && float.abs() < 2f64.powi(53)
            {
                *value = Value::from(float as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        Value::Object(fields) => fields.values_mut().for_each(integral_floats_as_integers),
        _ => {}
    }
}

/// The last good spec with the current scale and rollout settings; `None` if the snapshot no
/// longer reads as a spec.
fn last_good_with_current_scale(
    current: &QuantizedModelSpec,
    last_good: &Value,
) -> Option<QuantizedModelSpec> {
    let mut spec = last_good.clone();
    let current = serde_json::to_value(current).ok()?;
    let fields = spec.as_object_mut()?;
    for field in SCALE_FIELDS.iter().chain(&["rollout"]) {
        match current.get(*field) {
            Some(value) => fields.insert((*field).to_owned(), value.clone()),
            None => fields.remove(*field),
        };
    }
    serde_json::from_value(spec).ok()
}

/// A short, stable fingerprint of a template spec (FNV-1a of its JSON): a canary's status
/// names the spec it judges without carrying all of it.
pub fn spec_hash(template: &Value) -> String {
    let hash = template
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("{hash:016x}")
}

/// What one reconcile applies.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The spec the objects are rendered from: the model's, or its last good one.
    pub spec: QuantizedModelSpec,
    /// The failed rollout this plan undoes, while it is in force.
    pub rollback: Option<RollbackStatus>,
    /// Pods are replaced one at a time (no spare GPU for a surge pod).
    pub one_at_a_time: bool,
    /// A canary of the spec's version beside `spec` (then the last good one), while it is
    /// judged.
    pub canary: Option<CanaryPlan>,
}

/// The canary Deployment's spec and where its analysis stands.
#[derive(Clone, Debug, PartialEq)]
pub struct CanaryPlan {
    /// The model's spec at the canary's replica count.
    pub spec: QuantizedModelSpec,
    pub settings: CanarySpec,
    /// The analysis so far (`Starting` for a new canary).
    pub status: CanaryStatus,
}

/// The canary the model's spec calls for: a canary is configured, a last good version runs,
/// the spec differs from it, and no verdict on this very spec was reached yet. With the spec
/// the stable Deployment renders meanwhile (the last good one).
fn canary_of(model: &QuantizedModel) -> Option<(QuantizedModelSpec, CanaryPlan)> {
    let settings = model.spec.rollout.canary.as_ref()?;
    let status = model.status.as_ref()?;
    let last_good = status.last_good_spec.as_ref()?;
    let template = template_spec(&model.spec);
    if template == *last_good {
        return None;
    }
    let hash = spec_hash(&template);
    let previous = status.canary.as_ref().filter(|c| c.spec_hash == hash);
    let analysis = match previous {
        Some(canary) if matches!(canary.phase, CanaryPhase::Promoting | CanaryPhase::Promoted) => {
            return None;
        }
        Some(canary) if matches!(canary.phase, CanaryPhase::Starting | CanaryPhase::Analysing) => {
            canary.clone()
        }
        // A new spec, or one retried after its rollback.
        _ => CanaryStatus {
            phase: CanaryPhase::Starting,
            version: model.spec.model.version.clone(),
            spec_hash: hash,
            analysis_started: None,
            checks: Vec::new(),
            message: String::new(),
        },
    };
    let stable = last_good_with_current_scale(&model.spec, last_good)?;
    let mut spec = model.spec.clone();
    spec.replicas = settings.replicas;
    spec.autoscaling = None;
    Some((
        stable,
        CanaryPlan {
            spec,
            settings: settings.clone(),
            status: analysis,
        },
    ))
}

impl Plan {
    /// The plan the model's spec and status call for, before anything is observed.
    pub fn of(model: &QuantizedModel) -> Self {
        let status = model.status.as_ref();
        let rolled_back = status.and_then(|status| {
            let rollback = status.rollback.as_ref()?;
            let last_good = status.last_good_spec.as_ref()?;
            still_rolled_back(model, rollback)
                .then(|| last_good_with_current_scale(&model.spec, last_good))
                .flatten()
                .map(|spec| (spec, rollback.clone()))
        });
        let (spec, rollback, canary) = match rolled_back {
            Some((last_good, rollback)) => (last_good, Some(rollback), None),
            None => match canary_of(model) {
                Some((stable, canary)) => (stable, None, Some(canary)),
                None => (model.spec.clone(), None, None),
            },
        };
        let mut plan = Plan {
            spec,
            rollback,
            one_at_a_time: false,
            canary,
        };
        if status.and_then(|s| s.rollout_strategy.as_deref()) == Some(ONE_AT_A_TIME) {
            plan.replace_one_at_a_time();
        }
        plan
    }

    /// The model as it is rendered: its spec replaced by the plan's.
    pub fn model(&self, model: &QuantizedModel) -> QuantizedModel {
        QuantizedModel {
            spec: self.spec.clone(),
            ..model.clone()
        }
    }

    /// The version the rendered pods run.
    pub fn version(&self) -> &str {
        &self.spec.model.version
    }

    fn replace_one_at_a_time(&mut self) {
        self.one_at_a_time = true;
        self.spec.rollout.max_surge = IntOrString::Int(0);
        self.spec.rollout.max_unavailable = IntOrString::Int(1);
    }

    /// The plan after `verdict`, if it changes what is applied.
    pub fn after(&self, verdict: Verdict) -> Option<Plan> {
        match verdict {
            Verdict::Proceed => None,
            Verdict::RollBack { rollback, to } => {
                let mut plan = Plan {
                    spec: *to,
                    rollback: Some(rollback),
                    one_at_a_time: false,
                    canary: None,
                };
                if self.one_at_a_time {
                    plan.replace_one_at_a_time();
                }
                Some(plan)
            }
            Verdict::ReplaceOneAtATime => {
                let mut plan = self.clone();
                plan.replace_one_at_a_time();
                Some(plan)
            }
        }
    }

    /// The plan once the canary passed: the model's spec on the stable Deployment (at the
    /// scale this plan has), no canary.
    pub fn promoted(&self, model: &QuantizedModel) -> Plan {
        let mut spec = model.spec.clone();
        spec.replicas = self.spec.replicas;
        Plan {
            spec,
            rollback: None,
            one_at_a_time: false,
            canary: None,
        }
    }
}

/// A rollback stays in force while autoRollback is on (or it ended a canary, whose version
/// never replaced the stable one) and neither the spec (beyond its scale) nor the retry
/// annotation changed since it failed.
fn still_rolled_back(model: &QuantizedModel, rollback: &RollbackStatus) -> bool {
    let failed_canary = model
        .status
        .as_ref()
        .and_then(|s| s.canary.as_ref())
        .is_some_and(|c| {
            c.phase == CanaryPhase::RolledBack && c.spec_hash == spec_hash(&rollback.failed_spec)
        });
    (model.spec.rollout.auto_rollback || failed_canary)
        && template_spec(&model.spec) == rollback.failed_spec
        && model.annotations().get(RETRY_ANNOTATION) == rollback.retry_annotation.as_ref()
}

/// What the observed state calls for.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Proceed,
    /// The rollout failed: go back to the last good spec (`to`, at the current scale).
    RollBack {
        rollback: RollbackStatus,
        to: Box<QuantizedModelSpec>,
    },
    /// A surge pod waits for a GPU that no node has free: replace pods one at a time.
    ReplaceOneAtATime,
}

/// Judges the rollout of `plan` from the applied Deployment and the model's pods.
pub fn judge(
    model: &QuantizedModel,
    plan: &Plan,
    deployment: &Deployment,
    pods: &[Pod],
    now: &Time,
) -> Verdict {
    if plan.rollback.is_some() {
        return Verdict::Proceed;
    }
    let version = plan.version();
    let of_version: Vec<&Pod> = pods
        .iter()
        .filter(|pod| pod.labels().get(MODEL_VERSION_KEY).map(String::as_str) == Some(version))
        .collect();
    if waiting_for_gpu(&plan.spec, &of_version) {
        let old_replicas_left = deployment.status.as_ref().is_some_and(|s| {
            s.replicas.unwrap_or_default() > s.updated_replicas.unwrap_or_default()
        });
        return if old_replicas_left
            && !plan.one_at_a_time
            && plan.spec.rollout.no_spare_gpu == NoSpareGpu::ReplaceOneAtATime
        {
            Verdict::ReplaceOneAtATime
        } else {
            // Waiting for capacity says nothing about the version: never a reason to roll back.
            Verdict::Proceed
        };
    }
    match failure(plan, deployment, &of_version, now) {
        Some((reason, message)) if model.spec.rollout.auto_rollback => {
            roll_back(model, version, reason, message, now)
        }
        _ => Verdict::Proceed,
    }
}

/// Rolls the model's spec (whose `version` failed for `reason`) back to its last good spec, at
/// the current scale; `Proceed` when there is none to go to. A failed rollout calls it only with
/// autoRollback on; a failed canary always (its version never replaced the stable one).
pub fn roll_back(
    model: &QuantizedModel,
    version: &str,
    reason: String,
    message: String,
    now: &Time,
) -> Verdict {
    let Some(status) = model.status.as_ref() else {
        return Verdict::Proceed;
    };
    let (Some(last_good_spec), Some(last_good_version)) =
        (&status.last_good_spec, &status.last_good_version)
    else {
        return Verdict::Proceed;
    };
    let failed_spec = template_spec(&model.spec);
    if failed_spec == *last_good_spec {
        return Verdict::Proceed;
    }
    let Some(to) = last_good_with_current_scale(&model.spec, last_good_spec) else {
        return Verdict::Proceed;
    };
    Verdict::RollBack {
        rollback: RollbackStatus {
            failed_version: version.to_owned(),
            reason,
            message,
            rolled_back_to: last_good_version.clone(),
            time: now.clone(),
            failed_spec,
            retry_annotation: model.annotations().get(RETRY_ANNOTATION).cloned(),
        },
        to: Box::new(to),
    }
}

/// Why the rollout of `plan` failed, if it did: a pod of its version that cannot run, the
/// Deployment past its progress deadline, or a started pod not Ready within the bound.
fn failure(
    plan: &Plan,
    deployment: &Deployment,
    pods_of_version: &[&Pod],
    now: &Time,
) -> Option<(String, String)> {
    if let Rollout::Stalled(message) = status::rollout(deployment) {
        return status::pod_failure(pods_of_version.iter().copied(), plan.version())
            .map(|failure| (failure.reason, failure.message))
            .or(Some((
                status::PROGRESS_DEADLINE_EXCEEDED.to_owned(),
                message,
            )));
    }
    pod_failure(&plan.spec, pods_of_version, now)
}

/// Why pods of `spec`'s version cannot serve, if one cannot: a state only a new spec fixes
/// (crash loop, image pull, ...), or started and not Ready within `readyTimeoutSeconds`.
pub fn pod_failure(
    spec: &QuantizedModelSpec,
    pods_of_version: &[&Pod],
    now: &Time,
) -> Option<(String, String)> {
    let version = &spec.model.version;
    if let Some(failure) = status::pod_failure(pods_of_version.iter().copied(), version) {
        return Some((failure.reason, failure.message));
    }
    let bound = i64::from(spec.rollout.ready_timeout_seconds);
    pods_of_version.iter().find_map(|pod| {
        let started = pod.status.as_ref()?.start_time.as_ref()?;
        let waited = now.0.as_second() - started.0.as_second();
        (pod.metadata.deletion_timestamp.is_none() && !ready(pod) && waited > bound).then(|| {
            (
                NOT_READY.to_owned(),
                format!(
                    "pod {} (version {version}) not Ready {waited} s after it started (readyTimeoutSeconds {bound})",
                    pod.name_any(),
                ),
            )
        })
    })
}

pub fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// Whether a pod of a GPU model waits for a node with enough free GPUs (the scheduler's
/// "Insufficient <resource>").
fn waiting_for_gpu(spec: &QuantizedModelSpec, pods: &[&Pod]) -> bool {
    if spec.effective_device() != Device::Gpu {
        return false;
    }
    let insufficient = format!(
        "Insufficient {}",
        spec.gpu.clone().unwrap_or_default().resource_name
    );
    pods.iter()
        .filter_map(|pod| pod.status.as_ref()?.conditions.as_ref())
        .flatten()
        .any(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
                && c.message
                    .as_deref()
                    .is_some_and(|m| m.contains(&insufficient))
        })
}

/// What a rollout of a single-replica GPU model needs, and what the spec chose.
pub fn rollout_note(spec: &QuantizedModelSpec) -> Option<String> {
    if spec.effective_device() != Device::Gpu
        || spec.autoscaling.as_ref().is_some_and(|a| a.enabled)
        || spec.replicas != 1
    {
        return None;
    }
    let choice = match spec.rollout.no_spare_gpu {
        NoSpareGpu::ReplaceOneAtATime => "without one the replica is replaced, a brief outage",
        NoSpareGpu::Wait => "without one the rollout waits for a GPU to free up",
    };
    Some(format!(
        "one replica on a GPU: a rollout needs a spare GPU or a brief outage; rollout.noSpareGpu is {}: {choice}",
        spec.rollout.no_spare_gpu.as_str()
    ))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    use super::*;
    use crate::testing::{merge, model, rolling_from_good_1_to_2};

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    fn deployment(replicas: i32, updated: i32, extra_status: Value) -> Deployment {
        let mut status =
            json!({"observedGeneration": 2, "replicas": replicas, "updatedReplicas": updated});
        merge(&mut status, extra_status);
        serde_json::from_value(json!({
            "metadata": {"name": "bge", "generation": 2},
            "spec": {"replicas": updated.max(1), "selector": {}, "template": {}},
            "status": serde_json::from_value::<DeploymentStatus>(status).unwrap(),
        }))
        .unwrap()
    }

    /// A pod of `version` with `status` (a core/v1 PodStatus as JSON).
    fn pod(name: &str, version: &str, status: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {MODEL_VERSION_KEY: version}},
            "status": status,
        }))
        .unwrap()
    }

    fn crash_looping(name: &str, version: &str) -> Pod {
        pod(
            name,
            version,
            json!({"containerStatuses": [{
                "name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 2,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 1, "message": "model.gguf: truncated"}},
            }]}),
        )
    }

    fn started_not_ready(name: &str, version: &str, started: i64) -> Pod {
        pod(
            name,
            version,
            json!({
                "startTime": at(started).0.to_string(),
                "conditions": [{"type": "Ready", "status": "False"}],
            }),
        )
    }

    fn waiting_for_a_gpu(name: &str, version: &str) -> Pod {
        pod(
            name,
            version,
            json!({"conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/5 nodes are available: 2 Insufficient nvidia.com/gpu, 3 node(s) didn't match Pod's node affinity/selector.",
            }]}),
        )
    }

    fn judged(qm: &QuantizedModel, deployment: &Deployment, pods: &[Pod]) -> Verdict {
        judge(qm, &Plan::of(qm), deployment, pods, &at(1000))
    }

    fn rolled_back(qm: &QuantizedModel, deployment: &Deployment, pods: &[Pod]) -> RollbackStatus {
        match judged(qm, deployment, pods) {
            Verdict::RollBack { rollback, .. } => rollback,
            other => panic!("expected a rollback, got {other:?}"),
        }
    }

    fn with_canary(mut qm: QuantizedModel) -> QuantizedModel {
        qm.spec.rollout.canary = serde_json::from_value(json!({"replicas": 1})).unwrap();
        qm
    }

    fn canary_status(qm: &QuantizedModel, phase: CanaryPhase) -> CanaryStatus {
        CanaryStatus {
            phase,
            version: qm.spec.model.version.clone(),
            spec_hash: spec_hash(&template_spec(&qm.spec)),
            analysis_started: None,
            checks: Vec::new(),
            message: String::new(),
        }
    }

    #[test]
    fn a_canary_runs_the_new_spec_beside_the_last_good_one() {
        let mut qm = with_canary(rolling_from_good_1_to_2());
        qm.spec.replicas = 3;
        let plan = Plan::of(&qm);
        assert_eq!(
            plan.version(),
            "1.0.0",
            "the stable pods stay on the last good version"
        );
        assert_eq!(plan.spec.replicas, 3);
        let canary = plan.canary.expect("a canary");
        assert_eq!(
            (canary.spec.model.version.as_str(), canary.spec.replicas),
            ("2.0.0", 1)
        );
        assert_eq!(canary.status.phase, CanaryPhase::Starting);
        assert_eq!(canary.status.spec_hash, spec_hash(&template_spec(&qm.spec)));
    }

    #[test]
    fn no_canary_without_a_last_good_version_or_for_the_last_good_spec_itself() {
        let first = with_canary(crate::testing::rolling_from_1_to_2());
        assert!(
            Plan::of(&first).canary.is_none(),
            "a first rollout has nothing to compare"
        );
        let mut same = with_canary(model(json!({})));
        same.status = Some(crate::crd::QuantizedModelStatus {
            last_good_version: Some("1.0.0".into()),
            last_good_spec: Some(template_spec(&same.spec)),
            ..Default::default()
        });
        assert!(Plan::of(&same).canary.is_none());
    }

    #[test]
    fn a_canary_under_analysis_carries_on_and_a_passed_one_renders_the_spec() {
        let mut qm = with_canary(rolling_from_good_1_to_2());
        let mut analysing = canary_status(&qm, CanaryPhase::Analysing);
        analysing.analysis_started = Some(at(5));
        qm.status.as_mut().unwrap().canary = Some(analysing.clone());
        assert_eq!(Plan::of(&qm).canary.unwrap().status, analysing);

        qm.status.as_mut().unwrap().canary = Some(canary_status(&qm, CanaryPhase::Promoting));
        let plan = Plan::of(&qm);
        assert!(plan.canary.is_none());
        assert_eq!(
            plan.version(),
            "2.0.0",
            "promoted: the stable Deployment rolls it out"
        );

        // Another spec than the one judged starts a canary of its own.
        qm.spec.args = vec!["--max-batch-tokens".into(), "4096".into()];
        let plan = Plan::of(&qm);
        assert_eq!(plan.canary.unwrap().status.phase, CanaryPhase::Starting);
    }

    #[test]
    fn a_promoted_plan_keeps_the_scale() {
        let mut qm = with_canary(rolling_from_good_1_to_2());
        qm.spec.replicas = 4;
        let promoted = Plan::of(&qm).promoted(&qm);
        assert_eq!((promoted.version(), promoted.spec.replicas), ("2.0.0", 4));
        assert!(promoted.canary.is_none() && promoted.rollback.is_none());
    }

    #[test]
    fn a_snapshot_equals_its_spec_after_the_apiservers_round_trip() {
        let qm = model(json!({"rollout": {"canary": {"maxP99Ratio": 10.0, "maxErrorRate": 0.05}}}));
        let template = template_spec(&qm.spec);
        // What the apiserver gives back: whole floats as integers.
        let stored: Value = serde_json::from_str(
            &template
                .to_string()
                .replace("10.0", "10")
                .replace("2.0", "2"),
        )
        .unwrap();
        assert_eq!(template, stored);
        assert_eq!(template["rollout"]["canary"]["maxErrorRate"], json!(0.05));
    }

    #[test]
    fn spec_hashes_are_stable_and_tell_specs_apart() {
        let one = template_spec(&model(json!({})).spec);
        assert_eq!(spec_hash(&one), spec_hash(&one.clone()));
        assert_eq!(spec_hash(&one).len(), 16);
        let two = template_spec(&model(json!({"model": {"version": "2"}})).spec);
        assert_ne!(spec_hash(&one), spec_hash(&two));
    }

    #[test]
    fn the_scale_is_not_part_of_what_rolls_out() {
        let one = model(json!({"replicas": 1}));
        let three =
            model(json!({"replicas": 3, "autoscaling": {"enabled": true, "external": true}}));
        assert_eq!(template_spec(&one.spec), template_spec(&three.spec));
        let args = model(json!({"args": ["--max-batch-tokens", "8192"]}));
        assert_ne!(template_spec(&one.spec), template_spec(&args.spec));
    }

    #[test]
    fn a_crashing_new_version_rolls_back_to_the_last_good_one() {
        let qm = rolling_from_good_1_to_2();
        let pods = [crash_looping("bge-new", "2.0.0")];
        let verdict = judged(&qm, &deployment(2, 1, json!({})), &pods);
        let Verdict::RollBack { rollback, to } = &verdict else {
            panic!("expected a rollback, got {verdict:?}");
        };
        assert_eq!(rollback.failed_version, "2.0.0");
        assert_eq!(rollback.rolled_back_to, "1.0.0");
        assert_eq!(rollback.reason, "CrashLoopBackOff");
        assert!(
            rollback.message.contains("model.gguf: truncated"),
            "{}",
            rollback.message
        );
        assert_eq!(rollback.failed_spec, template_spec(&qm.spec));
        assert_eq!(rollback.time, at(1000));
        assert_eq!(to.model.version, "1.0.0");

        let plan = Plan::of(&qm).after(verdict.clone()).unwrap();
        assert_eq!(plan.version(), "1.0.0");
        assert!(plan.rollback.is_some());
    }

    #[test]
    fn no_rollback_without_a_last_good_version_with_auto_rollback_off_or_for_an_old_crash() {
        let pods = [crash_looping("bge-new", "2.0.0")];
        let stuck = deployment(2, 1, json!({}));
        let mut first = rolling_from_good_1_to_2();
        first.status.as_mut().unwrap().last_good_spec = None;
        assert_eq!(judged(&first, &stuck, &pods), Verdict::Proceed);

        let mut off = rolling_from_good_1_to_2();
        off.spec.rollout.auto_rollback = false;
        assert_eq!(judged(&off, &stuck, &pods), Verdict::Proceed);

        let qm = rolling_from_good_1_to_2();
        let old_crashing = [crash_looping("bge-old", "1.0.0")];
        assert_eq!(
            judged(&qm, &stuck, &old_crashing),
            Verdict::Proceed,
            "only the new version's pods judge it"
        );

        // The failing spec is the last good one (nothing else to go back to).
        let mut same = model(json!({}));
        same.status = qm.status.clone();
        let crash_of_good = [crash_looping("bge-a", "1.0.0")];
        assert_eq!(judged(&same, &stuck, &crash_of_good), Verdict::Proceed);
    }

    #[test]
    fn a_rollout_past_its_deadline_or_not_ready_in_time_rolls_back() {
        let qm = rolling_from_good_1_to_2();
        let stalled = deployment(
            2,
            1,
            json!({"conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "timed out"}]}),
        );
        assert_eq!(
            rolled_back(&qm, &stalled, &[]).reason,
            "ProgressDeadlineExceeded"
        );

        let rolling = deployment(2, 1, json!({}));
        let slow = [started_not_ready("bge-new", "2.0.0", 1000 - 301)];
        let rollback = rolled_back(&qm, &rolling, &slow);
        assert_eq!(rollback.reason, NOT_READY);
        assert!(
            rollback.message.contains("301 s after it started"),
            "{}",
            rollback.message
        );
        let in_time = [started_not_ready("bge-new", "2.0.0", 1000 - 299)];
        assert_eq!(judged(&qm, &rolling, &in_time), Verdict::Proceed);
    }

    #[test]
    fn a_rollback_holds_until_the_spec_or_the_retry_annotation_changes() {
        let mut qm = rolling_from_good_1_to_2();
        qm.metadata.annotations = Some([(RETRY_ANNOTATION.to_owned(), "a".to_owned())].into());
        let rollback = rolled_back(
            &qm,
            &deployment(2, 1, json!({})),
            &[crash_looping("bge-new", "2.0.0")],
        );
        assert_eq!(rollback.retry_annotation.as_deref(), Some("a"));
        qm.status.as_mut().unwrap().rollback = Some(rollback);

        let plan = Plan::of(&qm);
        assert_eq!(plan.version(), "1.0.0", "the failed spec is not retried");
        assert_eq!(
            judged(&qm, &deployment(1, 1, json!({})), &[]),
            Verdict::Proceed
        );

        let mut scaled = qm.clone();
        scaled.spec.replicas = 3;
        let plan = Plan::of(&scaled);
        assert_eq!(
            (plan.version(), plan.spec.replicas),
            ("1.0.0", 3),
            "a scale is no new spec, and applies"
        );

        let mut fixed = qm.clone();
        fixed.spec.model.version = "2.0.1".into();
        assert_eq!(Plan::of(&fixed).version(), "2.0.1");
        assert_eq!(Plan::of(&fixed).rollback, None);

        let mut retried = qm.clone();
        retried.metadata.annotations = Some([(RETRY_ANNOTATION.to_owned(), "b".to_owned())].into());
        assert_eq!(Plan::of(&retried).version(), "2.0.0");

        let mut off = qm.clone();
        off.spec.rollout.auto_rollback = false;
        assert_eq!(Plan::of(&off).version(), "2.0.0");
    }

    fn gpu_rollout(spec: Value) -> QuantizedModel {
        let mut qm = rolling_from_good_1_to_2();
        let mut fp16 = json!({"precision": "fp16", "replicas": 2, "model": {"version": "2.0.0"}});
        merge(&mut fp16, spec);
        qm.spec = model(fp16).spec;
        qm.status.as_mut().unwrap().last_good_spec =
            Some(template_spec(&model(json!({"precision": "fp16"})).spec));
        qm
    }

    #[test]
    fn a_gpu_surge_pod_without_a_gpu_switches_to_one_at_a_time_and_is_no_failure() {
        let qm = gpu_rollout(json!({}));
        let surging = deployment(3, 1, json!({}));
        let pods = [waiting_for_a_gpu("bge-new", "2.0.0")];
        assert_eq!(judged(&qm, &surging, &pods), Verdict::ReplaceOneAtATime);
        let plan = Plan::of(&qm).after(Verdict::ReplaceOneAtATime).unwrap();
        assert!(plan.one_at_a_time);
        assert_eq!(
            (
                &plan.spec.rollout.max_surge,
                &plan.spec.rollout.max_unavailable
            ),
            (&IntOrString::Int(0), &IntOrString::Int(1))
        );
        assert_eq!(plan.version(), "2.0.0");

        // Past the deadline while waiting for a GPU: still not the version's fault.
        let stalled = deployment(
            3,
            1,
            json!({"conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "timed out"}]}),
        );
        let mut waiting = gpu_rollout(json!({"rollout": {"noSpareGpu": "Wait"}}));
        assert_eq!(judged(&waiting, &stalled, &pods), Verdict::Proceed);
        waiting.status.as_mut().unwrap().rollout_strategy = Some(ONE_AT_A_TIME.into());
        assert!(
            Plan::of(&waiting).one_at_a_time,
            "the switch lasts until the rollout completes"
        );

        let fresh = deployment(1, 1, json!({}));
        assert_eq!(
            judged(&qm, &fresh, &pods),
            Verdict::Proceed,
            "no old pod to make room"
        );
        let cpu = rolling_from_good_1_to_2();
        assert_eq!(judged(&cpu, &surging, &pods), Verdict::Proceed);
    }

    #[test]
    fn a_single_replica_gpu_model_says_what_its_rollout_needs() {
        let one = gpu_rollout(json!({"replicas": 1}));
        let note = rollout_note(&one.spec).unwrap();
        assert!(note.contains("a spare GPU or a brief outage"), "{note}");
        assert!(note.contains("ReplaceOneAtATime"), "{note}");
        let waits = gpu_rollout(json!({"replicas": 1, "rollout": {"noSpareGpu": "Wait"}}));
        assert!(
            rollout_note(&waits.spec)
                .unwrap()
                .contains("waits for a GPU")
        );
        assert_eq!(
            rollout_note(&gpu_rollout(json!({})).spec),
            None,
            "two replicas need neither"
        );
        assert_eq!(rollout_note(&model(json!({})).spec), None);
    }
}
