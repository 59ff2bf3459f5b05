//! Our side of `bench/run`: loads one artifact, embeds the batches of `--inputs` (token ids
//! from `bench/bench.py`, so every engine sees the same inputs), and prints one JSON line per
//! shape (per-rep wall times and the pooled embeddings of the last rep), then the peak RSS.
//!
//! `cargo run --release -p qmodel-server --example bench -- --artifact DIR --inputs FILE`

use std::time::{Duration, Instant};

use qmodel_server::backend::{DeviceKind, Encoding, load};

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

fn main() -> anyhow::Result<()> {
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
            serde_json::json!({
                "batch": shape["batch"], "len": shape["len"],
                "times_ms": times, "embeddings": embeddings,
            })
        );
    }
    println!("{}", serde_json::json!({ "peak_rss_kb": peak_rss_kb() }));
    Ok(())
}
