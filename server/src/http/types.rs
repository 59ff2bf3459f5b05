//! Every JSON shape the HTTP API reads or writes, in one place. Shapes follow
//! text-embeddings-inference (`/embed`, `/embed_all`, `/rerank`, `/similarity`, `/tokenize`,
//! `/decode`, errors), OpenAI (`/v1/embeddings`, `/v1/models`) and Cohere (`/v1/rerank`,
//! `/v2/rerank`, which Jina clients also read). Unknown request fields are ignored, as all three
//! do: clients send extras.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::artifact::{Pooling, Precision, Task};
use crate::backend::DeviceKind;
pub use crate::service::ErrorType;
use crate::service::{EmbedOptions, EncodeOptions, Error, PredictInput, ScoreOptions};
use crate::tokenize::{Input, TruncationDirection};

/// `string | [string] | [id] | [[id]]` (a list may mix texts and lists of ids), as TEI's
/// `inputs` and OpenAI's `input`; a flat list of integers is one input of token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs(pub Vec<Input>);

/// One element of a list of inputs: a text, a list of ids, or an id of a flat list of ids.
enum Item {
    Input(Input),
    Id(u32),
}

struct ItemVisitor;

impl<'de> Visitor<'de> for ItemVisitor {
    type Value = Item;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, a token id or a list of token ids")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Item, E> {
        Ok(Item::Input(Input::Text(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Item, E> {
        Ok(Item::Input(Input::Text(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Item, E> {
        token_id(v).map(Item::Id)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Item, E> {
        Err(E::custom(format!(
            "token id {v} is negative: ids are non-negative integers"
        )))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
        let mut ids = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(512));
        while let Some(TokenId(id)) = seq.next_element()? {
            ids.push(id);
        }
        Ok(Item::Input(Input::Ids(ids)))
    }
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ItemVisitor)
    }
}

fn token_id<E: de::Error>(v: u64) -> Result<u32, E> {
    u32::try_from(v).map_err(|_| E::custom(format!("token id {v} is out of range")))
}

/// A token id: a non-negative integer (floats and strings are refused).
struct TokenId(u32);

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Item::deserialize(deserializer)? {
            Item::Id(id) => Ok(TokenId(id)),
            Item::Input(_) => Err(de::Error::custom(
                "a list of token ids holds only non-negative integers",
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Inputs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InputsVisitor;

        impl<'de> Visitor<'de> for InputsVisitor {
            type Value = Inputs;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, a list of strings, a list of token ids or a list of lists of token ids")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Inputs, E> {
                Ok(Inputs(vec![Input::Text(v.to_owned())]))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Inputs, E> {
                Ok(Inputs(vec![Input::Text(v)]))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Inputs, A::Error> {
                // Capped: the size hint comes from the client.
                let capacity = seq.size_hint().unwrap_or(0).min(64);
                let (mut inputs, mut ids) = (Vec::with_capacity(capacity), Vec::new());
                while let Some(item) = seq.next_element::<Item>()? {
                    match item {
                        Item::Input(input) => inputs.push(input),
                        Item::Id(id) => ids.push(id),
                    }
                }
                match (inputs.is_empty(), ids.is_empty()) {
                    (_, true) => Ok(Inputs(inputs)),
                    (true, false) => Ok(Inputs(vec![Input::Ids(ids)])),
                    (false, false) => Err(de::Error::custom(
                        "a list of inputs mixes token ids with texts or lists of ids",
                    )),
                }
            }
        }

        deserializer.deserialize_any(InputsVisitor)
    }
}

impl Inputs {
    /// The texts, for routes that take only text.
    pub fn texts(self, field: &str) -> Result<Vec<String>, Error> {
        self.0
            .into_iter()
            .map(|input| match input {
                Input::Text(text) => Ok(text),
                Input::Ids(_) => Err(Error::validation(format!(
                    "`{field}` takes text here, not token ids"
                ))),
            })
            .collect()
    }
}

/// `[id]` or `[[id]]`: `/decode`'s `ids`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdLists(pub Vec<Vec<u32>>);

impl<'de> Deserialize<'de> for IdLists {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let Inputs(inputs) = Inputs::deserialize(deserializer)?;
        inputs
            .into_iter()
            .map(|input| match input {
                Input::Ids(ids) => Ok(ids),
                Input::Text(_) => Err(de::Error::custom("`ids` holds token ids, not text")),
            })
            .collect::<Result<_, _>>()
            .map(IdLists)
    }
}

/// How text inputs are encoded, as TEI's embedding routes take it.
#[derive(Debug, Default, Deserialize)]
pub struct EncodeParameters {
    /// Defaults to the server's `--auto-truncate`.
    pub truncate: Option<bool>,
    #[serde(default)]
    pub truncation_direction: TruncationDirection,
    /// Defaults to the server's default prompt.
    pub prompt_name: Option<String>,
}

impl EncodeParameters {
    pub fn options(&self) -> EncodeOptions {
        EncodeOptions {
            truncate: self.truncate,
            truncation_direction: self.truncation_direction,
            prompt_name: self.prompt_name.clone(),
        }
    }
}

/// `POST /embed` (and `POST /` for embedding models).
#[derive(Debug, Deserialize)]
pub struct EmbedRequest {
    pub inputs: Inputs,
    /// Defaults to the model's manifest.
    pub normalize: Option<bool>,
    pub dimensions: Option<usize>,
    #[serde(flatten)]
    pub encode: EncodeParameters,
}

impl EmbedRequest {
    pub fn options(&self) -> EmbedOptions {
        EmbedOptions {
            encode: self.encode.options(),
            normalize: self.normalize,
            dimensions: self.dimensions,
        }
    }
}

/// `POST /embed_all`: every token's vector; answered `[[[f32]]]` (input, token, value).
#[derive(Debug, Deserialize)]
pub struct EmbedAllRequest {
    pub inputs: Inputs,
    #[serde(flatten)]
    pub encode: EncodeParameters,
}

/// `POST /similarity` (huggingface_hub's `sentence_similarity`): answered with one cosine per
/// sentence.
#[derive(Debug, Deserialize)]
pub struct SimilarityRequest {
    pub inputs: SimilarityInputs,
    #[serde(default)]
    pub parameters: EncodeParameters,
}

#[derive(Debug, Deserialize)]
pub struct SimilarityInputs {
    pub source_sentence: String,
    pub sentences: Vec<String>,
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
    #[serde(default)]
    pub truncation_direction: TruncationDirection,
}

impl RerankRequest {
    pub fn options(&self) -> ScoreOptions {
        ScoreOptions {
            truncate: self.truncate,
            truncation_direction: self.truncation_direction,
            raw_scores: self.raw_scores,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Rank {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub text: Option<String>,
    pub score: f32,
}

/// `POST /predict` (and `POST /` for classifiers).
#[derive(Debug, Deserialize)]
pub struct PredictRequest {
    pub inputs: PredictInputs,
    pub truncate: Option<bool>,
    #[serde(default)]
    pub truncation_direction: TruncationDirection,
    /// The logits rather than softmax (or, multi-label, sigmoid) scores.
    #[serde(default)]
    pub raw_scores: bool,
}

impl PredictRequest {
    pub fn options(&self) -> ScoreOptions {
        ScoreOptions {
            truncate: self.truncate,
            truncation_direction: self.truncation_direction,
            raw_scores: self.raw_scores,
        }
    }
}

/// A text, a pair `[a, b]`, or a list of texts and pairs. As TEI reads it, a list of exactly
/// two texts is one pair.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PredictInputs {
    Single(Sequence),
    Batch(Vec<Sequence>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Sequence {
    Single(String),
    Pair(String, String),
}

impl From<Sequence> for PredictInput {
    fn from(s: Sequence) -> Self {
        match s {
            Sequence::Single(text) => PredictInput::Single(text),
            Sequence::Pair(a, b) => PredictInput::Pair(a, b),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Prediction {
    pub score: f32,
    pub label: String,
}

/// One list of predictions for a single input, a list of them for a batch.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum PredictResponse {
    Single(Vec<Prediction>),
    Batch(Vec<Vec<Prediction>>),
}

/// `POST /v1/rerank`, `POST /v2/rerank`: Cohere's shape (Jina's is the same request).
#[derive(Debug, Deserialize)]
pub struct CohereRerankRequest {
    /// Accepted and not checked: the server serves one model.
    pub model: Option<String>,
    pub query: String,
    pub documents: Vec<Document>,
    /// Only the best `top_n` (at least 1) [default: all].
    pub top_n: Option<usize>,
    #[serde(default)]
    pub return_documents: bool,
    /// Not Cohere's: Cohere cuts over-long documents, so these routes do too unless told not to.
    pub truncate: Option<bool>,
    #[serde(default)]
    pub truncation_direction: TruncationDirection,
}

/// A document as a string or `{"text": ...}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Document {
    Text(String),
    Object { text: String },
}

impl Document {
    pub fn into_text(self) -> String {
        match self {
            Document::Text(text) | Document::Object { text } => text,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct CohereRerankResponse {
    pub id: String,
    pub results: Vec<CohereRerankResult>,
    pub meta: CohereMeta,
    /// Jina's field, which Cohere clients ignore.
    pub model: String,
}

#[derive(Debug, Serialize)]
pub struct CohereRerankResult {
    pub index: usize,
    pub relevance_score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<DocumentText>,
}

#[derive(Debug, Serialize)]
pub struct DocumentText {
    pub text: String,
}

#[derive(Debug, Serialize)]
pub struct CohereMeta {
    pub api_version: CohereApiVersion,
    pub billed_units: CohereBilledUnits,
}

#[derive(Debug, Serialize)]
pub struct CohereApiVersion {
    pub version: &'static str,
}

#[derive(Debug, Serialize)]
pub struct CohereBilledUnits {
    pub search_units: u32,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Deserialize)]
pub struct OpenAiEmbeddingsRequest {
    pub input: Inputs,
    /// Accepted and not checked: the server serves one model.
    pub model: Option<String>,
    #[serde(default)]
    pub encoding_format: EncodingFormat,
    pub dimensions: Option<usize>,
    /// Accepted and ignored, as an end-user id for abuse tracking is OpenAI's business.
    pub user: Option<String>,
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

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct OpenAiModels {
    pub object: &'static str,
    pub data: Vec<OpenAiModel>,
}

#[derive(Debug, Serialize)]
pub struct OpenAiModel {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

/// `POST /tokenize`; answered with one list of [`crate::tokenize::Token`] per input.
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub inputs: Inputs,
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
    pub prompt_name: Option<String>,
}

/// `POST /decode`; answered with one text per list of ids.
#[derive(Debug, Deserialize)]
pub struct DecodeRequest {
    pub ids: IdLists,
    #[serde(default = "yes")]
    pub skip_special_tokens: bool,
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
    /// Width of the embeddings (the most `dimensions` may ask).
    pub dimensions: usize,
    pub max_input_length: usize,
    pub max_batch_tokens: usize,
    pub max_batch_requests: usize,
    pub max_client_batch_size: usize,
    pub max_concurrent_requests: usize,
    pub auto_truncate: bool,
    /// The model's prompts, by name (`prompt_name` picks one).
    pub prompts: BTreeMap<String, String>,
    /// What goes before text inputs whose request names no prompt.
    pub default_prompt: Option<String>,
    /// Threads of the compute pools, and why that many (see [`crate::threads`]).
    pub compute_threads: usize,
    pub compute_threads_reason: String,
    /// The CPU kernels' path (`amx`, `avx512vnni`, `avx2`, `neon-i8mm`, `neon-dot`, `scalar`: the
    /// best this CPU has, or `QMODEL_KERNEL`'s); absent on a GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_kernel: Option<String>,
    /// Version of qmodel-server.
    pub version: String,
}

/// Every error body: `{"error": "...", "error_type": "..."}`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorResponse {
    pub error: String,
    pub error_type: ErrorType,
}
