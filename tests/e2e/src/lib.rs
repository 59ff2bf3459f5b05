//! Harness of the end-to-end tests: a real control plane (`tests/cluster/up`, reached through
//! `KUBECONFIG`), the Helm chart installed once per test binary, one namespace per test, and the
//! operator binary run locally as the chart's ServiceAccount so the chart's RBAC is what is tested.
//!
//! Nothing here skips: without a reachable cluster every test fails with the reason.
//! [`real_node`] adds what the tests of pods that really run need.

pub mod real_node;

use std::fmt::Display;
use std::fs::{self, File};
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Helm release and namespace of the cluster-wide install of the chart under test.
pub const RELEASE: &str = "qmodel-operator";
pub const RELEASE_NAMESPACE: &str = "qmodel-system";
/// Field manager of the objects the tests write, distinct from the operator's.
const TEST_MANAGER: &str = "qmodel-e2e";
pub const MODEL_LABEL: &str = "serving.qmodel.dev/model";
pub const VERSION_LABEL: &str = "serving.qmodel.dev/model-version";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where operator logs and generated kubeconfigs go; kept after the run for post-mortems.
pub(crate) fn work_dir() -> PathBuf {
    let dir = repo_root().join("target/e2e");
    fs::create_dir_all(&dir).expect("creating target/e2e");
    dir
}

/// Runs a command to completion; its stdout, or an error naming the command and its stderr.
pub fn command(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Result<String, String> {
    run(Command::new(program).args(args))
}

/// [`command`] for a prepared [`Command`] (environment, paths as arguments); stdin is closed.
pub fn run(command: &mut Command) -> Result<String, String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("running {command:?}: {error}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn kubectl(args: &[&str]) -> Result<String, String> {
    command("kubectl", args)
}

/// A release of the chart, and what the operators the tests start need from it.
pub struct Install {
    /// Where the release lives: its ServiceAccount, ConfigMap and leader-election Role.
    pub namespace: String,
    /// The chart's ServiceAccount (the release's full name).
    pub service_account: String,
    /// Kubeconfig authenticating as that ServiceAccount (a TokenRequest token).
    service_account_kubeconfig: PathBuf,
    /// The operator configuration the chart rendered into its ConfigMap.
    operator_config: PathBuf,
}

static SHARED_INSTALL: OnceLock<Result<Install, String>> = OnceLock::new();

/// The cluster-wide release with `tests/e2e/values.yaml`, installed once per test binary
/// (`helm upgrade --install`, so idempotent across binaries); it brings the CRD.
fn shared_install() -> &'static Install {
    SHARED_INSTALL
        .get_or_init(|| {
            let kubeconfig = std::env::var("KUBECONFIG").map_err(|_| {
                "KUBECONFIG is not set: the e2e tests need the control plane of tests/cluster/up \
                 (tests/e2e/run starts one)"
                    .to_owned()
            })?;
            kubectl(&["get", "--raw", "/readyz", "--request-timeout=10s"]).map_err(|error| {
                format!("the cluster of KUBECONFIG={kubeconfig} is unreachable: {error}")
            })?;
            let values = repo_root().join("tests/e2e/values.yaml");
            helm_install(
                RELEASE,
                RELEASE_NAMESPACE,
                &["--create-namespace", "--values", path_str(&values)],
            )
        })
        .as_ref()
        .unwrap_or_else(|error| panic!("e2e setup failed: {error}"))
}

/// Installs (or upgrades) release `release` of the chart into `namespace` with `--wait`, then
/// writes a kubeconfig with a token of its ServiceAccount and the operator config it rendered.
pub fn helm_install(release: &str, namespace: &str, args: &[&str]) -> Result<Install, String> {
    let root = repo_root();
    let helm = std::env::var_os("HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("tests/cluster/bin/helm"));
    let chart = root.join("charts/qmodel-operator");
    let mut helm_args = vec![
        "upgrade",
        "--install",
        release,
        path_str(&chart),
        "--namespace",
        namespace,
        "--wait",
        "--timeout",
        "120s",
    ];
    helm_args.extend_from_slice(args);
    command(&helm, &helm_args)?;
    // The ServiceAccount and ConfigMap carry the release's full name.
    let service_account = kubectl(&[
        "get",
        "serviceaccount",
        "--namespace",
        namespace,
        "--selector",
        &format!("app.kubernetes.io/instance={release}"),
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])?;
    let token = kubectl(&[
        "create",
        "token",
        &service_account,
        "--namespace",
        namespace,
        "--duration",
        "2h",
    ])?;
    let cluster_field = |field: &str| {
        kubectl(&[
            "config",
            "view",
            "--minify",
            "--raw",
            "-o",
            &format!("jsonpath={{.clusters[0].cluster.{field}}}"),
        ])
    };
    let user = format!("system:serviceaccount:{namespace}:{service_account}");
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {
            "server": cluster_field("server")?,
            "certificate-authority-data": cluster_field("certificate-authority-data")?,
        }}],
        "users": [{"name": user, "user": {"token": token.trim()}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": user, "namespace": namespace}}],
        "current-context": "e2e",
    });
    let dir = work_dir();
    let service_account_kubeconfig = dir.join(format!("{namespace}-{release}.kubeconfig"));
    fs::write(&service_account_kubeconfig, config.to_string())
        .map_err(|error| format!("writing {service_account_kubeconfig:?}: {error}"))?;
    let rendered = kubectl(&[
        "get",
        "configmap",
        &service_account,
        "--namespace",
        namespace,
        "-o",
        "jsonpath={.data.config\\.yaml}",
    ])?;
    let operator_config = dir.join(format!("{namespace}-{release}-config.yaml"));
    fs::write(&operator_config, rendered)
        .map_err(|error| format!("writing {operator_config:?}: {error}"))?;
    Ok(Install {
        namespace: namespace.to_owned(),
        service_account,
        service_account_kubeconfig,
        operator_config,
    })
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("repository paths are UTF-8")
}

/// Polls `probe` every 250 ms until it returns `Ok`; panics after `timeout` with the last
/// reason the probe gave for not being there yet.
pub async fn wait_for<T, E, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(reason) if start.elapsed() >= timeout => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {reason}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// One test's namespace (restricted Pod Security enforced, so the server pods must comply),
/// deleted on drop.
pub struct TestEnv {
    pub client: Client,
    pub namespace: String,
}

impl TestEnv {
    /// Installs the chart if this binary has not yet, and creates the test's namespace.
    pub async fn new(test: &str) -> Self {
        shared_install();
        let client = Client::try_default()
            .await
            .unwrap_or_else(|error| panic!("building a client from KUBECONFIG: {error}"));
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        let namespace = format!("e2e-{}-{:05x}", test.replace('_', "-"), nanos & 0xfffff);
        let namespace_object: Namespace = serde_json::from_value(json!({
            "metadata": {
                "name": namespace,
                "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
            }
        }))
        .expect("namespace manifest");
        Api::<Namespace>::all(client.clone())
            .create(&Default::default(), &namespace_object)
            .await
            .unwrap_or_else(|error| panic!("creating namespace {namespace}: {error}"));
        Self { client, namespace }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn models(&self) -> Api<DynamicObject> {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("serving.qmodel.dev", "v1alpha1", "QuantizedModel"),
            "quantizedmodels",
        );
        Api::namespaced_with(self.client.clone(), &self.namespace, &resource)
    }

    /// Server-side applies a QuantizedModel manifest (see [`model`]).
    pub async fn apply_model(&self, manifest: &Value) -> Result<DynamicObject, kube::Error> {
        let name = manifest["metadata"]["name"]
            .as_str()
            .expect("manifest has a name");
        self.models()
            .patch(
                name,
                &PatchParams::apply(TEST_MANAGER).force(),
                &Patch::Apply(manifest),
            )
            .await
    }

    /// Waits until the operator reports the model's current generation Ready=True at `version`.
    pub async fn wait_ready(&self, name: &str, version: &str, timeout: Duration) -> DynamicObject {
        let models = self.models();
        wait_for(
            &format!(
                "QuantizedModel {}/{name} Ready at {version}",
                self.namespace
            ),
            timeout,
            || async {
                let model = models.get(name).await.map_err(|e| e.to_string())?;
                let status = &model.data["status"];
                let settled = condition(&model, "Ready")["status"] == "True"
                    && status["currentVersion"] == version
                    && status["observedGeneration"].as_i64() == model.metadata.generation;
                if settled {
                    Ok(model)
                } else {
                    Err(format!("status: {status}"))
                }
            },
        )
        .await
    }

    /// Waits until the model's condition `type_` is True with `reason`; its message.
    pub async fn wait_condition(
        &self,
        name: &str,
        type_: &str,
        reason: &str,
        timeout: Duration,
    ) -> String {
        let models = self.models();
        wait_for(
            &format!(
                "QuantizedModel {}/{name} {type_}=True ({reason})",
                self.namespace
            ),
            timeout,
            || async {
                let model = models.get(name).await.map_err(|e| e.to_string())?;
                let found = condition(&model, type_);
                if found["status"] == "True" && found["reason"] == reason {
                    Ok(found["message"].as_str().unwrap_or_default().to_owned())
                } else {
                    Err(format!("status: {}", model.data["status"]))
                }
            },
        )
        .await
    }

    /// The pods of a model.
    pub async fn pods(&self, model: &str) -> Vec<Pod> {
        self.api::<Pod>()
            .list(&ListParams::default().labels(&format!("{MODEL_LABEL}={model}")))
            .await
            .unwrap_or_else(|error| panic!("listing pods of {model}: {error}"))
            .items
    }

    /// Events about the object named `regarding` with `reason`.
    pub async fn events(&self, regarding: &str, reason: &str) -> Vec<Event> {
        let events = self
            .api::<Event>()
            .list(&ListParams::default())
            .await
            .unwrap_or_else(|error| panic!("listing events: {error}"));
        events
            .items
            .into_iter()
            .filter(|event| {
                event.reason.as_deref() == Some(reason)
                    && event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(regarding)
            })
            .collect()
    }

    /// Starts the operator as the shared release's ServiceAccount, reconciling this namespace
    /// only, with a Lease of its own so tests running side by side do not share a leader.
    pub fn operator(&self, identity: &str) -> Operator {
        self.operator_of(shared_install(), identity)
    }

    /// Starts the operator as `install`'s ServiceAccount, with its config and Lease namespace.
    pub fn operator_of(&self, install: &Install, identity: &str) -> Operator {
        Operator::start(install, &self.namespace, identity)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Blocking is fine here: it is the end of the test. Frees node capacity (GPUs) for
        // the tests still running.
        if let Err(error) = kubectl(&["delete", "namespace", &self.namespace, "--wait=false"]) {
            eprintln!("cleanup: {error}");
        }
    }
}

/// A QuantizedModel manifest: `precision` with its natural device, tiny CPU requests so many
/// models fit the fake nodes, and `spec` merged over that.
pub fn model(name: &str, version: &str, precision: &str, spec: Value) -> Value {
    let mut manifest = json!({
        "apiVersion": "serving.qmodel.dev/v1alpha1",
        "kind": "QuantizedModel",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "bge-small-en-v1.5", "version": version, "task": "embed"},
            "precision": precision,
            "resources": {
                "requests": {"cpu": "10m", "memory": "16Mi"},
                "limits": {"memory": "64Mi"},
            },
        },
    });
    if let (Some(base), Value::Object(extra)) = (manifest["spec"].as_object_mut(), spec) {
        base.extend(extra);
    }
    manifest
}

/// The model version an object (pod, ReplicaSet) carries in its [`VERSION_LABEL`].
pub fn version_of<K: kube::Resource>(object: &K) -> Option<&str> {
    object
        .meta()
        .labels
        .as_ref()?
        .get(VERSION_LABEL)
        .map(String::as_str)
}

/// The condition of `type` in a model's status (`Null` when absent).
pub fn condition<'a>(model: &'a DynamicObject, type_: &str) -> &'a Value {
    model.data["status"]["conditions"]
        .as_array()
        .and_then(|conditions| conditions.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

/// The operator binary, run as a child process; killed on drop.
pub struct Operator {
    child: Child,
    pub identity: String,
    pub http_addr: SocketAddr,
    pub log: PathBuf,
}

impl Operator {
    fn start(install: &Install, namespace: &str, identity: &str) -> Self {
        let binary = repo_root().join("target/release/qmodel-operator");
        assert!(
            binary.exists(),
            "{binary:?} is missing: run `cargo build --release -p qmodel-operator` (tests/e2e/run does)"
        );
        // Ask the kernel for a free port; the operator binds it right after.
        let http_addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("picking a free port");
        let log = work_dir().join(format!("{namespace}-{identity}.log"));
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("opening the operator log");
        let child = Command::new(&binary)
            .args(["run", "--config", path_str(&install.operator_config)])
            .args(["--http-addr", &http_addr.to_string()])
            .args(["--watch-namespace", namespace])
            .args(["--lease-name", &format!("qmodel-operator-{namespace}")])
            .args(["--lease-namespace", &install.namespace])
            .args(["--identity", identity])
            .env("KUBECONFIG", &install.service_account_kubeconfig)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("cloning the log handle"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {binary:?}: {error}"));
        Self {
            child,
            identity: identity.to_owned(),
            http_addr,
            log,
        }
    }

    /// Waits until `/readyz` answers 200 (leader election is running).
    pub async fn wait_ready(&mut self) {
        let what = format!(
            "operator {} to be ready (log: {:?})",
            self.identity, self.log
        );
        let addr = self.http_addr;
        let child = &mut self.child;
        wait_for(&what, Duration::from_secs(30), || {
            if let Some(status) = child.try_wait().expect("polling the operator process") {
                panic!("operator exited with {status} before becoming ready; see its log");
            }
            http_get(addr, "/readyz")
        })
        .await;
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited (it stays reaped; `None` while it runs).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("polling the operator process")
    }

    /// SIGKILL: no graceful shutdown, no Lease release.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        command("kill", &["-TERM", &self.child.id().to_string()]).expect("sending SIGTERM");
        self.child.wait().expect("waiting for the operator")
    }

    /// Peak resident set size in KiB (`VmHWM`), while the process runs.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("reading the operator's /proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }

    /// The value of an unlabelled Prometheus metric (0 when not yet exported).
    pub async fn metric(&self, name: &str) -> f64 {
        let body = http_get(self.http_addr, "/metrics")
            .await
            .unwrap_or_else(|error| panic!("scraping {}: {error}", self.identity));
        body.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .map_or(0.0, |value| value.trim().parse().expect("a metric value"))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Stops the cluster's kube-apiserver (`tests/cluster/apiserver stop`); etcd, the controllers
/// and kwok keep running. Affects every test running at the same time: only for a test binary
/// of its own.
pub fn stop_apiserver() {
    let script = repo_root().join("tests/cluster/apiserver");
    command(&script, &["stop"]).unwrap_or_else(|error| panic!("stopping the apiserver: {error}"));
}

/// Starts the kube-apiserver stopped by [`stop_apiserver`] again and waits for `/readyz`.
pub fn start_apiserver() {
    let script = repo_root().join("tests/cluster/apiserver");
    command(&script, &["start"]).unwrap_or_else(|error| panic!("starting the apiserver: {error}"));
}

/// A plain HTTP/1.0 GET on loopback; the body when the status is 200.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|error| format!("connecting to {addr}: {error}"))?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .map_err(|error| error.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|error| error.to_string())?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") {
        Ok(body.to_owned())
    } else {
        Err(format!(
            "GET {path}: {}",
            head.lines().next().unwrap_or("no response")
        ))
    }
}
