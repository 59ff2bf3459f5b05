//! The artifact format: quantize round trip, and refusal of missing, truncated or corrupt
//! files with an error naming the file.

mod common;

use std::path::Path;

use qmodel_server::artifact::{
    MANIFEST_FILE, Manifest, Pooling, Precision, TOKENIZER_FILE, Task, WEIGHTS_FILE,
};
use qmodel_server::backend::{DeviceKind, load};
use qmodel_server::quantize::{QuantizeArgs, quantize};

#[test]
fn quantize_writes_the_manifest_of_an_embedding_model() {
    let dir = common::artifact(&common::minilm(), Precision::Int8);
    let manifest = Manifest::read(dir.path()).unwrap();
    assert_eq!(manifest.model_id, "all-MiniLM-L6-v2");
    assert_eq!(manifest.model_version, "test");
    assert_eq!(manifest.task, Task::Embed);
    assert_eq!(manifest.architecture, "bert");
    assert_eq!(manifest.pooling, Pooling::Mean);
    assert!(manifest.normalize);
    assert_eq!(manifest.max_input_tokens, 256);
    assert_eq!(manifest.precision, Precision::Int8);
    assert_eq!(
        manifest.files.keys().collect::<Vec<_>>(),
        [WEIGHTS_FILE, TOKENIZER_FILE]
    );
    let model = load(dir.path(), DeviceKind::Cpu).unwrap();
    assert_eq!(model.manifest, manifest);
    assert_eq!(model.tokenizer.max_input_tokens(), 256);

    // The int8 artifact is about a quarter of the F32 checkpoint, embedding table included.
    let f32_bytes = std::fs::metadata(common::minilm().join("model.safetensors"))
        .unwrap()
        .len();
    let int8_bytes = std::fs::metadata(dir.path().join(WEIGHTS_FILE))
        .unwrap()
        .len();
    println!("model.safetensors {f32_bytes} bytes, int8 {WEIGHTS_FILE} {int8_bytes} bytes");
    assert!(int8_bytes * 3 < f32_bytes);
}

/// `load`'s error for an artifact damaged by `damage`, which must name `file`.
fn load_error(damage: impl FnOnce(&Path), file: &str) -> String {
    let dir = common::artifact(&common::minilm(), Precision::Int8);
    damage(dir.path());
    let Err(error) = load(dir.path(), DeviceKind::Cpu) else {
        panic!("a damaged {file} loaded");
    };
    let message = error.to_string();
    assert!(
        message.contains(file) && !message.contains('\n'),
        "error does not name {file} on one line: {message}"
    );
    message
}

#[test]
fn missing_files_are_named() {
    for file in [WEIGHTS_FILE, TOKENIZER_FILE, MANIFEST_FILE] {
        load_error(|dir| std::fs::remove_file(dir.join(file)).unwrap(), file);
    }
}

#[test]
fn truncated_files_are_named() {
    for file in [WEIGHTS_FILE, TOKENIZER_FILE] {
        let message = load_error(
            |dir| {
                let path = dir.join(file);
                let len = std::fs::metadata(&path).unwrap().len();
                std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_len(len / 2)
                    .unwrap();
            },
            file,
        );
        assert!(message.contains("sha256"), "{message}");
    }
}

#[test]
fn corrupt_files_are_named() {
    load_error(
        |dir| {
            let path = dir.join(WEIGHTS_FILE);
            let mut bytes = std::fs::read(&path).unwrap();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x40;
            std::fs::write(&path, bytes).unwrap();
        },
        WEIGHTS_FILE,
    );
    load_error(
        |dir| std::fs::write(dir.join(MANIFEST_FILE), "{\"model_id\": ").unwrap(),
        MANIFEST_FILE,
    );
}

#[test]
fn a_manifest_must_list_weights_and_tokenizer() {
    load_error(
        |dir| {
            let mut manifest = Manifest::read(dir).unwrap();
            manifest.files.remove(TOKENIZER_FILE);
            manifest.write(dir).unwrap();
        },
        MANIFEST_FILE,
    );
}

/// A format-1 artifact (plain Q8_0 weights, no `format` in the manifest) is refused with a
/// message saying to re-quantize, not misread.
#[test]
fn an_old_format_artifact_is_refused() {
    let message = load_error(
        |dir| {
            let path = dir.join(MANIFEST_FILE);
            let mut json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            json.as_object_mut().unwrap().remove("format_version");
            std::fs::write(&path, json.to_string()).unwrap();
        },
        MANIFEST_FILE,
    );
    assert!(
        message.contains("format 1") && message.contains("quantize"),
        "{message}"
    );
}

#[test]
fn embeds_related_sentences_closer_than_unrelated_ones() {
    let model = common::loaded(&common::minilm(), Precision::Int8);
    let encode = |t: &str| model.tokenizer.encode(t, false).unwrap();
    let batch = [
        encode("A man is playing a guitar."),
        encode("Someone plays an acoustic guitar on stage."),
        encode("The stock market fell sharply on Tuesday."),
    ];
    let e = model.backend.embed(&batch).unwrap();
    assert_eq!(e.len(), 3);
    assert_eq!(e[0].len(), 384);
    let related = common::cosine(&e[0], &e[1]);
    let unrelated = common::cosine(&e[0], &e[2]);
    assert!(related > unrelated + 0.3, "{related} vs {unrelated}");
    assert!(model.backend.classify(&batch).is_err());
}

/// A copy of the MiniLM checkpoint (weights linked) with `edit` applied, and quantize's error.
fn quantize_error(edit: impl FnOnce(&Path)) -> String {
    let source = common::minilm();
    let from = tempfile::tempdir().unwrap();
    for file in ["config.json", "tokenizer.json", "sentence_bert_config.json"] {
        std::fs::copy(source.join(file), from.path().join(file)).unwrap();
    }
    std::os::unix::fs::symlink(
        source.join("model.safetensors"),
        from.path().join("model.safetensors"),
    )
    .unwrap();
    edit(from.path());
    let out = tempfile::tempdir().unwrap();
    let args = QuantizeArgs {
        from: from.path().to_path_buf(),
        out: out.path().to_path_buf(),
        precision: Precision::Int8,
        model_version: "test".into(),
        model_id: Some("broken".into()),
    };
    let error = quantize(&args).expect_err("a broken checkpoint was quantized");
    assert!(!out.path().join(MANIFEST_FILE).exists());
    format!("{error:#}")
}

#[test]
fn quantize_refuses_a_checkpoint_that_does_not_fit_its_config() {
    let message = quantize_error(|dir| {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("1536", "1024")).unwrap();
    });
    assert!(
        message.contains("encoder.layer.0.intermediate.dense.weight")
            && message.contains("[1536, 384]"),
        "{message}"
    );
}

#[test]
fn quantize_names_a_missing_file() {
    let message = quantize_error(|dir| std::fs::remove_file(dir.join(TOKENIZER_FILE)).unwrap());
    assert!(message.contains(TOKENIZER_FILE), "{message}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    let dir = common::artifact(&common::minilm(), Precision::F16);
    let Err(error) = load(dir.path(), DeviceKind::Cuda) else {
        panic!("loaded on CUDA without the cuda feature");
    };
    assert!(error.to_string().contains("`cuda` feature"), "{error}");
}

#[test]
fn the_quantize_command_writes_an_artifact_or_names_what_is_wrong() {
    let out = tempfile::tempdir().unwrap();
    let quantize = |from: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_qmodel-server"))
            .arg("quantize")
            .arg("--from")
            .arg(from)
            .arg("--out")
            .arg(out.path())
            .args([
                "--precision",
                "f16",
                "--model-version",
                "7",
                "--model-id",
                "minilm",
            ])
            .output()
            .unwrap()
    };
    let ok = quantize(&common::minilm());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let manifest = Manifest::read(out.path()).unwrap();
    assert_eq!(
        (manifest.model_id.as_str(), manifest.model_version.as_str()),
        ("minilm", "7")
    );
    assert_eq!(manifest.precision, Precision::F16);

    let failed = quantize(Path::new("/nonexistent"));
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("/nonexistent/config.json"), "{stderr}");
}
