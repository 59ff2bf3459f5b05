//! The real node of `tests/cluster/` (`real-0`: kubelet, containerd, kube-proxy, CoreDNS; see
//! tests/cluster/README.md): placing pods there, the images baked from this checkout and loaded
//! into its runtime, requests through a Service from the host, and a client pod inside the
//! cluster network.
//!
//! Nothing here skips: without the real node, or without a built server or operator binary,
//! every test using it fails with the reason.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{TestEnv, command, repo_root, run, wait_for, work_dir};

/// The real node's label and taint key (tests/cluster/README.md).
pub const REAL_NODE_KEY: &str = "qmodel.dev/real-node";
/// The model baked into the server images (the catalog's default).
pub const MODEL: &str = "all-MiniLM-L6-v2";
/// The busybox client image that `tests/cluster/up` loads onto the real node.
pub const CLIENT_IMAGE: &str = "qmodel.local/busybox:1";
pub const OPERATOR_IMAGE_REPOSITORY: &str = "ghcr.io/qmodel/qmodel-operator";
/// A server version whose image is loaded with a corrupt artifact: the server exits 1 at start.
pub const CORRUPT_VERSION: &str = "3-corrupt";
/// A server version whose image exists nowhere.
pub const MISSING_VERSION: &str = "404";
/// A server version baked from a checkpoint with shuffled weights: it starts, answers every
/// request 200 and passes every probe, with embeddings far from the real model's.
pub const DEGRADED_VERSION: &str = "2-degraded";

/// `spec` fields (QuantizedModel or pod) that put a pod on the real node and nowhere else.
pub fn placement() -> Value {
    json!({
        "nodeSelector": {REAL_NODE_KEY: "true"},
        "tolerations": [{"key": REAL_NODE_KEY, "operator": "Exists", "effect": "NoSchedule"}],
    })
}

/// One real-node test at a time: the node has the machine's two cores, and the load tests
/// count every failed request.
/// (An async lock: each test holds it across its awaits, on its own runtime; a test that
/// fails releases it like one that passes.)
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Fails the test unless the cluster has a Ready real node.
pub async fn require_real_node(env: &TestEnv) {
    let nodes: Api<Node> = Api::all(env.client.clone());
    let listed = nodes
        .list(&kube::api::ListParams::default().labels(&format!("{REAL_NODE_KEY}=true")))
        .await
        .unwrap_or_else(|error| panic!("listing nodes: {error}"));
    let node = listed.items.first().unwrap_or_else(|| {
        panic!(
            "the cluster has no real node (label {REAL_NODE_KEY}=true): tests/cluster/up must start \
             it (tests/cluster/README.md, \"The real node\")"
        )
    });
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    assert!(ready, "the real node is not Ready: {:?}", node.status);
}

/// The image references loaded into the real node for this run.
pub struct Images {
    pub operator_tag: String,
}

/// Bakes the operator image and the server images of versions 1, 2, [`CORRUPT_VERSION`] and
/// [`DEGRADED_VERSION`] from this checkout's release binaries (`models/bake-operator`,
/// `models/bake`) and loads them into the real node (`tests/cluster/load-image`); once per
/// test binary.
pub fn images() -> &'static Images {
    static IMAGES: OnceLock<Result<Images, String>> = OnceLock::new();
    IMAGES
        .get_or_init(bake_and_load)
        .as_ref()
        .unwrap_or_else(|error| panic!("baking and loading the images failed: {error}"))
}

fn bake_and_load() -> Result<Images, String> {
    let root = repo_root();
    let binary = |name: &str| {
        let path = root.join("target/release").join(name);
        path.exists().then_some(path).ok_or_else(|| {
            format!("{name} is not built: run `cargo build --release` (tests/run does)")
        })
    };
    let (server, operator) = (binary("qmodel-server")?, binary("qmodel-operator")?);
    let dir = work_dir().join("images");
    std::fs::create_dir_all(&dir).map_err(|error| format!("creating {dir:?}: {error}"))?;
    let started = Instant::now();
    let mut layouts: Vec<PathBuf> = Vec::new();
    let operator_layout = dir.join("operator");
    run(Command::new(root.join("models/bake-operator"))
        .arg(&operator_layout)
        .env("QMODEL_OPERATOR", &operator))?;
    layouts.push(operator_layout);
    let degraded = shuffled_checkpoint(&dir.join("degraded-checkpoint"))?;
    let degraded = degraded.to_str().expect("UTF-8 path");
    for (version, checkpoint, corrupt) in [
        ("1", MODEL, false),
        ("2", MODEL, false),
        (CORRUPT_VERSION, MODEL, true),
        (DEGRADED_VERSION, degraded, false),
    ] {
        let layout = dir.join(format!("server-{version}"));
        let mut bake = Command::new(root.join("models/bake"));
        bake.args([checkpoint, layout.to_str().expect("UTF-8 path")])
            .env("MODEL_NAME", MODEL)
            .env("MODEL_VERSION", version)
            .env("PRECISION", "int8")
            .env("QMODEL_SERVER", &server);
        if corrupt {
            bake.env("CORRUPT_ARTIFACT", "1");
        }
        run(&mut bake)?;
        layouts.push(layout);
    }
    let mut load = Command::new(root.join("tests/cluster/load-image"));
    load.args(&layouts);
    let loaded = run(&mut load)?;
    eprintln!(
        "real node: baked and loaded {} images in {:.1} s:\n{}",
        layouts.len(),
        started.elapsed().as_secs_f64(),
        loaded.trim()
    );
    Ok(Images {
        operator_tag: workspace_version(),
    })
}

/// A copy of the [`MODEL`] checkpoint (`models/fetch`) in `dir` whose feed-forward input
/// weights have their rows in reverse order in every layer: the shapes, the tokenizer and the
/// files stay valid, the model's output does not. Written into the safetensors file in place.
fn shuffled_checkpoint(dir: &std::path::Path) -> Result<PathBuf, String> {
    let source = run(Command::new(repo_root().join("models/fetch")).arg(MODEL))?;
    let source = PathBuf::from(source.trim());
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|error| format!("clearing {dir:?}: {error}"))?;
    }
    run(Command::new("cp").arg("-r").arg(&source).arg(dir))?;
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).map_err(|error| format!("reading {path:?}: {error}"))?;
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len])
        .map_err(|error| format!("{path:?}: safetensors header: {error}"))?;
    let data = 8 + header_len;
    let mut shuffled = 0;
    for (name, tensor) in header.as_object().into_iter().flatten() {
        if !(name.starts_with("encoder.layer.") && name.ends_with(".intermediate.dense.weight")) {
            continue;
        }
        let (Some(rows), Some(columns), Some(start), Some(end)) = (
            tensor["shape"][0].as_u64(),
            tensor["shape"][1].as_u64(),
            tensor["data_offsets"][0].as_u64(),
            tensor["data_offsets"][1].as_u64(),
        ) else {
            return Err(format!("{path:?}: {name} is not a matrix: {tensor}"));
        };
        assert_eq!(tensor["dtype"], "F32", "{name}");
        let row = 4 * columns as usize;
        let matrix = &mut bytes[data + start as usize..data + end as usize];
        assert_eq!(matrix.len(), row * rows as usize, "{name}");
        let reversed: Vec<u8> = matrix.chunks_exact(row).rev().flatten().copied().collect();
        matrix.copy_from_slice(&reversed);
        shuffled += 1;
    }
    if shuffled == 0 {
        return Err(format!(
            "{path:?}: no feed-forward weights found to shuffle"
        ));
    }
    std::fs::write(&path, bytes).map_err(|error| format!("writing {path:?}: {error}"))?;
    Ok(dir.to_owned())
}

/// The chart's appVersion, which `models/bake-operator` tags by default, is the workspace version.
fn workspace_version() -> String {
    env!("CARGO_PKG_VERSION").to_owned()
}

/// A QuantizedModel of the baked MiniLM image on the real node: small requests (the node has
/// two cores), a memory limit, and `spec` merged over that.
pub fn real_model(name: &str, version: &str, spec: Value) -> Value {
    let mut manifest = json!({
        "apiVersion": "serving.qmodel.dev/v1alpha1",
        "kind": "QuantizedModel",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": MODEL, "version": version, "task": "embed"},
            "precision": "int8",
            "resources": {
                "requests": {"cpu": "100m", "memory": "64Mi"},
                "limits": {"memory": "512Mi"},
            },
        },
    });
    let base = manifest["spec"].as_object_mut().expect("spec object");
    for (key, value) in placement()
        .as_object()
        .into_iter()
        .flatten()
        .chain(spec.as_object().into_iter().flatten())
    {
        base.insert(key.clone(), value.clone());
    }
    manifest
}

/// The ClusterIP and port of a Service, reachable from the host (routes via the node's veth).
pub async fn cluster_ip(env: &TestEnv, service: &str) -> String {
    let service: Service = env
        .api::<Service>()
        .get(service)
        .await
        .unwrap_or_else(|error| panic!("getting Service {service}: {error}"));
    let spec = service.spec.expect("service spec");
    let ip = spec.cluster_ip.expect("a ClusterIP");
    let port = spec.ports.expect("ports")[0].port;
    format!("{ip}:{port}")
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`, so kube-proxy picks an
/// endpoint for each request); the status code and body.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|error| format!("connecting to {addr}: {error}"))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| format!("sending to {addr}: {error}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .map_err(|error| format!("reading from {addr}: {error}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP response from {addr}: {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status line: {head:?}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// `GET /info` of whichever replica the Service picks; retried for a minute, since kube-proxy
/// programs a new Service's rules a moment after its pods are Ready.
pub async fn info(addr: &str) -> Value {
    wait_for(
        &format!("GET /info through {addr}"),
        Duration::from_secs(60),
        || async {
            let answer =
                tokio::time::timeout(Duration::from_secs(2), http(addr, "GET", "/info", ""))
                    .await
                    .map_err(|_| "no answer within 2 s".to_owned())?;
            match answer? {
                (200, body) => serde_json::from_str::<Value>(&body)
                    .map_err(|error| format!("/info is not JSON ({error}): {body}")),
                (status, body) => Err(format!("{status}: {body}")),
            }
        },
    )
    .await
}

/// Requests sent continuously through a Service from the host, counting every answer.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
}

/// What a [`Load`] saw.
#[derive(Debug)]
pub struct LoadReport {
    pub ok: u64,
    pub failures: Vec<String>,
    pub seconds: f64,
}

impl Load {
    /// `clients` concurrent loops of `POST /embed` (one short sentence) to `addr`, each on a
    /// new connection.
    pub fn start(addr: &str, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|client| {
                let (addr, stop, ok, failures) =
                    (addr.to_owned(), stop.clone(), ok.clone(), failures.clone());
                tokio::spawn(async move {
                    let body = json!({"inputs": [format!("client {client} asks about rollouts")]})
                        .to_string();
                    while !stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        let answer = tokio::time::timeout(
                            Duration::from_secs(30),
                            http(&addr, "POST", "/embed", &body),
                        )
                        .await
                        .unwrap_or_else(|_| Err("no answer within 30 s".to_owned()));
                        match answer {
                            Ok((200, _)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok((status, body)) => failures
                                .lock()
                                .expect("failures lock")
                                .push(format!("{:?} after start: {status} {body}", sent.elapsed())),
                            Err(error) => failures.lock().expect("failures lock").push(error),
                        }
                        // Leave the node's two cores to the servers.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failures,
            tasks,
            started: Instant::now(),
        }
    }

    /// Requests answered 200 so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub async fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("a load client panicked");
        }
        LoadReport {
            ok: self.ok.load(Ordering::Relaxed),
            failures: self.failures.lock().expect("failures lock").clone(),
            seconds: self.started.elapsed().as_secs_f64(),
        }
    }
}

/// A busybox pod on the real node, in the cluster network, for requests by DNS name. Runs as
/// the restricted Pod Security Standard demands.
pub struct ClientPod {
    pub name: String,
    namespace: String,
}

impl ClientPod {
    pub async fn start(env: &TestEnv, name: &str) -> Self {
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "containers": [{
                    "name": "client",
                    "image": CLIENT_IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sleep", "3600"],
                    "securityContext": {
                        "allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true,
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "resources": {"limits": {"memory": "32Mi"}},
                }],
                "terminationGracePeriodSeconds": 0,
            },
        });
        pod["spec"]
            .as_object_mut()
            .expect("spec")
            .extend(placement().as_object().expect("placement").clone());
        let pod: Pod = serde_json::from_value(pod).expect("client pod manifest");
        let pods = env.api::<Pod>();
        pods.create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|error| panic!("creating client pod {name}: {error}"));
        wait_for(
            &format!("client pod {name} running"),
            Duration::from_secs(60),
            || async {
                let pod = pods.get(name).await.map_err(|e| e.to_string())?;
                let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
                if phase.as_deref() == Some("Running") {
                    Ok(())
                } else {
                    Err(format!("{:?}", pod.status))
                }
            },
        )
        .await;
        Self {
            name: name.to_owned(),
            namespace: env.namespace.clone(),
        }
    }

    /// Runs `args` in the client container (`kubectl exec`); its stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["exec", "-n", &self.namespace, &self.name, "--"];
        full.extend_from_slice(args);
        command("kubectl", &full)
    }

    /// `POST url` with a JSON body from inside the cluster (busybox wget); the response body.
    pub fn post(&self, url: &str, body: &str) -> Result<String, String> {
        // busybox's own `wget -T` crashes on this node; `timeout` bounds the call instead.
        self.exec(&[
            "timeout",
            "30",
            "wget",
            "-q",
            "-O",
            "-",
            "--header",
            "Content-Type: application/json",
            "--post-data",
            body,
            url,
        ])
    }
}

/// `kubectl logs` of a pod (its server container).
pub fn logs(env: &TestEnv, pod: &str) -> String {
    command("kubectl", &["logs", "-n", &env.namespace, pod])
        .unwrap_or_else(|error| panic!("kubectl logs {pod}: {error}"))
}
