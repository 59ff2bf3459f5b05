//! Every model family against its reference implementation (transformers and
//! sentence-transformers on torch, FP32; `models/reference/make_family_fixtures.py` writes the
//! fixtures in `server/tests/fixtures/families/`): all-mpnet-base-v2 on its real weights, and
//! the small deterministic XLM-RoBERTa and ModernBERT checkpoints of
//! `models/make_family_checkpoints` (no real weights of those families are reachable). F32
//! per input, INT8 accuracy, the other precisions, rerankers, batch invariance, and the
//! architectures `quantize` refuses.

mod common;

use std::path::PathBuf;

use qmodel_server::artifact::{Manifest, Precision, Task};
use qmodel_server::backend::{Encoding, LoadedModel};
use qmodel_server::quantize::{QuantizeArgs, quantize};

const MAKE_TINY: &str = ".venv/bin/python models/make_family_checkpoints";

fn checkpoint(name: &str) -> PathBuf {
    match name {
        "all-mpnet-base-v2" => common::checkpoint(name, "models/fetch all-mpnet-base-v2"),
        _ => common::checkpoint(name, MAKE_TINY),
    }
}

fn read_json(path: PathBuf) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Fails unless the checkpoint on disk is the one the fixture was made from.
fn check_checkpoint(header: &serde_json::Value) -> PathBuf {
    let name = header["checkpoint"].as_str().unwrap();
    let dir = checkpoint(name);
    assert_eq!(
        qmodel_server::artifact::sha256_file(&dir.join("model.safetensors")).unwrap(),
        header["checkpoint_sha256"].as_str().unwrap(),
        "{} is not the checkpoint the fixtures were made from: rerun `{MAKE_TINY}` (and \
         models/reference/make_family_fixtures.py if that script changed)",
        dir.display()
    );
    dir
}

/// An embedding fixture: its checkpoint, inputs, token counts and reference rows.
struct EmbeddingReference {
    checkpoint: PathBuf,
    inputs: Vec<String>,
    token_counts: Vec<usize>,
    rows: Vec<Vec<f32>>,
}

fn embedding_reference(stem: &str) -> EmbeddingReference {
    let header = read_json(common::fixture(&format!("families/{stem}.json")));
    let checkpoint = check_checkpoint(&header);
    let inputs: Vec<String> = serde_json::from_value(read_json(common::fixture(
        header["inputs"].as_str().unwrap(),
    )))
    .unwrap();
    let dim = header["dim"].as_u64().unwrap() as usize;
    let data = std::fs::read(common::fixture(&format!(
        "families/{}",
        header["data"].as_str().unwrap()
    )))
    .unwrap();
    let rows: Vec<Vec<f32>> = data
        .chunks_exact(4 * dim)
        .map(|row| {
            row.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), inputs.len(), "{stem}: rows vs inputs");
    EmbeddingReference {
        checkpoint,
        inputs,
        token_counts: serde_json::from_value(header["token_counts"].clone()).unwrap(),
        rows,
    }
}

fn encodings(model: &LoadedModel, reference: &EmbeddingReference) -> Vec<Encoding> {
    reference
        .inputs
        .iter()
        .zip(&reference.token_counts)
        .map(|(text, &count)| {
            let e = model.tokenizer.encode(text, true).unwrap();
            assert_eq!(
                e.len(),
                count,
                "tokenized differently from the reference: {text:?}"
            );
            e
        })
        .collect()
}

/// Per-input cosine to the reference, embedding in batches of mixed lengths.
fn cosines(stem: &str, precision: Precision) -> Vec<f64> {
    let reference = embedding_reference(stem);
    let model = common::loaded(&reference.checkpoint, precision);
    let inputs = encodings(&model, &reference);
    let embeddings: Vec<Vec<f32>> = inputs
        .chunks(16)
        .flat_map(|batch| model.backend.embed(batch).unwrap())
        .collect();
    embeddings
        .iter()
        .zip(&reference.rows)
        .map(|(a, b)| common::cosine(a, b))
        .collect()
}

fn summary(stem: &str, precision: Precision, cosines: &[f64]) -> (f64, f64) {
    common::cosine_summary(&format!("{stem} {precision:?}"), cosines)
}

const EMBEDDERS: [&str; 4] = [
    "all-mpnet-base-v2",
    "tiny-xlm-roberta",
    "tiny-xlm-roberta.multilingual",
    "tiny-modernbert",
];

#[test]
fn f32_matches_the_reference_per_input() {
    for stem in EMBEDDERS {
        let cosines = cosines(stem, Precision::F32);
        summary(stem, Precision::F32, &cosines);
        for (i, c) in cosines.iter().enumerate() {
            assert!(*c >= 0.9999, "{stem} input {i}: cosine {c}");
        }
    }
}

/// The INT8 target of every family: mean cosine >= 0.998 and min >= 0.99 against the F32
/// reference (multilingual text for XLM-RoBERTa), except all-mpnet-base-v2's min: its input 4
/// ("Why?", 4 tokens) measured 0.9868 on the avx2 path and 0.9896 on scalar (AMD EPYC without
/// AVX-512, 2026-12-02; per-token activation scales follow the f32 rounding of the layer
/// before, which differs by path), at or above 0.99 on AVX-512 VNNI; 0.9937 on avx2 with the
/// fused attention (2026-12-07). It is fragile: summing the F32 outlier rows' products in
/// another order (FMA chains instead of 16 lanes) moved it to 0.971-0.980. A known shortfall
/// below the target, not a new one.
#[test]
fn int8_meets_the_accuracy_target() {
    for stem in EMBEDDERS {
        let (mean, min) = summary(stem, Precision::Int8, &cosines(stem, Precision::Int8));
        let min_target = if stem == "all-mpnet-base-v2" {
            0.985
        } else {
            0.99
        };
        assert!(mean >= 0.998, "{stem}: mean cosine {mean}");
        assert!(min >= min_target, "{stem}: min cosine {min}");
    }
}

/// F16 weights (the GPU artifact, widened to F32 on CPU) and int4 (a size option with visible
/// loss, as for BERT: mean >= 0.95, min >= 0.80).
#[test]
fn f16_and_int4_stay_within_their_tolerances() {
    for stem in EMBEDDERS {
        let (mean, min) = summary(stem, Precision::F16, &cosines(stem, Precision::F16));
        assert!(
            mean >= 0.99999 && min >= 0.9999,
            "{stem} F16: {mean} / {min}"
        );
        let (mean, min) = summary(stem, Precision::Int4, &cosines(stem, Precision::Int4));
        assert!(mean >= 0.95 && min >= 0.80, "{stem} int4: {mean} / {min}");
    }
}

/// An input's embedding alone equals its embedding inside a batch of other lengths.
#[test]
fn embeddings_are_batch_invariant() {
    for stem in ["all-mpnet-base-v2", "tiny-modernbert"] {
        let reference = embedding_reference(stem);
        for precision in [Precision::F32, Precision::Int8] {
            let model = common::loaded(&reference.checkpoint, precision);
            let inputs = encodings(&model, &reference);
            let batch: Vec<Encoding> = [0, 120, 10, 127, 60, 3, 90]
                .iter()
                .map(|&i| inputs[i].clone())
                .collect();
            let together = model.backend.embed(&batch).unwrap();
            let mut max_diff = 0f32;
            for (input, in_batch) in batch.iter().zip(&together) {
                let alone = model.backend.embed(std::slice::from_ref(input)).unwrap();
                for (a, b) in alone[0].iter().zip(in_batch) {
                    max_diff = max_diff.max((a - b).abs());
                }
            }
            println!("{stem} {precision:?} batch invariance: max abs diff {max_diff:e}");
            assert!(max_diff <= 1e-5, "{stem} {precision:?}: {max_diff}");
        }
    }
}

/// A reranker fixture: its checkpoint, (query, passages) groups and reference logits.
struct RerankReference {
    checkpoint: PathBuf,
    groups: Vec<(String, Vec<String>)>,
    token_counts: Vec<Vec<usize>>,
    logits: Vec<Vec<f32>>,
}

fn rerank_reference(name: &str) -> RerankReference {
    let header = read_json(common::fixture(&format!("families/{name}.rerank.json")));
    let checkpoint = check_checkpoint(&header);
    let groups = read_json(common::fixture(header["inputs"].as_str().unwrap()))
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["query"].as_str().unwrap().to_owned(),
                serde_json::from_value(g["passages"].clone()).unwrap(),
            )
        })
        .collect();
    RerankReference {
        checkpoint,
        groups,
        token_counts: serde_json::from_value(header["token_counts"].clone()).unwrap(),
        logits: serde_json::from_value(header["logits"].clone()).unwrap(),
    }
}

fn scores(model: &LoadedModel, reference: &RerankReference) -> Vec<Vec<f32>> {
    reference
        .groups
        .iter()
        .zip(&reference.token_counts)
        .map(|((query, passages), counts)| {
            let batch: Vec<Encoding> = passages
                .iter()
                .zip(counts)
                .map(|(p, &count)| {
                    let e = model.tokenizer.encode_pair(query, p, false).unwrap();
                    assert_eq!(
                        e.len(),
                        count,
                        "pair tokenized differently: {query:?} {p:?}"
                    );
                    e
                })
                .collect();
            model
                .backend
                .classify(&batch)
                .unwrap()
                .into_iter()
                .map(|l| l[0])
                .collect()
        })
        .collect()
}

const RERANKERS: [&str; 3] = [
    "tiny-xlm-roberta-reranker",
    "tiny-modernbert-reranker",
    "tiny-modernbert-reranker-mean",
];

/// F32 logits within 1e-3 relative of the reference. INT8 against F32: the same top passage
/// for at least 7 of 8 queries and logits within 0.25. These heads are random, not trained:
/// a query's passages lie within 0.6 to 1.4 of each other, and the 64-wide encoders' [CLS]
/// state carries more int8 error than a mean over tokens (measured: XLM-RoBERTa 7/8 and 0.17,
/// ModernBERT cls and mean 8/8 and 0.15; all-MiniLM-L6-v2's reranker, tests/reranker.rs, 8/8).
#[test]
fn rerankers_match_the_reference() {
    for name in RERANKERS {
        let reference = rerank_reference(name);
        let dir = common::artifact(&reference.checkpoint, Precision::F32);
        let manifest = Manifest::read(dir.path()).unwrap();
        assert_eq!(manifest.task, Task::Rerank, "{name}");
        let f32_scores = scores(
            &qmodel_server::backend::load(dir.path(), qmodel_server::backend::DeviceKind::Cpu)
                .unwrap(),
            &reference,
        );
        let mut worst = 0f32;
        for (got, want) in f32_scores
            .iter()
            .flatten()
            .zip(reference.logits.iter().flatten())
        {
            let relative = (got - want).abs() / want.abs().max(1.0);
            worst = worst.max(relative);
        }
        println!("{name} F32 logits vs reference: max relative diff {worst:e}");
        assert!(worst <= 1e-3, "{name}: F32 logit off by {worst} relative");

        let int8_scores = scores(
            &common::loaded(&reference.checkpoint, Precision::Int8),
            &reference,
        );
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
            "{name} INT8 vs F32: top-1 agreement {top1}/{}, max abs logit diff {max_diff:e}",
            reference.groups.len()
        );
        assert!(
            top1 * 8 >= reference.groups.len() * 7,
            "{name}: top-1 agreement {top1}/{}",
            reference.groups.len()
        );
        assert!(max_diff <= 0.25, "{name}: INT8 logit diff {max_diff}");
    }
}

/// The INT8 accuracy, batch-invariance and reranker tests on every other kernel path this CPU
/// has, each forced with `QMODEL_KERNEL`.
#[test]
fn int8_on_every_kernel_path() {
    common::on_every_other_kernel_path(&[
        "int8_meets_the_accuracy_target",
        "embeddings_are_batch_invariant",
        "rerankers_match_the_reference",
    ]);
}

#[test]
fn manifest_names_the_family_and_the_checkpoint_files() {
    for (name, family) in [
        ("all-mpnet-base-v2", "mpnet"),
        ("tiny-xlm-roberta", "xlm-roberta"),
        ("tiny-modernbert-reranker", "modernbert"),
    ] {
        let dir = checkpoint(name);
        let artifact = common::artifact(&dir, Precision::Int8);
        let manifest = Manifest::read(artifact.path()).unwrap();
        assert_eq!(manifest.architecture, family, "{name}");
        assert_eq!(
            manifest.checkpoint_files["model.safetensors"],
            qmodel_server::artifact::sha256_file(&dir.join("model.safetensors")).unwrap(),
            "{name}"
        );
        assert!(manifest.checkpoint_files.contains_key("config.json"));
        assert!(
            !manifest.checkpoint_files.keys().any(|f| f.starts_with('.')),
            "hidden files are not listed: {:?}",
            manifest.checkpoint_files.keys()
        );
    }
}

/// A checkpoint of an architecture no family reads is refused at quantize time, naming it
/// and what is supported; so is a config without architectures or model type.
#[test]
fn unsupported_architectures_are_refused_by_name() {
    let minilm = common::minilm();
    for (config, named) in [
        (
            serde_json::json!({"architectures": ["GPT2Model"], "model_type": "gpt2"}),
            "\"GPT2Model\"",
        ),
        (serde_json::json!({"model_type": "t5"}), "\"t5\""),
        (serde_json::json!({"hidden_size": 8}), "(none)"),
    ] {
        let from = tempfile::tempdir().unwrap();
        for file in ["model.safetensors", "tokenizer.json"] {
            std::fs::copy(minilm.join(file), from.path().join(file)).unwrap();
        }
        std::fs::write(from.path().join("config.json"), config.to_string()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let err = quantize(&QuantizeArgs {
            from: from.path().to_path_buf(),
            out: out.path().to_path_buf(),
            precision: Precision::Int8,
            model_version: "1".into(),
            model_id: Some("x".into()),
        })
        .unwrap_err();
        let message = format!("{err:#}");
        println!("{message}");
        for expected in [
            named,
            "not supported",
            "MPNetModel",
            "XLMRobertaModel",
            "ModernBertModel",
        ] {
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
        assert!(
            !out.path().join("manifest.json").exists(),
            "no artifact is written"
        );
    }
}
