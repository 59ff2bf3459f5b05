//! BERT encoder (post-LayerNorm, GELU(erf) feed-forward, absolute positions), as in Hugging
//! Face `BertModel`, plus the `BertForSequenceClassification` head (pooler + classifier) that
//! cross-encoder rerankers use. Tensor names are Hugging Face's without the `bert.` prefix.

use std::collections::HashMap;

use anyhow::{Context, bail, ensure};
use candle_core::quantized::gguf_file::Value;
use candle_core::{D, DType, IndexOp, Module, Tensor};
use candle_nn::LayerNorm;
use serde::Deserialize;

use super::{Linear, Role, RowTable, Weights};

pub const ARCHITECTURE: &str = "bert";

/// Added to attention scores of padding keys: `exp` of it underflows to exactly 0, so padding
/// contributes exact zeros (in F16 it saturates to -inf, which is also an exact 0).
const MASKED: f32 = -1e9;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
}

/// The parts of a Hugging Face `config.json` this implementation cannot honor unless they
/// have the usual values.
#[derive(Deserialize)]
struct HfVariant {
    #[serde(default = "gelu")]
    hidden_act: String,
    #[serde(default = "absolute")]
    position_embedding_type: String,
}

fn gelu() -> String {
    "gelu".into()
}

fn absolute() -> String {
    "absolute".into()
}

impl Config {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf(json: &serde_json::Value) -> anyhow::Result<Self> {
        let variant = HfVariant::deserialize(json)?;
        ensure!(
            variant.hidden_act == "gelu",
            "hidden_act {:?} is not supported (only gelu)",
            variant.hidden_act
        );
        ensure!(
            variant.position_embedding_type == "absolute",
            "position_embedding_type {:?} is not supported (only absolute)",
            variant.position_embedding_type
        );
        let config = Self::deserialize(json)?;
        ensure!(
            config.num_attention_heads > 0 && config.hidden_size % config.num_attention_heads == 0,
            "hidden_size {} is not a multiple of num_attention_heads {}",
            config.hidden_size,
            config.num_attention_heads
        );
        Ok(config)
    }

    pub fn gguf_metadata(&self) -> Vec<(String, Value)> {
        let u32_of = |v: usize| Value::U32(v as u32);
        vec![
            (
                "general.architecture".into(),
                Value::String(ARCHITECTURE.into()),
            ),
            ("bert.vocab_size".into(), u32_of(self.vocab_size)),
            ("bert.embedding_length".into(), u32_of(self.hidden_size)),
            ("bert.block_count".into(), u32_of(self.num_hidden_layers)),
            (
                "bert.attention.head_count".into(),
                u32_of(self.num_attention_heads),
            ),
            (
                "bert.feed_forward_length".into(),
                u32_of(self.intermediate_size),
            ),
            (
                "bert.context_length".into(),
                u32_of(self.max_position_embeddings),
            ),
            ("bert.token_type_count".into(), u32_of(self.type_vocab_size)),
            (
                "bert.attention.layer_norm_epsilon".into(),
                Value::F32(self.layer_norm_eps as f32),
            ),
        ]
    }

    pub fn from_gguf(metadata: &HashMap<String, Value>) -> anyhow::Result<Self> {
        let get = |key: &str| {
            metadata
                .get(key)
                .with_context(|| format!("GGUF metadata has no {key}"))
        };
        let usize_of = |key: &str| -> anyhow::Result<usize> { Ok(get(key)?.to_u32()? as usize) };
        let arch = get("general.architecture")?.to_string()?;
        ensure!(
            arch == ARCHITECTURE,
            "architecture {arch:?} is not {ARCHITECTURE:?}"
        );
        Ok(Self {
            vocab_size: usize_of("bert.vocab_size")?,
            hidden_size: usize_of("bert.embedding_length")?,
            num_hidden_layers: usize_of("bert.block_count")?,
            num_attention_heads: usize_of("bert.attention.head_count")?,
            intermediate_size: usize_of("bert.feed_forward_length")?,
            max_position_embeddings: usize_of("bert.context_length")?,
            type_vocab_size: usize_of("bert.token_type_count")?,
            layer_norm_eps: f64::from(get("bert.attention.layer_norm_epsilon")?.to_f32()?),
        })
    }
}

/// Every tensor the model reads, with its role; `head` adds the sequence-classification head.
pub fn tensors(config: &Config, head: bool) -> Vec<(String, Role)> {
    let mut names = vec![
        (
            "embeddings.word_embeddings.weight".to_string(),
            Role::Embedding,
        ),
        ("embeddings.position_embeddings.weight".into(), Role::Plain),
        (
            "embeddings.token_type_embeddings.weight".into(),
            Role::Plain,
        ),
        ("embeddings.LayerNorm.weight".into(), Role::Plain),
        ("embeddings.LayerNorm.bias".into(), Role::Plain),
    ];
    let linear = |names: &mut Vec<(String, Role)>, prefix: &str| {
        names.push((format!("{prefix}.weight"), Role::Linear));
        names.push((format!("{prefix}.bias"), Role::Plain));
    };
    let norm = |names: &mut Vec<(String, Role)>, prefix: &str| {
        names.push((format!("{prefix}.weight"), Role::Plain));
        names.push((format!("{prefix}.bias"), Role::Plain));
    };
    for i in 0..config.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        for proj in ["query", "key", "value"] {
            linear(&mut names, &format!("{p}.attention.self.{proj}"));
        }
        linear(&mut names, &format!("{p}.attention.output.dense"));
        norm(&mut names, &format!("{p}.attention.output.LayerNorm"));
        linear(&mut names, &format!("{p}.intermediate.dense"));
        linear(&mut names, &format!("{p}.output.dense"));
        norm(&mut names, &format!("{p}.output.LayerNorm"));
    }
    if head {
        linear(&mut names, "pooler.dense");
        // One output row: quantizing it saves nothing and costs the score precision.
        names.push(("classifier.weight".into(), Role::Plain));
        names.push(("classifier.bias".into(), Role::Plain));
    }
    names
}

/// Right-padded token ids of a batch: `batch` rows of `seq` tokens, `lens[i]` of them real.
pub struct Batch<'a> {
    pub ids: &'a [u32],
    pub type_ids: &'a [u32],
    pub lens: &'a [usize],
    pub seq: usize,
}

struct Embeddings {
    words: RowTable,
    positions: Tensor,
    token_types: Tensor,
    norm: LayerNorm,
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

struct Head {
    pooler: Linear,
    classifier: Linear,
}

pub struct Model {
    config: Config,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    head: Option<Head>,
    dtype: DType,
    device: candle_core::Device,
}

impl Model {
    pub fn load(weights: &Weights, head: bool) -> anyhow::Result<Self> {
        let config = Config::from_gguf(weights.metadata())?;
        let eps = config.layer_norm_eps;
        let embeddings = Embeddings {
            words: weights.rows("embeddings.word_embeddings.weight")?,
            positions: weights.tensor("embeddings.position_embeddings.weight")?,
            token_types: weights.tensor("embeddings.token_type_embeddings.weight")?,
            norm: weights.layer_norm("embeddings.LayerNorm", eps)?,
        };
        ensure!(
            embeddings.words.dim() == config.hidden_size,
            "word embeddings are {} wide, the model {}",
            embeddings.words.dim(),
            config.hidden_size
        );
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    query: weights.linear(&format!("{p}.attention.self.query"))?,
                    key: weights.linear(&format!("{p}.attention.self.key"))?,
                    value: weights.linear(&format!("{p}.attention.self.value"))?,
                    attention_out: weights.linear(&format!("{p}.attention.output.dense"))?,
                    attention_norm: weights
                        .layer_norm(&format!("{p}.attention.output.LayerNorm"), eps)?,
                    intermediate: weights.linear(&format!("{p}.intermediate.dense"))?,
                    output: weights.linear(&format!("{p}.output.dense"))?,
                    output_norm: weights.layer_norm(&format!("{p}.output.LayerNorm"), eps)?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let head = if head {
            Some(Head {
                pooler: weights.linear("pooler.dense")?,
                classifier: weights.linear("classifier")?,
            })
        } else {
            None
        };
        Ok(Self {
            config,
            embeddings,
            layers,
            head,
            dtype: weights.compute_dtype(),
            device: weights.device().clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The last hidden state, `[batch * seq, hidden]` in the compute dtype.
    pub fn forward(&self, batch: &Batch) -> anyhow::Result<Tensor> {
        let (b, s) = (batch.lens.len(), batch.seq);
        ensure!(
            s <= self.config.max_position_embeddings,
            "{s} tokens exceed the model's {} positions",
            self.config.max_position_embeddings
        );
        if let Some(&t) = batch
            .type_ids
            .iter()
            .find(|&&t| t as usize >= self.config.type_vocab_size)
        {
            bail!(
                "token type {t} is outside the model's {} types",
                self.config.type_vocab_size
            );
        }
        let h = self.config.hidden_size;
        let dev = &self.device;

        let mut words = Vec::new();
        self.embeddings.words.gather(batch.ids, &mut words)?;
        let words = Tensor::from_vec(words, (b * s, h), dev)?.to_dtype(self.dtype)?;
        let positions: Vec<u32> = (0..b).flat_map(|_| 0..s as u32).collect();
        let positions = Tensor::from_vec(positions, b * s, dev)?;
        let types = Tensor::from_slice(batch.type_ids, b * s, dev)?;
        let xs = (words
            + self.embeddings.positions.index_select(&positions, 0)?
            + self.embeddings.token_types.index_select(&types, 0)?)?;
        let mut xs = self.embeddings.norm.forward(&xs)?;

        let mask: Vec<f32> = batch
            .lens
            .iter()
            .flat_map(|&len| (0..s).map(move |j| if j < len { 0.0 } else { MASKED }))
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, s), dev)?.to_dtype(self.dtype)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask, b, s, self.config.num_attention_heads)?;
        }
        Ok(xs)
    }

    /// Relevance logits from the last hidden state: classifier(tanh(pooler(CLS))).
    pub fn score(&self, hidden: &Tensor, batch: usize, seq: usize) -> anyhow::Result<Vec<f32>> {
        let head = self
            .head
            .as_ref()
            .context("this model has no classification head")?;
        let cls = hidden
            .reshape((batch, seq, self.config.hidden_size))?
            .i((.., 0))?
            .contiguous()?;
        let pooled = head.pooler.forward(&cls)?.tanh()?;
        let logits = head.classifier.forward(&pooled)?;
        ensure!(
            logits.dim(D::Minus1)? == 1,
            "the classifier has {} labels, a reranker needs 1",
            logits.dim(D::Minus1)?
        );
        Ok(logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
    }
}

impl Layer {
    fn forward(
        &self,
        xs: &Tensor,
        mask: &Tensor,
        b: usize,
        s: usize,
        heads: usize,
    ) -> anyhow::Result<Tensor> {
        let h = xs.dim(1)?;
        let hd = h / heads;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, s, heads, hd))?.transpose(1, 2)?.contiguous()
        };
        // Scaling q rather than the scores touches s*hd values instead of s*s.
        let q = split((self.query.forward(xs)? * (1.0 / (hd as f64).sqrt()))?)?;
        let k = split(self.key.forward(xs)?)?;
        let v = split(self.value.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * s, h))?;
        let xs = self
            .attention_norm
            .forward(&(self.attention_out.forward(&context)? + xs)?)?;
        let ff = self.intermediate.forward(&xs)?.gelu_erf()?;
        Ok(self
            .output_norm
            .forward(&(self.output.forward(&ff)? + xs)?)?)
    }
}
