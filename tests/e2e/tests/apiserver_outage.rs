//! The kube-apiserver going away and coming back while models change (issue 7). A test binary
//! of its own: stopping the apiserver would break any test running beside it.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::ListParams;
use qmodel_e2e::{TestEnv, model, start_apiserver, stop_apiserver};
use serde_json::json;

/// Generous: after an outage longer than the Lease, watches reconnect with backoff; the time
/// it took is printed as a figure, not asserted.
const SETTLE: Duration = Duration::from_secs(300);
/// Longer than the operator's Lease (15 s): a leader cannot renew through it.
const OUTAGE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn operator_rides_out_an_apiserver_restart_and_converges() {
    let env = TestEnv::new("outage").await;
    let mut operator = env.operator("op-0");
    operator.wait_ready().await;
    for name in ["alpha", "beta", "gone"] {
        env.apply_model(&model(name, "v1", "int8", json!({})))
            .await
            .expect("apply v1");
    }
    for name in ["alpha", "beta", "gone"] {
        env.wait_ready(name, "v1", SETTLE).await;
    }

    // A change the operator is busy with when the apiserver goes.
    env.apply_model(&model("alpha", "v2", "int8", json!({"replicas": 2})))
        .await
        .expect("apply alpha v2");
    stop_apiserver();
    let stopped = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    start_apiserver();
    eprintln!("apiserver down for {:?}", stopped.elapsed());

    // Changes right after it comes back, while the operator's watches are still reconnecting.
    env.apply_model(&model("beta", "v2", "int8", json!({"replicas": 2})))
        .await
        .expect("apply beta v2");
    env.apply_model(&model("gamma", "v1", "int8", json!({})))
        .await
        .expect("create gamma");
    env.models()
        .delete("gone", &Default::default())
        .await
        .expect("delete gone");

    // An operator that lost its Lease exits non-zero for Kubernetes to restart it; do what the
    // kubelet would.
    let mut restarts = 0;
    let deadline = Instant::now() + SETTLE;
    let converged = loop {
        if let Some(status) = operator.exited() {
            eprintln!("operator exited with {status} after the outage; restarting it");
            assert!(
                restarts < 3,
                "the operator keeps exiting; see {:?}",
                operator.log
            );
            restarts += 1;
            operator = env.operator("op-0");
            operator.wait_ready().await;
        }
        let mut settled = true;
        for (name, version) in [("alpha", "v2"), ("beta", "v2"), ("gamma", "v1")] {
            let model = env.models().get(name).await.expect("get model");
            let status = &model.data["status"];
            settled &= qmodel_e2e::condition(&model, "Ready")["status"] == "True"
                && status["currentVersion"] == version
                && status["observedGeneration"].as_i64() == model.metadata.generation;
        }
        if settled {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(converged, "models not converged; see {:?}", operator.log);
    eprintln!(
        "RESULT apiserver outage: converged {:?} after the restart, operator restarts: {restarts}",
        stopped.elapsed() - OUTAGE
    );

    // Nothing lost, nothing doubled: one Deployment per model, with the desired replicas.
    let deployments = env
        .api::<Deployment>()
        .list(&ListParams::default())
        .await
        .expect("Deployments")
        .items;
    let mut seen: Vec<_> = deployments
        .iter()
        .filter(|d| d.metadata.deletion_timestamp.is_none())
        .map(|d| {
            (
                d.metadata.name.clone().unwrap_or_default(),
                d.spec.as_ref().and_then(|s| s.replicas),
            )
        })
        .collect();
    seen.sort();
    // `gone`'s Deployment goes with garbage collection; wait for it if it is still there.
    if seen.iter().any(|(name, _)| name == "gone") {
        qmodel_e2e::wait_for("gone's Deployment to be collected", SETTLE, || async {
            match env.api::<Deployment>().get_opt("gone").await {
                Ok(None) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        seen.retain(|(name, _)| name != "gone");
    }
    assert_eq!(
        seen,
        [
            ("alpha".to_owned(), Some(2)),
            ("beta".to_owned(), Some(2)),
            ("gamma".to_owned(), Some(1))
        ]
    );
}
