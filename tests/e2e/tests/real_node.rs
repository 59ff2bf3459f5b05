//! Pods that really run (issue 17): the baked operator and server images on the real node of
//! tests/cluster, behind real probes, Services, DNS and kube-proxy; rollouts and pod deletions
//! counted request by request under load; versions that cannot start reported with their cause.
//!
//! The tests take turns on the node ([`real_node::exclusive`]); each prints its figures.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{DeleteParams, ListParams, PostParams};
use qmodel_e2e::real_node::{
    self, CORRUPT_VERSION, ClientPod, DEGRADED_VERSION, Load, LoadReport, MISSING_VERSION,
    OPERATOR_IMAGE_REPOSITORY, cluster_ip, info, logs, placement, real_model, require_real_node,
};
use qmodel_e2e::{TestEnv, VERSION_LABEL, condition, helm_install, model, version_of, wait_for};
use serde_json::{Value, json};

/// Pods of the baked image start in about a second; the first one on a cold node also unpacks
/// the image.
const START: Duration = Duration::from_secs(120);
const ROLLOUT: Duration = Duration::from_secs(180);

/// The real node's test environment: the node is there, the images are loaded, and this test
/// has it to itself.
async fn real_env(test: &str) -> (TestEnv, tokio::sync::MutexGuard<'static, ()>) {
    let turn = real_node::exclusive().await;
    let env = TestEnv::new(test).await;
    require_real_node(&env).await;
    real_node::images();
    (env, turn)
}

fn assert_no_failures(what: &str, report: &LoadReport) {
    eprintln!(
        "BENCHMARK {what}: {} requests answered 200, {} failed, over {:.1} s",
        report.ok,
        report.failures.len(),
        report.seconds
    );
    assert!(report.ok > 0, "{what}: no request got through");
    assert!(
        report.failures.is_empty(),
        "{what}: {} of {} requests failed, first ones: {:#?}",
        report.failures.len(),
        report.ok + report.failures.len() as u64,
        &report.failures[..report.failures.len().min(10)]
    );
}

/// The model's pods of `version`, once `count` are Running and Ready.
async fn ready_pods(env: &TestEnv, name: &str, version: &str, count: usize) -> Vec<Pod> {
    wait_for(
        &format!("{count} ready pods of {name} at version {version}"),
        START,
        || async {
            let pods: Vec<Pod> = env
                .pods(name)
                .await
                .into_iter()
                .filter(|pod| {
                    pod.metadata.deletion_timestamp.is_none()
                        && pod
                            .metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(VERSION_LABEL))
                            == Some(&version.to_owned())
                })
                .collect();
            let ready = pods.iter().filter(|pod| pod_ready(pod)).count();
            if ready == count && pods.len() == count {
                Ok(pods)
            } else {
                Err(format!("{ready} of {} ready", pods.len()))
            }
        },
    )
    .await
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Cosine similarity of two vectors.
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// The first `n` reference sentences and their ONNX Runtime embeddings (server/tests/fixtures).
fn reference(n: usize) -> (Vec<String>, Vec<Vec<f32>>) {
    let fixtures = qmodel_e2e::repo_root().join("server/tests/fixtures");
    let read = |name: &str| std::fs::read(fixtures.join(name)).expect("reading a fixture");
    let sentences: Vec<String> = serde_json::from_slice(&read("sentences.json")).unwrap();
    let header: Value = serde_json::from_slice(&read("minilm_embeddings.json")).unwrap();
    let dim = header["dim"].as_u64().expect("dim in the fixture header") as usize;
    let embeddings = read("minilm_embeddings.f32")
        .chunks_exact(4 * dim)
        .take(n)
        .map(|row| {
            row.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        })
        .collect();
    (sentences.into_iter().take(n).collect(), embeddings)
}

#[tokio::test]
async fn operator_image_runs_in_cluster_from_helm_and_reconciles() {
    let (env, _turn) = real_env("incluster").await;
    let images = real_node::images();
    let values = json!({
        "image": {
            "repository": OPERATOR_IMAGE_REPOSITORY,
            "tag": images.operator_tag,
            "pullPolicy": "IfNotPresent",
        },
        "watchNamespaces": [env.namespace],
        "leaderElection": false,
        "nodeSelector": placement()["nodeSelector"],
        "tolerations": placement()["tolerations"],
    });
    let values_file = std::env::temp_dir().join(format!("{}-values.json", env.namespace));
    std::fs::write(&values_file, values.to_string()).unwrap();
    let started = Instant::now();
    // `--wait`: the operator's Deployment is available, i.e. its pod passed its /readyz probe.
    helm_install(
        "incluster",
        &env.namespace,
        &["--skip-crds", "--values", values_file.to_str().unwrap()],
    )
    .unwrap_or_else(|error| panic!("helm install of the baked operator image: {error}"));
    let operator_pods = env
        .api::<Pod>()
        .list(&ListParams::default().labels("app.kubernetes.io/instance=incluster"))
        .await
        .unwrap()
        .items;
    assert_eq!(operator_pods.len(), 1);
    let operator_pod = &operator_pods[0];
    assert!(pod_ready(operator_pod), "{:?}", operator_pod.status);
    assert_eq!(
        operator_pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref()),
        Some("real-0"),
        "the operator runs on the real node"
    );
    let image = &operator_pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .image;
    assert_eq!(
        image,
        &format!("{OPERATOR_IMAGE_REPOSITORY}:{}", images.operator_tag)
    );
    eprintln!(
        "BENCHMARK in-cluster operator: helm install -> pod Ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // It reconciles with in-cluster configuration (the `kubernetes` Service): a model on the
    // kwok nodes becomes Ready through it alone.
    env.apply_model(&model("reconciled", "v1", "int8", json!({})))
        .await
        .unwrap();
    env.wait_ready("reconciled", "v1", Duration::from_secs(60))
        .await;
    let log = logs(&env, operator_pod.metadata.name.as_deref().unwrap());
    assert!(log.contains("reconciling"), "operator log: {log}");
}

#[tokio::test]
async fn int8_model_serves_reference_embeddings_by_dns_name_from_a_pod() {
    let (env, _turn) = real_env("serve").await;
    let mut operator = env.operator("op");
    operator.wait_ready().await;
    let started = Instant::now();
    env.apply_model(&real_model("minilm", "1", json!({"replicas": 1})))
        .await
        .unwrap();
    let model = env.wait_ready("minilm", "1", START).await;
    eprintln!(
        "BENCHMARK real pod: QuantizedModel applied -> Ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let pods = ready_pods(&env, "minilm", "1", 1).await;
    let pod = &pods[0];
    assert_eq!(
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some("real-0")
    );
    let status = pod.status.as_ref().unwrap();
    let container = &status.container_statuses.as_ref().unwrap()[0];
    assert!(container.ready && container.state.as_ref().unwrap().running.is_some());
    assert_eq!(container.restart_count, 0);

    let endpoint = model.data["status"]["endpoint"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        endpoint,
        format!("http://minilm.{}.svc.cluster.local:8080", env.namespace)
    );
    let client = ClientPod::start(&env, "client").await;
    let (sentences, expected) = reference(8);
    let answer = client
        .post(
            &format!("{endpoint}/embed"),
            &json!({"inputs": sentences}).to_string(),
        )
        .unwrap_or_else(|error| panic!("POST {endpoint}/embed from a pod: {error}"));
    let embeddings: Vec<Vec<f32>> = serde_json::from_str(&answer)
        .unwrap_or_else(|error| panic!("not embeddings ({error}): {answer}"));
    assert_eq!(embeddings.len(), expected.len());
    for (i, (got, want)) in embeddings.iter().zip(&expected).enumerate() {
        let similarity = cosine(got, want);
        assert!(
            similarity >= 0.99,
            "sentence {i} {:?}: cosine {similarity} to the reference",
            sentences[i]
        );
    }

    let log = logs(&env, pod.metadata.name.as_deref().unwrap());
    for line in ["compute threads", "listening", "warmed up; ready"] {
        assert!(log.contains(line), "kubectl logs lacks {line:?}: {log}");
    }
}

#[tokio::test]
async fn pods_are_restricted_read_only_memory_limited_and_size_threads_from_the_cpu_limit() {
    let (env, _turn) = real_env("restricted").await;
    let mut operator = env.operator("op");
    operator.wait_ready().await;
    let resources = json!({
        "requests": {"cpu": "100m", "memory": "64Mi"},
        "limits": {"cpu": "1", "memory": "384Mi"},
    });
    env.apply_model(&real_model("limited", "1", json!({"resources": resources})))
        .await
        .unwrap();
    env.wait_ready("limited", "1", START).await;
    let pods = ready_pods(&env, "limited", "1", 1).await;
    let spec = pods[0].spec.as_ref().unwrap();
    let container = &spec.containers[0];
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(
        container
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()["memory"]
            .0,
        "384Mi"
    );
    // The namespace enforces the restricted Pod Security Standard (TestEnv): the pod was
    // admitted, so it complies; and it runs.
    let labels = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(env.client.clone())
        .get(&env.namespace)
        .await
        .unwrap()
        .metadata
        .labels
        .unwrap();
    assert_eq!(labels["pod-security.kubernetes.io/enforce"], "restricted");

    let addr = cluster_ip(&env, "limited").await;
    let info = info(&addr).await;
    assert_eq!(
        info["compute_threads"],
        1,
        "a 1-CPU limit on a {}-core node: {info}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let reason = info["compute_threads_reason"].as_str().unwrap();
    assert!(reason.starts_with("CPU limit 100000/100000"), "{reason}");
    eprintln!("real pod with limits.cpu 1: compute_threads 1 ({reason})");
}

/// Changes the model's version under load and waits for the rollout; the load's report and the
/// rollout's duration.
async fn roll_out_under_load(
    env: &TestEnv,
    name: &str,
    replicas: i64,
    to: &str,
) -> (LoadReport, f64) {
    let addr = cluster_ip(env, name).await;
    let load = Load::start(&addr, 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    env.apply_model(&real_model(name, to, json!({"replicas": replicas})))
        .await
        .unwrap();
    env.wait_ready(name, to, ROLLOUT).await;
    let rollout = started.elapsed().as_secs_f64();
    // The old pods' preStop and drain end after the rollout is complete: keep loading through
    // them.
    wait_for("the old version's pods gone", ROLLOUT, || async {
        let left = env
            .pods(name)
            .await
            .into_iter()
            .filter(|pod| version_of(pod) != Some(to))
            .count();
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} left"))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    (load.stop().await, rollout)
}

/// A model of `replicas` pods at version 1 on the real node, served by this test's operator,
/// all of them Ready; the operator (kept running while the returned value lives) and the pods.
async fn serving(env: &TestEnv, name: &str, replicas: usize) -> (qmodel_e2e::Operator, Vec<Pod>) {
    let mut operator = env.operator("op");
    operator.wait_ready().await;
    env.apply_model(&real_model(name, "1", json!({"replicas": replicas})))
        .await
        .unwrap();
    env.wait_ready(name, "1", START).await;
    let pods = ready_pods(env, name, "1", replicas).await;
    (operator, pods)
}

#[tokio::test]
async fn version_rollout_under_load_fails_no_request() {
    let (env, _turn) = real_env("rollout").await;
    let _operator = serving(&env, "rolling", 2).await;

    let (report, rollout) = roll_out_under_load(&env, "rolling", 2, "2").await;
    eprintln!("BENCHMARK rollout 1 -> 2 (2 replicas): {rollout:.1} s to Ready at 2");
    assert_no_failures("rollout 1 -> 2 under load", &report);
    let model = env.models().get("rolling").await.unwrap();
    assert_eq!(model.data["status"]["currentVersion"], "2");
    let addr = cluster_ip(&env, "rolling").await;
    for _ in 0..4 {
        assert_eq!(info(&addr).await["model_version"], "2");
    }
}

#[tokio::test]
async fn deleting_a_pod_of_two_replicas_under_load_fails_no_request() {
    let (env, _turn) = real_env("podkill").await;
    let (_operator, pods) = serving(&env, "pair", 2).await;
    let victim = pods[0].metadata.name.clone().unwrap();

    let addr = cluster_ip(&env, "pair").await;
    let load = Load::start(&addr, 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    env.api::<Pod>()
        .delete(&victim, &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the deleted pod gone and two replicas ready again",
        ROLLOUT,
        || async {
            let pods = env.pods("pair").await;
            let gone = pods
                .iter()
                .all(|p| p.metadata.name.as_deref() != Some(&victim));
            let ready = pods.iter().filter(|p| pod_ready(p)).count();
            if gone && ready == 2 {
                Ok(())
            } else {
                Err(format!("gone {gone}, {ready} ready"))
            }
        },
    )
    .await;
    let replaced = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = load.stop().await;
    eprintln!("BENCHMARK pod deletion (2 replicas): replaced and gone in {replaced:.1} s");
    assert_no_failures("pod deletion under load", &report);
}

/// The model's pods of `version` (terminating ones too).
async fn pods_of(env: &TestEnv, name: &str, version: &str) -> Vec<Pod> {
    env.pods(name)
        .await
        .into_iter()
        .filter(|pod| version_of(pod) == Some(version))
        .collect()
}

/// Applies the broken `version` under load over a Ready version 1; waits until the operator
/// rolls it back by itself (RolledBack and Degraded with `reason`, a RolledBack Event, the
/// broken pods gone) and checks that no request failed and that the failed version is not
/// retried. Returns the RolledBack condition's message.
async fn broken_version_rolls_back_under_load(
    env: &TestEnv,
    name: &str,
    version: &str,
    reason: &str,
) -> String {
    env.apply_model(&real_model(name, "1", json!({})))
        .await
        .unwrap();
    env.wait_ready(name, "1", START).await;
    let addr = cluster_ip(env, name).await;
    let load = Load::start(&addr, 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    env.apply_model(&real_model(name, version, json!({})))
        .await
        .unwrap();
    let models = env.models();
    let message = env
        .wait_condition(name, "RolledBack", reason, ROLLOUT)
        .await;
    let detected = started.elapsed().as_secs_f64();
    wait_for(&format!("the pods of {version} gone"), ROLLOUT, || async {
        match pods_of(env, name, version).await.len() {
            0 => Ok(()),
            left => Err(format!("{left} left")),
        }
    })
    .await;
    eprintln!(
        "BENCHMARK {reason} version rolled back: decided after {detected:.1} s, its pods gone after {:.1} s: {message}",
        started.elapsed().as_secs_f64()
    );
    let event = wait_for("a RolledBack Event", Duration::from_secs(30), || async {
        env.events(name, "RolledBack")
            .await
            .into_iter()
            .next()
            .ok_or("none yet")
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(
        event.note.as_deref().unwrap_or_default().contains(version),
        "{event:?}"
    );

    // Rolled back and staying there: the failed version is not retried.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let model = models.get(name).await.unwrap();
    let status = &model.data["status"];
    assert_eq!(status["currentVersion"], "1", "{status}");
    assert_eq!(status["lastGoodVersion"], "1", "{status}");
    assert_eq!(status["desiredVersion"], version, "{status}");
    assert_eq!(status["rollback"]["failedVersion"], version, "{status}");
    let degraded = condition(&model, "Degraded");
    assert_eq!(
        (&degraded["status"], &degraded["reason"]),
        (&json!("True"), &json!(reason)),
        "{status}"
    );
    assert_eq!(
        condition(&model, "Ready")["reason"],
        "RolledBack",
        "{status}"
    );
    assert_eq!(condition(&model, "Available")["status"], "True");
    assert!(
        pods_of(env, name, version).await.is_empty(),
        "{version} retried"
    );
    let template_version = env
        .api::<Deployment>()
        .get(name)
        .await
        .unwrap()
        .spec
        .and_then(|spec| spec.template.metadata)
        .and_then(|metadata| metadata.labels)
        .and_then(|labels| labels.get(VERSION_LABEL).cloned());
    assert_eq!(template_version.as_deref(), Some("1"));
    assert_eq!(info(&addr).await["model_version"], "1");
    assert_no_failures(
        &format!("version {version} ({reason}) and its rollback under load"),
        &load.stop().await,
    );
    message
}

#[tokio::test]
async fn a_missing_image_rolls_back_by_itself_and_fails_no_request() {
    let (env, _turn) = real_env("pullfail").await;
    let mut operator = env.operator("op");
    operator.wait_ready().await;
    let message =
        broken_version_rolls_back_under_load(&env, "nopull", MISSING_VERSION, "ImagePullBackOff")
            .await;
    assert!(
        message.contains(&format!("qmodel-server:{MISSING_VERSION}-int8")),
        "{message}"
    );
}

#[tokio::test]
async fn a_crashing_version_rolls_back_by_itself_with_its_error_and_fails_no_request() {
    let (env, _turn) = real_env("crashloop").await;
    let mut operator = env.operator("op");
    operator.wait_ready().await;
    let message =
        broken_version_rolls_back_under_load(&env, "corrupt", CORRUPT_VERSION, "CrashLoopBackOff")
            .await;
    // The server's one-line error, as the kubelet took it from the log (FallbackToLogsOnError).
    assert!(message.contains("exited with code 1"), "{message}");
    assert!(message.contains("model.gguf"), "{message}");
}

#[tokio::test]
async fn with_auto_rollback_off_a_crashing_version_stays_degraded_while_v1_serves() {
    let (env, _turn) = real_env("norollback").await;
    let mut operator = env.operator("op");
    operator.wait_ready().await;
    let off = json!({"rollout": {"autoRollback": false}});
    env.apply_model(&real_model("kept", "1", off.clone()))
        .await
        .unwrap();
    env.wait_ready("kept", "1", START).await;
    let addr = cluster_ip(&env, "kept").await;
    let load = Load::start(&addr, 2);
    env.apply_model(&real_model("kept", CORRUPT_VERSION, off))
        .await
        .unwrap();
    let models = env.models();
    env.wait_condition("kept", "Degraded", "CrashLoopBackOff", ROLLOUT)
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let model = models.get("kept").await.unwrap();
    assert_eq!(condition(&model, "RolledBack")["status"], "False");
    assert_eq!(model.data["status"]["currentVersion"], "1");
    assert_eq!(
        pods_of(&env, "kept", CORRUPT_VERSION).await.len(),
        1,
        "one surge pod, never more, and it stays"
    );
    assert_eq!(info(&addr).await["model_version"], "1");
    assert_no_failures(
        "a crashing version without rollback under load",
        &load.stop().await,
    );
}

/// A ConfigMap `golden` holding the quality gate's golden set: 8 reference sentences and their
/// ONNX Runtime embeddings (server/tests/fixtures), as `golden.json`.
async fn golden_set(env: &TestEnv) {
    let (sentences, embeddings) = reference(8);
    let set = json!({
        "embeddings": sentences
            .iter()
            .zip(&embeddings)
            .map(|(input, embedding)| json!({"input": input, "embedding": embedding}))
            .collect::<Vec<_>>(),
    });
    let config_map: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "golden"},
        "data": {"golden.json": set.to_string()},
    }))
    .unwrap();
    env.api::<ConfigMap>()
        .create(&PostParams::default(), &config_map)
        .await
        .unwrap();
}

/// Waits until the model's canary reaches `phase`; the model.
async fn canary_phase(env: &TestEnv, name: &str, version: &str, phase: &str) -> Value {
    let models = env.models();
    wait_for(
        &format!("the canary of {name} at {version} {phase}"),
        ROLLOUT,
        || async {
            let model = models.get(name).await.map_err(|e| e.to_string())?;
            let canary = &model.data["status"]["canary"];
            if canary["version"] == version && canary["phase"] == phase {
                Ok(model.data["status"].clone())
            } else {
                Err(format!("status: {}", model.data["status"]))
            }
        },
    )
    .await
}

/// The canary pods of a model (label `serving.qmodel.dev/track=canary`), terminating ones too.
async fn canary_pods(env: &TestEnv, name: &str) -> usize {
    env.pods(name)
        .await
        .iter()
        .filter(|pod| {
            pod.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("serving.qmodel.dev/track"))
                .is_some_and(|track| track == "canary")
        })
        .count()
}

fn check<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["canary"]["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {name} check: {status}"))
}

async fn wait_canary_gone(env: &TestEnv, name: &str) {
    wait_for("the canary pods gone", ROLLOUT, || async {
        match canary_pods(env, name).await {
            0 => Ok(()),
            left => Err(format!("{left} left")),
        }
    })
    .await;
}

#[tokio::test]
async fn a_degraded_canary_fails_its_quality_gate_and_a_good_one_is_promoted_under_load() {
    let (env, _turn) = real_env("canary").await;
    let mut operator = env.operator("op");
    operator.wait_ready().await;
    golden_set(&env).await;
    let spec = json!({
        "replicas": 1,
        "rollout": {"canary": {
            "replicas": 1,
            "analysisSeconds": 10,
            // A new pod's first requests on a shared two-core node: the latency check is the
            // unit tests' to judge finely, here only a gross regression fails.
            "maxP99Ratio": 10.0,
            "qualityGate": {"configMap": "golden", "minCosine": 0.99},
        }},
    });
    env.apply_model(&real_model("judged", "1", spec.clone()))
        .await
        .unwrap();
    env.wait_ready("judged", "1", START).await;
    let addr = cluster_ip(&env, "judged").await;
    let load = Load::start(&addr, 4);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The shuffled-weights version starts, is Ready and answers 200: only the gate catches it.
    let started = Instant::now();
    env.apply_model(&real_model("judged", DEGRADED_VERSION, spec.clone()))
        .await
        .unwrap();
    let message = env
        .wait_condition("judged", "RolledBack", "QualityGateFailed", ROLLOUT)
        .await;
    let decided = started.elapsed().as_secs_f64();
    assert!(message.contains("minCosine"), "{message}");
    let status = canary_phase(&env, "judged", DEGRADED_VERSION, "RolledBack").await;
    let cosine = check(&status, "minCosine");
    assert_eq!(cosine["passed"], false, "{status}");
    let measured: f64 = cosine["value"].as_str().unwrap().parse().unwrap();
    assert!(measured < 0.99, "{status}");
    assert_eq!(status["currentVersion"], "1", "{status}");
    wait_canary_gone(&env, "judged").await;
    let event = wait_for("a RolledBack Event", Duration::from_secs(30), || async {
        env.events("judged", "RolledBack")
            .await
            .into_iter()
            .next()
            .ok_or("none yet")
    })
    .await;
    let note = event.note.unwrap_or_default();
    assert!(
        note.contains("QualityGateFailed") && note.contains("minCosine"),
        "{note}"
    );
    eprintln!(
        "BENCHMARK degraded canary ({DEGRADED_VERSION}): quality gate failed {decided:.1} s after the change, minCosine {measured} < 0.99, canary pod gone after {:.1} s: {message}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(info(&addr).await["model_version"], "1");

    // A good version passes the same gate and the metric checks, then rolls out everywhere.
    let started = Instant::now();
    env.apply_model(&real_model("judged", "2", spec))
        .await
        .unwrap();
    let analysing = canary_phase(&env, "judged", "2", "Analysing").await;
    let analysis_started = started.elapsed().as_secs_f64();
    assert_eq!(
        check(&analysing, "minCosine")["passed"],
        true,
        "{analysing}"
    );
    env.wait_ready("judged", "2", ROLLOUT).await;
    let promoted = canary_phase(&env, "judged", "2", "Promoted").await;
    let rolled_out = started.elapsed().as_secs_f64();
    wait_canary_gone(&env, "judged").await;
    wait_for("version 1 gone", ROLLOUT, || async {
        match pods_of(&env, "judged", "1").await.len() {
            0 => Ok(()),
            left => Err(format!("{left} left")),
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for name in ["errorRate", "p99Ratio", "minCosine"] {
        assert_eq!(check(&promoted, name)["passed"], true, "{promoted}");
    }
    let canary = env.api::<Deployment>().get("judged-canary").await.unwrap();
    assert_eq!(canary.spec.unwrap().replicas, Some(0));
    eprintln!(
        "BENCHMARK good canary (2): Ready and analysing after {analysis_started:.1} s, promoted and rolled out after {rolled_out:.1} s: {}",
        promoted["canary"]["message"]
    );
    assert_eq!(info(&addr).await["model_version"], "2");
    assert_no_failures(
        "a degraded canary rolled back, then a good one promoted",
        &load.stop().await,
    );
    assert!(
        env.events("judged", "CanaryPassed").await.len() == 1,
        "one CanaryPassed Event"
    );
}

/// `qmodel_requests_total` of API routes a pod answered, read from its own `/metrics`.
async fn requests_served(pod: &Pod) -> f64 {
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap();
    let (_, text) = real_node::http(&format!("{ip}:8080"), "GET", "/metrics", "")
        .await
        .unwrap();
    text.lines()
        .filter(|line| line.starts_with("qmodel_requests_total{route=\"/embed\""))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_load_step_scales_up_on_requests_in_flight_and_back_down_after_the_delay() {
    let (env, _turn) = real_env("autoscale").await;
    let mut operator = env.operator("op");
    operator.wait_ready().await;
    let delay = 15;
    let spec = json!({"autoscaling": {
        "enabled": true,
        "minReplicas": 1,
        "maxReplicas": 2,
        "metric": "InFlight",
        "targetPerReplica": 0.5,
        "scaleDownDelaySeconds": delay,
    }});
    env.apply_model(&real_model("elastic", "1", spec))
        .await
        .unwrap();
    env.wait_ready("elastic", "1", START).await;
    let first = ready_pods(&env, "elastic", "1", 1).await;
    let first = first[0].metadata.name.clone().unwrap();
    // Idle: the autoscaler holds the minimum.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let model = env.models().get("elastic").await.unwrap();
    assert_eq!(
        model.data["status"]["autoscaling"]["desiredReplicas"], 1,
        "{}",
        model.data["status"]
    );

    let addr = cluster_ip(&env, "elastic").await;
    let load = Load::start(&addr, 8);
    let started = Instant::now();
    let pods = ready_pods(&env, "elastic", "1", 2).await;
    let second_ready = started.elapsed().as_secs_f64();
    let second = pods
        .into_iter()
        .find(|pod| pod.metadata.name.as_deref() != Some(first.as_str()))
        .unwrap();
    wait_for("the new replica taking traffic", ROLLOUT, || async {
        let served = requests_served(&second).await;
        if served > 0.0 {
            Ok(())
        } else {
            Err("no request yet".to_owned())
        }
    })
    .await;
    let taking_traffic = started.elapsed().as_secs_f64();
    let model = env.models().get("elastic").await.unwrap();
    let scaling = model.data["status"]["autoscaling"].clone();
    assert_eq!(scaling["desiredReplicas"], 2, "{scaling}");
    let report = load.stop().await;
    assert_no_failures("a load step scaling 1 -> 2", &report);
    let scaled_up = env.events("elastic", "ScaledUp").await;
    assert!(!scaled_up.is_empty(), "a ScaledUp Event");

    // Load gone: one replica again, never before the delay.
    let stopped = Instant::now();
    wait_for("scaled back to one replica", ROLLOUT, || async {
        let model = env
            .models()
            .get("elastic")
            .await
            .map_err(|e| e.to_string())?;
        let desired = &model.data["status"]["autoscaling"]["desiredReplicas"];
        let running = env
            .pods("elastic")
            .await
            .iter()
            .filter(|pod| pod.metadata.deletion_timestamp.is_none())
            .count();
        if desired == 1 && running == 1 {
            Ok(())
        } else {
            Err(format!("desired {desired}, {running} pods"))
        }
    })
    .await;
    let scaled_down = stopped.elapsed().as_secs_f64();
    // The delay runs from the last sample that saw the load, up to one sampling interval (5 s)
    // before the load stopped.
    assert!(
        scaled_down >= f64::from(delay) - 5.0,
        "scaled down {scaled_down:.1} s after the load stopped: within the {delay} s delay"
    );
    let series = format!(
        "qmodel_operator_autoscaler_desired_replicas{{model=\"elastic\",namespace=\"{}\"}}",
        env.namespace
    );
    assert_eq!(operator.metric(&series).await, 1.0, "{series}");
    eprintln!(
        "BENCHMARK autoscaling 1 -> 2 on requests in flight (target 0.5, 8 clients): second replica Ready {second_ready:.1} s after the load step, taking traffic after {taking_traffic:.1} s ({} requests, 0 failed); back to 1 replica {scaled_down:.1} s after the load stopped (scaleDownDelaySeconds {delay}); status at 2: {}",
        report.ok, scaling["message"]
    );
}
