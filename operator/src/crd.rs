//! The `QuantizedModel` custom resource (`serving.qmodel.dev/v1alpha1`).
//!
//! Validation that only needs the object itself lives here as schema constraints and CEL rules, so
//! the apiserver rejects such mistakes at admission time. Checks that need the operator's
//! configuration (GPU profiles) happen in [`crate::resources`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, LocalObjectReference, ResourceRequirements, Toleration,
    TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A BERT embedding or reranker model served by `qmodel-server`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "serving.qmodel.dev",
    version = "v1alpha1",
    kind = "QuantizedModel",
    namespaced,
    shortname = "qm",
    status = "QuantizedModelStatus",
    derive = "PartialEq",
    doc = "A quantized BERT embedding or reranker model served by qmodel-server",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.currentVersion"),
    printcolumn(name = "Last-Good", type_ = "string", json_path = ".status.lastGoodVersion"),
    printcolumn(name = "Precision", type_ = "string", json_path = ".spec.precision"),
    printcolumn(name = "Device", type_ = "string", json_path = ".status.device"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.autoscaling.desiredReplicas"),
    printcolumn(name = "Canary", type_ = "string", json_path = ".status.canary.phase"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    // The Deployment, Service and PodDisruptionBudget share the model's name, which is also a
    // label value: a DNS-1035 label (Service names) of at most 63 characters fits all of them.
    validation = Rule::new("self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name must be a DNS-1035 label of at most 63 characters: it names the Service")
)]
#[x_kube(
    validation = Rule::new("self.precision != 'fp16' || !has(self.device) || self.device == 'gpu'").message("precision fp16 requires device gpu"),
    validation = Rule::new("!(self.precision in ['int8', 'int4']) || !has(self.device) || self.device == 'cpu'").message("precisions int8 and int4 run on device cpu only"),
    validation = Rule::new("!has(self.gpu) || (has(self.device) ? self.device == 'gpu' : self.precision == 'fp16')").message("spec.gpu is only allowed with device gpu"),
    validation = Rule::new("!has(self.rollout.canary) || self.rollout.canary.replicas <= (has(self.autoscaling) && self.autoscaling.enabled && has(self.autoscaling.maxReplicas) ? self.autoscaling.maxReplicas : self.replicas)").message("rollout.canary.replicas must not exceed the model's replicas (autoscaling.maxReplicas when the operator autoscales)")
)]
#[serde(rename_all = "camelCase")]
pub struct QuantizedModelSpec {
    pub model: ModelRef,
    #[serde(default)]
    pub image: ImageSpec,
    pub precision: Precision,
    /// Where the model runs; defaults from the precision (fp16 -> gpu, otherwise cpu).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = drop_null_enum_value)]
    pub device: Option<Device>,
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self >= 0").message("replicas must not be negative"))]
    pub replicas: i32,
    /// With `enabled: true` something else (a HorizontalPodAutoscaler targeting the Deployment)
    /// owns the Deployment's replica count: the operator stops setting `replicas` in its apply,
    /// so it never fights the autoscaler, and `spec.replicas` only decides the
    /// PodDisruptionBudget. Enabling it on a running model hands the field over: the
    /// Deployment keeps its current count until the autoscaler changes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Container resources; a default applies on CPU, and the GPU limit is always set from `gpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Replaces the operator's default placement (GPU profile affinity or the rule keeping CPU
    /// pods off GPU nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Replaces the default spread of replicas across nodes (`kubernetes.io/hostname`, max skew
    /// 1, `ScheduleAnyway`); an empty list turns spreading off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.all(c, c.maxSkew >= 1)").message("topologySpreadConstraints maxSkew must be at least 1"))]
    #[schemars(length(max = 8))]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuSpec>,
    #[serde(default)]
    pub rollout: RolloutSpec,
    #[serde(default)]
    pub service: ServiceSpec,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Extra arguments appended after the operator's `serve` flags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

impl QuantizedModelSpec {
    /// Whether an external autoscaler, not the operator, owns the Deployment's replica count.
    pub fn externally_scaled(&self) -> bool {
        self.autoscaling
            .as_ref()
            .is_some_and(|a| a.enabled && a.external)
    }

    /// The operator's own autoscaler settings, when it sets the replica count from load.
    pub fn operator_autoscaling(&self) -> Option<&AutoscalingSpec> {
        self.autoscaling
            .as_ref()
            .filter(|a| a.enabled && !a.external && a.max_replicas.is_some())
    }

    /// The device the model runs on: the explicit one, else the precision's natural device.
    pub fn effective_device(&self) -> Device {
        self.device.unwrap_or(match self.precision {
            Precision::Fp16 => Device::Gpu,
            Precision::Int8 | Precision::Int4 | Precision::Fp32 => Device::Cpu,
        })
    }
}

/// schemars lists `null` among the values of an optional enum; an absent field already covers
/// "unset", and the apiserver's enum check is not meant to see a null value.
fn drop_null_enum_value(schema: &mut schemars::Schema) {
    if let Some(values) = schema
        .get_mut("enum")
        .and_then(|values| values.as_array_mut())
    {
        values.retain(|value| !value.is_null());
    }
}

/// Who sets the Deployment's replica count: `spec.replicas` (without this), the operator's
/// autoscaler on the server's own load (`enabled` with `minReplicas`/`maxReplicas`), or an
/// external autoscaler such as a HorizontalPodAutoscaler (`enabled` and `external`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!self.enabled || self.external || has(self.maxReplicas)").message("autoscaling needs maxReplicas for the operator's autoscaler, or external: true to leave replicas to an HPA"),
    validation = Rule::new("!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed maxReplicas")
)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    #[serde(default)]
    pub enabled: bool,
    /// Leave the Deployment's replicas to an external autoscaler (an HPA targeting it): the
    /// operator stops setting `replicas` in its apply, so it never fights the autoscaler, and
    /// `spec.replicas` only decides the PodDisruptionBudget. Enabling it on a running model
    /// hands the field over: the Deployment keeps its current count until the autoscaler
    /// changes it.
    #[serde(default)]
    pub external: bool,
    #[serde(default = "default_min_replicas")]
    #[x_kube(validation = Rule::new("self >= 1").message("autoscaling.minReplicas must be at least 1"))]
    pub min_replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("autoscaling.maxReplicas must be at least 1"))]
    pub max_replicas: Option<i32>,
    /// The server's own load signal, read from every Ready pod's `/metrics`.
    #[serde(default)]
    pub metric: ScaleMetric,
    /// The signal's target per replica: replicas = ceil(smoothed total / target).
    #[serde(default = "default_target_per_replica")]
    #[x_kube(validation = Rule::new("self > 0.0").message("autoscaling.targetPerReplica must be positive"))]
    pub target_per_replica: f64,
    /// Seconds the load must stay low before replicas are removed: the count drops only to the
    /// highest recommendation of that window.
    #[serde(default = "default_scale_down_delay_seconds")]
    #[x_kube(validation = Rule::new("self >= 0").message("autoscaling.scaleDownDelaySeconds must not be negative"))]
    pub scale_down_delay_seconds: i32,
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            external: false,
            min_replicas: default_min_replicas(),
            max_replicas: None,
            metric: ScaleMetric::default(),
            target_per_replica: default_target_per_replica(),
            scale_down_delay_seconds: default_scale_down_delay_seconds(),
        }
    }
}

fn default_min_replicas() -> i32 {
    1
}

fn default_target_per_replica() -> f64 {
    4.0
}

fn default_scale_down_delay_seconds() -> i32 {
    300
}

/// A load signal `qmodel-server` exports.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ScaleMetric {
    /// `qmodel_requests_in_flight`: API requests received and not yet answered.
    #[default]
    InFlight,
    /// `qmodel_queue_depth`: inputs waiting for a batch.
    QueueDepth,
}

impl ScaleMetric {
    pub fn as_str(self) -> &'static str {
        match self {
            ScaleMetric::InFlight => "InFlight",
            ScaleMetric::QueueDepth => "QueueDepth",
        }
    }
}

fn default_replicas() -> i32 {
    1
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelRef {
    /// Directory of the model inside the image (`/models/<name>`).
    #[schemars(
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"),
        length(min = 1, max = 128)
    )]
    #[x_kube(validation = Rule::new("!self.contains('..')").message("model name must not contain '..'"))]
    pub name: String,
    /// Model version; part of the image tag and of a label, so a label value.
    #[schemars(regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$"))]
    pub version: String,
    pub task: Task,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Embed,
    Rerank,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Int8,
    Int4,
    Fp16,
    Fp32,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Int8 => "int8",
            Precision::Int4 => "int4",
            Precision::Fp16 => "fp16",
            Precision::Fp32 => "fp32",
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Gpu,
}

impl Device {
    /// The value of the server's `--device` flag.
    pub fn server_flag(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Gpu => "cuda",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Gpu => "gpu",
        }
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!(has(self.tag) && has(self.digest))").message("set at most one of image.tag and image.digest"))]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// Defaults to the operator's configured image repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Overrides the tag derived from model version and precision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"))]
    pub tag: Option<String>,
    /// Pins the image by digest (`sha256:<64 hex>`); wins over any tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^sha256:[a-f0-9]{64}$"))]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = drop_null_enum_value)]
    pub pull_policy: Option<PullPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_secrets: Vec<LocalObjectReference>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuSpec {
    #[serde(default = "default_gpu_count")]
    #[x_kube(validation = Rule::new("self >= 1").message("gpu.count must be at least 1"))]
    pub count: i32,
    #[serde(default = "default_gpu_resource_name")]
    pub resource_name: String,
    /// A GPU profile of the operator's configuration; defaults to the configured default profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

impl Default for GpuSpec {
    fn default() -> Self {
        Self {
            count: default_gpu_count(),
            resource_name: default_gpu_resource_name(),
            profile: None,
        }
    }
}

fn default_gpu_count() -> i32 {
    1
}

fn default_gpu_resource_name() -> String {
    "nvidia.com/gpu".to_owned()
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    #[serde(default = "default_max_surge")]
    pub max_surge: IntOrString,
    #[serde(default = "default_max_unavailable")]
    pub max_unavailable: IntOrString,
    /// Seconds a rollout may make no progress before the model is marked Degraded (and, with
    /// `autoRollback`, rolled back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0").message("progressDeadlineSeconds must be positive"))]
    pub progress_deadline_seconds: Option<i32>,
    /// Put the Deployment back on the last version that fully rolled out when a new one fails:
    /// past the progress deadline, its pods in `CrashLoopBackOff`, `ImagePullBackOff` or
    /// another state only a new spec fixes, or not Ready within `readyTimeoutSeconds`. The
    /// failed spec is not retried until the spec changes again or the
    /// `serving.qmodel.dev/retry-rollout` annotation changes.
    #[serde(default = "default_auto_rollback")]
    pub auto_rollback: bool,
    /// Seconds a started pod of a new version may take to become Ready before its rollout
    /// counts as failed.
    #[serde(default = "default_ready_timeout_seconds")]
    #[x_kube(validation = Rule::new("self > 0").message("readyTimeoutSeconds must be positive"))]
    pub ready_timeout_seconds: i32,
    /// What a GPU rollout does when its surge pod finds no free GPU.
    #[serde(default)]
    pub no_spare_gpu: NoSpareGpu,
    /// Run a new version on a few pods beside the stable ones, judge it, and only then roll it
    /// out to every replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySpec>,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_surge: default_max_surge(),
            max_unavailable: default_max_unavailable(),
            progress_deadline_seconds: None,
            auto_rollback: default_auto_rollback(),
            ready_timeout_seconds: default_ready_timeout_seconds(),
            no_spare_gpu: NoSpareGpu::default(),
            canary: None,
        }
    }
}

/// A canary analysis: the new version's pods serve a share of the Service's traffic
/// (`replicas` of `replicas + stable replicas`) for `analysisSeconds`, then their own metrics
/// and the quality gate decide between promoting it and rolling it back.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CanarySpec {
    /// Pods of the new version, beside the stable replicas.
    #[serde(default = "default_canary_replicas")]
    #[x_kube(validation = Rule::new("self >= 1").message("rollout.canary.replicas must be at least 1"))]
    pub replicas: i32,
    /// Seconds of analysis, counted from every canary pod being Ready.
    #[serde(default = "default_analysis_seconds")]
    #[x_kube(validation = Rule::new("self >= 1").message("rollout.canary.analysisSeconds must be at least 1"))]
    pub analysis_seconds: i32,
    /// Highest share of the canary's API requests answered with a 5xx.
    #[serde(default = "default_max_error_rate")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 1.0").message("rollout.canary.maxErrorRate must be within 0 and 1"))]
    pub max_error_rate: f64,
    /// Highest p99 latency of the canary's API requests, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("rollout.canary.maxP99Seconds must be positive"))]
    pub max_p99_seconds: Option<f64>,
    /// Highest ratio of the canary's p99 latency to the stable pods' (over their lifetime).
    #[serde(default = "default_max_p99_ratio")]
    #[x_kube(validation = Rule::new("self > 0.0").message("rollout.canary.maxP99Ratio must be positive"))]
    pub max_p99_ratio: f64,
    /// Fewest API requests the canary must have answered for the error-rate and latency checks
    /// to count; with fewer, the analysis waits (up to `readyTimeoutSeconds` more) for traffic.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0").message("rollout.canary.minRequests must not be negative"))]
    pub min_requests: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality_gate: Option<QualityGateSpec>,
}

fn default_canary_replicas() -> i32 {
    1
}

fn default_analysis_seconds() -> i32 {
    60
}

fn default_max_error_rate() -> f64 {
    0.01
}

fn default_max_p99_ratio() -> f64 {
    2.0
}

/// A golden set sent to every canary pod: a ConfigMap key holding JSON
/// `{"embeddings": [{"input": "...", "embedding": [...]}],
///   "rankings": [{"query": "...", "texts": ["..."], "order": [2, 0, 1]}]}`
/// (`order`: text indices, most relevant first). An embedding model answers `embeddings` through
/// `/embed`, a reranker `rankings` through `/rerank`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QualityGateSpec {
    /// ConfigMap in the model's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub config_map: String,
    #[serde(default = "default_golden_key")]
    pub key: String,
    /// Lowest cosine similarity of any embedding to its expected one.
    #[serde(default = "default_min_cosine")]
    #[x_kube(validation = Rule::new("self >= -1.0 && self <= 1.0").message("qualityGate.minCosine must be within -1 and 1"))]
    pub min_cosine: f64,
    /// Lowest rank agreement (the share of text pairs ordered as expected) of any query.
    #[serde(default = "default_min_rank_agreement")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 1.0").message("qualityGate.minRankAgreement must be within 0 and 1"))]
    pub min_rank_agreement: f64,
}

fn default_golden_key() -> String {
    "golden.json".to_owned()
}

fn default_min_cosine() -> f64 {
    0.99
}

fn default_min_rank_agreement() -> f64 {
    0.9
}

fn default_auto_rollback() -> bool {
    true
}

fn default_ready_timeout_seconds() -> i32 {
    300
}

/// A GPU model's rollout whose surge pod cannot be scheduled for lack of GPUs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NoSpareGpu {
    /// Replace replicas one at a time (`maxSurge: 0`, `maxUnavailable: 1`, within the
    /// PodDisruptionBudget): no deadlock, and no outage with two replicas or more; a single
    /// replica is down while its successor starts.
    #[default]
    ReplaceOneAtATime,
    /// Keep every old replica until a GPU frees up; past the progress deadline the model is
    /// Degraded (never rolled back: a full cluster says nothing about the version).
    Wait,
}

impl NoSpareGpu {
    pub fn as_str(self) -> &'static str {
        match self {
            NoSpareGpu::ReplaceOneAtATime => "ReplaceOneAtATime",
            NoSpareGpu::Wait => "Wait",
        }
    }
}

fn default_max_surge() -> IntOrString {
    IntOrString::Int(1)
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(0)
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default = "default_service_port")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("service.port must be a TCP port"))]
    pub port: i32,
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            port: default_service_port(),
            type_: ServiceType::default(),
        }
    }
}

fn default_service_port() -> i32 {
    8080
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Observed state, written only by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct QuantizedModelStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    #[serde(default)]
    pub updated_replicas: i32,
    /// The version every replica runs, once a rollout has finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Label selector of the pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The last version that fully rolled out: what a failed rollout goes back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_good_version: Option<String>,
    /// The spec of the last good version (without replicas and autoscaling), re-applied on
    /// rollback so everything that changed with the failed version goes back too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "opaque_object")]
    pub last_good_spec: Option<serde_json::Value>,
    /// Set while the model runs its last good version because the spec's failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackStatus>,
    /// How the current rollout replaces pods, when the operator changed it from the spec's
    /// (a GPU rollout without a spare GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_strategy: Option<String>,
    /// What a rollout of this model needs, when that is worth saying (a single-replica GPU
    /// model: a spare GPU or a brief outage, and which `rollout.noSpareGpu` chose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_note: Option<String>,
    /// The canary analysis of the spec's version, while it runs and after its verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStatus>,
    /// The operator's autoscaler: what it measured and decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// Where a canary stands.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CanaryPhase {
    /// Canary pods starting.
    Starting,
    /// Every canary pod Ready; metrics and the quality gate are being judged.
    Analysing,
    /// Passed: the version rolls out to every replica.
    Promoting,
    /// Promoted and rolled out.
    Promoted,
    /// Failed a check: the canary pods are gone, the stable version serves.
    RolledBack,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatus {
    pub phase: CanaryPhase,
    pub version: String,
    /// Fingerprint of the spec under analysis: a different spec starts a new canary.
    pub spec_hash: String,
    /// When every canary pod was first Ready: the analysis window starts there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis_started: Option<Time>,
    /// The checks as last measured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CanaryCheck>,
    #[serde(default)]
    pub message: String,
}

/// One analysis check: its measured value against its limit.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CanaryCheck {
    /// `errorRate`, `p99Seconds`, `p99Ratio`, `minCosine`, `minRankAgreement`.
    pub name: String,
    /// The measured value, as text (a float's shortest form).
    pub value: String,
    pub limit: String,
    pub passed: bool,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    pub metric: ScaleMetric,
    pub desired_replicas: i32,
    pub current_replicas: i32,
    /// The smoothed signal summed over Ready pods, as text.
    pub signal: String,
    pub target_per_replica: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// Why the count is what it is (scaled up, held by the scale-down delay, at a bound, ...).
    #[serde(default)]
    pub message: String,
}

/// A rollout that failed and was undone.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RollbackStatus {
    pub failed_version: String,
    /// Why it failed: a pod cause (`CrashLoopBackOff`, `ImagePullBackOff`, ...),
    /// `ProgressDeadlineExceeded` or `NotReady`.
    pub reason: String,
    pub message: String,
    pub rolled_back_to: String,
    pub time: Time,
    /// The failed spec (without replicas and autoscaling): a spec that differs is tried.
    #[schemars(schema_with = "opaque_object")]
    pub failed_spec: serde_json::Value,
    /// The `serving.qmodel.dev/retry-rollout` annotation when it failed: a new value retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_annotation: Option<String>,
}

/// An object the apiserver stores as it is (a spec snapshot the operator alone reads).
fn opaque_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// The CustomResourceDefinition as YAML, as `qmodel-operator crd` prints it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&QuantizedModel::crd()).expect("a CRD serializes to YAML")
}

#[cfg(test)]
mod tests {
    use kube::core::cel::validate_cel;
    use serde_json::json;

    use super::*;
    use crate::testing::model;

    const MAX_NAME_LENGTH: usize = 63;

    #[test]
    fn committed_crds_are_current() {
        // The repository's copy and the Helm chart's (helm installs charts/*/crds/ verbatim).
        for (path, committed) in [
            (
                "crds/quantizedmodel.yaml",
                include_str!("../../crds/quantizedmodel.yaml"),
            ),
            (
                "charts/qmodel-operator/crds/quantizedmodel.yaml",
                include_str!("../../charts/qmodel-operator/crds/quantizedmodel.yaml"),
            ),
        ] {
            assert!(
                committed == crd_yaml(),
                "{path} is stale: run `cargo run -p qmodel-operator -- crd > {path}`"
            );
        }
    }

    #[test]
    fn crd_names_subresources_and_columns() {
        use kube::CustomResourceExt;
        let crd = QuantizedModel::crd();
        assert_eq!(crd.spec.group, "serving.qmodel.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["qm".to_owned()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        let subresources = version.subresources.as_ref().unwrap();
        assert!(subresources.status.is_some());
        let scale = subresources.scale.as_ref().unwrap();
        assert_eq!(scale.spec_replicas_path, ".spec.replicas");
        assert_eq!(scale.status_replicas_path, ".status.replicas");
        assert_eq!(
            scale.label_selector_path.as_deref(),
            Some(".status.selector")
        );
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.to_uppercase())
            .collect();
        assert_eq!(
            columns,
            [
                "READY",
                "VERSION",
                "LAST-GOOD",
                "PRECISION",
                "DEVICE",
                "REPLICAS",
                "DESIRED",
                "CANARY",
                "ENDPOINT",
                "AGE"
            ]
        );
    }

    /// Every object schema must be structural: typed, with no `$ref`, `anyOf` at the top of a
    /// property, or untyped leaves (unless marked int-or-string or preserve-unknown-fields).
    #[test]
    fn schema_is_structural() {
        use kube::CustomResourceExt;
        fn check(path: &str, schema: &serde_json::Value) {
            let object = schema.as_object().unwrap();
            assert!(!object.contains_key("$ref"), "{path} has a $ref");
            let typed = object.contains_key("type")
                || object.get("x-kubernetes-int-or-string") == Some(&json!(true))
                || object.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
            assert!(typed, "{path} has no type: {schema}");
            if let Some(values) = object.get("enum").and_then(|e| e.as_array()) {
                assert!(
                    !values.contains(&json!(null)),
                    "{path} lists null among its enum values"
                );
            }
            for (name, child) in object
                .get("properties")
                .and_then(|p| p.as_object())
                .into_iter()
                .flatten()
            {
                check(&format!("{path}.{name}"), child);
            }
            for key in ["items", "additionalProperties"] {
                if let Some(child) = object.get(key).filter(|c| c.is_object()) {
                    check(&format!("{path}[{key}]"), child);
                }
            }
        }
        let crd = QuantizedModel::crd();
        let schema = serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema
                .as_ref()
                .unwrap(),
        )
        .unwrap();
        check("", &schema);
    }

    fn cel_errors(spec: serde_json::Value) -> String {
        match validate_cel(&model(spec)) {
            Ok(()) => String::new(),
            Err(errors) => format!("{errors:?}"),
        }
    }

    #[test]
    fn cel_accepts_valid_models() {
        assert_eq!(cel_errors(json!({})), "");
        assert_eq!(cel_errors(json!({"precision": "fp16"})), "");
        assert_eq!(
            cel_errors(json!({"precision": "fp16", "device": "gpu", "gpu": {"count": 2}})),
            ""
        );
        assert_eq!(
            cel_errors(json!({"precision": "fp32", "device": "gpu", "gpu": {"count": 1}})),
            ""
        );
        assert_eq!(
            cel_errors(json!({
                "replicas": 1,
                "autoscaling": {"enabled": true, "minReplicas": 1, "maxReplicas": 4},
                "rollout": {"canary": {"replicas": 2, "qualityGate": {"configMap": "golden"}}},
            })),
            ""
        );
        assert_eq!(
            cel_errors(json!({"autoscaling": {"enabled": true, "external": true}})),
            ""
        );
    }

    #[test]
    fn schema_defaults_fill_the_canary_and_the_autoscaler() {
        let qm = model(json!({
            "autoscaling": {"enabled": true, "maxReplicas": 3},
            "rollout": {"canary": {"qualityGate": {"configMap": "golden"}}},
        }));
        let autoscaling = qm
            .spec
            .operator_autoscaling()
            .expect("the operator autoscales");
        assert_eq!(
            (
                autoscaling.min_replicas,
                autoscaling.metric,
                autoscaling.target_per_replica
            ),
            (1, ScaleMetric::InFlight, 4.0)
        );
        assert_eq!(autoscaling.scale_down_delay_seconds, 300);
        let canary = qm.spec.rollout.canary.as_ref().unwrap();
        assert_eq!((canary.replicas, canary.analysis_seconds), (1, 60));
        assert_eq!((canary.max_error_rate, canary.max_p99_ratio), (0.01, 2.0));
        let gate = canary.quality_gate.as_ref().unwrap();
        assert_eq!((gate.key.as_str(), gate.min_cosine), ("golden.json", 0.99));
        assert!(!qm.spec.externally_scaled());
        let external = model(json!({"autoscaling": {"enabled": true, "external": true}}));
        assert!(external.spec.externally_scaled());
        assert!(external.spec.operator_autoscaling().is_none());
    }

    #[test]
    fn cel_rejects_what_cannot_be_served() {
        let cases = [
            (
                json!({"precision": "fp16", "device": "cpu"}),
                "fp16 requires device gpu",
            ),
            (
                json!({"precision": "int8", "device": "gpu"}),
                "int8 and int4 run on device cpu only",
            ),
            (
                json!({"precision": "int4", "device": "gpu"}),
                "int8 and int4 run on device cpu only",
            ),
            (
                json!({"precision": "int8", "gpu": {"count": 1}}),
                "spec.gpu is only allowed with device gpu",
            ),
            (json!({"replicas": -1}), "replicas must not be negative"),
            (
                json!({"precision": "fp16", "gpu": {"count": 0}}),
                "gpu.count must be at least 1",
            ),
            (
                json!({"image": {"tag": "t", "digest": format!("sha256:{}", "0".repeat(64))}}),
                "at most one of image.tag",
            ),
            (
                json!({"service": {"port": 70000}}),
                "service.port must be a TCP port",
            ),
            (
                json!({"rollout": {"progressDeadlineSeconds": 0}}),
                "progressDeadlineSeconds must be positive",
            ),
            (json!({"model": {"name": "a..b"}}), "must not contain '..'"),
            (
                json!({"rollout": {"readyTimeoutSeconds": 0}}),
                "readyTimeoutSeconds must be positive",
            ),
            (
                json!({"autoscaling": {"enabled": true}}),
                "needs maxReplicas for the operator's autoscaler, or external: true",
            ),
            (
                json!({"autoscaling": {"enabled": true, "minReplicas": 3, "maxReplicas": 2}}),
                "minReplicas must not exceed maxReplicas",
            ),
            (
                json!({"autoscaling": {"enabled": true, "maxReplicas": 2, "targetPerReplica": 0}}),
                "targetPerReplica must be positive",
            ),
            (
                json!({"replicas": 2, "rollout": {"canary": {"replicas": 3}}}),
                "rollout.canary.replicas must not exceed the model's replicas",
            ),
            (
                json!({"replicas": 2, "autoscaling": {"enabled": true, "maxReplicas": 4},
                       "rollout": {"canary": {"replicas": 5}}}),
                "rollout.canary.replicas must not exceed",
            ),
            (
                json!({"rollout": {"canary": {"replicas": 0}}}),
                "rollout.canary.replicas must be at least 1",
            ),
            (
                json!({"rollout": {"canary": {"maxErrorRate": 1.5}}}),
                "maxErrorRate must be within 0 and 1",
            ),
            (
                json!({"rollout": {"canary": {"qualityGate": {"configMap": "g", "minCosine": 2}}}}),
                "minCosine must be within -1 and 1",
            ),
        ];
        for (spec, message) in cases {
            let errors = cel_errors(spec.clone());
            assert!(
                errors.contains(message),
                "{spec}: expected {message:?}, got {errors:?}"
            );
        }
    }

    #[test]
    fn cel_limits_the_name_so_children_fit() {
        let mut qm = model(json!({}));
        qm.metadata.name = Some("a".repeat(MAX_NAME_LENGTH));
        assert!(validate_cel(&qm).is_ok());
        qm.metadata.name = Some("a".repeat(MAX_NAME_LENGTH + 1));
        assert!(format!("{:?}", validate_cel(&qm).unwrap_err()).contains("DNS-1035"));
        qm.metadata.name = Some("9lives".to_owned());
        assert!(
            validate_cel(&qm).is_err(),
            "a Service name must start with a letter"
        );
    }
}
