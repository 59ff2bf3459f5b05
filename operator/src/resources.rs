//! Desired state: pure functions from a `QuantizedModel` and the operator configuration to the
//! objects that serve it. No I/O, so every placement and rollout decision is unit-tested here.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, HTTPGetAction,
    Lifecycle, LifecycleHandler, NodeAffinity, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec as CoreServiceSpec,
    SleepAction, Toleration, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::config::{OperatorConfig, Termination};
use crate::crd::{Device, Precision, PullPolicy, QuantizedModel, QuantizedModelSpec};

pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "qmodel-operator";
pub const MODEL_LABEL: &str = "serving.qmodel.dev/model";
/// Pod-template label and annotation carrying the model version; never part of a selector,
/// because a Deployment's selector is immutable.
pub const MODEL_VERSION_KEY: &str = "serving.qmodel.dev/model-version";
pub const SERVER_NAME: &str = "qmodel-server";
/// Label of a canary's pods (value [`CANARY`]); stable pods have none. The Service selects both.
pub const TRACK_LABEL: &str = "serving.qmodel.dev/track";
pub const CANARY: &str = "canary";
pub const CONTAINER_NAME: &str = "server";
pub const CONTAINER_PORT: i32 = 8080;
pub const PORT_NAME: &str = "http";
/// Unprivileged user and group the server runs as (the distroless "nonroot" ids).
const RUN_AS_ID: i64 = 65532;

/// Everything the controller applies for one model, plus the facts its status reports.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredState {
    pub deployment: Deployment,
    pub service: Service,
    /// Present when more than one replica runs; otherwise any existing one is deleted.
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
    pub image: String,
    pub device: Device,
    pub endpoint: String,
    /// The pods' label selector in string form, for the scale subresource.
    pub selector: String,
}

/// Why a `QuantizedModel` cannot be served. Each becomes a condition and an Event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(
        "the object lacks a name, namespace or uid; only objects read from the API server can be served"
    )]
    NotPersisted,
    #[error("precision {precision} cannot run on device {device}")]
    PrecisionDeviceMismatch {
        precision: &'static str,
        device: &'static str,
    },
    #[error("spec.gpu is set but the model runs on device cpu")]
    GpuOnCpu,
    #[error("GPU profile {profile:?} is not configured in the operator (known: {known})")]
    UnknownGpuProfile { profile: String, known: String },
    #[error(
        "rollout.maxSurge and rollout.maxUnavailable are both zero, so no rollout could make progress"
    )]
    ZeroRolloutBudget,
}

/// The image tag convention, in one place: `<version>-<precision>` for CPU images and
/// `<version>-<precision>-cuda` for GPU images (`1.2.0-int8`, `1.2.0-fp16-cuda`).
pub fn default_image_tag(version: &str, precision: Precision, device: Device) -> String {
    match device {
        Device::Cpu => format!("{version}-{}", precision.as_str()),
        Device::Gpu => format!("{version}-{}-cuda", precision.as_str()),
    }
}

/// The full image reference: a digest override wins, then a tag override, then the convention.
pub fn image_reference(spec: &QuantizedModelSpec, config: &OperatorConfig) -> String {
    let repository = spec
        .image
        .repository
        .as_deref()
        .unwrap_or(&config.image_repository);
    match (&spec.image.digest, &spec.image.tag) {
        (Some(digest), _) => format!("{repository}@{digest}"),
        (None, Some(tag)) => format!("{repository}:{tag}"),
        (None, None) => format!(
            "{repository}:{}",
            default_image_tag(&spec.model.version, spec.precision, spec.effective_device())
        ),
    }
}

pub fn endpoint(name: &str, namespace: &str, port: i32) -> String {
    format!("http://{name}.{namespace}.svc.cluster.local:{port}")
}

/// Labels selecting a model's pods; stable across versions.
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_owned(), SERVER_NAME.to_owned()),
        (INSTANCE_LABEL.to_owned(), name.to_owned()),
        (MODEL_LABEL.to_owned(), name.to_owned()),
    ])
}

pub fn selector_string(name: &str) -> String {
    selector_labels(name)
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Labels of the Deployment, Service and PodDisruptionBudget objects themselves.
fn object_labels(name: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(name);
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
    labels
}

pub fn desired_state(
    model: &QuantizedModel,
    config: &OperatorConfig,
) -> Result<DesiredState, SpecError> {
    let spec = &model.spec;
    let (Some(namespace), Some(owner)) = (model.namespace(), model.controller_owner_ref(&()))
    else {
        return Err(SpecError::NotPersisted);
    };
    let name = model.name_any();
    let device = spec.effective_device();
    check_precision_and_device(spec, device)?;
    if is_zero(&spec.rollout.max_surge) && is_zero(&spec.rollout.max_unavailable) {
        return Err(SpecError::ZeroRolloutBudget);
    }
    let placement = placement(spec, device, config)?;
    let image = image_reference(spec, config);
    let metadata = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(namespace.clone()),
        labels: Some(object_labels(&name)),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    };
    Ok(DesiredState {
        deployment: deployment(
            spec,
            metadata.clone(),
            &name,
            &image,
            device,
            placement,
            &config.termination,
        ),
        service: service(spec, metadata.clone(), &name),
        pod_disruption_budget: (spec.replicas > 1).then(|| pod_disruption_budget(metadata, &name)),
        endpoint: endpoint(&name, &namespace, spec.service.port),
        selector: selector_string(&name),
        image,
        device,
    })
}

/// The canary Deployment's name: the model's and a suffix. (The model's name is a DNS-1035
/// label of at most 63 characters; a Deployment's name may be longer.)
pub fn canary_name(name: &str) -> String {
    format!("{name}-{CANARY}")
}

/// The canary Deployment of `model` (whose spec is the canary's): the stable one's pods with
/// the [`TRACK_LABEL`], under its own name and selector, at the spec's replica count.
pub fn canary_deployment(
    model: &QuantizedModel,
    config: &OperatorConfig,
) -> Result<Deployment, SpecError> {
    let mut deployment = desired_state(model, config)?.deployment;
    let name = model.name_any();
    deployment.metadata.name = Some(canary_name(&name));
    let track = || (TRACK_LABEL.to_owned(), CANARY.to_owned());
    if let Some(labels) = deployment.metadata.labels.as_mut() {
        labels.extend([track()]);
    }
    if let Some(spec) = deployment.spec.as_mut() {
        spec.replicas = Some(model.spec.replicas);
        if let Some(labels) = spec.selector.match_labels.as_mut() {
            labels.extend([track()]);
        }
        if let Some(labels) = spec
            .template
            .metadata
            .as_mut()
            .and_then(|m| m.labels.as_mut())
        {
            labels.extend([track()]);
        }
    }
    Ok(deployment)
}

fn check_precision_and_device(spec: &QuantizedModelSpec, device: Device) -> Result<(), SpecError> {
    let compatible = match spec.precision {
        Precision::Int8 | Precision::Int4 => device == Device::Cpu,
        Precision::Fp16 => device == Device::Gpu,
        Precision::Fp32 => true,
    };
    if !compatible {
        return Err(SpecError::PrecisionDeviceMismatch {
            precision: spec.precision.as_str(),
            device: device.as_str(),
        });
    }
    if spec.gpu.is_some() && device == Device::Cpu {
        return Err(SpecError::GpuOnCpu);
    }
    Ok(())
}

fn is_zero(value: &IntOrString) -> bool {
    match value {
        IntOrString::Int(n) => *n == 0,
        IntOrString::String(s) => s.trim_end_matches('%').trim() == "0",
    }
}

/// Scheduling and resources of the server pod, decided by the device.
#[derive(Clone, Debug, PartialEq, Default)]
struct Placement {
    node_selector: BTreeMap<String, String>,
    tolerations: Vec<Toleration>,
    affinity: Option<Affinity>,
    runtime_class_name: Option<String>,
    resources: ResourceRequirements,
}

fn placement(
    spec: &QuantizedModelSpec,
    device: Device,
    config: &OperatorConfig,
) -> Result<Placement, SpecError> {
    match device {
        Device::Cpu => Ok(Placement {
            node_selector: spec.node_selector.clone(),
            tolerations: spec.tolerations.clone(),
            affinity: spec.affinity.clone().or_else(|| {
                config
                    .keep_cpu_models_off_gpu_nodes
                    .then(|| avoid_gpu_nodes(&config.gpu_node_label))
            }),
            runtime_class_name: None,
            resources: spec
                .resources
                .clone()
                .unwrap_or_else(|| config.default_cpu_resources.clone()),
        }),
        Device::Gpu => {
            let gpu = spec.gpu.clone().unwrap_or_default();
            let profile_name = gpu
                .profile
                .as_deref()
                .unwrap_or(&config.default_gpu_profile);
            let profile = config.gpu_profiles.get(profile_name).ok_or_else(|| {
                SpecError::UnknownGpuProfile {
                    profile: profile_name.to_owned(),
                    known: config
                        .gpu_profiles
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                }
            })?;
            let mut node_selector = profile.node_selector.clone();
            node_selector.extend(spec.node_selector.clone());
            // GPU nodes are commonly tainted with the resource name (as the
            // ExtendedResourceToleration admission plugin assumes).
            let gpu_taint = Toleration {
                key: Some(gpu.resource_name.clone()),
                operator: Some("Exists".to_owned()),
                effect: Some("NoSchedule".to_owned()),
                ..Toleration::default()
            };
            let tolerations = std::iter::once(gpu_taint)
                .chain(profile.tolerations.iter().cloned())
                .chain(spec.tolerations.iter().cloned())
                .collect();
            let mut resources = spec.resources.clone().unwrap_or_default();
            let count = Quantity(gpu.count.to_string());
            resources
                .limits
                .get_or_insert_with(BTreeMap::new)
                .insert(gpu.resource_name.clone(), count.clone());
            // Extended resources need requests equal to limits; only rewrite one the user set.
            if let Some(request) = resources
                .requests
                .as_mut()
                .and_then(|r| r.get_mut(&gpu.resource_name))
            {
                *request = count;
            }
            Ok(Placement {
                node_selector,
                tolerations,
                affinity: spec.affinity.clone().or_else(|| profile.affinity.clone()),
                runtime_class_name: profile.runtime_class_name.clone(),
                resources,
            })
        }
    }
}

/// Required node affinity excluding nodes that carry the GPU label with value "true"; nodes
/// without the label match `NotIn`, so ordinary CPU nodes stay eligible.
fn avoid_gpu_nodes(gpu_node_label: &str) -> Affinity {
    Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: gpu_node_label.to_owned(),
                        operator: "NotIn".to_owned(),
                        values: Some(vec!["true".to_owned()]),
                    }]),
                    ..NodeSelectorTerm::default()
                }],
            }),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    }
}

fn deployment(
    spec: &QuantizedModelSpec,
    metadata: ObjectMeta,
    name: &str,
    image: &str,
    device: Device,
    placement: Placement,
    termination: &Termination,
) -> Deployment {
    let version = &spec.model.version;
    let mut pod_labels = selector_labels(name);
    pod_labels.insert(MODEL_VERSION_KEY.to_owned(), version.clone());
    let mut pod_annotations = spec.pod_annotations.clone();
    pod_annotations.insert(MODEL_VERSION_KEY.to_owned(), version.clone());

    let mut args = vec![
        "serve".to_owned(),
        "--model".to_owned(),
        format!("/models/{}", spec.model.name),
        "--device".to_owned(),
        device.server_flag().to_owned(),
        "--port".to_owned(),
        CONTAINER_PORT.to_string(),
        "--shutdown-grace".to_owned(),
        termination.server_grace_seconds.to_string(),
    ];
    args.extend(spec.args.iter().cloned());

    let container = Container {
        name: CONTAINER_NAME.to_owned(),
        image: Some(image.to_owned()),
        // Explicit, so a moving tag never makes every pod start pull from the registry.
        image_pull_policy: Some(
            spec.image
                .pull_policy
                .unwrap_or(PullPolicy::IfNotPresent)
                .as_str()
                .to_owned(),
        ),
        args: Some(args),
        ports: Some(vec![ContainerPort {
            name: Some(PORT_NAME.to_owned()),
            container_port: CONTAINER_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        env: (!spec.env.is_empty()).then(|| spec.env.clone()),
        resources: Some(placement.resources),
        // Loading and warming a model can take minutes; the startup probe holds off liveness
        // until /ready first succeeds, checking every second so a new pod takes traffic (and
        // a rollout moves on) about a second after it is ready. Readiness then follows each
        // second, tolerating three slow answers from a busy replica before it is taken out.
        startup_probe: Some(http_probe("/ready", 1, 600)),
        readiness_probe: Some(http_probe("/ready", 1, 3)),
        liveness_probe: Some(http_probe("/health", 10, 3)),
        // Keep the pod in its endpoints' "terminating" state long enough for every
        // kube-proxy to stop sending it new connections before SIGTERM. The kubelet's own
        // sleep: the distroless image has no `sleep` binary to exec.
        lifecycle: (termination.pre_stop_sleep_seconds > 0).then(|| Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: termination.pre_stop_sleep_seconds,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        // A server that fails at start prints one line naming the cause; the kubelet makes it
        // the container's termination message, which the model's Degraded condition quotes.
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "tmp".to_owned(),
            mount_path: "/tmp".to_owned(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };

    let pod_spec = PodSpec {
        containers: vec![container],
        volumes: Some(vec![Volume {
            name: "tmp".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        }]),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS_ID),
            run_as_group: Some(RUN_AS_ID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        // The server never talks to the Kubernetes API.
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(termination.termination_grace_period_seconds),
        service_account_name: spec.service_account_name.clone(),
        priority_class_name: spec.priority_class_name.clone(),
        image_pull_secrets: (!spec.image.pull_secrets.is_empty())
            .then(|| spec.image.pull_secrets.clone()),
        node_selector: (!placement.node_selector.is_empty()).then_some(placement.node_selector),
        tolerations: (!placement.tolerations.is_empty()).then_some(placement.tolerations),
        affinity: placement.affinity,
        topology_spread_constraints: Some(
            spec.topology_spread_constraints
                .clone()
                .unwrap_or_else(|| vec![spread_across_nodes(name)]),
        )
        .filter(|constraints| !constraints.is_empty()),
        runtime_class_name: placement.runtime_class_name,
        ..PodSpec::default()
    };

    Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            // Left out under autoscaling: omitted from the server-side apply, the field stays
            // with whoever last set it (the HPA) instead of being reset on every reconcile.
            replicas: (!spec.externally_scaled()).then_some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(name)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(spec.rollout.max_surge.clone()),
                    max_unavailable: Some(spec.rollout.max_unavailable.clone()),
                }),
            }),
            progress_deadline_seconds: spec.rollout.progress_deadline_seconds,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// Replicas on different nodes where the scheduler can, so one node's loss leaves the others
/// (the PodDisruptionBudget covers voluntary disruptions). Skew is counted per ReplicaSet
/// (`pod-template-hash`), so a rollout's new pods spread too; `ScheduleAnyway`, so a cluster
/// with fewer nodes than replicas still runs them all. Set whatever the replica count: a scale
/// from 1 to 2 must not change the pod template and roll every pod.
fn spread_across_nodes(name: &str) -> TopologySpreadConstraint {
    TopologySpreadConstraint {
        max_skew: 1,
        topology_key: "kubernetes.io/hostname".to_owned(),
        when_unsatisfiable: "ScheduleAnyway".to_owned(),
        label_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(name)),
            ..LabelSelector::default()
        }),
        match_label_keys: Some(vec!["pod-template-hash".to_owned()]),
        ..TopologySpreadConstraint::default()
    }
}

fn http_probe(path: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(PORT_NAME.to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

fn service(spec: &QuantizedModelSpec, metadata: ObjectMeta, name: &str) -> Service {
    Service {
        metadata,
        spec: Some(CoreServiceSpec {
            type_: Some(spec.service.type_.as_str().to_owned()),
            selector: Some(selector_labels(name)),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.to_owned()),
                port: spec.service.port,
                target_port: Some(IntOrString::String(PORT_NAME.to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..CoreServiceSpec::default()
        }),
        status: None,
    }
}

fn pod_disruption_budget(metadata: ObjectMeta, name: &str) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(name)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::GpuProfile;
    use crate::testing::model;

    fn pod_spec(state: &DesiredState) -> &PodSpec {
        state
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
    }

    fn server(state: &DesiredState) -> &Container {
        &pod_spec(state).containers[0]
    }

    fn quantities(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, Quantity>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
                .collect(),
        )
    }

    fn config_with_h100() -> OperatorConfig {
        let mut config = OperatorConfig::default();
        config.gpu_profiles.insert(
            "h100".to_owned(),
            GpuProfile {
                node_selector: BTreeMap::from([("gpu.product".to_owned(), "H100".to_owned())]),
                tolerations: vec![Toleration {
                    key: Some("dedicated".to_owned()),
                    value: Some("gpu".to_owned()),
                    operator: Some("Equal".to_owned()),
                    effect: Some("NoSchedule".to_owned()),
                    ..Toleration::default()
                }],
                affinity: None,
                runtime_class_name: Some("nvidia".to_owned()),
            },
        );
        config
    }

    #[test]
    fn image_tag_convention() {
        assert_eq!(
            default_image_tag("1.2.0", Precision::Int8, Device::Cpu),
            "1.2.0-int8"
        );
        assert_eq!(
            default_image_tag("1.2.0", Precision::Int4, Device::Cpu),
            "1.2.0-int4"
        );
        assert_eq!(
            default_image_tag("1.2.0", Precision::Fp32, Device::Cpu),
            "1.2.0-fp32"
        );
        assert_eq!(
            default_image_tag("1.2.0", Precision::Fp16, Device::Gpu),
            "1.2.0-fp16-cuda"
        );
    }

    #[test]
    fn int8_runs_on_cpu_kept_off_gpu_nodes() {
        let qm = model(json!({}));
        let state = desired_state(&qm, &OperatorConfig::default()).unwrap();
        assert_eq!(state.image, "ghcr.io/qmodel/qmodel-server:1.0.0-int8");
        assert_eq!(state.device, Device::Cpu);
        assert_eq!(state.endpoint, "http://bge.ml.svc.cluster.local:8080");
        assert_eq!(
            state.selector,
            "app.kubernetes.io/instance=bge,app.kubernetes.io/name=qmodel-server,serving.qmodel.dev/model=bge"
        );

        let deployment = &state.deployment;
        assert_eq!(deployment.metadata.name.as_deref(), Some("bge"));
        assert_eq!(deployment.metadata.namespace.as_deref(), Some("ml"));
        let owner = &deployment.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("QuantizedModel", "bge", "0b9e-uid")
        );
        assert_eq!(owner.controller, Some(true));
        let spec = deployment.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(
            spec.selector.match_labels.as_ref(),
            Some(&selector_labels("bge"))
        );
        let rolling = spec
            .strategy
            .as_ref()
            .unwrap()
            .rolling_update
            .as_ref()
            .unwrap();
        assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
        assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
        let template_meta = spec.template.metadata.as_ref().unwrap();
        assert_eq!(
            template_meta.labels.as_ref().unwrap()[MODEL_VERSION_KEY],
            "1.0.0"
        );
        assert_eq!(
            template_meta.annotations.as_ref().unwrap()[MODEL_VERSION_KEY],
            "1.0.0"
        );

        let container = server(&state);
        assert_eq!(
            container.args.as_ref().unwrap(),
            &[
                "serve",
                "--model",
                "/models/bge-small",
                "--device",
                "cpu",
                "--port",
                "8080",
                "--shutdown-grace",
                "2"
            ]
        );
        assert_eq!(container.image_pull_policy.as_deref(), Some("IfNotPresent"));
        assert_eq!(
            container.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        assert_eq!(
            container.resources,
            Some(OperatorConfig::default().default_cpu_resources)
        );
        let probe_path = |probe: &Option<Probe>| {
            probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .clone()
        };
        assert_eq!(
            probe_path(&container.readiness_probe).as_deref(),
            Some("/ready")
        );
        assert_eq!(
            probe_path(&container.startup_probe).as_deref(),
            Some("/ready")
        );
        assert_eq!(
            probe_path(&container.liveness_probe).as_deref(),
            Some("/health")
        );
        let readiness = container.readiness_probe.as_ref().unwrap();
        assert_eq!(readiness.period_seconds, Some(1));
        let pre_stop = container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .unwrap();
        assert_eq!(pre_stop.sleep.as_ref().map(|s| s.seconds), Some(5));
        assert!(
            pre_stop.exec.is_none(),
            "the image has no shell or sleep binary"
        );
        let security = container.security_context.as_ref().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.privileged, Some(false));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            security.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_owned()][..])
        );
        assert_eq!(
            container.volume_mounts.as_ref().unwrap()[0].mount_path,
            "/tmp"
        );

        let pod = pod_spec(&state);
        assert_eq!(pod.termination_grace_period_seconds, Some(30));
        assert_eq!(pod.automount_service_account_token, Some(false));
        let pod_security = pod.security_context.as_ref().unwrap();
        assert_eq!(pod_security.run_as_non_root, Some(true));
        assert_eq!(pod_security.run_as_user, Some(65532));
        assert_eq!(
            pod_security.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        assert_eq!(
            pod.affinity,
            Some(avoid_gpu_nodes("nvidia.com/gpu.present"))
        );
        assert_eq!(pod.tolerations, None);
        assert_eq!(pod.runtime_class_name, None);

        let service = state.service.spec.as_ref().unwrap();
        assert_eq!(service.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(service.selector.as_ref(), Some(&selector_labels("bge")));
        assert_eq!(service.ports.as_ref().unwrap()[0].port, 8080);
        assert_eq!(
            state.service.metadata.owner_references,
            deployment.metadata.owner_references
        );
        assert_eq!(state.pod_disruption_budget, None);
    }

    #[test]
    fn the_stop_sequence_follows_the_operator_config() {
        let config = OperatorConfig {
            termination: Termination {
                pre_stop_sleep_seconds: 0,
                server_grace_seconds: 7,
                termination_grace_period_seconds: 60,
            },
            ..OperatorConfig::default()
        };
        let state = desired_state(&model(json!({})), &config).unwrap();
        let container = server(&state);
        assert_eq!(container.lifecycle, None, "no preStop sleep of 0 s");
        assert_eq!(
            container.args.as_ref().unwrap()[7..9],
            ["--shutdown-grace", "7"]
        );
        assert_eq!(pod_spec(&state).termination_grace_period_seconds, Some(60));
    }

    #[test]
    fn replicas_spread_across_nodes_by_default_and_the_spec_can_replace_or_drop_it() {
        let config = OperatorConfig::default();
        let spread = |spec| {
            pod_spec(&desired_state(&model(spec), &config).unwrap())
                .topology_spread_constraints
                .clone()
        };
        let default = spread(json!({"replicas": 3})).unwrap();
        assert_eq!(default, [spread_across_nodes("bge")]);
        assert_eq!(default[0].topology_key, "kubernetes.io/hostname");
        assert_eq!(default[0].when_unsatisfiable, "ScheduleAnyway");
        assert_eq!(
            default[0].match_label_keys.as_deref(),
            Some(&["pod-template-hash".to_owned()][..])
        );
        assert_eq!(
            spread(json!({"replicas": 1})),
            Some(default.clone()),
            "the same template at any scale: scaling 1 -> 2 rolls no pod"
        );
        let zones = json!([{"maxSkew": 2, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}]);
        let custom = spread(json!({"replicas": 3, "topologySpreadConstraints": zones})).unwrap();
        assert_eq!(
            (
                custom.len(),
                custom[0].topology_key.as_str(),
                custom[0].max_skew
            ),
            (1, "topology.kubernetes.io/zone", 2)
        );
        assert_eq!(
            spread(json!({"replicas": 3, "topologySpreadConstraints": []})),
            None
        );
    }

    #[test]
    fn cpu_models_may_be_allowed_on_gpu_nodes() {
        let config = OperatorConfig {
            keep_cpu_models_off_gpu_nodes: false,
            ..OperatorConfig::default()
        };
        let state = desired_state(&model(json!({})), &config).unwrap();
        assert_eq!(pod_spec(&state).affinity, None);
    }

    #[test]
    fn fp16_runs_on_the_gpu_profile() {
        let qm = model(json!({
            "precision": "fp16",
            "gpu": {"count": 2, "resourceName": "nvidia.com/gpu", "profile": "h100"},
            "nodeSelector": {"zone": "a"},
        }));
        let state = desired_state(&qm, &config_with_h100()).unwrap();
        assert_eq!(state.device, Device::Gpu);
        assert_eq!(state.image, "ghcr.io/qmodel/qmodel-server:1.0.0-fp16-cuda");
        let container = server(&state);
        assert_eq!(
            &container.args.as_ref().unwrap()[3..5],
            &["--device", "cuda"]
        );
        let resources = container.resources.as_ref().unwrap();
        assert_eq!(resources.limits, quantities(&[("nvidia.com/gpu", "2")]));
        assert_eq!(resources.requests, None);

        let pod = pod_spec(&state);
        assert_eq!(
            pod.node_selector,
            Some(BTreeMap::from([
                ("gpu.product".to_owned(), "H100".to_owned()),
                ("zone".to_owned(), "a".to_owned())
            ]))
        );
        let tolerations = pod.tolerations.as_ref().unwrap();
        assert_eq!(tolerations.len(), 2);
        assert_eq!(tolerations[0].key.as_deref(), Some("nvidia.com/gpu"));
        assert_eq!(tolerations[0].operator.as_deref(), Some("Exists"));
        assert_eq!(tolerations[1].key.as_deref(), Some("dedicated"));
        assert_eq!(pod.runtime_class_name.as_deref(), Some("nvidia"));
        assert_eq!(
            pod.affinity, None,
            "GPU pods must not get the avoid-GPU-nodes affinity"
        );
    }

    #[test]
    fn fp16_without_gpu_block_uses_default_profile_and_one_gpu() {
        let state = desired_state(
            &model(json!({"precision": "fp16"})),
            &OperatorConfig::default(),
        )
        .unwrap();
        let container = server(&state);
        assert_eq!(
            container.resources.as_ref().unwrap().limits,
            quantities(&[("nvidia.com/gpu", "1")])
        );
        assert_eq!(pod_spec(&state).tolerations.as_ref().unwrap().len(), 1);
    }

    #[test]
    fn gpu_request_set_by_user_is_aligned_with_the_count() {
        let qm = model(json!({
            "precision": "fp16",
            "gpu": {"count": 3},
            "resources": {"requests": {"memory": "8Gi", "nvidia.com/gpu": "1"}, "limits": {"memory": "16Gi"}},
        }));
        let state = desired_state(&qm, &OperatorConfig::default()).unwrap();
        let resources = server(&state).resources.clone().unwrap();
        assert_eq!(
            resources.requests,
            quantities(&[("memory", "8Gi"), ("nvidia.com/gpu", "3")])
        );
        assert_eq!(
            resources.limits,
            quantities(&[("memory", "16Gi"), ("nvidia.com/gpu", "3")])
        );
    }

    #[test]
    fn explicit_overrides_win() {
        let qm = model(json!({
            "precision": "int4",
            "replicas": 3,
            "image": {
                "repository": "registry.example/qm",
                "tag": "custom",
                "pullPolicy": "Always",
                "pullSecrets": [{"name": "regcred"}],
            },
            "resources": {"requests": {"cpu": "4"}},
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
            "tolerations": [{"key": "spot", "operator": "Exists"}],
            "env": [{"name": "RUST_LOG", "value": "debug"}],
            "args": ["--max-batch", "32"],
            "podAnnotations": {"prometheus.io/scrape": "true", MODEL_VERSION_KEY: "spoofed"},
            "serviceAccountName": "models",
            "priorityClassName": "high",
            "service": {"port": 9000, "type": "LoadBalancer"},
            "rollout": {"maxSurge": "25%", "maxUnavailable": 1, "progressDeadlineSeconds": 120},
        }));
        let state = desired_state(&qm, &OperatorConfig::default()).unwrap();
        assert_eq!(state.image, "registry.example/qm:custom");
        assert_eq!(state.endpoint, "http://bge.ml.svc.cluster.local:9000");
        let container = server(&state);
        assert_eq!(container.image_pull_policy.as_deref(), Some("Always"));
        assert_eq!(container.args.as_ref().unwrap()[9..], ["--max-batch", "32"]);
        assert_eq!(container.env.as_ref().unwrap()[0].name, "RUST_LOG");
        assert_eq!(
            container.resources.as_ref().unwrap().requests,
            quantities(&[("cpu", "4")])
        );
        let pod = pod_spec(&state);
        assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
        assert!(
            pod.affinity.as_ref().unwrap().node_affinity.is_none(),
            "user affinity replaces the default"
        );
        assert_eq!(
            pod.tolerations.as_ref().unwrap()[0].key.as_deref(),
            Some("spot")
        );
        assert_eq!(pod.service_account_name.as_deref(), Some("models"));
        assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
        let deployment = state.deployment.spec.as_ref().unwrap();
        let annotations = deployment
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap();
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(
            annotations[MODEL_VERSION_KEY], "1.0.0",
            "the operator's version annotation wins"
        );
        assert_eq!(deployment.replicas, Some(3));
        assert_eq!(deployment.progress_deadline_seconds, Some(120));
        let rolling = deployment
            .strategy
            .as_ref()
            .unwrap()
            .rolling_update
            .as_ref()
            .unwrap();
        assert_eq!(
            rolling.max_surge,
            Some(IntOrString::String("25%".to_owned()))
        );
        let service = state.service.spec.as_ref().unwrap();
        assert_eq!(service.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(service.ports.as_ref().unwrap()[0].port, 9000);

        let pdb = state
            .pod_disruption_budget
            .expect("several replicas get a PDB");
        let pdb_spec = pdb.spec.unwrap();
        assert_eq!(pdb_spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(
            pdb_spec.selector.unwrap().match_labels,
            Some(selector_labels("bge"))
        );
    }

    #[test]
    fn autoscaling_leaves_the_replica_count_out_of_the_apply() {
        let config = OperatorConfig::default();
        let fixed = desired_state(&model(json!({"replicas": 3})), &config).unwrap();
        assert_eq!(fixed.deployment.spec.as_ref().unwrap().replicas, Some(3));
        let off = json!({"replicas": 3, "autoscaling": {"enabled": false}});
        let off = desired_state(&model(off), &config).unwrap();
        assert_eq!(off.deployment.spec.as_ref().unwrap().replicas, Some(3));

        let on = json!({"replicas": 3, "autoscaling": {"enabled": true, "external": true}});
        let on = desired_state(&model(on), &config).unwrap();
        // Absent from the applied object, not `replicas: null`: the HPA's value stands.
        let applied = serde_json::to_value(&on.deployment).unwrap();
        assert!(
            applied["spec"].get("replicas").is_none(),
            "{}",
            applied["spec"]
        );
        // Everything else is as without autoscaling; the PDB still follows spec.replicas.
        let mut rest = on.deployment.clone();
        rest.spec.as_mut().unwrap().replicas = Some(3);
        assert_eq!(rest, off.deployment);
        assert_eq!(on.pod_disruption_budget, off.pod_disruption_budget);
    }

    #[test]
    fn digest_wins_over_tag() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let qm = model(json!({"image": {"tag": "ignored", "digest": digest}}));
        assert_eq!(
            image_reference(&qm.spec, &OperatorConfig::default()),
            format!("ghcr.io/qmodel/qmodel-server@{digest}")
        );
    }

    #[test]
    fn version_change_changes_only_the_pod_template_version() {
        let config = OperatorConfig::default();
        let v1 = desired_state(&model(json!({"replicas": 2})), &config).unwrap();
        let v2 = desired_state(
            &model(json!({"replicas": 2, "model": {"version": "1.1.0"}})),
            &config,
        )
        .unwrap();
        assert_eq!(v2.image, "ghcr.io/qmodel/qmodel-server:1.1.0-int8");
        assert_eq!(v1.service, v2.service);
        assert_eq!(v1.pod_disruption_budget, v2.pod_disruption_budget);
        assert_eq!(v1.selector, v2.selector);

        // Put v1's versioned fields into v2's Deployment: nothing else may differ.
        let mut rewound = v2.deployment.clone();
        let template = &mut rewound.spec.as_mut().unwrap().template;
        let meta = template.metadata.as_mut().unwrap();
        meta.labels
            .as_mut()
            .unwrap()
            .insert(MODEL_VERSION_KEY.to_owned(), "1.0.0".to_owned());
        meta.annotations
            .as_mut()
            .unwrap()
            .insert(MODEL_VERSION_KEY.to_owned(), "1.0.0".to_owned());
        template.spec.as_mut().unwrap().containers[0].image = Some(v1.image.clone());
        assert_ne!(rewound, v2.deployment);
        assert_eq!(rewound, v1.deployment);
    }

    #[test]
    fn invalid_combinations_are_typed_errors() {
        let config = config_with_h100();
        let error = |spec| desired_state(&model(spec), &config).unwrap_err();
        assert_eq!(
            error(json!({"precision": "int8", "device": "gpu"})),
            SpecError::PrecisionDeviceMismatch {
                precision: "int8",
                device: "gpu"
            }
        );
        assert_eq!(
            error(json!({"precision": "fp16", "device": "cpu"})),
            SpecError::PrecisionDeviceMismatch {
                precision: "fp16",
                device: "cpu"
            }
        );
        assert_eq!(
            error(json!({"precision": "fp32", "gpu": {"count": 1}})),
            SpecError::GpuOnCpu
        );
        assert_eq!(
            error(json!({"rollout": {"maxSurge": 0, "maxUnavailable": "0%"}})),
            SpecError::ZeroRolloutBudget
        );
        let unknown = error(json!({"precision": "fp16", "gpu": {"profile": "a100"}}));
        assert_eq!(
            unknown.to_string(),
            r#"GPU profile "a100" is not configured in the operator (known: default, h100)"#
        );
    }

    #[test]
    fn objects_not_from_the_api_server_are_refused() {
        let mut qm = model(json!({}));
        qm.metadata.uid = None;
        assert_eq!(
            desired_state(&qm, &OperatorConfig::default()),
            Err(SpecError::NotPersisted)
        );
    }

    #[test]
    fn fp32_may_run_on_gpu() {
        let state = desired_state(
            &model(json!({"precision": "fp32", "device": "gpu"})),
            &OperatorConfig::default(),
        )
        .unwrap();
        assert_eq!(state.image, "ghcr.io/qmodel/qmodel-server:1.0.0-fp32-cuda");
    }
}
