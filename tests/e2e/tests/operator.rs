//! The chart and the operator's behaviour on the real control plane (issue 5, checks 1-7).

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use qmodel_e2e::{
    MODEL_LABEL, RELEASE, RELEASE_NAMESPACE, TestEnv, VERSION_LABEL, command, condition,
    helm_install, model, repo_root, version_of, wait_for,
};
use serde_json::json;

const SETTLE: Duration = Duration::from_secs(60);
/// The garbage collector notices a new CRD on its 30 s discovery resync: on a fresh cluster
/// the first cascade waits for that (seen: 42 s).
const GARBAGE_COLLECTION: Duration = Duration::from_secs(120);

#[tokio::test]
async fn helm_install_establishes_the_crd() {
    let env = TestEnv::new("install").await;
    let helm = repo_root().join("tests/cluster/bin/helm");
    let status = command(
        &helm,
        &["status", RELEASE, "-n", RELEASE_NAMESPACE, "-o", "json"],
    )
    .expect("helm status");
    let status: serde_json::Value = serde_json::from_str(&status).expect("helm status JSON");
    assert_eq!(status["info"]["status"], "deployed", "{status}");

    let crds = Api::<CustomResourceDefinition>::all(env.client.clone());
    let crd = crds
        .get("quantizedmodels.serving.qmodel.dev")
        .await
        .expect("the chart installs the CRD");
    let established = crd
        .status
        .and_then(|status| status.conditions)
        .unwrap_or_default()
        .into_iter()
        .any(|c| c.type_ == "Established" && c.status == "True");
    assert!(established, "CRD not Established");

    // The chart's own operator Deployment is available (kwok runs its pod) and restricted.
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), RELEASE_NAMESPACE);
    let deployment = deployments.get(RELEASE).await.expect("operator Deployment");
    let pod = deployment
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    let container = &pod.containers[0];
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()])
    );
    let pod_security = pod.security_context.expect("pod securityContext");
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(
        pod_security.seccomp_profile.map(|p| p.type_).as_deref(),
        Some("RuntimeDefault")
    );
    let env_var = |name: &str| {
        container
            .env
            .iter()
            .flatten()
            .find(|var| var.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("env {name}"))
    };
    let pod_name = env_var("POD_NAME")
        .value_from
        .expect("POD_NAME from the downward API");
    assert_eq!(
        pod_name.field_ref.map(|f| f.field_path).as_deref(),
        Some("metadata.name")
    );
    assert_eq!(
        env_var("QMODEL_OPERATOR_LEADER_ELECTION").value.as_deref(),
        Some("true")
    );
    wait_for("the chart's operator Deployment available", SETTLE, || {
        let deployments = deployments.clone();
        async move {
            let status = deployments
                .get(RELEASE)
                .await
                .map_err(|e| e.to_string())?
                .status;
            match status.as_ref().and_then(|s| s.available_replicas) {
                Some(available) if available >= 1 => Ok(()),
                _ => Err(format!("{status:?}")),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn int8_model_runs_on_cpu_nodes_and_reports_its_endpoint() {
    let env = TestEnv::new("int8").await;
    let mut operator = env.operator("op");
    operator.wait_ready().await;
    env.apply_model(&model("embed", "v1", "int8", json!({"replicas": 2})))
        .await
        .expect("apply int8 model");
    let ready = env.wait_ready("embed", "v1", SETTLE).await;
    assert_eq!(
        ready.data["status"]["endpoint"],
        format!("http://embed.{}.svc.cluster.local:8080", env.namespace)
    );

    let service = env.api::<Service>().get("embed").await.expect("Service");
    let selector = service.spec.and_then(|s| s.selector).unwrap_or_default();
    assert_eq!(selector.get(MODEL_LABEL).map(String::as_str), Some("embed"));
    let pods = env.pods("embed").await;
    assert_eq!(pods.len(), 2);
    for pod in &pods {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        assert!(node.starts_with("cpu-"), "int8 pod on node {node:?}");
    }

    // `kubectl get qm` shows the printer columns with the model's values.
    let table = command("kubectl", &["get", "qm", "-n", &env.namespace]).expect("kubectl get qm");
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
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
    // DESIRED (the operator's autoscaler) and CANARY are blank for this model.
    let row: Vec<&str> = lines.next().expect("a row").split_whitespace().collect();
    let endpoint = format!("http://embed.{}.svc.cluster.local:8080", env.namespace);
    assert_eq!(
        row[..8],
        [
            "embed",
            "True",
            "v1",
            "v1",
            "int8",
            "cpu",
            "2",
            endpoint.as_str()
        ]
    );
}

#[tokio::test]
async fn fp16_model_runs_on_gpu_nodes_with_gpu_limits_and_toleration() {
    let env = TestEnv::new("fp16").await;
    let mut operator = env.operator("op");
    operator.wait_ready().await;
    // One replica: the fake cluster has two GPUs, shared with the stalled-rollout test.
    let manifest = model("rerank", "v1", "fp16", json!({"gpu": {"profile": "h100"}}));
    env.apply_model(&manifest).await.expect("apply fp16 model");
    env.wait_ready("rerank", "v1", SETTLE).await;

    let pods = env.pods("rerank").await;
    assert_eq!(pods.len(), 1);
    let spec = pods[0].spec.as_ref().expect("pod spec");
    let node = spec.node_name.as_deref().unwrap_or_default();
    assert!(node.starts_with("gpu-"), "fp16 pod on node {node:?}");
    let limits = spec.containers[0]
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap_or_default();
    assert_eq!(
        limits.get("nvidia.com/gpu").map(|q| q.0.as_str()),
        Some("1")
    );
    let tolerates_gpu = spec.tolerations.iter().flatten().any(|t| {
        t.key.as_deref() == Some("nvidia.com/gpu") && t.effect.as_deref() == Some("NoSchedule")
    });
    assert!(
        tolerates_gpu,
        "no nvidia.com/gpu toleration: {:?}",
        spec.tolerations
    );
    // The h100 profile's nodeSelector from the chart values.
    assert_eq!(
        spec.node_selector
            .as_ref()
            .and_then(|s| s.get("nvidia.com/gpu.product"))
            .map(String::as_str),
        Some("NVIDIA-H100-80GB-HBM3")
    );
    let args = spec.containers[0].args.clone().unwrap_or_default();
    assert!(
        args.windows(2).any(|w| w == ["--device", "cuda"]),
        "{args:?}"
    );
}

#[tokio::test]
async fn version_bump_rolls_out_without_dropping_to_zero_ready() {
    let env = TestEnv::new("rollout").await;
    let mut operator = env.operator("op");
    operator.wait_ready().await;
    env.apply_model(&model("embed", "v1", "int8", json!({"replicas": 2})))
        .await
        .expect("apply v1");
    env.wait_ready("embed", "v1", SETTLE).await;

    // Watch the Deployment throughout the rollout, recording the lowest readyReplicas seen.
    let deployments = env.api::<Deployment>();
    let config = watcher::Config::default().fields("metadata.name=embed");
    // v2 is applied only once the watch has its first state: on a busy machine the whole
    // rollout could otherwise finish before the watch starts, and it would see one state.
    let (started, watching) = tokio::sync::oneshot::channel();
    let watch = tokio::spawn(async move {
        let mut lowest = i32::MAX;
        let mut seen = 0;
        let mut started = Some(started);
        let mut stream = watcher(deployments, config).applied_objects().boxed();
        while let Some(deployment) = stream.try_next().await.expect("watching the Deployment") {
            if let Some(started) = started.take() {
                let _ = started.send(());
            }
            let status = deployment.status.unwrap_or_default();
            let ready = status.ready_replicas.unwrap_or(0);
            lowest = lowest.min(ready);
            seen += 1;
            let template_version = deployment
                .spec
                .and_then(|s| s.template.metadata)
                .and_then(|m| m.labels)
                .and_then(|l| l.get(VERSION_LABEL).cloned());
            // Done once only v2 replicas remain, all ready.
            let done = template_version.as_deref() == Some("v2")
                && status.updated_replicas == Some(2)
                && status.replicas == Some(2)
                && ready == 2;
            if done {
                break;
            }
        }
        (lowest, seen)
    });
    tokio::time::timeout(SETTLE, watching)
        .await
        .expect("the watch started")
        .expect("watch task");
    env.apply_model(&model("embed", "v2", "int8", json!({"replicas": 2})))
        .await
        .expect("apply v2");
    // Meanwhile the model says Ready=False (the change has not landed) but Available=True
    // (its endpoint keeps serving): sample its conditions until the rollout is done.
    let models = env.models();
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        loop {
            let qm = models.get("embed").await.expect("get the model");
            let ready = condition(&qm, "Ready")["status"] == "True";
            samples.push((
                ready,
                condition(&qm, "Available")["status"].clone(),
                qm.data["status"]["desiredVersion"].clone(),
            ));
            if ready && qm.data["status"]["currentVersion"] == "v2" {
                return samples;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let ready = env.wait_ready("embed", "v2", SETTLE).await;
    assert_eq!(ready.data["status"]["desiredVersion"], "v2");
    let samples = tokio::time::timeout(Duration::from_secs(10), sampler)
        .await
        .expect("the sampler saw the finished rollout")
        .expect("sampler task");
    assert!(
        samples.iter().all(|(_, available, _)| available == "True"),
        "Available went False during the rollout: {samples:?}"
    );
    assert!(
        samples
            .iter()
            .any(|(ready, _, version)| !ready && version == "v2"),
        "no sample caught the rollout in progress (Ready=False at v2): {samples:?}"
    );
    let (lowest, seen) = tokio::time::timeout(Duration::from_secs(10), watch)
        .await
        .expect("the watch saw the finished rollout")
        .expect("watch task");
    assert!(seen > 1, "the watch saw {seen} Deployment states");
    assert!(
        lowest >= 1,
        "readyReplicas dropped to {lowest} during the rollout"
    );

    // A new ReplicaSet took over; the old one is scaled to zero.
    let sets = env
        .api::<ReplicaSet>()
        .list(&ListParams::default().labels(&format!("{MODEL_LABEL}=embed")))
        .await
        .expect("list ReplicaSets")
        .items;
    let by_version = |version: &str| {
        sets.iter()
            .find(|rs| version_of(*rs) == Some(version))
            .and_then(|rs| rs.status.as_ref())
            .map(|s| (s.replicas, s.ready_replicas.unwrap_or(0)))
            .unwrap_or_else(|| panic!("no ReplicaSet of {version}"))
    };
    assert_eq!(sets.len(), 2);
    assert_eq!(by_version("v2"), (2, 2));
    assert_eq!(by_version("v1"), (0, 0));
    let versions: Vec<_> = env
        .pods("embed")
        .await
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .map(|pod| {
            pod.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(VERSION_LABEL).cloned())
        })
        .collect();
    assert_eq!(versions, [Some("v2".to_owned()), Some("v2".to_owned())]);
}

#[tokio::test]
async fn stalled_rollout_degrades_and_the_old_version_keeps_serving() {
    let env = TestEnv::new("stalled").await;
    let mut operator = env.operator("op");
    operator.wait_ready().await;
    // autoRollback off: the behaviour without it (the real-node tests roll back).
    let spec = |profile: &str| json!({"gpu": {"profile": profile}, "rollout": {"progressDeadlineSeconds": 5, "autoRollback": false}});
    env.apply_model(&model("rerank", "v1", "fp16", spec("default")))
        .await
        .expect("apply v1");
    env.wait_ready("rerank", "v1", SETTLE).await;

    // v2 on a GPU profile no node matches: its pod stays Pending past the progress deadline.
    env.apply_model(&model("rerank", "v2", "fp16", spec("unschedulable")))
        .await
        .expect("apply v2");
    let models = env.models();
    let degraded = wait_for("Degraded=True", SETTLE, || async {
        let model = models.get("rerank").await.map_err(|e| e.to_string())?;
        let degraded = condition(&model, "Degraded").clone();
        if degraded["status"] == "True" {
            Ok(model)
        } else {
            Err(format!("status: {}", model.data["status"]))
        }
    })
    .await;
    let reason = &condition(&degraded, "Degraded")["reason"];
    assert_eq!(
        reason, "ProgressDeadlineExceeded",
        "{}",
        degraded.data["status"]
    );
    assert_eq!(degraded.data["status"]["currentVersion"], "v1");
    assert_eq!(degraded.data["status"]["desiredVersion"], "v2");
    wait_for("a RolloutStalled Event", SETTLE, || async {
        let events = env.events("rerank", "RolloutStalled").await;
        events.first().cloned().ok_or("none yet")
    })
    .await;

    // The v1 pod still runs and is still behind the Service.
    let pods = env.pods("rerank").await;
    let serving: Vec<_> = pods
        .iter()
        .filter(|pod| {
            pod.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(VERSION_LABEL))
                .map(String::as_str)
                == Some("v1")
                && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .collect();
    assert_eq!(serving.len(), 1, "v1 pods running");
    let slices = env
        .api::<EndpointSlice>()
        .list(&ListParams::default().labels("kubernetes.io/service-name=rerank"))
        .await
        .expect("EndpointSlices");
    let ready_endpoints = slices
        .items
        .iter()
        .flat_map(|slice| &slice.endpoints)
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .count();
    assert_eq!(ready_endpoints, 1, "the Service still has the v1 endpoint");
}

#[tokio::test]
async fn invalid_specs_are_rejected_at_apply_time() {
    let env = TestEnv::new("cel").await;
    let long_name = "a".repeat(64);
    let cases = [
        (
            model("fp16-cpu", "v1", "fp16", json!({"device": "cpu"})),
            "precision fp16 requires device gpu",
        ),
        (
            model("int8-gpu", "v1", "int8", json!({"device": "gpu"})),
            "precisions int8 and int4 run on device cpu only",
        ),
        (
            model(&long_name, "v1", "int8", json!({})),
            "metadata.name must be a DNS-1035 label of at most 63 characters",
        ),
        (
            model("negative", "v1", "int8", json!({"replicas": -1})),
            "replicas must not be negative",
        ),
    ];
    for (manifest, message) in cases {
        match env.apply_model(&manifest).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{status:?}");
                assert!(
                    status.message.contains(message),
                    "{message:?} not in {:?}",
                    status.message
                );
            }
            other => panic!(
                "{} was not rejected: {other:?}",
                manifest["metadata"]["name"]
            ),
        }
    }
    let stored = env
        .models()
        .list(&ListParams::default())
        .await
        .expect("list");
    assert!(stored.items.is_empty(), "nothing stored");
}

#[tokio::test]
async fn deleting_the_model_garbage_collects_its_children() {
    let env = TestEnv::new("gc").await;
    let mut operator = env.operator("op");
    operator.wait_ready().await;
    // Two replicas, so a PodDisruptionBudget exists too.
    env.apply_model(&model("embed", "v1", "int8", json!({"replicas": 2})))
        .await
        .expect("apply");
    env.wait_ready("embed", "v1", SETTLE).await;
    env.api::<PodDisruptionBudget>()
        .get("embed")
        .await
        .expect("PDB exists");

    env.models()
        .delete("embed", &DeleteParams::default())
        .await
        .expect("delete model");
    let (deployments, services, budgets) = (
        env.api::<Deployment>(),
        env.api::<Service>(),
        env.api::<PodDisruptionBudget>(),
    );
    wait_for("children garbage-collected", GARBAGE_COLLECTION, || async {
        let left = [
            (
                "Deployment",
                deployments.get_opt("embed").await.map(|o| o.is_some()),
            ),
            (
                "Service",
                services.get_opt("embed").await.map(|o| o.is_some()),
            ),
            (
                "PodDisruptionBudget",
                budgets.get_opt("embed").await.map(|o| o.is_some()),
            ),
        ];
        let remaining: Vec<_> = left
            .iter()
            .filter(|(_, exists)| !matches!(exists, Ok(false)))
            .map(|(kind, _)| *kind)
            .collect();
        let pods = env.pods("embed").await.len();
        if remaining.is_empty() && pods == 0 {
            Ok(())
        } else {
            Err(format!("left: {remaining:?}, {pods} pods"))
        }
    })
    .await;
}

#[tokio::test]
async fn namespaced_install_works_with_roles_only() {
    let env = TestEnv::new("namespaced").await;
    let watch = format!("watchNamespaces={{{}}}", env.namespace);
    let install = helm_install(
        "qmodel-ns",
        &env.namespace,
        &[
            "--set",
            &watch,
            "--set",
            "leaderElection=true",
            "--skip-crds",
        ],
    )
    .expect("namespaced helm install");
    let cluster_roles = Api::<ClusterRole>::all(env.client.clone());
    let fullname = &install.service_account;
    assert!(
        cluster_roles
            .get_opt(fullname)
            .await
            .expect("get")
            .is_none(),
        "a namespaced install has no ClusterRole"
    );
    let user = format!("system:serviceaccount:{}:{fullname}", env.namespace);
    assert!(can_i(&env, &user, "list", "quantizedmodels", Some(&env.namespace)).await);
    assert!(
        !can_i(&env, &user, "list", "quantizedmodels", None).await,
        "cluster-wide list"
    );

    let mut operator = env.operator_of(&install, "op");
    operator.wait_ready().await;
    env.apply_model(&model("embed", "v1", "int8", json!({})))
        .await
        .expect("apply");
    env.wait_ready("embed", "v1", SETTLE).await;
}

#[tokio::test]
async fn chart_rbac_denies_what_the_operator_does_not_need() {
    let env = TestEnv::new("rbac").await;
    let user = format!("system:serviceaccount:{RELEASE_NAMESPACE}:{RELEASE}");
    let namespace = Some(env.namespace.as_str());
    for (verb, resource, allowed) in [
        ("watch", "quantizedmodels", true),
        ("patch", "deployments", true),
        ("delete", "deployments", false),
        ("update", "quantizedmodels", false),
        ("delete", "services", false),
        ("get", "secrets", false),
        ("get", "configmaps", true),
        ("list", "configmaps", false),
        ("watch", "pods", true),
        ("delete", "pods", false),
        ("create", "pods", false),
    ] {
        assert_eq!(
            can_i(&env, &user, verb, resource, namespace).await,
            allowed,
            "{verb} {resource}"
        );
    }
}

/// Whether `user` may `verb` `resource` (any API group) in `namespace` (all when `None`).
async fn can_i(
    env: &TestEnv,
    user: &str,
    verb: &str,
    resource: &str,
    namespace: Option<&str>,
) -> bool {
    let group = match resource {
        "quantizedmodels" => "serving.qmodel.dev",
        "deployments" => "apps",
        _ => "",
    };
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {
            "user": user,
            "resourceAttributes": {
                "verb": verb,
                "group": group,
                "resource": resource,
                "namespace": namespace.unwrap_or_default(),
            },
        },
    }))
    .expect("review manifest");
    let review = Api::<SubjectAccessReview>::all(env.client.clone())
        .create(&Default::default(), &review)
        .await
        .expect("SubjectAccessReview");
    review.status.expect("review status").allowed
}
