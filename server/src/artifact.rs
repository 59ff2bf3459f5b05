//! The on-disk model artifact: one directory holding `model.gguf`, `tokenizer.json` and
//! `manifest.json`. The manifest names the model and records the sha256 of every other file,
//! so a server refuses to start from a truncated or corrupt image layer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const WEIGHTS_FILE: &str = "model.gguf";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Embed,
    Rerank,
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
    pub model_id: String,
    pub model_version: String,
    pub task: Task,
    /// Model family, e.g. `bert`.
    pub architecture: String,
    pub pooling: Pooling,
    /// Whether `/embed` normalizes when the request does not say.
    pub normalize: bool,
    pub max_input_tokens: usize,
    pub precision: Precision,
    /// File name (relative to the artifact directory) -> lowercase hex sha256.
    pub files: BTreeMap<String, String>,
}
