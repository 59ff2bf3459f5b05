//! Shared by the model tests: real checkpoints from `models/cache/` (a clear failure, never a
//! skip, when they are missing), artifacts quantized into temporary directories, fixtures.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;

use qmodel_kernels::Path as KernelPath;
use qmodel_server::artifact::Precision;
use qmodel_server::backend::{DeviceKind, LoadedModel, load};
use qmodel_server::quantize::{QuantizeArgs, quantize};

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// A checkpoint under `models/cache/`; `make` is the command that creates it.
pub fn checkpoint(name: &str, make: &str) -> PathBuf {
    let dir = repo_path(&format!("models/cache/{name}"));
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run `{make}` first",
        dir.display()
    );
    dir
}

pub fn minilm() -> PathBuf {
    checkpoint("all-MiniLM-L6-v2", "models/fetch")
}

pub fn reranker() -> PathBuf {
    checkpoint(
        "minilm-reranker-test",
        "models/fetch && .venv/bin/python models/make_reranker",
    )
}

/// Quantizes `from` into a fresh temporary directory.
pub fn artifact(from: &Path, precision: Precision) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    quantize(&QuantizeArgs {
        from: from.to_path_buf(),
        out: out.path().to_path_buf(),
        precision,
        model_version: "test".into(),
        model_id: None,
    })
    .unwrap();
    out
}

pub fn loaded(from: &Path, precision: Precision) -> LoadedModel {
    loaded_on(from, precision, DeviceKind::Cpu)
}

pub fn loaded_on(from: &Path, precision: Precision, device: DeviceKind) -> LoadedModel {
    let dir = artifact(from, precision);
    load(dir.path(), device).unwrap()
}

pub fn fixture(name: &str) -> PathBuf {
    repo_path(&format!("server/tests/fixtures/{name}"))
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// (mean, min) of per-input cosines, printed under `label` and the kernel path that computed
/// them, with the worst input.
pub fn cosine_summary(label: &str, cosines: &[f64]) -> (f64, f64) {
    let mean = cosines.iter().sum::<f64>() / cosines.len() as f64;
    let (worst, min) = cosines
        .iter()
        .copied()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    println!(
        "{label} on {} vs reference over {} inputs: mean cosine {mean:.7}, min {min:.7} \
         (1 - min = {:.1e}, input {worst})",
        KernelPath::active(),
        cosines.len(),
        1.0 - min
    );
    (mean, min)
}

/// Runs `tests` of this test binary again on every other kernel path this CPU supports, each
/// in a child process with `QMODEL_KERNEL` forced (the path is chosen once per process; this
/// process runs them on its own active path), and prints what each child measured. CI cannot
/// pick its CPU, so a bound that holds on one path only would otherwise pass unnoticed.
pub fn on_every_other_kernel_path(tests: &[&str]) {
    let active = KernelPath::active();
    let others: Vec<KernelPath> = KernelPath::supported()
        .into_iter()
        .filter(|&p| p != active)
        .collect();
    println!(
        "kernel paths: {active} here, re-running {tests:?} on {}",
        if others.is_empty() {
            "none (no other path on this CPU)".to_owned()
        } else {
            others
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let exe = std::env::current_exe().unwrap();
    for path in others {
        for test in tests {
            let output = Command::new(&exe)
                .args([test, "--exact", "--nocapture", "--test-threads=1"])
                .env("QMODEL_KERNEL", path.name())
                .output()
                .unwrap();
            let log = String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr);
            // What the test printed, without the harness's own words: with --nocapture its
            // first line follows the harness's "test NAME ... " on the same line.
            for line in log.lines() {
                let line = line.split_once(" ... ").map_or(line, |(_, rest)| rest);
                if !(line.is_empty() || line == "ok" || line.starts_with("running ")) {
                    println!("  QMODEL_KERNEL={path} {test}: {line}");
                }
            }
            assert!(
                output.status.success(),
                "QMODEL_KERNEL={path} {test} failed:\n{log}"
            );
            assert!(
                log.contains("1 passed"),
                "QMODEL_KERNEL={path} {test} did not run:\n{log}"
            );
        }
    }
}

pub fn argmax(xs: &[f32]) -> usize {
    (0..xs.len())
        .max_by(|&i, &j| xs[i].total_cmp(&xs[j]))
        .unwrap()
}
