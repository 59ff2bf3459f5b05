//! Operator configuration, read once at start-up from a YAML file.
//!
//! Every field has a default, so an empty file (or no file) gives a working operator.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::Deserialize;

#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct OperatorConfig {
    /// Image repository of `qmodel-server` when a model does not name one.
    pub image_repository: String,
    /// The one server-side-apply field manager for every object the operator writes.
    pub field_manager: String,
    /// Node label present on GPU nodes; CPU models are kept off nodes where it is `"true"`.
    pub gpu_node_label: String,
    /// Whether CPU models get the node affinity that keeps them off GPU nodes.
    pub keep_cpu_models_off_gpu_nodes: bool,
    /// Profile used by GPU models that name none.
    pub default_gpu_profile: String,
    pub gpu_profiles: BTreeMap<String, GpuProfile>,
    /// Resources of CPU models that set none.
    pub default_cpu_resources: ResourceRequirements,
    /// How a server pod stops without failing a request; see [`Termination`].
    pub termination: Termination,
}

/// The stop sequence of a server pod. The kubelet runs the `preStop` sleep first, while the
/// endpoints controller and kube-proxy take the terminating pod out of the Service; then
/// SIGTERM: the server answers `/ready` with 503 but keeps serving for its grace period
/// (`--shutdown-grace`, for load balancers that only watch readiness), then stops accepting and
/// finishes what it accepted. The kubelet kills it `terminationGracePeriodSeconds` after the
/// start of the sequence, so that must exceed the sum with room for the drain.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Termination {
    pub pre_stop_sleep_seconds: i64,
    pub server_grace_seconds: i64,
    pub termination_grace_period_seconds: i64,
}

impl Default for Termination {
    fn default() -> Self {
        Self {
            pre_stop_sleep_seconds: 5,
            server_grace_seconds: 2,
            termination_grace_period_seconds: 30,
        }
    }
}

/// Where and how GPU pods run, as KubeAI's resource profiles.
#[derive(Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct GpuProfile {
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub affinity: Option<Affinity>,
    pub runtime_class_name: Option<String>,
}

pub const DEFAULT_GPU_PROFILE: &str = "default";

impl Default for OperatorConfig {
    fn default() -> Self {
        let quantities = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(name, value)| ((*name).to_owned(), Quantity((*value).to_owned())))
                .collect::<BTreeMap<_, _>>()
        };
        Self {
            image_repository: "ghcr.io/qmodel/qmodel-server".to_owned(),
            field_manager: "qmodel-operator".to_owned(),
            gpu_node_label: "nvidia.com/gpu.present".to_owned(),
            keep_cpu_models_off_gpu_nodes: true,
            default_gpu_profile: DEFAULT_GPU_PROFILE.to_owned(),
            gpu_profiles: BTreeMap::from([(DEFAULT_GPU_PROFILE.to_owned(), GpuProfile::default())]),
            default_cpu_resources: ResourceRequirements {
                requests: Some(quantities(&[("cpu", "1"), ("memory", "1Gi")])),
                limits: Some(quantities(&[("memory", "2Gi")])),
                ..ResourceRequirements::default()
            },
            termination: Termination::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading operator config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing operator config {path}: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("operator config: default GPU profile {0:?} is not among gpuProfiles")]
    MissingDefaultProfile(String),
    #[error(
        "operator config: termination.terminationGracePeriodSeconds ({total}) must exceed preStopSleepSeconds + serverGraceSeconds ({stop})"
    )]
    TerminationTooShort { total: i64, stop: i64 },
}

impl OperatorConfig {
    pub fn from_yaml(text: &str, path: &str) -> Result<Self, ConfigError> {
        // An empty file is YAML null, which should mean "all defaults".
        let config: Self = if text.trim().is_empty() {
            Self::default()
        } else {
            serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?
        };
        if !config
            .gpu_profiles
            .contains_key(&config.default_gpu_profile)
        {
            return Err(ConfigError::MissingDefaultProfile(
                config.default_gpu_profile,
            ));
        }
        let termination = &config.termination;
        let stop = termination.pre_stop_sleep_seconds + termination.server_grace_seconds;
        if termination.pre_stop_sleep_seconds < 0
            || termination.server_grace_seconds < 0
            || termination.termination_grace_period_seconds <= stop
        {
            return Err(ConfigError::TerminationTooShort {
                total: termination.termination_grace_period_seconds,
                stop,
            });
        }
        Ok(config)
    }

    /// The configuration at `path`, or the defaults when no path is given.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_yaml(&text, &shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(
            OperatorConfig::from_yaml("", "c.yaml").unwrap(),
            OperatorConfig::default()
        );
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let config = OperatorConfig::from_yaml(
            r#"
imageRepository: registry.example/qmodel
defaultGpuProfile: h100
gpuProfiles:
  h100:
    nodeSelector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
    tolerations: [{key: dedicated, operator: Equal, value: gpu, effect: NoSchedule}]
    runtimeClassName: nvidia
"#,
            "c.yaml",
        )
        .unwrap();
        assert_eq!(config.image_repository, "registry.example/qmodel");
        assert_eq!(config.field_manager, "qmodel-operator");
        assert_eq!(config.gpu_node_label, "nvidia.com/gpu.present");
        let h100 = &config.gpu_profiles["h100"];
        assert_eq!(h100.runtime_class_name.as_deref(), Some("nvidia"));
        assert_eq!(h100.tolerations[0].key.as_deref(), Some("dedicated"));
        assert!(!config.gpu_profiles.contains_key(DEFAULT_GPU_PROFILE));
    }

    #[test]
    fn example_file_parses_and_matches_the_defaults_it_documents() {
        let example = OperatorConfig::from_yaml(
            include_str!("../config.example.yaml"),
            "config.example.yaml",
        )
        .unwrap();
        let defaults = OperatorConfig::default();
        assert_eq!(example.image_repository, defaults.image_repository);
        assert_eq!(example.field_manager, defaults.field_manager);
        assert_eq!(example.gpu_node_label, defaults.gpu_node_label);
        assert_eq!(
            example.keep_cpu_models_off_gpu_nodes,
            defaults.keep_cpu_models_off_gpu_nodes
        );
        assert_eq!(
            example.default_cpu_resources,
            defaults.default_cpu_resources
        );
        assert_eq!(example.default_gpu_profile, defaults.default_gpu_profile);
        assert_eq!(example.termination, defaults.termination);
        assert_eq!(
            example.gpu_profiles["default"],
            defaults.gpu_profiles["default"]
        );
        assert_eq!(
            example.gpu_profiles["h100"].runtime_class_name.as_deref(),
            Some("nvidia")
        );
    }

    #[test]
    fn default_profile_must_exist() {
        let err = OperatorConfig::from_yaml("defaultGpuProfile: a100\n", "c.yaml").unwrap_err();
        assert!(matches!(err, ConfigError::MissingDefaultProfile(name) if name == "a100"));
    }

    #[test]
    fn termination_must_leave_time_to_drain() {
        let config =
            OperatorConfig::from_yaml("termination: {preStopSleepSeconds: 10}\n", "c.yaml")
                .unwrap();
        assert_eq!(config.termination.pre_stop_sleep_seconds, 10);
        assert_eq!(config.termination.termination_grace_period_seconds, 30);
        let err = OperatorConfig::from_yaml(
            "termination: {preStopSleepSeconds: 20, serverGraceSeconds: 10}\n",
            "c.yaml",
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::TerminationTooShort {
                    total: 30,
                    stop: 30
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = OperatorConfig::from_yaml("imageRepo: typo\n", "c.yaml").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = OperatorConfig::load(Some(Path::new("/nonexistent/qmodel.yaml"))).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
    }
}
