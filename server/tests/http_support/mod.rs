//! Shared by the HTTP tests: an in-process server on the real int8 MiniLM, a spawned
//! `qmodel-server serve`, and a minimal HTTP/1.1 client (one request per connection) for the
//! latter.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use qmodel_server::artifact::Precision;
use qmodel_server::backend::{DeviceKind, load};
use qmodel_server::config::Limits;
use qmodel_server::config::PromptArgs;
use qmodel_server::service::Service;
use qmodel_server::threads::ComputeThreads;
use serde_json::Value;
use tower::ServiceExt;

#[path = "../common/mod.rs"]
pub mod common;

/// The int8 MiniLM artifact, built into a temporary directory.
pub fn minilm_int8() -> tempfile::TempDir {
    common::artifact(&common::minilm(), Precision::Int8)
}

/// An in-process app on the int8 MiniLM; warmed up (ready) when `warm`.
pub async fn app(limits: Limits, warm: bool) -> Arc<Service> {
    app_on(&common::minilm(), limits, warm).await
}

/// An in-process app on the int8 artifact of `checkpoint`.
pub async fn app_on(checkpoint: &Path, limits: Limits, warm: bool) -> Arc<Service> {
    let dir = common::artifact(checkpoint, Precision::Int8);
    let app = Service::new(
        load(dir.path(), DeviceKind::Cpu).unwrap(),
        limits,
        &PromptArgs::default(),
        ComputeThreads::detect(None),
    )
    .unwrap();
    if warm {
        app.warm_up().await.unwrap();
    }
    app
}

pub struct Reply {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts the status and TEI's error shape; returns the error message.
    pub fn expect_error(&self, status: u16, error_type: &str) -> String {
        let json = self.json();
        assert_eq!(self.status.as_u16(), status, "body: {json}");
        assert_eq!(json["error_type"], error_type, "body: {json}");
        json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message in {json}"))
            .to_owned()
    }

    pub fn embeddings(&self) -> Vec<Vec<f32>> {
        assert_eq!(self.status, StatusCode::OK, "body: {}", self.json());
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// One request through the router, in process.
pub async fn call(
    router: &Router,
    method: Method,
    path: &str,
    body: impl Into<Body>,
    bearer: Option<&str>,
) -> Reply {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = router
        .clone()
        .oneshot(request.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        content_type,
        body: body.to_vec(),
    }
}

pub async fn post(router: &Router, path: &str, json: Value) -> Reply {
    call(router, Method::POST, path, json.to_string(), None).await
}

/// `n` distinct sentences in eight lengths (~6 to ~200 tokens), so that some share a length.
pub fn sentences(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let words = 1 + (i % 8) * 21;
            let mut s = format!("Sentence {i} is about");
            for w in 0..words {
                s.push_str([" tokens", " queues", " batches", " Zürich", " 42", " λ"][(i + w) % 6]);
            }
            s
        })
        .collect()
}

/// A `qmodel-server serve` child on an ephemeral loopback port; killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Server {
    /// Starts the binary with `env` (configuration by environment variables, as a deployment
    /// does) and waits for it to listen.
    pub fn start(model: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_under(&[], model, env)
    }

    /// [`Server::start`] run through `wrapper` (e.g. `taskset -c 0`), when non-empty.
    pub fn start_under(wrapper: &[&str], model: &Path, env: &[(&str, &str)]) -> Self {
        let binary = env!("CARGO_BIN_EXE_qmodel-server");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let mut child = command
            .arg("serve")
            .env("MODEL_DIR", model)
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("RUST_LOG", "info")
            .env("JSON_OUTPUT", "false")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the server exited before listening")
                .unwrap();
            if let Some((_, addr)) = line.split_once("listening addr=") {
                break addr.trim().to_owned();
            }
        };
        // Keep draining the log so the child never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, addr }
    }

    pub async fn request(&self, method: &str, path: &str, body: &str) -> Reply {
        request(&self.addr, method, path, body).await
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.request("GET", "/ready", "").await.status != StatusCode::OK {
            assert!(Instant::now() < deadline, "not ready after 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A value from /metrics: the sum of the samples whose line starts with `series`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = String::from_utf8(self.request("GET", "/metrics", "").await.body).unwrap();
        metric(&text, series)
    }

    /// The child's resident set (`VmRSS`) or its peak (`VmHWM`), in bytes.
    pub fn memory(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("no {field} in /proc status"));
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap();
        kib * 1024
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// One HTTP/1.1 request on its own connection; reads the whole response. Blocking I/O on the
/// blocking pool keeps this free of tokio's `io-util` feature.
pub async fn request(addr: &str, method: &str, path: &str, body: &str) -> Reply {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let message = [head.as_bytes(), body.as_bytes()].concat();
    let addr = addr.to_owned();
    let raw = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream.write_all(&message).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        raw
    })
    .await
    .unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .map(str::to_owned);
    Reply {
        status: StatusCode::from_u16(status).unwrap(),
        content_type,
        body: raw[split + 4..].to_vec(),
    }
}
