//! The on-disk model artifact: one directory holding `model.gguf`, `tokenizer.json` and
//! `manifest.json`. The manifest names the model and records the sha256 of every other file,
//! so a server refuses to start from a truncated or corrupt image layer.
//!
//! `model.gguf` (GGUF v2, written by candle's `gguf_file`) holds the architecture as metadata
//! (`general.architecture` = `bert`, `bert.embedding_length`, `bert.block_count`,
//! `bert.attention.head_count`, `bert.feed_forward_length`, `bert.context_length`,
//! `bert.vocab_size`, `bert.token_type_count`, `bert.attention.layer_norm_epsilon`) and the
//! tensors under Hugging Face's names without the `bert.` prefix (`embeddings.*`,
//! `encoder.layer.N.*`, and for rerankers `pooler.dense.*` and `classifier.*`). Linear weights
//! are stored at the artifact's precision (int8: Q8_0, int4: Q4_0, f16: F16, f32: F32), the
//! word-embedding table as Q8_0 (int8, int4) or F16/F32, everything else as F32.
//!
//! Format 2 (`format_version` in the manifest): int8 linear weights are quantized per output channel.
//! They are still Q8_0 blocks, so any GGUF reader decodes them, but all the blocks of a row
//! share one f16 scale (the row's `max|w| / 127`, rounded up to an f16), which makes a row
//! exactly `scale * q` with `q` in [-127, 127]: the CPU loader packs `q` and the row scales
//! straight into `qmodel-kernels`' int8 GEMM layout. Format 1 (no `format_version` field) stored
//! ordinary Q8_0 (a scale per 32 weights); its artifacts are refused with a message saying
//! to re-quantize, rather than misread.
//!
//! Format 3: int8 artifacts are smoothed (SmoothQuant). The linear layers that read a
//! LayerNorm output (Q, K, V and the first feed-forward layer of each encoder layer) carry an
//! F32 `<layer>.input_scale` (`[in]`, calibrated at quantize time): their stored weight is the
//! original times `1 / input_scale` per column, and the input is multiplied by `input_scale`
//! before it is quantized. A format-2 reader would ignore those tensors and compute garbage,
//! hence the new version; format-2 artifacts are refused likewise.
//!
//! Format 4: the second feed-forward layer of BERT-style encoders is smoothed too
//! (`encoder.layer.N.output.dense.input_scale`, `[intermediate]`), shrinking its weights'
//! outlier columns; a format-3 reader would ignore it. Format-3 artifacts still load.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, ensure};
use sha2::{Digest, Sha256};

use serde::{Deserialize, Serialize};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const WEIGHTS_FILE: &str = "model.gguf";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The artifact format this build writes; see the module docs.
pub const FORMAT_VERSION: u32 = 4;
/// The oldest format this build reads: format 3 is format 4 without the second feed-forward
/// layer's smoothing, which the loader then does not apply.
pub const OLDEST_READABLE_FORMAT: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Embed,
    /// A one-label sequence classifier over (query, text) pairs: a cross-encoder.
    Rerank,
    /// A sequence classifier with several labels (`/predict`).
    Classify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    Mean,
    Cls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Int8,
    Int4,
    F16,
    F32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Artifact format ([`FORMAT_VERSION`]); absent in format-1 manifests.
    #[serde(rename = "format_version", default = "format_1")]
    pub format: u32,
    pub model_id: String,
    pub model_version: String,
    pub task: Task,
    /// Model family: `bert`, `xlm-roberta`, `mpnet` or `modernbert`.
    pub architecture: String,
    pub pooling: Pooling,
    /// Whether `/embed` normalizes when the request does not say.
    pub normalize: bool,
    pub max_input_tokens: usize,
    pub precision: Precision,
    /// File name (relative to the artifact directory) -> lowercase hex sha256.
    pub files: BTreeMap<String, String>,
    /// Every file of the checkpoint the artifact was made from (path relative to the
    /// checkpoint directory) -> lowercase hex sha256: what was quantized, for provenance.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checkpoint_files: BTreeMap<String, String>,
    /// The checkpoint's sentence-transformers prompts (`prompts`, `default_prompt_name`).
    #[serde(flatten)]
    pub prompts: crate::prompts::Prompts,
    /// A classifier's `id2label`, in id order (absent for embedders and rerankers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// The checkpoint's `problem_type` is `multi_label_classification`: each label's score is
    /// its own sigmoid rather than a softmax over the labels.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub multi_label: bool,
}

fn format_1() -> u32 {
    1
}

impl Manifest {
    /// Outputs of the classification head: none for an embedder, one for a reranker.
    pub fn head_labels(&self) -> usize {
        match self.task {
            Task::Embed => 0,
            Task::Rerank => 1,
            Task::Classify => self.labels.len(),
        }
    }

    /// Reads `manifest.json` from an artifact directory, without checking the other files.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid manifest", path.display()))
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self)? + "\n";
        std::fs::write(&path, text).with_context(|| format!("{}: cannot write", path.display()))
    }
}

/// Reads and checks an artifact directory: the manifest parses, lists the weights and the
/// tokenizer, and every file it lists exists with the recorded sha256. Every error is one line
/// naming the offending file.
pub fn verify(dir: &Path) -> anyhow::Result<Manifest> {
    let manifest = Manifest::read(dir)?;
    let manifest_path = dir.join(MANIFEST_FILE);
    ensure!(
        (OLDEST_READABLE_FORMAT..=FORMAT_VERSION).contains(&manifest.format),
        "{}: artifact format {} is not supported by this server (it reads formats \
         {OLDEST_READABLE_FORMAT} to {FORMAT_VERSION}): re-run `qmodel-server quantize` on the \
         checkpoint",
        manifest_path.display(),
        manifest.format
    );
    for required in [WEIGHTS_FILE, TOKENIZER_FILE] {
        ensure!(
            manifest.files.contains_key(required),
            "{}: does not list {required}",
            manifest_path.display()
        );
    }
    for (name, expected) in &manifest.files {
        // Only plain names: a manifest must not point outside its directory.
        ensure!(
            Path::new(name).file_name() == Some(name.as_ref()),
            "{}: file name {name:?} is not a plain name",
            manifest_path.display()
        );
        let path = dir.join(name);
        let actual = sha256_file(&path)?;
        ensure!(
            actual == *expected,
            "{}: sha256 {actual} does not match the manifest's {expected}: the file is corrupt or truncated",
            path.display()
        );
    }
    check_weights_fit(dir, &manifest)?;
    Ok(manifest)
}

/// The weights' GGUF header agrees with the manifest: a model file of another precision or task
/// (copied in with its checksum updated) is refused rather than served under the wrong label.
/// Reads only the header (metadata and tensor table), not the tensors.
fn check_weights_fit(dir: &Path, manifest: &Manifest) -> anyhow::Result<()> {
    use candle_core::quantized::gguf_file;
    let path = dir.join(WEIGHTS_FILE);
    let mut file =
        std::fs::File::open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| {
        // candle's message may carry a backtrace on the lines after the first.
        let e = e.to_string();
        let first = e.lines().next().unwrap_or_default();
        anyhow::anyhow!("{}: not a GGUF file: {first}", path.display())
    })?;
    let family = crate::models::Family::from_name(&manifest.architecture).with_context(|| {
        format!(
            "{}: architecture {:?} is not supported (bert, xlm-roberta, mpnet, modernbert)",
            dir.join(MANIFEST_FILE).display(),
            manifest.architecture
        )
    })?;
    let probe = family.first_linear_weight();
    let info = content
        .tensor_infos
        .get(probe)
        .with_context(|| format!("{}: no tensor {probe}", path.display()))?;
    // The dtype quantize stores linear weights in at this precision (one convention, there).
    let expected = crate::models::storage_dtype(crate::models::Role::Linear, manifest.precision);
    ensure!(
        info.ggml_dtype == expected,
        "{}: linear weights are {:?} but the manifest says precision {:?} ({expected:?}): weights of another precision",
        path.display(),
        info.ggml_dtype,
        manifest.precision
    );
    let has_head = content.tensor_infos.contains_key("classifier.weight");
    ensure!(
        has_head == (manifest.task != Task::Embed),
        "{}: weights {} a classifier head but the manifest's task is {:?}: weights of another model",
        path.display(),
        if has_head { "have" } else { "lack" },
        manifest.task
    );
    Ok(())
}

/// Lowercase hex sha256 of a file. Streams it with `read` rather than through a map, so
/// checking does not leave the whole file counted in the process's resident memory.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
