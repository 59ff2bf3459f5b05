//! The real binary: startup failures before binding, configuration from the environment,
//! overload with bounded memory, and SIGTERM draining.

mod http_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use http_support::{Server, common, minilm_int8, request, sentences};
use qmodel_server::artifact::{
    MANIFEST_FILE, Precision, TOKENIZER_FILE, WEIGHTS_FILE, sha256_file,
};
use serde_json::{Value, json};

/// Rewrites the manifest with `edit` applied to its JSON.
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join(MANIFEST_FILE);
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut manifest);
    std::fs::write(&path, manifest.to_string()).unwrap();
}

/// Replaces `file` with `bytes` and records their sha256 in the manifest, so that only the
/// content is wrong, not the checksum.
fn replace_consistently(dir: &Path, file: &str, bytes: &[u8]) {
    std::fs::write(dir.join(file), bytes).unwrap();
    let sha = sha256_file(&dir.join(file)).unwrap();
    edit_manifest(dir, |m| m["files"][file] = json!(sha));
}

/// Damaged or mismatched artifacts: `serve` exits non-zero with one line naming what is wrong,
/// before it binds its port.
#[test]
fn a_bad_model_directory_fails_with_one_line_before_binding() {
    let f32_weights = std::fs::read(
        common::artifact(&common::minilm(), Precision::F32)
            .path()
            .join(WEIGHTS_FILE),
    )
    .unwrap();
    let reranker_weights = std::fs::read(
        common::artifact(&common::reranker(), Precision::Int8)
            .path()
            .join(WEIGHTS_FILE),
    )
    .unwrap();
    type Damage<'a> = Box<dyn Fn(&Path) + 'a>;
    // (what, damage, a piece of the expected one-line reason)
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "no such directory",
            Box::new(|d| std::fs::remove_dir_all(d).unwrap()),
            "manifest.json",
        ),
        (
            "manifest is not JSON",
            Box::new(|d| std::fs::write(d.join(MANIFEST_FILE), "not json").unwrap()),
            "manifest.json",
        ),
        (
            "manifest of an unknown format version",
            Box::new(|d| edit_manifest(d, |m| m["format_version"] = json!(5))),
            "artifact format 5 is not supported",
        ),
        (
            "manifest with a wrong sha256 for an intact file",
            Box::new(|d| edit_manifest(d, |m| m["files"][TOKENIZER_FILE] = json!("0".repeat(64)))),
            "tokenizer.json: sha256",
        ),
        (
            "manifest lists a file that is not there",
            Box::new(|d| edit_manifest(d, |m| m["files"]["vocab.txt"] = json!("0".repeat(64)))),
            "vocab.txt",
        ),
        (
            "manifest lists a path outside the directory",
            Box::new(|d| edit_manifest(d, |m| m["files"]["../etc/passwd"] = json!("0".repeat(64)))),
            "not a plain name",
        ),
        (
            "manifest of an unknown task",
            Box::new(|d| edit_manifest(d, |m| m["task"] = json!("summarize"))),
            "manifest.json",
        ),
        (
            "tokenizer changed but checksum not",
            Box::new(|d| std::fs::write(d.join(TOKENIZER_FILE), b"{}").unwrap()),
            "tokenizer.json: sha256",
        ),
        (
            "tokenizer that is not JSON (checksum matching)",
            Box::new(|d| replace_consistently(d, TOKENIZER_FILE, b"not a tokenizer")),
            "tokenizer.json",
        ),
        (
            "weights that are not GGUF (checksum matching)",
            Box::new(|d| replace_consistently(d, WEIGHTS_FILE, b"not gguf at all")),
            "model.gguf",
        ),
        (
            "weights of another precision (f32 under an int8 manifest)",
            Box::new(|d| replace_consistently(d, WEIGHTS_FILE, &f32_weights)),
            "model.gguf",
        ),
        (
            "weights of another model (a reranker under an embedding manifest)",
            Box::new(|d| replace_consistently(d, WEIGHTS_FILE, &reranker_weights)),
            "model.gguf",
        ),
    ];
    let mut failures = Vec::new();
    for (what, damage, reason) in &cases {
        let dir = minilm_int8();
        damage(dir.path());
        if let Err(failure) = fails_with_one_line(dir.path(), &[], reason) {
            failures.push(format!("{what}: {failure}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A kernel path that is not one, or one this CPU lacks, is refused at start with the reason.
#[test]
fn a_bad_kernel_choice_fails_with_one_line_before_binding() {
    let dir = minilm_int8();
    let cases = [
        (
            "QMODEL_KERNEL=fastest",
            "expected one of amx, avx512vnni, avx2, neon-i8mm, neon-dot, scalar",
        ),
        // No CPU runs both families: whichever this one is, the other is refused.
        (
            if cfg!(target_arch = "aarch64") {
                "QMODEL_KERNEL=avx2"
            } else {
                "QMODEL_KERNEL=neon-dot"
            },
            "this CPU does not support it",
        ),
    ];
    for (setting, reason) in cases {
        let (name, value) = setting.split_once('=').unwrap();
        fails_with_one_line(dir.path(), &[(name, value)], reason)
            .unwrap_or_else(|e| panic!("{setting}: {e}"));
    }
}

/// Runs `serve` on `dir` with `env` (and RUST_BACKTRACE=1: candle's errors carry a backtrace
/// then, which must not reach the one line) and checks it exits non-zero, before binding, with
/// one stderr line containing `reason`.
fn fails_with_one_line(dir: &Path, env: &[(&str, &str)], reason: &str) -> Result<(), String> {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_qmodel-server"))
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .arg("--model")
        .arg(dir)
        .env("RUST_BACKTRACE", "1")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A bad setup that loads would serve forever: stop it and report it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!("{} {}", output.status, stderr.trim());
    let ok = !output.status.success()
        && stderr.lines().count() == 1
        && stderr.starts_with("qmodel-server: ")
        && stderr.contains(reason)
        && !stdout.contains("listening");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} stderr {stderr:?} stdout {stdout:?}",
            output.status
        ))
    }
}

/// 500 concurrent clients, each sending 8 inputs near the 256-token limit, in two waves: the
/// excess is refused with 429 fast, every accepted request completes with 200, none hangs past
/// REQUEST_TIMEOUT, and peak RSS stays bounded (and does not grow between waves).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_answers_429_fast_and_memory_stays_bounded() {
    const CLIENTS: usize = 500;
    const TIMEOUT: Duration = Duration::from_secs(60);
    let model = minilm_int8();
    let server = Server::start(
        model.path(),
        &[
            ("MAX_CONCURRENT_REQUESTS", "4"),
            ("AUTO_TRUNCATE", "true"),
            ("REQUEST_TIMEOUT", "60"),
        ],
    );
    server.wait_ready().await;
    // ~250 tokens each, just under the model's limit of 256.
    let long = "a longer input about queues and batches ".repeat(27);
    let inputs: Vec<String> = (0..8).map(|i| format!("{i} {long}")).collect();
    let body = json!({"inputs": inputs}).to_string();
    let tokens = server
        .request(
            "POST",
            "/tokenize",
            &json!({"inputs": inputs[0]}).to_string(),
        )
        .await
        .json()[0]
        .as_array()
        .unwrap()
        .len();
    assert!((240..=300).contains(&tokens), "{tokens} tokens per input");

    let mut peaks = Vec::new();
    for wave in 0..2 {
        let started = Instant::now();
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (addr, body) = (server.addr.clone(), body.clone());
                tokio::spawn(async move {
                    let sent = Instant::now();
                    // Past REQUEST_TIMEOUT (plus slack) the server has hung this request.
                    let reply = tokio::time::timeout(
                        TIMEOUT + Duration::from_secs(10),
                        request(&addr, "POST", "/embed", &body),
                    )
                    .await
                    .expect("a request hung past REQUEST_TIMEOUT");
                    (reply, sent.elapsed())
                })
            })
            .collect();
        let (mut ok, mut refusals, mut slowest_ok) = (0, Vec::new(), Duration::ZERO);
        for client in clients {
            let (reply, took) = client.await.unwrap();
            match reply.status.as_u16() {
                200 => {
                    assert_eq!(reply.embeddings().len(), 8);
                    ok += 1;
                    slowest_ok = slowest_ok.max(took);
                }
                429 => {
                    reply.expect_error(429, "overloaded");
                    refusals.push(took);
                }
                other => panic!("status {other}: {}", String::from_utf8_lossy(&reply.body)),
            }
        }
        refusals.sort();
        let quantile =
            |q: f64| refusals[((refusals.len() as f64 * q) as usize).min(refusals.len() - 1)];
        let (p50, p99) = (quantile(0.5), quantile(0.99));
        let peak = server.memory("VmHWM");
        eprintln!(
            "BENCHMARK overload wave {wave}: {CLIENTS} clients x 8 inputs x {tokens} tokens: \
             {ok} ok (slowest {slowest_ok:?}), {} refused with 429 (p50 {p50:?}, p99 {p99:?}, \
             max {:?}) in {:?}, VmHWM {} MiB",
            refusals.len(),
            refusals.last().unwrap(),
            started.elapsed(),
            peak >> 20
        );
        assert_eq!(ok + refusals.len(), CLIENTS);
        assert!(
            ok >= 4 && !refusals.is_empty(),
            "{ok} ok, {} refused",
            refusals.len()
        );
        // Refusing is cheap: a 429 never waits for the model (generous for a shared CI box).
        assert!(p99 < Duration::from_secs(3), "p99 of 429s {p99:?}");
        peaks.push(peak);
    }
    // A second identical wave must not raise the peak much: nothing grows without bound.
    assert!(
        peaks[1] < peaks[0] + (64 << 20),
        "peak RSS grew from {} to {} MiB",
        peaks[0] >> 20,
        peaks[1] >> 20
    );
    assert!(peaks[1] < 400 << 20, "peak RSS {} MiB", peaks[1] >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_every_accepted_request_then_exits_zero() {
    let model = minilm_int8();
    let server = Server::start(model.path(), &[("MAX_BATCH_REQUESTS", "4")]);
    server.wait_ready().await;
    let texts = sentences(32);
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let body = json!({"inputs": texts, "normalize": i % 2 == 0}).to_string();
            let addr = server.addr.clone();
            tokio::spawn(async move { request(&addr, "POST", "/embed", &body).await })
        })
        .collect();
    // Signal only once work is provably waiting in the queue.
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.metric("qmodel_queue_depth").await < 1.0 {
        assert!(Instant::now() < deadline, "nothing ever queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.signal("TERM");
    // Accepting stops at once; what was accepted still completes below.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        std::net::TcpStream::connect(&server.addr).is_err(),
        "still accepting"
    );

    for client in clients {
        let reply = client.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.embeddings().len(), 32);
    }
    let status = exit_status(server).await;
    assert!(status.success(), "exit status {status}");
}

/// Waits for the child's exit status (at most 30 s).
async fn exit_status(mut server: Server) -> std::process::ExitStatus {
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running 30 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap()
}

/// With SHUTDOWN_GRACE, SIGTERM first withdraws readiness (so Kubernetes takes the pod out of
/// its Service) while new requests are still answered; only after the grace period does the
/// server stop accepting and drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_withdraws_readiness_but_serves_through_the_grace_period() {
    const GRACE: Duration = Duration::from_secs(3);
    let model = minilm_int8();
    let server = Server::start(model.path(), &[("SHUTDOWN_GRACE", "3")]);
    server.wait_ready().await;
    let signalled = Instant::now();
    server.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let ready = server.request("GET", "/ready", "").await;
        if ready.status == StatusCode::SERVICE_UNAVAILABLE {
            ready.expect_error(503, "unhealthy");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/ready still {} after SIGTERM",
            ready.status
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let body = json!({"inputs": sentences(4)}).to_string();
    let mut served = 0;
    while signalled.elapsed() < GRACE - Duration::from_millis(800) {
        let reply = server.request("POST", "/embed", &body).await;
        assert_eq!(reply.embeddings().len(), 4, "during the grace period");
        served += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served > 0);
    let addr = server.addr.clone();
    let status = exit_status(server).await;
    assert!(status.success(), "exit status {status}");
    assert!(
        signalled.elapsed() >= GRACE,
        "exited {:?} after SIGTERM, before the grace period ended",
        signalled.elapsed()
    );
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "still accepting"
    );
}

/// Compute threads follow the CPUs the process may use, not the machine's core count, and
/// INFERENCE_THREADS overrides; /info says how many and why, and which CPU kernels run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_threads_follow_the_cpu_affinity_or_the_flag() {
    let model = minilm_int8();
    let info = |server: Server| async move {
        server.wait_ready().await;
        server.request("GET", "/info", "").await.json()
    };
    let pinned = info(Server::start_under(
        &["taskset", "-c", "0"],
        model.path(),
        &[],
    ))
    .await;
    assert_eq!(pinned["compute_threads"], 1, "{pinned}");
    assert!(
        pinned["compute_threads_reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("affinity") || reason.contains("CPU limit")),
        "{pinned}"
    );
    let told = info(Server::start(model.path(), &[("INFERENCE_THREADS", "3")])).await;
    assert_eq!(told["compute_threads"], 3, "{told}");
    assert_eq!(told["compute_threads_reason"], "--inference-threads");
    // The kernel path: what this process, with the same environment, would pick.
    assert_eq!(
        told["cpu_kernel"],
        qmodel_kernels::Path::from_env().unwrap().name(),
        "{told}"
    );
}

/// 32 inputs of distinct lengths (the last few truncated to 256 tokens): many batches in a row.
fn slow_request_body() -> String {
    let inputs: Vec<String> = (0..32)
        .map(|i| "queues and batches ".repeat(4 + i * 2))
        .collect();
    json!({"inputs": inputs, "truncate": true}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_its_timeout_gets_504_and_its_queued_inputs_are_dropped() {
    let model = minilm_int8();
    let server = Server::start(
        model.path(),
        &[("REQUEST_TIMEOUT", "0.05"), ("MAX_BATCH_REQUESTS", "1")],
    );
    server.wait_ready().await;
    let reply = server.request("POST", "/embed", &slow_request_body()).await;
    reply.expect_error(504, "timeout");
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metric("qmodel_queue_depth").await > 0.0 {
        assert!(Instant::now() < deadline, "the queue never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(server.metric("qmodel_cancelled_inputs_total").await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_has_its_queued_inputs_dropped() {
    let model = minilm_int8();
    let server = Server::start(model.path(), &[("MAX_BATCH_REQUESTS", "1")]);
    server.wait_ready().await;
    let body = slow_request_body();
    {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
        write!(
            stream,
            "POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        // Hang up once the request is queued.
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.metric("qmodel_queue_depth").await < 1.0 {
            assert!(Instant::now() < deadline, "nothing ever queued");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(server.metric("qmodel_requests_in_flight").await, 1.0);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metric("qmodel_queue_depth").await > 0.0 {
        assert!(Instant::now() < deadline, "the queue never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The request left with its client: it no longer counts as in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metric("qmodel_requests_in_flight").await > 0.0 {
        assert!(Instant::now() < deadline, "the request stayed in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let computed = server.metric("qmodel_batch_size_sum").await - 1.0; // minus warm-up
    let cancelled = server.metric("qmodel_cancelled_inputs_total").await;
    assert!(
        cancelled > 0.0,
        "nothing cancelled ({computed} inputs computed)"
    );
    assert_eq!(computed + cancelled, 32.0);
}
