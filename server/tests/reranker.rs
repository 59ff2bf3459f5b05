//! The cross-encoder path on the test reranker (`models/make_reranker`) against an
//! independent reference (ONNX Runtime; `models/reference/make_fixtures.py`).

mod common;

use qmodel_server::artifact::{Manifest, Pooling, Precision, Task};
use qmodel_server::backend::{DeviceKind, LoadedModel, load};

struct Group {
    query: String,
    passages: Vec<String>,
}

fn groups() -> (Vec<Group>, Vec<Vec<f32>>) {
    let read = |name| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(common::fixture(name)).unwrap()).unwrap()
    };
    let pairs = read("rerank_pairs.json");
    let reference = read("rerank_logits.json");
    let checkpoint = common::reranker().join("model.safetensors");
    assert_eq!(
        qmodel_server::artifact::sha256_file(&checkpoint).unwrap(),
        reference["checkpoint_sha256"].as_str().unwrap(),
        "{} is not the checkpoint the fixtures were made from: rerun models/make_reranker \
         (and models/reference/make_fixtures.py if make_reranker itself changed)",
        checkpoint.display()
    );
    let groups = pairs
        .as_array()
        .unwrap()
        .iter()
        .map(|g| Group {
            query: g["query"].as_str().unwrap().into(),
            passages: serde_json::from_value(g["passages"].clone()).unwrap(),
        })
        .collect();
    (
        groups,
        serde_json::from_value(reference["logits"].clone()).unwrap(),
    )
}

fn scores(model: &LoadedModel, groups: &[Group]) -> Vec<Vec<f32>> {
    groups
        .iter()
        .map(|g| {
            let batch: Vec<_> = g
                .passages
                .iter()
                .map(|p| model.tokenizer.encode_pair(&g.query, p, false).unwrap())
                .collect();
            let logits = model.backend.classify(&batch).unwrap();
            logits.into_iter().map(|l| l[0]).collect()
        })
        .collect()
}

#[test]
fn quantize_recognizes_a_cross_encoder() {
    let dir = common::artifact(&common::reranker(), Precision::Int8);
    let manifest = Manifest::read(dir.path()).unwrap();
    assert_eq!(manifest.task, Task::Rerank);
    assert_eq!(manifest.pooling, Pooling::Cls);
    assert!(!manifest.normalize);
    // No sentence_bert_config.json: the limit is the model's positions.
    assert_eq!(manifest.max_input_tokens, 512);
    let model = load(dir.path(), DeviceKind::Cpu).unwrap();
    let pair = model.tokenizer.encode_pair("q", "p", false).unwrap();
    assert!(model.backend.embed(&[pair]).is_err());
}

#[test]
fn f32_logits_match_the_reference() {
    let (groups, reference) = groups();
    assert!(reference.iter().map(Vec::len).sum::<usize>() >= 40);
    let model = common::loaded(&common::reranker(), Precision::F32);
    let ours = scores(&model, &groups);
    let max_diff = ours
        .iter()
        .flatten()
        .zip(reference.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("F32 rerank logits vs reference: max abs diff {max_diff:e}");
    assert!(max_diff <= 1e-3, "max abs diff {max_diff}");
}

/// Kendall's tau between two score lists (no ties expected in real-valued logits).
fn kendall_tau(a: &[f32], b: &[f32]) -> f64 {
    let mut sum = 0.0;
    let mut pairs = 0.0;
    for i in 0..a.len() {
        for j in i + 1..a.len() {
            sum += f64::from(((a[i] - a[j]) * (b[i] - b[j])).signum());
            pairs += 1.0;
        }
    }
    sum / pairs
}

/// Ranking agreement of INT8 with F32 over each query's passages: mean Kendall tau >= 0.9 and
/// the same top passage for at least 7 of 8 queries (measured: 1.00 and 8/8; an earlier head
/// seed gave 0.93 and 7/8). The test head is arbitrary, so one query's logits lie within
/// 0.05-0.3 of each other, not far above the INT8 logit error of about 0.01: a trained
/// reranker separates its passages far more.
#[test]
fn int8_ranks_like_f32() {
    let (groups, _) = groups();
    let f32_scores = scores(
        &common::loaded(&common::reranker(), Precision::F32),
        &groups,
    );
    let int8_scores = scores(
        &common::loaded(&common::reranker(), Precision::Int8),
        &groups,
    );
    let taus: Vec<f64> = f32_scores
        .iter()
        .zip(&int8_scores)
        .map(|(a, b)| kendall_tau(a, b))
        .collect();
    let mean_tau = taus.iter().sum::<f64>() / taus.len() as f64;
    let top1 = f32_scores
        .iter()
        .zip(&int8_scores)
        .filter(|(a, b)| common::argmax(a) == common::argmax(b))
        .count();
    let max_diff = f32_scores
        .iter()
        .flatten()
        .zip(int8_scores.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!(
        "INT8 vs F32 rerank: mean Kendall tau {mean_tau:.3} (per query {taus:.2?}), \
         top-1 agreement {top1}/{}, max abs logit diff {max_diff:e}",
        groups.len()
    );
    assert!(mean_tau >= 0.9, "mean Kendall tau {mean_tau}");
    assert!(
        top1 * 8 >= groups.len() * 7,
        "top-1 agreement {top1}/{}",
        groups.len()
    );
}

/// The INT8 ranking test on every other kernel path this CPU has, forced with `QMODEL_KERNEL`.
#[test]
fn int8_on_every_kernel_path() {
    common::on_every_other_kernel_path(&["int8_ranks_like_f32"]);
}
