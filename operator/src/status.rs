//! Status: pure functions from what the controller observed to the `QuantizedModel` status, and
//! from a status change to the Events worth publishing.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::runtime::events::{Event, EventType};

use crate::canary;
use crate::crd::{CanaryPhase, CanaryStatus, QuantizedModel, QuantizedModelStatus};
use crate::resources::{CONTAINER_NAME, DesiredState, MODEL_VERSION_KEY, SpecError};
use crate::rollout::{self, NOT_READY, ONE_AT_A_TIME, Plan, RETRY_ANNOTATION};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
/// Whether the model's Service has a replica to send requests to right now, whatever version
/// it runs: unlike `Ready`, it stays True through a rollout or a scale-up.
pub const AVAILABLE: &str = "Available";
/// True while the model runs its last good version because the spec's failed to roll out.
pub const ROLLED_BACK: &str = "RolledBack";

const INVALID_SPEC: &str = "InvalidSpec";
pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
const ROLLING_OUT: &str = "RollingOut";
/// The Event of a rollout switched to one pod at a time.
const NO_SPARE_GPU: &str = "NoSpareGpu";
/// Degraded reasons naming why a pod's server container cannot run; also the Event reasons.
pub const IMAGE_PULL_BACK_OFF: &str = "ImagePullBackOff";
pub const CRASH_LOOP_BACK_OFF: &str = "CrashLoopBackOff";
/// Other waiting reasons of the kubelet that only a change of the spec or image can fix.
const CONTAINER_CANNOT_START: &[&str] = &[
    "CreateContainerConfigError",
    "CreateContainerError",
    "InvalidImageName",
    "RunContainerError",
];

/// What one reconcile saw.
pub enum Observation<'a> {
    /// The spec cannot be served; nothing was applied.
    Invalid(&'a SpecError),
    /// The desired objects were applied; `deployment` is the Deployment as the API server
    /// returned it.
    Applied {
        /// What was applied: the spec's version, or the last good one after a failure.
        plan: &'a Plan,
        desired: &'a DesiredState,
        deployment: &'a Deployment,
        /// The model's pods (its selector), of every version.
        pods: &'a [Pod],
    },
}

/// Where a Deployment's rollout stands, judged as `kubectl rollout status` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rollout {
    InProgress(String),
    Stalled(String),
    Complete,
}

pub fn rollout(deployment: &Deployment) -> Rollout {
    let status = deployment.status.clone().unwrap_or_default();
    let generation = deployment.metadata.generation.unwrap_or_default();
    if status.observed_generation.unwrap_or_default() < generation {
        return Rollout::InProgress(format!(
            "waiting for the Deployment controller to observe generation {generation}"
        ));
    }
    let progressing = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing");
    if let Some(stalled) =
        progressing.filter(|c| c.reason.as_deref() == Some(PROGRESS_DEADLINE_EXCEEDED))
    {
        return Rollout::Stalled(stalled.message.clone().unwrap_or_default());
    }
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let replicas = status.replicas.unwrap_or_default();
    let updated = status.updated_replicas.unwrap_or_default();
    let available = status.available_replicas.unwrap_or_default();
    if updated < desired {
        Rollout::InProgress(format!("{updated} of {desired} replicas updated"))
    } else if replicas > updated {
        Rollout::InProgress(format!(
            "{} old replicas pending termination",
            replicas - updated
        ))
    } else if available < updated {
        Rollout::InProgress(format!(
            "{available} of {updated} updated replicas available"
        ))
    } else {
        Rollout::Complete
    }
}

/// A ReplicaFailure condition of the Deployment (quota exceeded, forbidden pod spec, ...).
fn replica_failure(deployment: &Deployment) -> Option<(String, String)> {
    let conditions = deployment.status.as_ref()?.conditions.as_ref()?;
    let failure = conditions
        .iter()
        .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")?;
    Some((
        failure
            .reason
            .clone()
            .unwrap_or_else(|| "ReplicaFailure".to_owned()),
        failure.message.clone().unwrap_or_default(),
    ))
}

/// Why a pod of the model cannot serve: the kubelet's reason and a message naming the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFailure {
    pub reason: String,
    pub message: String,
}

/// The first pod (by name, the desired version's first) whose server container is stuck: its
/// image cannot be pulled (`ErrImagePull` and `ImagePullBackOff` alternate; both are reported
/// as `ImagePullBackOff`), it crashes over and over (`CrashLoopBackOff`, with the exit code and
/// termination message of its last run), or the kubelet cannot create it. Messages avoid the
/// kubelet's changing back-off details, so one cause makes one Event.
pub fn pod_failure<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    version: &str,
) -> Option<PodFailure> {
    let mut pods: Vec<&Pod> = pods
        .into_iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .collect();
    let of_version =
        |pod: &Pod| pod.labels().get(MODEL_VERSION_KEY).map(String::as_str) == Some(version);
    pods.sort_by_key(|pod| (!of_version(pod), pod.name_any()));
    pods.into_iter().find_map(|pod| {
        let name = pod.name_any();
        let pod_version = pod.labels().get(MODEL_VERSION_KEY).cloned().unwrap_or_default();
        let container = pod
            .status
            .as_ref()?
            .container_statuses
            .as_ref()?
            .iter()
            .find(|c| c.name == CONTAINER_NAME)?;
        let waiting = container.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.as_deref()?;
        match reason {
            "ErrImagePull" | IMAGE_PULL_BACK_OFF => Some(PodFailure {
                reason: IMAGE_PULL_BACK_OFF.to_owned(),
                message: format!(
                    "pod {name} (version {pod_version}) cannot pull image {}",
                    container.image
                ),
            }),
            CRASH_LOOP_BACK_OFF => {
                let last = container
                    .last_state
                    .as_ref()
                    .and_then(|state| state.terminated.as_ref());
                let exit = last.map_or_else(
                    || "keeps exiting".to_owned(),
                    |t| format!("exited with code {}", t.exit_code),
                );
                let said = last
                    .and_then(|t| t.message.as_deref())
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                Some(PodFailure {
                    reason: CRASH_LOOP_BACK_OFF.to_owned(),
                    message: format!(
                        "pod {name} (version {pod_version}): container {CONTAINER_NAME} {exit}{said}"
                    ),
                })
            }
            other if CONTAINER_CANNOT_START.contains(&other) => Some(PodFailure {
                reason: other.to_owned(),
                message: format!(
                    "pod {name} (version {pod_version}): {}",
                    waiting.message.as_deref().unwrap_or(other)
                ),
            }),
            _ => None,
        }
    })
}

/// Condition `type_` of `model` after this reconcile: its transition time carries over from
/// the previous status while its status stays the same.
fn carried_condition(
    model: &QuantizedModel,
    now: &Time,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let unchanged = model.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
    });
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: model.metadata.generation,
        last_transition_time: unchanged
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone()),
    }
}

/// The status after this reconcile. Condition transition times and the last fully rolled-out
/// version carry over from the previous status.
pub fn status(
    model: &QuantizedModel,
    observation: &Observation,
    now: &Time,
) -> QuantizedModelStatus {
    let previous = model.status.clone().unwrap_or_default();
    let generation = model.metadata.generation;
    let condition = |type_: &str, status: bool, reason: &str, message: String| {
        carried_condition(model, now, type_, status, reason, message)
    };
    match observation {
        Observation::Invalid(error) => QuantizedModelStatus {
            observed_generation: generation,
            conditions: vec![
                condition(READY, false, INVALID_SPEC, error.to_string()),
                condition(
                    PROGRESSING,
                    false,
                    INVALID_SPEC,
                    "the spec cannot be served".to_owned(),
                ),
                condition(DEGRADED, true, INVALID_SPEC, error.to_string()),
            ]
            .into_iter()
            // Nothing was applied, so whatever served before still serves.
            .chain(find(&previous, AVAILABLE).cloned())
            .collect(),
            ..previous
        },
        Observation::Applied {
            plan,
            desired,
            deployment,
            pods,
        } => {
            let version = plan.version().to_owned();
            let rollback = plan.rollback.as_ref();
            // The pods of a rolled-back version are leaving; the rollback says why they failed.
            let pods = pods.iter().filter(|pod| {
                rollback
                    .is_none_or(|r| pod.labels().get(MODEL_VERSION_KEY) != Some(&r.failed_version))
            });
            let deployment_status = deployment.status.clone().unwrap_or_default();
            let replicas = deployment
                .spec
                .as_ref()
                .and_then(|s| s.replicas)
                .unwrap_or(1);
            let rollout = rollout(deployment);
            let (ready, ready_reason, ready_message) = match (&rollout, rollback) {
                (Rollout::Complete, Some(rollback)) => (
                    false,
                    ROLLED_BACK,
                    format!(
                        "version {} failed; {replicas} replicas serve version {version}",
                        rollback.failed_version
                    ),
                ),
                (Rollout::Complete, None) if replicas == 0 => {
                    (false, "ScaledToZero", "no replicas requested".to_owned())
                }
                (Rollout::Complete, None) => (
                    true,
                    "Available",
                    format!("{replicas} replicas serve version {version}"),
                ),
                (Rollout::InProgress(message), _) => (false, ROLLING_OUT, message.clone()),
                (Rollout::Stalled(message), _) => {
                    (false, PROGRESS_DEADLINE_EXCEEDED, message.clone())
                }
            };
            let progressing = match &rollout {
                Rollout::InProgress(message) => {
                    condition(PROGRESSING, true, ROLLING_OUT, message.clone())
                }
                Rollout::Stalled(message) => condition(
                    PROGRESSING,
                    false,
                    PROGRESS_DEADLINE_EXCEEDED,
                    message.clone(),
                ),
                Rollout::Complete => match rollback {
                    Some(rollback) => condition(
                        PROGRESSING,
                        false,
                        ROLLED_BACK,
                        format!(
                            "version {} failed and was rolled back to {version}",
                            rollback.failed_version
                        ),
                    ),
                    None => condition(
                        PROGRESSING,
                        false,
                        "RolloutComplete",
                        format!("version {version} rolled out"),
                    ),
                },
            };
            // The most specific cause first: a stuck pod says why a deadline passed, a rollback
            // why the spec's version is not what runs.
            let degraded = if let Some(failure) = pod_failure(pods, &version) {
                condition(DEGRADED, true, &failure.reason, failure.message)
            } else if let Some(rollback) = rollback {
                condition(
                    DEGRADED,
                    true,
                    &rollback.reason,
                    format!(
                        "version {} rolled back to {}: {}",
                        rollback.failed_version, rollback.rolled_back_to, rollback.message
                    ),
                )
            } else if let Rollout::Stalled(message) = &rollout {
                condition(DEGRADED, true, PROGRESS_DEADLINE_EXCEEDED, message.clone())
            } else if let Some((reason, message)) = replica_failure(deployment) {
                condition(DEGRADED, true, &reason, message)
            } else {
                condition(DEGRADED, false, "AsExpected", String::new())
            };
            let available_replicas = deployment_status.available_replicas.unwrap_or_default();
            let available = condition(
                AVAILABLE,
                available_replicas > 0,
                if available_replicas > 0 {
                    "ReplicasAvailable"
                } else {
                    "NoReplicasAvailable"
                },
                format!("{available_replicas} replicas available"),
            );
            let rolled_back = match rollback {
                Some(rollback) => condition(
                    ROLLED_BACK,
                    true,
                    &rollback.reason,
                    format!(
                        "version {} failed ({}: {}); rolled back to {}. Change the spec, or the {RETRY_ANNOTATION} annotation, to try again",
                        rollback.failed_version,
                        rollback.reason,
                        rollback.message,
                        rollback.rolled_back_to
                    ),
                ),
                None => condition(ROLLED_BACK, false, "NotRolledBack", String::new()),
            };
            let complete = rollout == Rollout::Complete;
            // The last good version moves on when the spec itself rolled out, never on rollback.
            let (last_good_version, last_good_spec) = if complete && rollback.is_none() {
                (
                    Some(version.clone()),
                    Some(rollout::template_spec(&plan.spec)),
                )
            } else {
                (previous.last_good_version, previous.last_good_spec)
            };
            QuantizedModelStatus {
                observed_generation: generation,
                conditions: vec![
                    condition(READY, ready, ready_reason, ready_message),
                    progressing,
                    degraded,
                    available,
                    rolled_back,
                ],
                replicas: deployment_status.replicas.unwrap_or_default(),
                ready_replicas: deployment_status.ready_replicas.unwrap_or_default(),
                updated_replicas: deployment_status.updated_replicas.unwrap_or_default(),
                current_version: if complete {
                    Some(version)
                } else {
                    previous.current_version
                },
                desired_version: Some(model.spec.model.version.clone()),
                image: Some(desired.image.clone()),
                device: Some(desired.device.as_str().to_owned()),
                endpoint: Some(desired.endpoint.clone()),
                selector: Some(desired.selector.clone()),
                last_good_version,
                last_good_spec,
                rollback: rollback.cloned(),
                rollout_strategy: (plan.one_at_a_time && !complete)
                    .then(|| ONE_AT_A_TIME.to_owned()),
                rollout_note: rollout::rollout_note(&model.spec),
                canary: None,
                autoscaling: None,
            }
        }
    }
}

/// Progressing's reason while a canary is judged.
pub const CANARY_ANALYSIS: &str = "CanaryAnalysis";

/// `status` with the model's canary: `judged` (this reconcile's verdict on the canary in
/// force) or, for the spec whose canary ended, the previous one, `Promoted` once its version
/// runs everywhere. While a canary is judged, Progressing says so.
pub fn with_canary(
    mut status: QuantizedModelStatus,
    model: &QuantizedModel,
    judged: Option<CanaryStatus>,
    now: &Time,
) -> QuantizedModelStatus {
    let spec_hash = rollout::spec_hash(&rollout::template_spec(&model.spec));
    let previous = model
        .status
        .as_ref()
        .and_then(|s| s.canary.clone())
        .filter(|canary| canary.spec_hash == spec_hash);
    status.canary = judged.or(previous).map(|mut canary| {
        if canary.phase == CanaryPhase::Promoting
            && status.rollback.is_none()
            && status.current_version.as_deref() == Some(canary.version.as_str())
        {
            canary.phase = CanaryPhase::Promoted;
        }
        canary
    });
    let judging = status
        .canary
        .as_ref()
        .filter(|c| matches!(c.phase, CanaryPhase::Starting | CanaryPhase::Analysing));
    if let Some(canary) = judging {
        let message = format!("canary of version {}: {}", canary.version, canary.message);
        // Progressing while the canary is judged; not Ready, since the spec's version does not
        // serve yet (`kubectl wait --for=condition=Ready` waits for the promotion). Available
        // still says the stable pods serve.
        for (type_, value) in [(PROGRESSING, true), (READY, false)] {
            if let Some(condition) = status.conditions.iter_mut().find(|c| c.type_ == type_) {
                *condition =
                    carried_condition(model, now, type_, value, CANARY_ANALYSIS, message.clone());
            }
        }
    }
    status
}

fn find<'a>(status: &'a QuantizedModelStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

fn event(type_: EventType, reason: &str, note: String) -> Event {
    Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    }
}

/// Events for what changed between two statuses, so steady-state reconciles publish nothing.
pub fn events(old: Option<&QuantizedModelStatus>, new: &QuantizedModelStatus) -> Vec<Event> {
    let empty = QuantizedModelStatus::default();
    let old = old.unwrap_or(&empty);
    let mut events = Vec::new();
    let invalid = find(new, DEGRADED).is_some_and(|c| c.reason == INVALID_SPEC);
    let serving = new.image.is_some() && !invalid;

    if serving && old.image.is_none() {
        events.push(event(
            EventType::Normal,
            "Created",
            format!(
                "serving {} at {}",
                new.image.as_deref().unwrap_or_default(),
                new.endpoint.as_deref().unwrap_or_default()
            ),
        ));
    } else if serving && old.observed_generation != new.observed_generation {
        events.push(event(
            EventType::Normal,
            "Updated",
            format!(
                "applied generation {}",
                new.observed_generation.unwrap_or_default()
            ),
        ));
    }
    if let (Some(from), Some(to)) = (&old.desired_version, &new.desired_version)
        && from != to
        && serving
    {
        events.push(event(
            EventType::Normal,
            "RolloutStarted",
            format!("rolling out version {to} (from {from})"),
        ));
    }
    if let Some(current) = new
        .current_version
        .as_ref()
        .filter(|v| old.current_version.as_ref() != Some(*v))
    {
        events.push(event(
            EventType::Normal,
            "RolloutFinished",
            format!(
                "all {} replicas run version {current}",
                new.updated_replicas
            ),
        ));
    }
    if let Some(rollback) = &new.rollback
        && old.rollback.as_ref().map(|r| &r.time) != Some(&rollback.time)
    {
        let message = find(new, ROLLED_BACK).map_or_else(String::new, |c| c.message.clone());
        events.push(event(EventType::Warning, ROLLED_BACK, message));
    }
    if let Some(canary) = &new.canary
        && old.canary.as_ref().map(|c| (&c.spec_hash, c.phase))
            != Some((&canary.spec_hash, canary.phase))
    {
        // A promoted canary's end is RolloutFinished, a failed one's RolledBack.
        let reason = match canary.phase {
            CanaryPhase::Starting => Some("CanaryStarted"),
            CanaryPhase::Analysing => Some("CanaryAnalysing"),
            CanaryPhase::Promoting => Some("CanaryPassed"),
            CanaryPhase::Promoted | CanaryPhase::RolledBack => None,
        };
        if let Some(reason) = reason {
            events.push(event(
                EventType::Normal,
                reason,
                format!("canary of version {}: {}", canary.version, canary.message),
            ));
        }
    }
    if let Some(scaled) = &new.autoscaling
        && let Some(before) = old
            .autoscaling
            .as_ref()
            .map(|a| a.desired_replicas)
            .filter(|before| *before != scaled.desired_replicas)
    {
        let reason = if scaled.desired_replicas > before {
            "ScaledUp"
        } else {
            "ScaledDown"
        };
        events.push(event(
            EventType::Normal,
            reason,
            format!(
                "{before} -> {} replicas: {}",
                scaled.desired_replicas, scaled.message
            ),
        ));
    }
    if new.rollout_strategy.is_some() && old.rollout_strategy.is_none() {
        events.push(event(
            EventType::Normal,
            NO_SPARE_GPU,
            format!(
                "no node has a GPU free for a surge pod: replacing the replicas of version {} one at a time",
                new.desired_version.as_deref().unwrap_or_default()
            ),
        ));
    }
    if let Some(degraded) = find(new, DEGRADED).filter(|c| c.status == "True") {
        let already_reported = find(old, DEGRADED).is_some_and(|c| {
            c.status == "True" && c.reason == degraded.reason && c.message == degraded.message
        });
        if !already_reported {
            let reason = match degraded.reason.as_str() {
                INVALID_SPEC => INVALID_SPEC,
                PROGRESS_DEADLINE_EXCEEDED => "RolloutStalled",
                cause @ (IMAGE_PULL_BACK_OFF | CRASH_LOOP_BACK_OFF | NOT_READY) => cause,
                cause if canary::REASONS.contains(&cause) => cause,
                cause if CONTAINER_CANNOT_START.contains(&cause) => cause,
                _ => "ReplicaFailure",
            };
            events.push(event(EventType::Warning, reason, degraded.message.clone()));
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    use super::*;
    use crate::config::OperatorConfig;
    use crate::resources::desired_state;
    use crate::testing::{model, rolling_from_1_to_2};

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    /// The applied Deployment of `qm` with the given generation and status.
    fn applied(
        qm: &QuantizedModel,
        generation: i64,
        status: DeploymentStatus,
    ) -> (DesiredState, Deployment) {
        let desired = desired_state(qm, &OperatorConfig::default()).unwrap();
        let mut deployment = desired.deployment.clone();
        deployment.metadata.generation = Some(generation);
        deployment.status = Some(status);
        (desired, deployment)
    }

    fn deployment_status(
        observed: i64,
        replicas: i32,
        updated: i32,
        available: i32,
    ) -> DeploymentStatus {
        DeploymentStatus {
            observed_generation: Some(observed),
            replicas: Some(replicas),
            updated_replicas: Some(updated),
            ready_replicas: Some(available),
            available_replicas: Some(available),
            ..DeploymentStatus::default()
        }
    }

    fn observe(qm: &QuantizedModel, status: DeploymentStatus, now: &Time) -> QuantizedModelStatus {
        observe_with_pods(qm, status, &[], now)
    }

    fn observe_with_pods(
        qm: &QuantizedModel,
        status: DeploymentStatus,
        pods: &[Pod],
        now: &Time,
    ) -> QuantizedModelStatus {
        let (desired, deployment) = applied(qm, 2, status);
        super::status(
            qm,
            &Observation::Applied {
                plan: &Plan::of(qm),
                desired: &desired,
                deployment: &deployment,
                pods,
            },
            now,
        )
    }

    /// A pod of `version` whose server container has `container_status` (a core/v1
    /// ContainerStatus as JSON, name and image filled in).
    fn pod(name: &str, version: &str, container_status: serde_json::Value) -> Pod {
        let defaults = json!({
            "name": "server",
            "image": format!("ghcr.io/qmodel/qmodel-server:{version}-int8"),
            "imageID": "",
            "ready": false,
            "restartCount": 0,
        });
        let mut status = defaults;
        crate::testing::merge(&mut status, container_status);
        serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "namespace": "ml",
                "labels": {"serving.qmodel.dev/model": "bge", MODEL_VERSION_KEY: version},
            },
            "status": {"containerStatuses": [status]},
        }))
        .unwrap()
    }

    fn running(name: &str, version: &str) -> Pod {
        pod(
            name,
            version,
            json!({"ready": true, "state": {"running": {}}}),
        )
    }

    fn pulling_fails(name: &str, version: &str, reason: &str) -> Pod {
        pod(
            name,
            version,
            json!({"state": {"waiting": {"reason": reason, "message": format!("{reason}: not found {name}")}}}),
        )
    }

    fn crash_looping(name: &str, version: &str) -> Pod {
        pod(
            name,
            version,
            json!({
                "restartCount": 3,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
                "lastState": {"terminated": {
                    "exitCode": 1,
                    "reason": "Error",
                    "message": "qmodel-server: model.gguf: sha256 mismatch\n",
                }},
            }),
        )
    }

    fn condition<'a>(status: &'a QuantizedModelStatus, type_: &str) -> (&'a str, &'a str) {
        let c = find(status, type_).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    fn reasons(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.reason.as_str()).collect()
    }

    #[test]
    fn rollout_follows_kubectl_rollout_status() {
        let qm = model(json!({"replicas": 3}));
        let judge = |status| rollout(&applied(&qm, 2, status).1);
        assert!(
            matches!(judge(deployment_status(1, 3, 3, 3)), Rollout::InProgress(m) if m.contains("generation 2"))
        );
        assert_eq!(
            judge(deployment_status(2, 4, 1, 3)),
            Rollout::InProgress("1 of 3 replicas updated".into())
        );
        assert_eq!(
            judge(deployment_status(2, 4, 3, 3)),
            Rollout::InProgress("1 old replicas pending termination".into())
        );
        assert_eq!(
            judge(deployment_status(2, 3, 3, 2)),
            Rollout::InProgress("2 of 3 updated replicas available".into())
        );
        assert_eq!(judge(deployment_status(2, 3, 3, 3)), Rollout::Complete);
    }

    #[test]
    fn new_model_progresses_then_becomes_ready() {
        let qm = model(json!({"replicas": 2}));
        let starting = observe(&qm, deployment_status(2, 2, 2, 0), &at(100));
        assert_eq!(condition(&starting, READY), ("False", ROLLING_OUT));
        assert_eq!(condition(&starting, PROGRESSING), ("True", ROLLING_OUT));
        assert_eq!(condition(&starting, DEGRADED), ("False", "AsExpected"));
        assert_eq!(starting.current_version, None);
        assert_eq!(starting.desired_version.as_deref(), Some("1.0.0"));
        assert_eq!(
            starting.endpoint.as_deref(),
            Some("http://bge.ml.svc.cluster.local:8080")
        );
        assert_eq!(starting.device.as_deref(), Some("cpu"));
        assert_eq!(starting.observed_generation, Some(1));
        assert!(
            starting
                .conditions
                .iter()
                .all(|c| c.observed_generation == Some(1))
        );
        assert_eq!(reasons(&events(None, &starting)), ["Created"]);

        let mut qm = qm;
        qm.status = Some(starting.clone());
        let ready = observe(&qm, deployment_status(2, 2, 2, 2), &at(200));
        assert_eq!(condition(&ready, READY), ("True", "Available"));
        assert_eq!(condition(&ready, PROGRESSING), ("False", "RolloutComplete"));
        assert_eq!(ready.current_version.as_deref(), Some("1.0.0"));
        assert_eq!(
            (ready.replicas, ready.ready_replicas, ready.updated_replicas),
            (2, 2, 2)
        );
        assert_eq!(find(&ready, READY).unwrap().last_transition_time, at(200));
        assert_eq!(
            find(&ready, DEGRADED).unwrap().last_transition_time,
            at(100),
            "unchanged condition keeps its time"
        );
        assert_eq!(
            reasons(&events(Some(&starting), &ready)),
            ["RolloutFinished"]
        );

        qm.status = Some(ready.clone());
        let again = observe(&qm, deployment_status(2, 2, 2, 2), &at(300));
        assert_eq!(again, ready, "a steady state yields an identical status");
        assert!(events(Some(&ready), &again).is_empty());
    }

    #[test]
    fn version_rollout_keeps_current_version_until_complete() {
        let mut qm = model(json!({"replicas": 2, "model": {"version": "2.0.0"}}));
        qm.metadata.generation = Some(2);
        let before = QuantizedModelStatus {
            observed_generation: Some(1),
            current_version: Some("1.0.0".into()),
            desired_version: Some("1.0.0".into()),
            image: Some("ghcr.io/qmodel/qmodel-server:1.0.0-int8".into()),
            ..QuantizedModelStatus::default()
        };
        qm.status = Some(before.clone());
        let rolling = observe(&qm, deployment_status(2, 3, 1, 2), &at(10));
        assert_eq!(condition(&rolling, PROGRESSING), ("True", ROLLING_OUT));
        assert_eq!(condition(&rolling, READY), ("False", ROLLING_OUT));
        assert_eq!(
            condition(&rolling, AVAILABLE),
            ("True", "ReplicasAvailable")
        );
        assert_eq!(rolling.current_version.as_deref(), Some("1.0.0"));
        assert_eq!(rolling.desired_version.as_deref(), Some("2.0.0"));
        assert_eq!(
            rolling.image.as_deref(),
            Some("ghcr.io/qmodel/qmodel-server:2.0.0-int8")
        );
        assert_eq!(
            reasons(&events(Some(&before), &rolling)),
            ["Updated", "RolloutStarted"]
        );

        qm.status = Some(rolling.clone());
        let done = observe(&qm, deployment_status(2, 2, 2, 2), &at(20));
        assert_eq!(done.current_version.as_deref(), Some("2.0.0"));
        assert_eq!(condition(&done, READY), ("True", "Available"));
        assert_eq!(reasons(&events(Some(&rolling), &done)), ["RolloutFinished"]);
    }

    #[test]
    fn stalled_rollout_is_degraded_with_the_deployment_reason() {
        let qm = rolling_from_1_to_2();
        let mut stuck = deployment_status(2, 2, 1, 1);
        stuck.conditions = Some(vec![DeploymentCondition {
            type_: "Progressing".into(),
            status: "False".into(),
            reason: Some(PROGRESS_DEADLINE_EXCEEDED.into()),
            message: Some(r#"ReplicaSet "bge-7c9" has timed out progressing."#.into()),
            ..DeploymentCondition::default()
        }]);
        let stalled = observe(&qm, stuck, &at(10));
        assert_eq!(
            condition(&stalled, DEGRADED),
            ("True", PROGRESS_DEADLINE_EXCEEDED)
        );
        assert_eq!(
            condition(&stalled, PROGRESSING),
            ("False", PROGRESS_DEADLINE_EXCEEDED)
        );
        assert_eq!(
            condition(&stalled, READY),
            ("False", PROGRESS_DEADLINE_EXCEEDED)
        );
        assert!(
            find(&stalled, DEGRADED)
                .unwrap()
                .message
                .contains("timed out progressing")
        );
        assert_eq!(
            stalled.current_version.as_deref(),
            Some("1.0.0"),
            "the old version keeps serving"
        );
        let published = events(qm.status.as_ref(), &stalled);
        assert_eq!(reasons(&published), ["RolloutStalled"]);
        assert_eq!(published[0].type_, EventType::Warning);
        assert!(events(Some(&stalled), &stalled).is_empty(), "reported once");
    }

    #[test]
    fn pod_failures_name_their_cause() {
        assert_eq!(pod_failure(&[running("bge-a", "2.0.0")], "2.0.0"), None);
        let starting = pod(
            "bge-b",
            "2.0.0",
            json!({"state": {"waiting": {"reason": "ContainerCreating"}}}),
        );
        assert_eq!(pod_failure(&[starting], "2.0.0"), None, "still starting");

        for reason in ["ErrImagePull", "ImagePullBackOff"] {
            let failure = pod_failure(&[pulling_fails("bge-c", "2.0.0", reason)], "2.0.0").unwrap();
            assert_eq!(
                failure,
                PodFailure {
                    reason: IMAGE_PULL_BACK_OFF.to_owned(),
                    message: "pod bge-c (version 2.0.0) cannot pull image ghcr.io/qmodel/qmodel-server:2.0.0-int8"
                        .to_owned(),
                },
                "{reason}: one message whatever the back-off state, so one Event"
            );
        }

        let crash = pod_failure(&[crash_looping("bge-d", "2.0.0")], "2.0.0").unwrap();
        assert_eq!(crash.reason, CRASH_LOOP_BACK_OFF);
        assert_eq!(
            crash.message,
            "pod bge-d (version 2.0.0): container server exited with code 1: qmodel-server: model.gguf: sha256 mismatch"
        );

        let config = pod(
            "bge-e",
            "2.0.0",
            json!({"state": {"waiting": {"reason": "CreateContainerConfigError", "message": "secret \"key\" not found"}}}),
        );
        assert_eq!(
            pod_failure(&[config], "2.0.0").unwrap().message,
            "pod bge-e (version 2.0.0): secret \"key\" not found"
        );
    }

    #[test]
    fn the_desired_versions_pods_are_judged_first_and_terminating_ones_not_at_all() {
        let mut leaving = crash_looping("bge-a", "1.0.0");
        leaving.metadata.deletion_timestamp = Some(at(5));
        assert_eq!(
            pod_failure(&[leaving, running("bge-b", "2.0.0")], "2.0.0"),
            None
        );
        let pods = [
            crash_looping("bge-a", "1.0.0"),
            pulling_fails("bge-z", "2.0.0", "ErrImagePull"),
        ];
        assert_eq!(
            pod_failure(&pods, "2.0.0").unwrap().reason,
            IMAGE_PULL_BACK_OFF
        );
        assert_eq!(
            pod_failure(&pods[..1], "2.0.0").unwrap().reason,
            CRASH_LOOP_BACK_OFF,
            "a broken old version is a failure too"
        );
    }

    #[test]
    fn a_stuck_new_version_is_degraded_with_the_pod_cause_while_the_old_one_serves() {
        let qm = rolling_from_1_to_2();
        let mut stuck = deployment_status(2, 2, 1, 1);
        // Past the deadline too: the pod's cause is the more useful reason.
        stuck.conditions = Some(vec![DeploymentCondition {
            type_: "Progressing".into(),
            status: "False".into(),
            reason: Some(PROGRESS_DEADLINE_EXCEEDED.into()),
            message: Some("timed out".into()),
            ..DeploymentCondition::default()
        }]);
        let pods = [
            running("bge-old", "1.0.0"),
            crash_looping("bge-new", "2.0.0"),
        ];
        let status = observe_with_pods(&qm, stuck, &pods, &at(10));
        assert_eq!(condition(&status, DEGRADED), ("True", CRASH_LOOP_BACK_OFF));
        assert!(
            find(&status, DEGRADED)
                .unwrap()
                .message
                .contains("sha256 mismatch")
        );
        assert_eq!(condition(&status, AVAILABLE), ("True", "ReplicasAvailable"));
        assert_eq!(status.current_version.as_deref(), Some("1.0.0"));
        let published = events(qm.status.as_ref(), &status);
        assert_eq!(reasons(&published), [CRASH_LOOP_BACK_OFF]);
        assert_eq!(published[0].type_, EventType::Warning);
        assert!(
            published[0]
                .note
                .as_deref()
                .unwrap()
                .contains("exited with code 1")
        );

        let mut qm = qm;
        qm.status = Some(status.clone());
        let again = observe_with_pods(&qm, deployment_status(2, 2, 1, 1), &pods, &at(20));
        assert_eq!(find(&again, DEGRADED), find(&status, DEGRADED));
        assert!(events(Some(&status), &again).is_empty(), "reported once");

        // The pull failure of a missing image, through its two alternating kubelet states.
        let qm = rolling_from_1_to_2();
        let pull = |reason| {
            let pods = [
                running("bge-old", "1.0.0"),
                pulling_fails("bge-new", "2.0.0", reason),
            ];
            observe_with_pods(&qm, deployment_status(2, 2, 1, 1), &pods, &at(30))
        };
        let (first, second) = (pull("ErrImagePull"), pull("ImagePullBackOff"));
        assert_eq!(condition(&first, DEGRADED), ("True", IMAGE_PULL_BACK_OFF));
        assert_eq!(
            reasons(&events(qm.status.as_ref(), &first)),
            [IMAGE_PULL_BACK_OFF]
        );
        assert!(events(Some(&first), &second).is_empty());
    }

    #[test]
    fn replica_failure_is_degraded() {
        let qm = model(json!({}));
        let mut failing = deployment_status(2, 0, 0, 0);
        failing.conditions = Some(vec![DeploymentCondition {
            type_: "ReplicaFailure".into(),
            status: "True".into(),
            reason: Some("FailedCreate".into()),
            message: Some("exceeded quota".into()),
            ..DeploymentCondition::default()
        }]);
        let status = observe(&qm, failing, &at(10));
        assert_eq!(condition(&status, DEGRADED), ("True", "FailedCreate"));
        assert_eq!(condition(&status, PROGRESSING), ("True", ROLLING_OUT));
        assert!(reasons(&events(None, &status)).contains(&"ReplicaFailure"));
    }

    #[test]
    fn scaled_to_zero_is_not_ready() {
        let status = observe(
            &model(json!({"replicas": 0})),
            deployment_status(2, 0, 0, 0),
            &at(10),
        );
        assert_eq!(condition(&status, READY), ("False", "ScaledToZero"));
        assert_eq!(
            condition(&status, AVAILABLE),
            ("False", "NoReplicasAvailable")
        );
        assert_eq!(status.current_version.as_deref(), Some("1.0.0"));
    }

    #[test]
    fn invalid_spec_sets_conditions_and_one_warning() {
        let error = SpecError::GpuOnCpu;
        let qm = model(json!({}));
        let status = super::status(&qm, &Observation::Invalid(&error), &at(10));
        assert_eq!(condition(&status, READY), ("False", INVALID_SPEC));
        assert_eq!(condition(&status, PROGRESSING), ("False", INVALID_SPEC));
        assert_eq!(condition(&status, DEGRADED), ("True", INVALID_SPEC));
        assert_eq!(find(&status, DEGRADED).unwrap().message, error.to_string());
        assert_eq!(status.image, None);
        let published = events(None, &status);
        assert_eq!(reasons(&published), ["InvalidSpec"]);
        assert_eq!(
            published[0].note.as_deref(),
            Some(error.to_string().as_str())
        );
        assert!(events(Some(&status), &status).is_empty());
    }

    #[test]
    fn invalid_update_of_a_served_model_keeps_what_it_served() {
        let mut qm = model(json!({}));
        let serving = observe(&qm, deployment_status(2, 1, 1, 1), &at(10));
        qm.status = Some(serving.clone());
        qm.metadata.generation = Some(2);
        let status = super::status(
            &qm,
            &Observation::Invalid(&SpecError::ZeroRolloutBudget),
            &at(20),
        );
        assert_eq!(status.current_version, serving.current_version);
        assert_eq!(status.endpoint, serving.endpoint);
        assert_eq!(
            find(&status, AVAILABLE),
            find(&serving, AVAILABLE),
            "the old Deployment still serves"
        );
        assert_eq!(reasons(&events(Some(&serving), &status)), ["InvalidSpec"]);
    }

    /// The status of `qm` after its failed 2.0.0 rollout was put back on 1.0.0.
    fn rolled_back(
        qm: &QuantizedModel,
        status: DeploymentStatus,
        pods: &[Pod],
    ) -> QuantizedModelStatus {
        let plan = Plan::of(qm);
        let verdict = crate::rollout::judge(
            qm,
            &plan,
            &applied(qm, 2, deployment_status(2, 2, 1, 1)).1,
            pods,
            &at(50),
        );
        let plan = plan.after(verdict).expect("a rollback");
        let desired = desired_state(&plan.model(qm), &OperatorConfig::default()).unwrap();
        let mut deployment = desired.deployment.clone();
        deployment.metadata.generation = Some(3);
        deployment.status = Some(DeploymentStatus {
            observed_generation: Some(3),
            ..status
        });
        super::status(
            qm,
            &Observation::Applied {
                plan: &plan,
                desired: &desired,
                deployment: &deployment,
                pods,
            },
            &at(50),
        )
    }

    #[test]
    fn a_rolled_back_model_says_which_version_failed_why_and_what_serves() {
        let qm = crate::testing::rolling_from_good_1_to_2();
        let pods = [
            running("bge-old", "1.0.0"),
            crash_looping("bge-new", "2.0.0"),
        ];
        let status = rolled_back(&qm, deployment_status(3, 2, 1, 1), &pods);
        assert_eq!(
            condition(&status, ROLLED_BACK),
            ("True", CRASH_LOOP_BACK_OFF)
        );
        let message = &find(&status, ROLLED_BACK).unwrap().message;
        assert!(
            message.contains("version 2.0.0 failed (CrashLoopBackOff: pod bge-new"),
            "{message}"
        );
        assert!(message.contains("rolled back to 1.0.0"), "{message}");
        assert!(message.contains(RETRY_ANNOTATION), "{message}");
        assert_eq!(condition(&status, DEGRADED), ("True", CRASH_LOOP_BACK_OFF));
        assert!(
            find(&status, DEGRADED)
                .unwrap()
                .message
                .starts_with("version 2.0.0 rolled back to 1.0.0: pod bge-new")
        );
        assert_eq!(condition(&status, AVAILABLE), ("True", "ReplicasAvailable"));
        assert_eq!(
            status.image.as_deref(),
            Some("ghcr.io/qmodel/qmodel-server:1.0.0-int8")
        );
        assert_eq!(status.desired_version.as_deref(), Some("2.0.0"));
        assert_eq!(status.rollback.as_ref().unwrap().failed_version, "2.0.0");
        let published = events(qm.status.as_ref(), &status);
        assert_eq!(reasons(&published), [ROLLED_BACK, CRASH_LOOP_BACK_OFF]);
        assert!(published.iter().all(|e| e.type_ == EventType::Warning));

        // Once the failed pods are gone and 1.0.0 runs everywhere again.
        let mut qm = qm;
        qm.status = Some(status.clone());
        let settled = observe(&qm, deployment_status(2, 1, 1, 1), &at(60));
        assert_eq!(condition(&settled, READY), ("False", ROLLED_BACK));
        assert_eq!(condition(&settled, PROGRESSING), ("False", ROLLED_BACK));
        assert_eq!(condition(&settled, ROLLED_BACK).0, "True");
        assert_eq!(settled.current_version.as_deref(), Some("1.0.0"));
        assert_eq!(settled.last_good_version.as_deref(), Some("1.0.0"));
        assert_eq!(
            settled.last_good_spec,
            qm.status.as_ref().unwrap().last_good_spec
        );
        assert_eq!(find(&settled, DEGRADED), find(&status, DEGRADED));
        assert!(events(Some(&status), &settled).is_empty(), "reported once");

        // A new spec is tried: the rollback ends.
        qm.spec.model.version = "2.0.1".into();
        let retrying = observe(&qm, deployment_status(2, 2, 1, 1), &at(70));
        assert_eq!(
            condition(&retrying, ROLLED_BACK),
            ("False", "NotRolledBack")
        );
        assert_eq!(retrying.rollback, None);
        assert_eq!(
            retrying.image.as_deref(),
            Some("ghcr.io/qmodel/qmodel-server:2.0.1-int8")
        );
    }

    #[test]
    fn a_promoting_canary_is_promoted_once_its_version_runs_everywhere_and_events_say_each_phase() {
        let qm = model(json!({"model": {"version": "2.0.0"}}));
        let hash = rollout::spec_hash(&rollout::template_spec(&qm.spec));
        let promoting = CanaryStatus {
            phase: CanaryPhase::Promoting,
            version: "2.0.0".into(),
            spec_hash: hash,
            analysis_started: Some(at(1)),
            checks: Vec::new(),
            message: "passed".into(),
        };
        let mut previous = qm.clone();
        previous.status = Some(QuantizedModelStatus {
            canary: Some(promoting.clone()),
            ..QuantizedModelStatus::default()
        });
        let rolling = QuantizedModelStatus {
            current_version: Some("1.0.0".into()),
            ..QuantizedModelStatus::default()
        };
        let kept = with_canary(rolling, &previous, None, &at(2));
        assert_eq!(kept.canary.as_ref().unwrap().phase, CanaryPhase::Promoting);
        let done = QuantizedModelStatus {
            current_version: Some("2.0.0".into()),
            ..QuantizedModelStatus::default()
        };
        let done = with_canary(done, &previous, None, &at(3));
        assert_eq!(done.canary.as_ref().unwrap().phase, CanaryPhase::Promoted);

        let starting = CanaryStatus {
            phase: CanaryPhase::Starting,
            ..promoting.clone()
        };
        let with = |canary: &CanaryStatus| QuantizedModelStatus {
            canary: Some(canary.clone()),
            ..QuantizedModelStatus::default()
        };
        let reasons = |old: &QuantizedModelStatus, new: &QuantizedModelStatus| {
            events(Some(old), new)
                .into_iter()
                .map(|e| e.reason)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            reasons(&QuantizedModelStatus::default(), &with(&starting)),
            ["CanaryStarted"]
        );
        assert_eq!(
            reasons(&with(&starting), &with(&promoting)),
            ["CanaryPassed"]
        );
        assert!(reasons(&with(&promoting), &with(&promoting)).is_empty());

        // Another spec drops the finished canary from status.
        let other = model(json!({"model": {"version": "3.0.0"}}));
        let other = QuantizedModel {
            status: previous.status.clone(),
            ..other
        };
        assert!(
            with_canary(QuantizedModelStatus::default(), &other, None, &at(4))
                .canary
                .is_none()
        );
    }

    #[test]
    fn scaling_events_say_from_what_to_what_and_why() {
        let scaled = |desired| QuantizedModelStatus {
            autoscaling: Some(crate::crd::AutoscalingStatus {
                metric: crate::crd::ScaleMetric::InFlight,
                desired_replicas: desired,
                current_replicas: 1,
                signal: "3".into(),
                target_per_replica: "1".into(),
                last_scale_time: None,
                message: "3 InFlight over 1 replicas".into(),
            }),
            ..QuantizedModelStatus::default()
        };
        let up = events(Some(&scaled(1)), &scaled(3));
        assert_eq!(up[0].reason, "ScaledUp");
        assert_eq!(
            up[0].note.as_deref(),
            Some("1 -> 3 replicas: 3 InFlight over 1 replicas")
        );
        assert_eq!(events(Some(&scaled(3)), &scaled(2))[0].reason, "ScaledDown");
        assert!(events(Some(&scaled(2)), &scaled(2)).is_empty());
    }

    #[test]
    fn a_complete_rollout_becomes_the_last_good_version() {
        let qm = crate::testing::rolling_from_good_1_to_2();
        let rolling = observe(&qm, deployment_status(2, 3, 1, 2), &at(10));
        assert_eq!(rolling.last_good_version.as_deref(), Some("1.0.0"));
        let done = observe(&qm, deployment_status(2, 2, 2, 2), &at(20));
        assert_eq!(done.last_good_version.as_deref(), Some("2.0.0"));
        assert_eq!(
            done.last_good_spec,
            Some(crate::rollout::template_spec(&qm.spec))
        );
        assert_eq!(condition(&done, ROLLED_BACK), ("False", "NotRolledBack"));
    }

    #[test]
    fn one_at_a_time_shows_in_status_until_the_rollout_completes() {
        let mut qm =
            model(json!({"precision": "fp16", "replicas": 2, "model": {"version": "2.0.0"}}));
        qm.status = crate::testing::rolling_from_good_1_to_2().status;
        let before = qm.status.clone();
        let plan = Plan::of(&qm)
            .after(crate::rollout::Verdict::ReplaceOneAtATime)
            .unwrap();
        let desired = desired_state(&plan.model(&qm), &OperatorConfig::default()).unwrap();
        let rolling_update = desired
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .strategy
            .as_ref()
            .unwrap()
            .rolling_update
            .clone()
            .unwrap();
        assert_eq!(rolling_update.max_surge, Some(IntOrString::Int(0)));
        assert_eq!(rolling_update.max_unavailable, Some(IntOrString::Int(1)));
        let mut deployment = desired.deployment.clone();
        deployment.metadata.generation = Some(2);
        deployment.status = Some(deployment_status(2, 2, 1, 1));
        let status = super::status(
            &qm,
            &Observation::Applied {
                plan: &plan,
                desired: &desired,
                deployment: &deployment,
                pods: &[],
            },
            &at(10),
        );
        assert_eq!(status.rollout_strategy.as_deref(), Some(ONE_AT_A_TIME));
        assert_eq!(
            status.rollout_note, None,
            "two replicas: no outage either way"
        );
        let published = events(before.as_ref(), &status);
        assert!(
            reasons(&published).contains(&"NoSpareGpu"),
            "{:?}",
            reasons(&published)
        );

        qm.status = Some(status);
        assert!(Plan::of(&qm).one_at_a_time);
        let done = observe(&qm, deployment_status(2, 2, 2, 2), &at(20));
        assert_eq!(done.rollout_strategy, None);
        assert_eq!(done.current_version.as_deref(), Some("2.0.0"));
    }
}
