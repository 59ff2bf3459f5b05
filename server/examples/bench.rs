//! Our side of `bench/run`: loads one artifact, embeds the batches of `--inputs` (token ids
//! from `bench/bench.py`, so every engine sees the same inputs), and prints one JSON line per
//! shape (per-rep wall times and the pooled embeddings of the last rep), then the peak RSS.
//!
//! `cargo run --release -p qmodel-server --example bench -- --artifact DIR --inputs FILE`
//!
//! With `--machine [--threads N] [--peak-budget-s S]` it prints instead one JSON line about the
//! machine: CPU model and int8-relevant flags from `/proc/cpuinfo`, the kernel paths this CPU
//! supports, the active one (`QMODEL_KERNEL` or the best: what the INT8 engine runs), and each
//! supported path's int8 peak measured on 1 and N threads (`qmodel_kernels::measure_peak`).

use std::time::{Duration, Instant};

use qmodel_kernels::{Path, measure_peak};
use qmodel_server::backend::{DeviceKind, Encoding, load};
use serde_json::json;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn peak_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The `/proc/cpuinfo` flags that decide the int8 paths (x86: `flags`, Arm: `Features`).
const FLAGS: &[&str] = if cfg!(target_arch = "aarch64") {
    &["asimddp", "i8mm"]
} else {
    &[
        "avx2",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx_vnni",
        "amx_tile",
        "amx_int8",
    ]
};

fn machine(threads: usize, budget: Duration) -> anyhow::Result<serde_json::Value> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo.lines().find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == name).then(|| value.trim().to_owned())
        })
    };
    let line = field("flags")
        .or_else(|| field("Features"))
        .unwrap_or_default();
    let present: Vec<&str> = FLAGS
        .iter()
        .copied()
        .filter(|f| line.split_whitespace().any(|g| g == *f))
        .collect();
    let mut peaks = Vec::new();
    let mut counts = vec![1, threads];
    counts.dedup();
    for path in Path::supported() {
        for &n in &counts {
            let peak = measure_peak(path, n, budget);
            peaks.push(json!({
                "path": path.name(), "threads": n,
                "instructions": peak.map(|p| p.instructions),
                "gops": peak.map(|p| p.gops),
            }));
        }
    }
    Ok(json!({ "machine": {
        "cpu": field("model name").unwrap_or_else(|| format!(
            "CPU implementer {} part {}",
            field("CPU implementer").unwrap_or_default(),
            field("CPU part").unwrap_or_default()
        )),
        "family": field("cpu family"),
        "model": field("model"),
        "flags": { "checked": FLAGS, "present": present },
        "logical_cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "paths": Path::supported().into_iter().map(Path::name).collect::<Vec<_>>(),
        "active": Path::from_env().map_err(anyhow::Error::msg)?.name(),
        "qmodel_kernel": std::env::var("QMODEL_KERNEL").ok(),
        "peaks": peaks,
    }}))
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--machine") {
        let threads = arg("--threads").map_or(2, |v| v.parse().unwrap());
        let budget = arg("--peak-budget-s").map_or(0.5, |v| v.parse().unwrap());
        let machine = machine(threads, Duration::from_secs_f64(budget))?;
        println!("{machine}");
        return Ok(());
    }
    let artifact = arg("--artifact").expect("--artifact DIR");
    let inputs = arg("--inputs").expect("--inputs FILE");
    let budget = Duration::from_secs_f64(arg("--budget-s").map_or(2.0, |v| v.parse().unwrap()));
    let max_reps: usize = arg("--max-reps").map_or(50, |v| v.parse().unwrap());
    let model = load(std::path::Path::new(&artifact), DeviceKind::Cpu)?;
    let shapes: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&inputs)?)?;
    for shape in shapes {
        let batch: Vec<Encoding> = shape["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ids| {
                let ids: Vec<u32> = ids
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect();
                Encoding {
                    type_ids: vec![0; ids.len()],
                    ids,
                }
            })
            .collect();
        let mut embeddings = model.backend.embed(&batch)?; // warm-up
        let (mut times, start) = (Vec::new(), Instant::now());
        while times.len() < 2 || (start.elapsed() < budget && times.len() < max_reps) {
            let t = Instant::now();
            embeddings = model.backend.embed(&batch)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "{}",
            json!({
                "batch": shape["batch"], "len": shape["len"],
                "times_ms": times, "embeddings": embeddings,
            })
        );
    }
    println!("{}", json!({ "peak_rss_kb": peak_rss_kb() }));
    Ok(())
}
