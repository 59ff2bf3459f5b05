//! The real binary: startup failures before binding, configuration from the environment,
//! overload with bounded memory, and SIGTERM draining.

mod http_support;

use std::process::Command;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use http_support::{Server, minilm_int8, request, sentences};
use serde_json::json;

#[test]
fn a_bad_model_directory_fails_with_one_line_before_binding() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let dir = minilm_int8();
    std::fs::write(dir.path().join("tokenizer.json"), b"{}").unwrap();
    let missing = dir.path().join("nothing-here");
    for model in [dir.path(), missing.as_path()] {
        let output = Command::new(env!("CARGO_BIN_EXE_qmodel-server"))
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--model")
            .arg(model)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
        assert!(stderr.starts_with("qmodel-server: "), "{stderr}");
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(
            !stdout.contains("listening"),
            "bound before failing: {stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_answers_429_fast_and_memory_stays_bounded() {
    let model = minilm_int8();
    let server = Server::start(
        model.path(),
        &[("MAX_CONCURRENT_REQUESTS", "4"), ("AUTO_TRUNCATE", "true")],
    );
    server.wait_ready().await;
    let long = "a longer input about queues and batches ".repeat(6);
    let inputs: Vec<String> = (0..32).map(|i| format!("{i} {long}")).collect();
    let body = json!({"inputs": inputs}).to_string();

    let mut peaks = Vec::new();
    for _wave in 0..2 {
        let started = Instant::now();
        let clients: Vec<_> = (0..300)
            .map(|_| {
                let (addr, body) = (server.addr.clone(), body.clone());
                tokio::spawn(async move {
                    let sent = Instant::now();
                    let reply = request(&addr, "POST", "/embed", &body).await;
                    (reply, sent.elapsed())
                })
            })
            .collect();
        let (mut ok, mut refused, mut slowest_refusal) = (0, 0, Duration::ZERO);
        for client in clients {
            let (reply, took) = client.await.unwrap();
            match reply.status.as_u16() {
                200 => {
                    assert_eq!(reply.embeddings().len(), 32);
                    ok += 1;
                }
                429 => {
                    reply.expect_error(429, "overloaded");
                    refused += 1;
                    slowest_refusal = slowest_refusal.max(took);
                }
                other => panic!("status {other}: {}", String::from_utf8_lossy(&reply.body)),
            }
        }
        eprintln!(
            "wave: {ok} ok, {refused} refused in {:?}, slowest 429 {slowest_refusal:?}, \
             VmHWM {} MiB",
            started.elapsed(),
            server.memory("VmHWM") >> 20
        );
        assert!(ok >= 4 && refused > 0, "{ok} ok, {refused} refused");
        peaks.push(server.memory("VmHWM"));
    }
    // A second identical wave must not raise the peak much: nothing grows without bound.
    assert!(
        peaks[1] < peaks[0] + (64 << 20),
        "peak RSS grew from {} to {} MiB",
        peaks[0] >> 20,
        peaks[1] >> 20
    );
    assert!(peaks[1] < 512 << 20, "peak RSS {} MiB", peaks[1] >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_every_accepted_request_then_exits_zero() {
    let model = minilm_int8();
    let mut server = Server::start(model.path(), &[("MAX_BATCH_REQUESTS", "4")]);
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
    let status = tokio::task::spawn_blocking(move || {
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
    .unwrap();
    assert!(status.success(), "exit status {status}");
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
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metric("qmodel_queue_depth").await > 0.0 {
        assert!(Instant::now() < deadline, "the queue never drained");
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
