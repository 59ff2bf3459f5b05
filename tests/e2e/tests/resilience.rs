//! The operator process dying or running twice (issue 5, check 8).

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ResourceQuota, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use qmodel_e2e::{Operator, RELEASE_NAMESPACE, TestEnv, VERSION_LABEL, condition, model, wait_for};
use serde_json::json;

const SETTLE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn operator_killed_mid_rollout_converges_after_restart() {
    let env = TestEnv::new("restart").await;
    let mut operator = env.operator("op-0");
    operator.wait_ready().await;
    env.apply_model(&model("embed", "v1", "int8", json!({"replicas": 3})))
        .await
        .expect("apply v1");
    env.wait_ready("embed", "v1", SETTLE).await;

    // A quota of three pods holds the v2 rollout mid-way: its surge pod cannot be created.
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "pods"},
        "spec": {"hard": {"pods": "3"}},
    }))
    .expect("quota manifest");
    let quotas = env.api::<ResourceQuota>();
    quotas
        .create(&Default::default(), &quota)
        .await
        .expect("create quota");
    wait_for("the quota to count the pods", SETTLE, || async {
        let used = quotas.get("pods").await.map_err(|e| e.to_string())?.status;
        let pods = used
            .as_ref()
            .and_then(|s| s.used.as_ref())
            .and_then(|u| u.get("pods"));
        if pods.is_some() {
            Ok(())
        } else {
            Err(format!("{used:?}"))
        }
    })
    .await;
    env.apply_model(&model("embed", "v2", "int8", json!({"replicas": 3})))
        .await
        .expect("apply v2");
    let models = env.models();
    let rolling = wait_for("the operator to report the v2 rollout", SETTLE, || async {
        let model = models.get("embed").await.map_err(|e| e.to_string())?;
        let status = &model.data["status"];
        if status["desiredVersion"] == "v2" && condition(&model, "Ready")["status"] == "False" {
            Ok(model)
        } else {
            Err(format!("status: {status}"))
        }
    })
    .await;
    assert_eq!(rolling.data["status"]["currentVersion"], "v1");
    operator.kill();
    // While no operator runs: the rollout is unblocked and the model changes again.
    quotas
        .delete("pods", &DeleteParams::default())
        .await
        .expect("delete quota");
    env.apply_model(&model("embed", "v3", "int8", json!({"replicas": 3})))
        .await
        .expect("apply v3");

    // A restarted container keeps its pod name, hence its identity and Lease.
    let mut operator = env.operator("op-0");
    operator.wait_ready().await;
    let model = env.wait_ready("embed", "v3", SETTLE).await;

    let selector = ListParams::default().labels("serving.qmodel.dev/model=embed");
    let deployments = env
        .api::<Deployment>()
        .list(&selector)
        .await
        .expect("Deployments")
        .items;
    let services = env
        .api::<Service>()
        .list(&selector)
        .await
        .expect("Services")
        .items;
    let budgets = env
        .api::<PodDisruptionBudget>()
        .list(&selector)
        .await
        .expect("PDBs")
        .items;
    assert_eq!(
        (deployments.len(), services.len(), budgets.len()),
        (1, 1, 1),
        "exactly one of each child"
    );
    let owners = deployments[0].owner_references();
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(Some(&owners[0].uid), model.metadata.uid.as_ref());
    wait_for("three v3 pods and nothing else", SETTLE, || async {
        let versions: Vec<_> = env
            .pods("embed")
            .await
            .iter()
            .map(|pod| pod.labels().get(VERSION_LABEL).cloned().unwrap_or_default())
            .collect();
        if versions == ["v3", "v3", "v3"] {
            Ok(())
        } else {
            Err(format!("{versions:?}"))
        }
    })
    .await;
}

#[tokio::test]
async fn only_the_leader_of_two_operators_acts() {
    let env = TestEnv::new("leader").await;
    let mut first = env.operator("op-a");
    let mut second = env.operator("op-b");
    first.wait_ready().await;
    second.wait_ready().await;

    let leases: Api<Lease> = Api::namespaced(env.client.clone(), RELEASE_NAMESPACE);
    let lease_name = format!("qmodel-operator-{}", env.namespace);
    let holder = || async {
        let lease = leases.get(&lease_name).await.map_err(|e| e.to_string())?;
        lease
            .spec
            .and_then(|s| s.holder_identity)
            .ok_or_else(|| "no holder".to_owned())
    };
    let holder_identity = wait_for("a Lease holder", SETTLE, holder).await;
    let (mut leader, standby): (Operator, Operator) = if holder_identity == first.identity {
        (first, second)
    } else {
        (second, first)
    };
    wait_for_leadership(&leader).await;

    env.apply_model(&model("embed", "v1", "int8", json!({})))
        .await
        .expect("apply");
    env.wait_ready("embed", "v1", SETTLE).await;
    assert!(leader.metric("qmodel_operator_reconciliations_total").await > 0.0);
    assert_eq!(standby.metric("qmodel_operator_leader").await, 0.0);
    assert_eq!(
        standby
            .metric("qmodel_operator_reconciliations_total")
            .await,
        0.0,
        "the standby reconciled"
    );
    let created = env.events("embed", "Created").await;
    assert!(!created.is_empty(), "a Created Event");
    for event in &created {
        assert_eq!(
            event.reporting_instance.as_deref(),
            Some(leader.identity.as_str())
        );
    }

    // A leader shutting down releases the Lease; the standby takes over and acts.
    let exit = leader.terminate();
    assert!(exit.success(), "leader exited with {exit}");
    let handover = std::time::Instant::now();
    wait_for_leadership(&standby).await;
    // A figure, not an assertion: with the release watched, well under the 15 s Lease.
    eprintln!(
        "RESULT leader handover: the standby leads {:?} after the leader exited",
        handover.elapsed()
    );
    assert_eq!(
        wait_for("the new Lease holder", SETTLE, holder).await,
        standby.identity
    );
    env.apply_model(&model("embed", "v2", "int8", json!({})))
        .await
        .expect("apply v2");
    env.wait_ready("embed", "v2", SETTLE).await;
}

async fn wait_for_leadership(operator: &Operator) {
    wait_for(
        &format!("{} to lead", operator.identity),
        SETTLE,
        || async {
            let leader = operator.metric("qmodel_operator_leader").await;
            if leader == 1.0 { Ok(()) } else { Err(leader) }
        },
    )
    .await;
}
