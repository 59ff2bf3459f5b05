//! BERT encoder (post-LayerNorm, GELU(erf) feed-forward, absolute positions), as in Hugging
//! Face `BertModel`, plus the `BertForSequenceClassification` head (pooler + classifier) that
//! cross-encoder rerankers use. Tensor names are Hugging Face's without the `bert.` prefix.
//! XLM-RoBERTa and MPNet run on this encoder too ([`super::xlm_roberta`], [`super::mpnet`]):
//! their position ids start at [`Config::position_offset`], they have one token type or none,
//! and MPNet adds [`Config::relative_attention`].

use std::collections::HashMap;

use anyhow::{Context, bail, ensure};
use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Module, Tensor};
use candle_nn::LayerNorm;
use serde::Deserialize;

use qmodel_kernels::{
    Activation, HeadIo, Path as KernelPath, RowBias, ThreadPool, attend_head_with,
};

use super::mpnet::{BIAS_TABLE, RelativeAttention, RelativeBias};
use super::{
    Activations, Batch, Encoder, Int8Linear, Linear, OutlierRows, Role, RowTable, SharedOut,
    TensorSpec, Weights, raise_to_abs_max,
};

pub const ARCHITECTURE: &str = "bert";

/// Tokens per feed-forward chunk; see [`Layer::forward`].
const FEED_FORWARD_CHUNK: usize = 512;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    /// 0: no token-type table (MPNet); 1: every token is type 0 (RoBERTa's pair template
    /// numbers its segments, the model ignores them).
    #[serde(default)]
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    /// The position id of an input's first token: 0 for BERT, `padding_idx + 1` for
    /// RoBERTa-style models.
    #[serde(skip)]
    pub position_offset: usize,
    /// MPNet's relative-position attention bias.
    #[serde(skip)]
    pub relative_attention: Option<RelativeAttention>,
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
        Self::deserialize(json)?.validated()
    }

    fn validated(self) -> anyhow::Result<Self> {
        ensure!(
            self.num_attention_heads > 0
                && self.hidden_size.is_multiple_of(self.num_attention_heads),
            "hidden_size {} is not a multiple of num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        Ok(self)
    }

    /// The longest input the position table allows.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset)
    }

    pub fn gguf_metadata(&self) -> Vec<(String, Value)> {
        let u32_of = |v: usize| Value::U32(v as u32);
        let mut metadata = vec![
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
            ("bert.position_offset".into(), u32_of(self.position_offset)),
        ];
        if let Some(r) = self.relative_attention {
            metadata.push(("bert.attention.relative_buckets".into(), u32_of(r.buckets)));
            metadata.push((
                "bert.attention.relative_max_distance".into(),
                u32_of(r.max_distance),
            ));
        }
        metadata
    }

    pub fn from_gguf(metadata: &HashMap<String, Value>) -> anyhow::Result<Self> {
        let get = |key: &str| {
            metadata
                .get(key)
                .with_context(|| format!("GGUF metadata has no {key}"))
        };
        let usize_of = |key: &str| -> anyhow::Result<usize> { Ok(get(key)?.to_u32()? as usize) };
        // Keys added with XLM-RoBERTa and MPNet: absent from BERT artifacts written before.
        let optional = |key: &str| -> anyhow::Result<Option<usize>> {
            metadata
                .get(key)
                .map(|v| Ok(v.to_u32()? as usize))
                .transpose()
        };
        let arch = get("general.architecture")?.to_string()?;
        ensure!(
            arch == ARCHITECTURE,
            "architecture {arch:?} is not {ARCHITECTURE:?}"
        );
        Self {
            vocab_size: usize_of("bert.vocab_size")?,
            hidden_size: usize_of("bert.embedding_length")?,
            num_hidden_layers: usize_of("bert.block_count")?,
            num_attention_heads: usize_of("bert.attention.head_count")?,
            intermediate_size: usize_of("bert.feed_forward_length")?,
            max_position_embeddings: usize_of("bert.context_length")?,
            type_vocab_size: usize_of("bert.token_type_count")?,
            layer_norm_eps: f64::from(get("bert.attention.layer_norm_epsilon")?.to_f32()?),
            position_offset: optional("bert.position_offset")?.unwrap_or(0),
            relative_attention: match (
                optional("bert.attention.relative_buckets")?,
                optional("bert.attention.relative_max_distance")?,
            ) {
                (Some(buckets), Some(max_distance)) => Some(RelativeAttention {
                    buckets,
                    max_distance,
                }),
                _ => None,
            },
        }
        .validated()
    }
}

/// Every tensor the model reads; `labels` > 0 adds the sequence-classification head with that
/// many outputs.
pub fn tensors(config: &Config, labels: usize) -> Vec<TensorSpec> {
    let (h, ff) = (config.hidden_size, config.intermediate_size);
    let mut specs = Vec::new();
    let mut add = |name: String, role: Role, shape: &[usize]| {
        specs.push(TensorSpec {
            name,
            role,
            shape: shape.to_vec(),
        })
    };
    // `prefix.weight` and its F32 `prefix.bias` of `out` values.
    let mut layer = |prefix: &str, weight: Role, shape: &[usize]| {
        add(format!("{prefix}.weight"), weight, shape);
        add(format!("{prefix}.bias"), Role::Plain, &shape[..1]);
    };
    layer("embeddings.LayerNorm", Role::Plain, &[h]);
    for i in 0..config.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        for proj in ["query", "key", "value"] {
            layer(&format!("{p}.attention.self.{proj}"), Role::Linear, &[h, h]);
        }
        layer(
            &format!("{p}.attention.output.dense"),
            Role::Linear,
            &[h, h],
        );
        layer(
            &format!("{p}.attention.output.LayerNorm"),
            Role::Plain,
            &[h],
        );
        layer(&format!("{p}.intermediate.dense"), Role::Linear, &[ff, h]);
        layer(&format!("{p}.output.dense"), Role::Linear, &[h, ff]);
        layer(&format!("{p}.output.LayerNorm"), Role::Plain, &[h]);
    }
    if labels > 0 {
        // One row per input goes through the head: F32 costs nothing, and int8 cost the test
        // XLM-RoBERTa reranker 0.2 of logit.
        layer("pooler.dense", Role::Plain, &[h, h]);
        // A few output rows: quantizing them saves nothing and costs the score precision.
        layer("classifier", Role::Plain, &[labels, h]);
    }
    let embeddings = [
        ("word_embeddings", Role::Embedding, config.vocab_size),
        (
            "position_embeddings",
            Role::Plain,
            config.max_position_embeddings,
        ),
        ("token_type_embeddings", Role::Plain, config.type_vocab_size),
    ];
    for (table, role, rows) in embeddings {
        if rows > 0 {
            add(format!("embeddings.{table}.weight"), role, &[rows, h]);
        }
    }
    if let Some(r) = config.relative_attention {
        add(
            BIAS_TABLE.into(),
            Role::Plain,
            &[r.buckets, config.num_attention_heads],
        );
    }
    specs
}

struct Embeddings {
    words: RowTable,
    positions: Tensor,
    /// `None` without a token-type table.
    token_types: Option<Tensor>,
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
    engine: Engine,
    relative_bias: Option<RelativeBias>,
}

/// How the encoder runs: on candle (F32/F16 weights, int4, CUDA) or, for int8 weights on the
/// CPU, on `qmodel-kernels` over plain `f32` buffers ([`Int8Model`]).
enum Engine {
    Candle(Box<CandleModel>),
    Int8(Box<Int8Model>),
}

struct CandleModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    head: Option<Head>,
    dtype: DType,
    device: candle_core::Device,
}

impl Model {
    /// `labels`: outputs of the classification head, 0 for none.
    pub fn load(weights: &Weights, labels: usize) -> anyhow::Result<Self> {
        let config = Config::from_gguf(weights.metadata())?;
        weights.check(&tensors(&config, labels))?;
        let head = labels > 0;
        let engine = if weights.int8_on_cpu("encoder.layer.0.attention.self.query") {
            Engine::Int8(Box::new(Int8Model::load(weights, &config, head)?))
        } else {
            Engine::Candle(Box::new(CandleModel::load(weights, &config, head)?))
        };
        let relative_bias = config
            .relative_attention
            .map(|r| RelativeBias::load(weights, &config, r))
            .transpose()?;
        Ok(Self {
            config,
            engine,
            relative_bias,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The batch checked against the model's limits, as the engines read it.
    fn inputs<'a>(&'a self, batch: &Batch<'a>) -> anyhow::Result<Inputs<'a>> {
        batch.check(self.config.max_tokens())?;
        Ok(Inputs {
            ids: batch.ids,
            type_ids: self.type_ids(batch)?,
            lens: batch.lens,
            relative_bias: self.relative_bias.as_ref(),
        })
    }

    /// The batch's token types as the model reads them: checked against the table, or all 0
    /// where the model has one type or none.
    fn type_ids<'a>(&self, batch: &Batch<'a>) -> anyhow::Result<Option<&'a [u32]>> {
        if self.config.type_vocab_size <= 1 {
            return Ok(None);
        }
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
        Ok(Some(batch.type_ids))
    }
}

impl Encoder for Model {
    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn max_tokens(&self) -> usize {
        self.config.max_tokens()
    }

    fn forward(&self, batch: &Batch) -> anyhow::Result<Tensor> {
        let inputs = self.inputs(batch)?;
        match &self.engine {
            Engine::Candle(m) => m.forward(&self.config, &inputs),
            Engine::Int8(m) => {
                let hidden = m.forward(&self.config, &inputs, None)?;
                Ok(Tensor::from_vec(
                    hidden,
                    (batch.ids.len(), self.config.hidden_size),
                    &candle_core::Device::Cpu,
                )?)
            }
        }
    }

    /// Run on an unsmoothed int8 model, whose two-pass activations on those layers are within
    /// 1e-3 of F32.
    fn observe_activations(&self, batch: &Batch, max: &mut [Vec<f32>]) -> anyhow::Result<()> {
        let Engine::Int8(m) = &self.engine else {
            bail!("activations are observed on int8 weights on the CPU only");
        };
        let h = self.config.hidden_size;
        ensure!(
            max.len() == smoothed_linears(&self.config).len() && max.iter().all(|m| m.len() == h),
            "expected {} maxima of {h} channels",
            smoothed_linears(&self.config).len()
        );
        let inputs = self.inputs(batch)?;
        m.forward(&self.config, &inputs, Some(max))?;
        Ok(())
    }

    /// classifier(tanh(pooler([CLS]))).
    fn score(&self, hidden: &Tensor, lens: &[usize]) -> anyhow::Result<Vec<Vec<f32>>> {
        match &self.engine {
            Engine::Candle(m) => m.score(hidden, lens),
            Engine::Int8(m) => {
                let hidden: Vec<f32> = hidden.flatten_all()?.to_vec1()?;
                m.score(&hidden, self.config.hidden_size, lens)
            }
        }
    }
}

/// A checked batch as the engines read it.
struct Inputs<'a> {
    ids: &'a [u32],
    /// `None`: every token is type 0 (or the model has no types).
    type_ids: Option<&'a [u32]>,
    lens: &'a [usize],
    relative_bias: Option<&'a RelativeBias>,
}

impl Inputs<'_> {
    /// Each token's position id.
    fn positions(&self, offset: usize) -> impl Iterator<Item = usize> + '_ {
        self.lens.iter().flat_map(move |&len| offset..offset + len)
    }
}

impl CandleModel {
    fn load(weights: &Weights, config: &Config, head: bool) -> anyhow::Result<Self> {
        let eps = config.layer_norm_eps;
        let embeddings = Embeddings {
            words: weights.rows("embeddings.word_embeddings.weight")?,
            positions: weights.tensor("embeddings.position_embeddings.weight")?,
            token_types: (config.type_vocab_size > 0)
                .then(|| weights.tensor("embeddings.token_type_embeddings.weight"))
                .transpose()?,
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
            embeddings,
            layers,
            head,
            dtype: weights.compute_dtype(),
            device: weights.device().clone(),
        })
    }

    fn forward(&self, config: &Config, inputs: &Inputs) -> anyhow::Result<Tensor> {
        let tokens = inputs.ids.len();
        let dev = &self.device;

        let mut words = Vec::new();
        self.embeddings.words.gather(inputs.ids, &mut words)?;
        let words =
            Tensor::from_vec(words, (tokens, config.hidden_size), dev)?.to_dtype(self.dtype)?;
        let positions: Vec<u32> = inputs
            .positions(config.position_offset)
            .map(|p| p as u32)
            .collect();
        let positions = Tensor::from_vec(positions, tokens, dev)?;
        let mut xs = (words + self.embeddings.positions.index_select(&positions, 0)?)?;
        if let Some(table) = &self.embeddings.token_types {
            let types = match inputs.type_ids {
                Some(types) => Tensor::from_slice(types, tokens, dev)?,
                None => Tensor::zeros(tokens, DType::U32, dev)?,
            };
            xs = (xs + table.index_select(&types, 0)?)?;
        }
        let mut xs = self.embeddings.norm.forward(&xs)?;
        let biases = match inputs.relative_bias {
            Some(bias) => inputs
                .lens
                .iter()
                .map(|&len| bias.tensor(len, self.dtype, dev).map(Some))
                .collect::<anyhow::Result<Vec<_>>>()?,
            None => vec![None; inputs.lens.len()],
        };
        for layer in &self.layers {
            xs = layer.forward(&xs, inputs.lens, &biases, config.num_attention_heads)?;
        }
        Ok(xs)
    }

    fn score(&self, hidden: &Tensor, lens: &[usize]) -> anyhow::Result<Vec<Vec<f32>>> {
        let head = self
            .head
            .as_ref()
            .context("this model has no classification head")?;
        let starts: Vec<u32> = lens
            .iter()
            .scan(0u32, |start, &len| {
                let first = *start;
                *start += len as u32;
                Some(first)
            })
            .collect();
        let cls = hidden.index_select(&Tensor::new(starts, &self.device)?, 0)?;
        let pooled = head.pooler.forward(&cls)?.tanh()?;
        let logits = head.classifier.forward(&pooled)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec2()?)
    }
}

impl Layer {
    /// `biases`: each input's `[heads, len, len]` attention bias, if the model has one.
    fn forward(
        &self,
        xs: &Tensor,
        lens: &[usize],
        biases: &[Option<Tensor>],
        heads: usize,
    ) -> anyhow::Result<Tensor> {
        let h = xs.dim(1)?;
        let hd = h / heads;
        // Scaling q rather than the scores touches hd values per token instead of len.
        let q = (self.query.forward(xs)? * (1.0 / (hd as f64).sqrt()))?;
        let k = self.key.forward(xs)?;
        let v = self.value.forward(xs)?;
        let mut contexts = Vec::with_capacity(lens.len());
        let mut start = 0;
        for (&len, bias) in lens.iter().zip(biases) {
            // [len, h] -> [heads, len, hd]
            let split = |t: &Tensor| -> candle_core::Result<Tensor> {
                t.narrow(0, start, len)?
                    .reshape((len, heads, hd))?
                    .transpose(0, 1)?
                    .contiguous()
            };
            let mut scores = split(&q)?.matmul(&split(&k)?.t()?)?;
            if let Some(bias) = bias {
                scores = (scores + bias)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let context = probs
                .matmul(&split(&v)?)?
                .transpose(0, 1)?
                .reshape((len, h))?;
            contexts.push(context);
            start += len;
        }
        let context = Tensor::cat(&contexts, 0)?;
        let xs = self
            .attention_norm
            .forward(&(self.attention_out.forward(&context)? + xs)?)?;
        // The feed-forward block works token by token: running it over chunks of tokens bounds
        // its 4x-wide intermediate activations (25 MB per layer for 32 x 128 tokens in F32).
        let tokens = xs.dim(0)?;
        let ff = (0..tokens)
            .step_by(FEED_FORWARD_CHUNK)
            .map(|start| {
                let chunk = xs.narrow(0, start, FEED_FORWARD_CHUNK.min(tokens - start))?;
                self.output
                    .forward(&self.intermediate.forward(&chunk)?.gelu_erf()?)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(self.output_norm.forward(&(Tensor::cat(&ff, 0)? + xs)?)?)
    }
}

/// LayerNorm over rows of `f32`, for [`Int8Model`].
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn load(weights: &Weights, prefix: &str, eps: f64) -> anyhow::Result<Self> {
        Ok(Self {
            gamma: weights.values(&format!("{prefix}.weight"))?,
            beta: weights.values(&format!("{prefix}.bias"))?,
            eps: eps as f32,
        })
    }

    fn apply(&self, rows: &mut [f32]) {
        qmodel_kernels::layer_norm_rows(rows, &self.gamma, &self.beta, self.eps);
    }
}

/// [`Int8Model`]'s intermediate activations, kept per thread between batches (a batch worker
/// runs one batch at a time), so a batch allocates only its output.
#[derive(Default)]
struct Workspace {
    qkv: Vec<f32>,
    context: Vec<f32>,
    y: Vec<f32>,
    inter: Vec<f32>,
}

thread_local! {
    static WORKSPACE: std::cell::RefCell<Workspace> = std::cell::RefCell::default();
}

/// The encoder for int8 weights on the CPU, on `qmodel-kernels` over plain `f32` buffers: int8
/// GEMMs (per-output-channel weights, per-token activations) for every linear layer, with Q,
/// K and V fused into one `[3 * hidden, hidden]` weight (the `1/sqrt(head_dim)` score scale
/// folded into Q's row scales and bias) and the feed-forward GELU fused into its first GEMM;
/// attention, softmax and LayerNorm in F32. Everything runs on the kernels' one thread pool.
struct Int8Model {
    words: RowTable,
    positions: Vec<f32>,
    token_types: Vec<f32>,
    norm: Norm,
    layers: Vec<Int8Layer>,
    head: Option<Int8Head>,
}

struct Int8Layer {
    qkv: Int8Linear,
    attention_out: Int8Linear,
    attention_norm: Norm,
    intermediate: Int8Linear,
    output: Int8Linear,
    output_norm: Norm,
}

struct Int8Head {
    /// `[hidden, hidden]`, F32 (any storage is read as F32, so older int8 poolers load too).
    pooler: Vec<f32>,
    pooler_bias: Vec<f32>,
    /// `[labels, hidden]`: the classifier's rows, and their biases.
    classifier: Vec<f32>,
    classifier_bias: Vec<f32>,
}

impl Int8Model {
    fn load(weights: &Weights, config: &Config, head: bool) -> anyhow::Result<Self> {
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let words = weights.rows("embeddings.word_embeddings.weight")?;
        ensure!(
            words.dim() == h,
            "word embeddings are {} wide, the model {h}",
            words.dim()
        );
        let score_scale = 1.0 / ((h / config.num_attention_heads) as f32).sqrt();
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                let [query, key, value] = qkv_prefixes(i);
                // Q, K and V share their input, hence one smoothing, stored with each.
                let qkv_scale = weights.input_scale(&query)?;
                ensure!(
                    weights.input_scale(&key)? == qkv_scale
                        && weights.input_scale(&value)? == qkv_scale,
                    "{p}: query, key and value are smoothed differently"
                );
                let (mut q, mut scales, mut bias) = (Vec::new(), Vec::new(), Vec::new());
                let mut outliers = OutlierRows {
                    rows: Vec::new(),
                    weight: Vec::new(),
                };
                for (part, (prefix, s)) in [(&query, score_scale), (&key, 1.0), (&value, 1.0)]
                    .into_iter()
                    .enumerate()
                {
                    let (wq, ws, _, _) = weights.int8_rows(prefix)?;
                    q.extend(wq);
                    scales.extend(ws.iter().map(|w| w * s));
                    let b = weights.values(&format!("{prefix}.bias"))?;
                    bias.extend(b.iter().map(|b| b * s));
                    if let Some(o) = weights.outliers(prefix)? {
                        outliers.rows.extend(o.rows.iter().map(|r| part * h + r));
                        outliers.weight.extend(o.weight.iter().map(|w| w * s));
                    }
                }
                // Per-token symmetric int8 activations cost too much accuracy on the inputs of
                // Q/K/V, the first feed-forward layer (both LayerNorm outputs, with outlier
                // channels) and the second (GELU outputs). The first two are smoothed at
                // quantize time (an artifact without smoothing, only seen while calibrating,
                // runs them two-pass); the second is quantized asymmetrically. All-MiniLM-L6-v2
                // vs F32, mean / min cosine over the test sentences: all one-pass symmetric
                // 0.9965 / 0.973; two-pass 0.9993 / 0.994 at 1.9x the int8 work; smoothed with
                // FFN-down two-pass 0.99913 / 0.99517; smoothed with FFN-down asymmetric
                // (one pass everywhere) 0.9990 / 0.994.
                let smoothed_or_two_pass = |scale: Option<Vec<f32>>| {
                    scale.map_or(Activations::TwoPass, Activations::Smoothed)
                };
                let qkv = Int8Linear::new(
                    &q,
                    &scales,
                    (3 * h, h),
                    bias,
                    smoothed_or_two_pass(qkv_scale),
                )
                .with_context(|| format!("{p}: fused QKV"))?
                .with_outliers((!outliers.rows.is_empty()).then_some(outliers));
                let up = format!("{p}.intermediate.dense");
                let intermediate =
                    weights.int8_linear(&up, smoothed_or_two_pass(weights.input_scale(&up)?))?;

                Ok(Int8Layer {
                    qkv,
                    attention_out: weights.int8_linear(
                        &format!("{p}.attention.output.dense"),
                        Activations::PerToken,
                    )?,
                    attention_norm: Norm::load(
                        weights,
                        &format!("{p}.attention.output.LayerNorm"),
                        eps,
                    )?,
                    intermediate,
                    output: weights
                        .int8_linear(&format!("{p}.output.dense"), Activations::Asymmetric)?,
                    output_norm: Norm::load(weights, &format!("{p}.output.LayerNorm"), eps)?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let head = if head {
            Some(Int8Head {
                pooler: weights.values("pooler.dense.weight")?,
                pooler_bias: weights.values("pooler.dense.bias")?,
                classifier: weights.values("classifier.weight")?,
                classifier_bias: weights.values("classifier.bias")?,
            })
        } else {
            None
        };
        Ok(Self {
            words,
            positions: weights.values("embeddings.position_embeddings.weight")?,
            token_types: if config.type_vocab_size > 0 {
                weights.values("embeddings.token_type_embeddings.weight")?
            } else {
                Vec::new()
            },
            norm: Norm::load(weights, "embeddings.LayerNorm", eps)?,
            layers,
            head,
        })
    }

    /// The last hidden state, `[tokens, hidden]` row-major. With `observed`, also raises it
    /// to the largest |input| per channel of each group of [`smoothed_linears`].
    fn forward(
        &self,
        config: &Config,
        inputs: &Inputs,
        observed: Option<&mut [Vec<f32>]>,
    ) -> anyhow::Result<Vec<f32>> {
        let (h, ff) = (config.hidden_size, config.intermediate_size);
        let tokens = inputs.ids.len();
        let mut x = Vec::with_capacity(tokens * h);
        self.words.gather(inputs.ids, &mut x)?;
        let positions = inputs.positions(config.position_offset);
        for (t, (row, pos)) in x.chunks_exact_mut(h).zip(positions).enumerate() {
            let p = &self.positions[pos * h..(pos + 1) * h];
            if self.token_types.is_empty() {
                row.iter_mut().zip(p).for_each(|(v, p)| *v += p);
                continue;
            }
            let ty = inputs.type_ids.map_or(0, |types| types[t] as usize);
            let t = &self.token_types[ty * h..(ty + 1) * h];
            for ((v, p), t) in row.iter_mut().zip(p).zip(t) {
                *v = (*v + p) + t;
            }
        }
        self.norm.apply(&mut x);
        WORKSPACE.with_borrow_mut(|work| {
            // Every buffer is written in full before it is read: sized, never cleared.
            work.qkv.resize(tokens * 3 * h, 0.0);
            work.context.resize(tokens * h, 0.0);
            work.y.resize(tokens * h, 0.0);
            work.inter.resize(FEED_FORWARD_CHUNK.min(tokens) * ff, 0.0);
            self.layers_forward(config, inputs, &mut x, work, observed);
        });
        Ok(x)
    }

    /// The encoder layers over the embedded tokens `x`, in place.
    fn layers_forward(
        &self,
        config: &Config,
        inputs: &Inputs,
        x: &mut [f32],
        work: &mut Workspace,
        mut observed: Option<&mut [Vec<f32>]>,
    ) {
        let (h, ff) = (config.hidden_size, config.intermediate_size);
        let tokens = inputs.ids.len();
        let Workspace {
            qkv,
            context,
            y,
            inter,
        } = work;
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(max) = observed.as_deref_mut() {
                raise_to_abs_max(&mut max[2 * i], x);
            }
            layer.qkv.forward(x, tokens, Activation::None, qkv);
            attention(
                qkv,
                inputs.lens,
                config.num_attention_heads,
                h,
                inputs.relative_bias,
                context,
            );
            layer
                .attention_out
                .forward(context, tokens, Activation::None, y);
            y.iter_mut().zip(x.iter()).for_each(|(y, x)| *y += x);
            layer.attention_norm.apply(y);
            // Feed-forward in chunks of tokens, bounding the 4x-wide intermediate buffer.
            for start in (0..tokens).step_by(FEED_FORWARD_CHUNK) {
                let n = FEED_FORWARD_CHUNK.min(tokens - start);
                let rows = &y[start * h..(start + n) * h];
                let inter = &mut inter[..n * ff];
                if let Some(max) = observed.as_deref_mut() {
                    raise_to_abs_max(&mut max[2 * i + 1], rows);
                }
                layer.intermediate.forward(rows, n, Activation::Gelu, inter);
                let out = &mut x[start * h..(start + n) * h];
                layer.output.forward(inter, n, Activation::None, out);
                out.iter_mut().zip(rows).for_each(|(o, r)| *o += r);
                layer.output_norm.apply(out);
            }
        }
    }

    fn score(&self, hidden: &[f32], h: usize, lens: &[usize]) -> anyhow::Result<Vec<Vec<f32>>> {
        let head = self
            .head
            .as_ref()
            .context("this model has no classification head")?;
        // rows of `weight` [out, h] times `x` [h], plus `bias`.
        let affine = |weight: &[f32], bias: &[f32], x: &[f32]| -> Vec<f32> {
            weight
                .chunks_exact(h)
                .zip(bias)
                .map(|(w, b)| x.iter().zip(w).map(|(x, w)| x * w).sum::<f32>() + b)
                .collect()
        };
        let mut start = 0;
        Ok(lens
            .iter()
            .map(|&len| {
                let cls = &hidden[start * h..(start + 1) * h];
                start += len;
                let pooled: Vec<f32> = affine(&head.pooler, &head.pooler_bias, cls)
                    .iter()
                    .map(|x| x.tanh())
                    .collect();
                affine(&head.classifier, &head.classifier_bias, &pooled)
            })
            .collect())
    }
}

/// The linear layers of an int8 artifact whose inputs are smoothed, grouped by the input they
/// share: per encoder layer, Q/K/V (the input of attention), then the first feed-forward layer.
pub fn smoothed_linears(config: &Config) -> Vec<Vec<String>> {
    (0..config.num_hidden_layers)
        .flat_map(|i| {
            [
                qkv_prefixes(i).to_vec(),
                vec![format!("encoder.layer.{i}.intermediate.dense")],
            ]
        })
        .collect()
}

fn qkv_prefixes(layer: usize) -> [String; 3] {
    ["query", "key", "value"].map(|p| format!("encoder.layer.{layer}.attention.self.{p}"))
}

/// Self-attention of a packed batch: `qkv` is `[tokens, 3 * h]` (Q already scaled), `context`
/// gets `[tokens, h]`; `bias` is added to the scores (MPNet). One task per (input, head) on the
/// kernels' pool, each attending over its own input's tokens only with the kernels' fused
/// attention (scores, softmax and values by block of query rows, never the whole `len x len`
/// matrix): an input's result is computed the same way whatever else is in the batch.
fn attention(
    qkv: &[f32],
    lens: &[usize],
    heads: usize,
    h: usize,
    bias: Option<&RelativeBias>,
    context: &mut [f32],
) {
    let hd = h / heads;
    let stride = 3 * h;
    let starts: Vec<usize> = lens
        .iter()
        .scan(0, |s, &len| {
            let first = *s;
            *s += len;
            Some(first)
        })
        .collect();
    assert_eq!(
        qkv.len(),
        starts.last().map_or(0, |s| s + lens[lens.len() - 1]) * stride
    );
    assert_eq!(context.len() * 3, qkv.len());
    let out = SharedOut(context.as_mut_ptr());
    let path = KernelPath::active();
    ThreadPool::global().run(lens.len() * heads, &|task| {
        let (input, head) = (task / heads, task % heads);
        let (start, len) = (starts[input], lens[input]);
        let add_bias = bias
            .map(|bias| move |query: usize, scores: &mut [f32]| bias.add_row(head, query, scores));
        // SAFETY: Q, K and V of this input and head lie inside `qkv` (checked above: `len`
        // rows of `stride` from `start`, columns `head * hd..+hd` of each third); the output
        // block (rows `start..start + len`, columns `head * hd..+hd` of `context`) is this
        // task's alone.
        unsafe {
            let q = qkv.as_ptr().add(start * stride + head * hd);
            let io = HeadIo {
                q,
                k: q.add(h),
                v: q.add(2 * h),
                in_stride: stride,
                out: out.ptr().add(start * h + head * hd),
                out_stride: h,
                len,
                head_dim: hd,
            };
            attend_head_with(path, io, add_bias.as_ref().map(|f| f as RowBias));
        }
    });
}
