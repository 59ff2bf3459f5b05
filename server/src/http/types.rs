//! Every JSON shape the HTTP API reads or writes, in one place. Shapes follow
//! text-embeddings-inference (`/embed`, `/rerank`, `/tokenize`, errors) and OpenAI
//! (`/v1/embeddings`). Unknown request fields are ignored, as both do: clients send extras such
//! as `model`, `user` or `prompt_name`.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::artifact::{Pooling, Precision, Task};
use crate::backend::DeviceKind;

/// `string | [string]`, as TEI's `inputs` and OpenAI's `input`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs(pub Vec<String>);

impl<'de> Deserialize<'de> for Inputs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InputsVisitor;

        impl<'de> Visitor<'de> for InputsVisitor {
            type Value = Inputs;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Inputs, E> {
                Ok(Inputs(vec![v.to_owned()]))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Inputs, E> {
                Ok(Inputs(vec![v]))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Inputs, A::Error> {
                // Capped: the size hint comes from the client.
                let mut texts = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(text) = seq.next_element::<String>()? {
                    texts.push(text);
                }
                Ok(Inputs(texts))
            }
        }

        deserializer.deserialize_any(InputsVisitor)
    }
}

/// `POST /embed` (and `POST /` for embedding models).
#[derive(Debug, Deserialize)]
pub struct EmbedRequest {
    pub inputs: Inputs,
    /// Defaults to the model's manifest.
    pub normalize: Option<bool>,
    /// Defaults to the server's `--auto-truncate`.
    pub truncate: Option<bool>,
}

/// `POST /rerank` (and `POST /` for rerankers).
#[derive(Debug, Deserialize)]
pub struct RerankRequest {
    pub query: String,
    pub texts: Vec<String>,
    /// `false` (default): sigmoid of the logit, in (0, 1).
    #[serde(default)]
    pub raw_scores: bool,
    #[serde(default)]
    pub return_text: bool,
    pub truncate: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Rank {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub text: Option<String>,
    pub score: f32,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Deserialize)]
pub struct OpenAiEmbeddingsRequest {
    pub input: Inputs,
    #[serde(default)]
    pub encoding_format: EncodingFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    #[default]
    Float,
    /// Base64 of the little-endian f32 bytes, as OpenAI sends it.
    Base64,
}

#[derive(Debug, Serialize)]
pub struct OpenAiEmbeddingsResponse {
    pub object: &'static str,
    pub data: Vec<OpenAiEmbedding>,
    pub model: String,
    pub usage: OpenAiUsage,
}

#[derive(Debug, Serialize)]
pub struct OpenAiEmbedding {
    pub object: &'static str,
    pub embedding: EmbeddingValue,
    pub index: usize,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum EmbeddingValue {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
pub struct OpenAiUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// `POST /tokenize`; answered with one list of [`crate::tokenize::Token`] per input.
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub inputs: Inputs,
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
}

fn yes() -> bool {
    true
}

/// `GET /info`.
#[derive(Debug, Serialize)]
pub struct Info {
    pub model_id: String,
    pub model_version: String,
    pub task: Task,
    pub precision: Precision,
    pub device: DeviceKind,
    pub pooling: Pooling,
    pub normalize: bool,
    pub max_input_length: usize,
    pub max_batch_tokens: usize,
    pub max_batch_requests: usize,
    pub max_client_batch_size: usize,
    pub max_concurrent_requests: usize,
    pub auto_truncate: bool,
    /// Threads of the compute pools, and why that many (see [`crate::threads`]).
    pub compute_threads: usize,
    pub compute_threads_reason: String,
    /// Version of qmodel-server.
    pub version: String,
}

/// Every error body: `{"error": "...", "error_type": "..."}`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorResponse {
    pub error: String,
    pub error_type: ErrorType,
}

/// TEI's names where TEI has the case (`validation`, `tokenizer`, `overloaded`, `backend`,
/// `unhealthy`); our own for what TEI answers without a JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    Validation,
    Tokenizer,
    PayloadTooLarge,
    Overloaded,
    Backend,
    Unhealthy,
    Timeout,
    Unauthorized,
    NotFound,
    MethodNotAllowed,
}
