//! GPU rollouts that cannot deadlock (issue 15), on the fake cluster's two GPU nodes of one
//! GPU each: a two-replica fp16 model uses every GPU, so its surge pod finds none. A binary of
//! its own, so no other test holds a GPU meanwhile.

use std::cell::Cell;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use qmodel_e2e::{TestEnv, condition, model, version_of, wait_for};
use serde_json::json;

/// Other binaries' namespaces may still be releasing their GPU pods when this one starts.
const SETTLE: Duration = Duration::from_secs(120);

#[tokio::test]
async fn a_two_replica_fp16_rollout_without_a_spare_gpu_completes_one_pod_at_a_time() {
    let env = TestEnv::new("gpu-rollout").await;
    let mut operator = env.operator("op");
    operator.wait_ready().await;
    let spec = json!({"replicas": 2, "gpu": {"profile": "h100"}});
    env.apply_model(&model("pair", "v1", "fp16", spec.clone()))
        .await
        .expect("apply v1");
    env.wait_ready("pair", "v1", SETTLE).await;

    let started = Instant::now();
    env.apply_model(&model("pair", "v2", "fp16", spec))
        .await
        .expect("apply v2");
    let models = env.models();
    let deployments = env.api::<Deployment>();
    let (one_at_a_time_seen, fewest_available) = (Cell::new(false), Cell::new(i32::MAX));
    wait_for("pair Ready at v2", SETTLE, || async {
        let model = models.get("pair").await.map_err(|e| e.to_string())?;
        let status = &model.data["status"];
        if status["rolloutStrategy"] == "OneAtATime" {
            one_at_a_time_seen.set(true);
        }
        let deployment = deployments.get("pair").await.map_err(|e| e.to_string())?;
        let available = deployment
            .status
            .and_then(|s| s.available_replicas)
            .unwrap_or_default();
        fewest_available.set(fewest_available.get().min(available));
        assert_ne!(
            condition(&model, "RolledBack")["status"],
            "True",
            "waiting for a GPU taken for a bad version: {status}"
        );
        if condition(&model, "Ready")["status"] == "True" && status["currentVersion"] == "v2" {
            Ok(())
        } else {
            Err(format!("status: {status}"))
        }
    })
    .await;
    let (one_at_a_time_seen, fewest_available) = (one_at_a_time_seen.get(), fewest_available.get());
    eprintln!(
        "BENCHMARK fp16 rollout v1 -> v2, 2 replicas, no spare GPU: Ready at v2 in {:.1} s, at least {fewest_available} replica available throughout",
        started.elapsed().as_secs_f64()
    );
    // The strategy lasts as long as the rollout (under a second here), so polling can miss it;
    // its Event stays.
    let no_spare_gpu = env.events("pair", "NoSpareGpu").await;
    assert!(
        one_at_a_time_seen || !no_spare_gpu.is_empty(),
        "neither status.rolloutStrategy OneAtATime nor a NoSpareGpu Event"
    );
    assert!(
        fewest_available >= 1,
        "the PodDisruptionBudget's one replica kept"
    );
    let event = env.events("pair", "NoSpareGpu").await;
    assert!(!event.is_empty(), "no NoSpareGpu Event");

    // Done: the spec's surge strategy is back for the next rollout, both replicas run v2 on
    // the two GPU nodes (spread by hostname).
    wait_for("the spec's maxSurge back", SETTLE, || async {
        let deployment = deployments.get("pair").await.map_err(|e| e.to_string())?;
        let surge = deployment
            .spec
            .and_then(|s| s.strategy)
            .and_then(|s| s.rolling_update)
            .and_then(|r| r.max_surge);
        match surge {
            Some(IntOrString::Int(1)) => Ok(()),
            other => Err(format!("maxSurge {other:?}")),
        }
    })
    .await;
    let model = models.get("pair").await.unwrap();
    assert!(model.data["status"]["rolloutStrategy"].is_null());
    let pods = env.pods("pair").await;
    let mut nodes: Vec<_> = pods
        .iter()
        .map(|pod| {
            assert_eq!(version_of(pod), Some("v2"));
            pod.spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default()
        })
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["gpu-0", "gpu-1"]);
}
