//! Hand edits to an owned Deployment (issue 7): the operator restores its fields, except the
//! replica count when the model says an autoscaler owns it.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use qmodel_e2e::{TestEnv, model, wait_for};
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(60);
/// A hand edit must be seen through the Deployment watch, not the periodic resync (minutes).
const PROMPTLY: Duration = Duration::from_secs(15);

/// What a person with `kubectl edit` would change: image, replicas and an env var's value.
async fn edit_by_hand(deployments: &kube::Api<Deployment>, name: &str) {
    let patch = json!({
        "spec": {
            "replicas": 5,
            "template": {"spec": {"containers": [{
                "name": "server",
                "image": "registry.example/evil:latest",
                "env": [{"name": "LOG_LEVEL", "value": "trace"}],
            }]}},
        }
    });
    deployments
        .patch(
            name,
            &PatchParams {
                field_manager: Some("kubectl-edit".to_owned()),
                ..PatchParams::default()
            },
            &Patch::Strategic(&patch),
        )
        .await
        .expect("hand edit");
}

/// (image, replicas, LOG_LEVEL) of the Deployment.
fn fields(deployment: &Deployment) -> (String, Option<i32>, Option<String>) {
    let spec = deployment.spec.as_ref().expect("spec");
    let container = &spec.template.spec.as_ref().expect("pod spec").containers[0];
    let log_level = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "LOG_LEVEL")
        .and_then(|e| e.value.clone());
    (
        container.image.clone().unwrap_or_default(),
        spec.replicas,
        log_level,
    )
}

async fn settled(
    env: &TestEnv,
    name: &str,
    want: impl Fn(&(String, Option<i32>, Option<String>)) -> bool,
) -> Duration {
    let started = Instant::now();
    let deployments = env.api::<Deployment>();
    wait_for("the Deployment's fields", PROMPTLY, || async {
        let deployment = deployments.get(name).await.map_err(|e| e.to_string())?;
        let fields = fields(&deployment);
        if want(&fields) {
            Ok(())
        } else {
            Err(format!("{fields:?}"))
        }
    })
    .await;
    started.elapsed()
}

fn spec(autoscaling: bool) -> Value {
    json!({
        "replicas": 2,
        "env": [{"name": "LOG_LEVEL", "value": "info"}],
        "autoscaling": {"enabled": autoscaling, "external": autoscaling},
    })
}

#[tokio::test]
async fn hand_edits_to_the_deployment_are_reverted() {
    let env = TestEnv::new("drift").await;
    let mut operator = env.operator("op-0");
    operator.wait_ready().await;
    env.apply_model(&model("embed", "v1", "int8", spec(false)))
        .await
        .expect("apply");
    env.wait_ready("embed", "v1", SETTLE).await;
    let deployments = env.api::<Deployment>();
    let original = fields(&deployments.get("embed").await.expect("Deployment"));
    assert_eq!((original.1, original.2.as_deref()), (Some(2), Some("info")));

    edit_by_hand(&deployments, "embed").await;
    let took = settled(&env, "embed", |now| *now == original).await;
    eprintln!("RESULT drift: image, replicas and env restored {took:?} after the hand edit");
    env.wait_ready("embed", "v1", SETTLE).await;
}

#[tokio::test]
async fn with_autoscaling_the_replica_count_is_left_to_the_autoscaler() {
    let env = TestEnv::new("hpa").await;
    let mut operator = env.operator("op-0");
    operator.wait_ready().await;
    env.apply_model(&model("embed", "v1", "int8", spec(true)))
        .await
        .expect("apply");
    env.wait_ready("embed", "v1", SETTLE).await;
    let deployments = env.api::<Deployment>();
    let original = fields(&deployments.get("embed").await.expect("Deployment"));
    // Never set by the operator: the apiserver's default of one.
    assert_eq!(original.1, Some(1));

    // What an HPA does: scale the Deployment (here together with a hand edit of the rest).
    edit_by_hand(&deployments, "embed").await;
    let took = settled(&env, "embed", |now| {
        (now.0.as_str(), now.1, &now.2) == (original.0.as_str(), Some(5), &original.2)
    })
    .await;
    // Image and env come back; give the operator time to (wrongly) touch replicas too.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = fields(&deployments.get("embed").await.expect("Deployment"));
    assert_eq!(
        after.1,
        Some(5),
        "the operator fought the autoscaler over replicas"
    );
    let owners: Vec<_> = deployments
        .get("embed")
        .await
        .expect("Deployment")
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
        })
        .filter_map(|m| m.manager)
        .collect();
    assert_eq!(owners, ["kubectl-edit"], "replicas owned by");
    eprintln!("RESULT drift with autoscaling: image and env restored {took:?}, replicas left at 5");

    // And the model stays Ready with the autoscaler's count.
    wait_for("five ready replicas", SETTLE, || async {
        let model = env.models().get("embed").await.map_err(|e| e.to_string())?;
        let status = &model.data["status"];
        if status["readyReplicas"] == 5 {
            Ok(())
        } else {
            Err(format!("{status}"))
        }
    })
    .await;
}
