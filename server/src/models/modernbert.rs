//! ModernBERT (`ModernBertModel`, `ModernBertForSequenceClassification`), as in Hugging Face's
//! `modeling_modernbert`: pre-LayerNorm layers (the first without one before attention), no
//! biases by default, rotary position embeddings with one theta for global layers and another
//! for local ones, global attention every `global_attn_every_n_layers` layers (or as
//! `layer_types` lists) and attention within `local_attention / 2` tokens either side in the
//! others, a GeGLU feed-forward, a final LayerNorm. The classification head pools (`cls` or
//! `mean`), then dense, GELU, LayerNorm, classifier. Tensor names are Hugging Face's without
//! the `model.` prefix.
//!
//! One implementation over candle tensors serves every precision: int8 weights on the CPU run
//! their GEMMs on `qmodel-kernels` ([`Linear::Int8`]), the rest of the layer in candle.

use std::collections::HashMap;

use anyhow::{Context, bail, ensure};
use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::LayerNorm;
use serde::Deserialize;

use crate::artifact::Pooling;

use super::{
    Activations, Batch, Encoder, Linear, Role, RowTable, TensorSpec, Weights, raise_to_abs_max,
};

pub const ARCHITECTURE: &str = "modernbert";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub norm_eps: f64,
    /// Per layer: attends to every token (else within `local_attention / 2` either side).
    pub global_layers: Vec<bool>,
    pub local_attention: usize,
    pub global_rope_theta: f64,
    pub local_rope_theta: f64,
    pub norm_bias: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub classifier_bias: bool,
    /// What the classification head reads: the first token or the mean of all.
    pub classifier_pooling: Pooling,
}

/// `config.json` as transformers writes it, in both its forms: `global_attn_every_n_layers`
/// and `global_rope_theta` / `local_rope_theta` (the released checkpoints), or `layer_types`
/// and `rope_parameters` (transformers 5).
#[derive(Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "norm_eps")]
    norm_eps: f64,
    #[serde(default = "gelu")]
    hidden_activation: String,
    #[serde(default = "gelu")]
    classifier_activation: String,
    #[serde(default = "three")]
    global_attn_every_n_layers: usize,
    layer_types: Option<Vec<String>>,
    #[serde(default = "local_attention")]
    local_attention: usize,
    global_rope_theta: Option<f64>,
    local_rope_theta: Option<f64>,
    rope_parameters: Option<HashMap<String, RopeParameters>>,
    #[serde(default)]
    norm_bias: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    classifier_bias: bool,
    #[serde(default = "cls")]
    classifier_pooling: String,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    #[serde(default = "default_rope")]
    rope_type: String,
}

fn norm_eps() -> f64 {
    1e-5
}
fn gelu() -> String {
    "gelu".into()
}
fn three() -> usize {
    3
}
fn local_attention() -> usize {
    128
}
fn cls() -> String {
    "cls".into()
}
fn default_rope() -> String {
    "default".into()
}

const GLOBAL_THETA: f64 = 160_000.0;
const LOCAL_THETA: f64 = 10_000.0;

impl Config {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf(json: &serde_json::Value) -> anyhow::Result<Self> {
        let hf = HfConfig::deserialize(json)?;
        for (what, act) in [
            ("hidden_activation", &hf.hidden_activation),
            ("classifier_activation", &hf.classifier_activation),
        ] {
            ensure!(act == "gelu", "{what} {act:?} is not supported (only gelu)");
        }
        ensure!(
            hf.global_attn_every_n_layers > 0,
            "global_attn_every_n_layers must be positive"
        );
        let global_layers = match &hf.layer_types {
            Some(types) => types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(true),
                    "sliding_attention" => Ok(false),
                    other => bail!("layer type {other:?} is not supported"),
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
            None => (0..hf.num_hidden_layers)
                .map(|i| i % hf.global_attn_every_n_layers == 0)
                .collect(),
        };
        let theta = |kind: &str, legacy: Option<f64>, default: f64| -> anyhow::Result<f64> {
            match hf.rope_parameters.as_ref().and_then(|p| p.get(kind)) {
                Some(p) => {
                    ensure!(
                        p.rope_type == "default",
                        "rope_type {:?} is not supported (only default)",
                        p.rope_type
                    );
                    Ok(p.rope_theta.or(legacy).unwrap_or(default))
                }
                None => Ok(legacy.unwrap_or(default)),
            }
        };
        let global_rope_theta = theta("full_attention", hf.global_rope_theta, GLOBAL_THETA)?;
        let local_rope_theta = theta("sliding_attention", hf.local_rope_theta, LOCAL_THETA)?;
        let classifier_pooling = match hf.classifier_pooling.as_str() {
            "cls" => Pooling::Cls,
            "mean" => Pooling::Mean,
            other => bail!("classifier_pooling {other:?} is not supported (cls or mean)"),
        };
        Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            intermediate_size: hf.intermediate_size,
            max_position_embeddings: hf.max_position_embeddings,
            norm_eps: hf.norm_eps,
            global_layers,
            local_attention: hf.local_attention,
            global_rope_theta,
            local_rope_theta,
            norm_bias: hf.norm_bias,
            attention_bias: hf.attention_bias,
            mlp_bias: hf.mlp_bias,
            classifier_bias: hf.classifier_bias,
            classifier_pooling,
        }
        .validated()
    }

    fn validated(self) -> anyhow::Result<Self> {
        ensure!(
            self.num_attention_heads > 0
                && self.hidden_size.is_multiple_of(self.num_attention_heads)
                && (self.hidden_size / self.num_attention_heads).is_multiple_of(2),
            "hidden_size {} is not an even head width times num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        ensure!(
            self.global_layers.len() == self.num_hidden_layers,
            "{} layer types for {} layers",
            self.global_layers.len(),
            self.num_hidden_layers
        );
        Ok(self)
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn gguf_metadata(&self) -> Vec<(String, Value)> {
        let u32_of = |v: usize| Value::U32(v as u32);
        let key = |k: &str| format!("{ARCHITECTURE}.{k}");
        vec![
            (
                "general.architecture".into(),
                Value::String(ARCHITECTURE.into()),
            ),
            (key("vocab_size"), u32_of(self.vocab_size)),
            (key("embedding_length"), u32_of(self.hidden_size)),
            (key("block_count"), u32_of(self.num_hidden_layers)),
            (
                key("attention.head_count"),
                u32_of(self.num_attention_heads),
            ),
            (key("feed_forward_length"), u32_of(self.intermediate_size)),
            (key("context_length"), u32_of(self.max_position_embeddings)),
            (
                key("attention.layer_norm_epsilon"),
                Value::F64(self.norm_eps),
            ),
            (
                key("attention.global_layers"),
                Value::Array(self.global_layers.iter().map(|&g| Value::Bool(g)).collect()),
            ),
            (key("attention.local_window"), u32_of(self.local_attention)),
            (key("rope.global_theta"), Value::F64(self.global_rope_theta)),
            (key("rope.local_theta"), Value::F64(self.local_rope_theta)),
            (key("norm_bias"), Value::Bool(self.norm_bias)),
            (key("attention_bias"), Value::Bool(self.attention_bias)),
            (key("mlp_bias"), Value::Bool(self.mlp_bias)),
            (key("classifier_bias"), Value::Bool(self.classifier_bias)),
            (
                key("classifier_pooling"),
                Value::String(
                    match self.classifier_pooling {
                        Pooling::Cls => "cls",
                        Pooling::Mean => "mean",
                    }
                    .into(),
                ),
            ),
        ]
    }

    pub fn from_gguf(metadata: &HashMap<String, Value>) -> anyhow::Result<Self> {
        let get = |k: &str| {
            let key = format!("{ARCHITECTURE}.{k}");
            metadata
                .get(&key)
                .with_context(|| format!("GGUF metadata has no {key}"))
        };
        let usize_of = |k: &str| -> anyhow::Result<usize> { Ok(get(k)?.to_u32()? as usize) };
        let bool_of = |k: &str| -> anyhow::Result<bool> { Ok(get(k)?.to_bool()?) };
        let global_layers = get("attention.global_layers")?
            .to_vec()?
            .iter()
            .map(|v| Ok(v.to_bool()?))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let classifier_pooling = match get("classifier_pooling")?.to_string()?.as_str() {
            "cls" => Pooling::Cls,
            "mean" => Pooling::Mean,
            other => bail!("classifier pooling {other:?} is not supported"),
        };
        Self {
            vocab_size: usize_of("vocab_size")?,
            hidden_size: usize_of("embedding_length")?,
            num_hidden_layers: usize_of("block_count")?,
            num_attention_heads: usize_of("attention.head_count")?,
            intermediate_size: usize_of("feed_forward_length")?,
            max_position_embeddings: usize_of("context_length")?,
            norm_eps: get("attention.layer_norm_epsilon")?.to_f64()?,
            global_layers,
            local_attention: usize_of("attention.local_window")?,
            global_rope_theta: get("rope.global_theta")?.to_f64()?,
            local_rope_theta: get("rope.local_theta")?.to_f64()?,
            norm_bias: bool_of("norm_bias")?,
            attention_bias: bool_of("attention_bias")?,
            mlp_bias: bool_of("mlp_bias")?,
            classifier_bias: bool_of("classifier_bias")?,
            classifier_pooling,
        }
        .validated()
    }
}

/// Every tensor the model reads; `labels` > 0 adds the classification head.
pub fn tensors(config: &Config, labels: usize) -> Vec<TensorSpec> {
    let (h, ff) = (config.hidden_size, config.intermediate_size);
    let mut specs = Vec::new();
    let mut add = |name: String, role: Role, shape: &[usize], bias: bool| {
        specs.push(TensorSpec {
            name: format!("{name}.weight"),
            role,
            shape: shape.to_vec(),
        });
        if bias {
            specs.push(TensorSpec {
                name: format!("{name}.bias"),
                role: Role::Plain,
                shape: shape[..1].to_vec(),
            });
        }
    };
    let norm = config.norm_bias;
    add(
        "embeddings.tok_embeddings".into(),
        Role::Embedding,
        &[config.vocab_size, h],
        false,
    );
    add("embeddings.norm".into(), Role::Plain, &[h], norm);
    for i in 0..config.num_hidden_layers {
        let p = format!("layers.{i}");
        if i > 0 {
            add(format!("{p}.attn_norm"), Role::Plain, &[h], norm);
        }
        let attention = config.attention_bias;
        add(
            format!("{p}.attn.Wqkv"),
            Role::Linear,
            &[3 * h, h],
            attention,
        );
        add(format!("{p}.attn.Wo"), Role::Linear, &[h, h], attention);
        add(format!("{p}.mlp_norm"), Role::Plain, &[h], norm);
        add(
            format!("{p}.mlp.Wi"),
            Role::Linear,
            &[2 * ff, h],
            config.mlp_bias,
        );
        add(
            format!("{p}.mlp.Wo"),
            Role::Linear,
            &[h, ff],
            config.mlp_bias,
        );
    }
    add("final_norm".into(), Role::Plain, &[h], norm);
    if labels > 0 {
        add(
            "head.dense".into(),
            Role::Linear,
            &[h, h],
            config.classifier_bias,
        );
        add("head.norm".into(), Role::Plain, &[h], norm);
        // A few output rows: quantizing them saves nothing and costs the score precision.
        add("classifier".into(), Role::Plain, &[labels, h], true);
    }
    specs
}

/// The linear layers of an int8 artifact whose inputs (LayerNorm outputs) are smoothed, one
/// group each: per layer, the attention's fused QKV, then the GeGLU's input projection.
pub fn smoothed_linears(config: &Config) -> Vec<Vec<String>> {
    (0..config.num_hidden_layers)
        .flat_map(|i| {
            [
                vec![format!("layers.{i}.attn.Wqkv")],
                vec![format!("layers.{i}.mlp.Wi")],
            ]
        })
        .collect()
}

struct Layer {
    /// `None` in the first layer, whose input is the embeddings' LayerNorm output.
    attn_norm: Option<LayerNorm>,
    qkv: Linear,
    attn_out: Linear,
    mlp_norm: LayerNorm,
    mlp_in: Linear,
    mlp_out: Linear,
    global: bool,
}

struct Head {
    dense: Linear,
    norm: LayerNorm,
    classifier: Linear,
}

/// cos and sin of every position's rotation angles, `[positions, head_dim / 2]`.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(
        theta: f64,
        head_dim: usize,
        positions: usize,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        let angles: Vec<f32> = (0..positions)
            .flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f))
            .collect();
        let angles = Tensor::from_vec(angles, (positions, head_dim / 2), &Device::Cpu)?;
        let to = |t: Tensor| t.to_dtype(dtype)?.to_device(device);
        Ok(Self {
            cos: to(angles.cos()?)?,
            sin: to(angles.sin()?)?,
        })
    }
}

pub struct Model {
    config: Config,
    words: RowTable,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    head: Option<Head>,
    global_rotary: Rotary,
    local_rotary: Rotary,
    dtype: DType,
    device: Device,
}

/// Linear layer `prefix`: on the int8 kernels where the artifact is int8 and runs on the CPU
/// (smoothed inputs where it was calibrated, two passes while calibrating), else candle's.
fn linear(weights: &Weights, prefix: &str, smoothable: bool) -> anyhow::Result<Linear> {
    if !weights.int8_on_cpu(prefix) {
        return weights.linear(prefix);
    }
    let activations = match (smoothable, weights.input_scale(prefix)?) {
        (true, Some(scale)) => Activations::Smoothed(scale),
        (true, None) => Activations::TwoPass,
        (false, _) => Activations::PerToken,
    };
    Ok(Linear::Int8(weights.int8_linear(prefix, activations)?))
}

impl Model {
    /// `labels`: outputs of the classification head, 0 for none.
    pub fn load(weights: &Weights, labels: usize) -> anyhow::Result<Self> {
        let config = Config::from_gguf(weights.metadata())?;
        weights.check(&tensors(&config, labels))?;
        let eps = config.norm_eps;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("layers.{i}");
                Ok(Layer {
                    attn_norm: (i > 0)
                        .then(|| weights.layer_norm(&format!("{p}.attn_norm"), eps))
                        .transpose()?,
                    qkv: linear(weights, &format!("{p}.attn.Wqkv"), true)?,
                    attn_out: linear(weights, &format!("{p}.attn.Wo"), false)?,
                    mlp_norm: weights.layer_norm(&format!("{p}.mlp_norm"), eps)?,
                    mlp_in: linear(weights, &format!("{p}.mlp.Wi"), true)?,
                    mlp_out: linear(weights, &format!("{p}.mlp.Wo"), false)?,
                    global: config.global_layers[i],
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let head = (labels > 0)
            .then(|| -> anyhow::Result<Head> {
                Ok(Head {
                    dense: linear(weights, "head.dense", false)?,
                    norm: weights.layer_norm("head.norm", eps)?,
                    classifier: weights.linear("classifier")?,
                })
            })
            .transpose()?;
        let (dtype, device) = (weights.compute_dtype(), weights.device().clone());
        let rotary = |theta| {
            Rotary::new(
                theta,
                config.head_dim(),
                config.max_position_embeddings,
                dtype,
                &device,
            )
        };
        Ok(Self {
            words: weights.rows("embeddings.tok_embeddings.weight")?,
            embed_norm: weights.layer_norm("embeddings.norm", eps)?,
            layers,
            final_norm: weights.layer_norm("final_norm", eps)?,
            head,
            global_rotary: rotary(config.global_rope_theta)?,
            local_rotary: rotary(config.local_rope_theta)?,
            dtype,
            device,
            config,
        })
    }

    /// The last hidden state; with `observed`, also raises it to the largest |input| per
    /// channel of each group of [`smoothed_linears`].
    fn run(&self, batch: &Batch, mut observed: Option<&mut [Vec<f32>]>) -> anyhow::Result<Tensor> {
        batch.check(self.config.max_position_embeddings)?;
        let h = self.config.hidden_size;
        let mut words = Vec::new();
        self.words.gather(batch.ids, &mut words)?;
        let words = Tensor::from_vec(words, (batch.ids.len(), h), &self.device)?;
        let mut xs = self.embed_norm.forward(&words.to_dtype(self.dtype)?)?;
        let mut observe = |group: usize, t: &Tensor| -> anyhow::Result<()> {
            if let Some(max) = observed.as_deref_mut() {
                let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                raise_to_abs_max(&mut max[group], &values);
            }
            Ok(())
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let normed = match &layer.attn_norm {
                Some(norm) => norm.forward(&xs)?,
                None => xs.clone(),
            };
            observe(2 * i, &normed)?;
            let context = self.attention(layer, &layer.qkv.forward(&normed)?, batch.lens)?;
            xs = (xs + layer.attn_out.forward(&context)?)?;
            let normed = layer.mlp_norm.forward(&xs)?;
            observe(2 * i + 1, &normed)?;
            let ff = self.config.intermediate_size;
            let projected = layer.mlp_in.forward(&normed)?;
            let gated = (projected.narrow(1, 0, ff)?.gelu_erf()? * projected.narrow(1, ff, ff)?)?;
            xs = (xs + layer.mlp_out.forward(&gated)?)?;
        }
        Ok(self.final_norm.forward(&xs)?)
    }

    /// Self-attention of a packed batch, per input over its own tokens: `qkv` is `[tokens, 3 *
    /// hidden]` (Q, K, V, each `heads x head_dim`), the result `[tokens, hidden]`.
    fn attention(&self, layer: &Layer, qkv: &Tensor, lens: &[usize]) -> anyhow::Result<Tensor> {
        let (h, heads) = (self.config.hidden_size, self.config.num_attention_heads);
        let hd = self.config.head_dim();
        let rotary = if layer.global {
            &self.global_rotary
        } else {
            &self.local_rotary
        };
        let mut contexts = Vec::with_capacity(lens.len());
        let mut start = 0;
        for &len in lens {
            // [len, h] -> [1, heads, len, hd]
            let split = |part: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(0, start, len)?
                    .narrow(1, part * h, h)?
                    .reshape((len, heads, hd))?
                    .transpose(0, 1)?
                    .unsqueeze(0)?
                    .contiguous()
            };
            let (cos, sin) = (rotary.cos.narrow(0, 0, len)?, rotary.sin.narrow(0, 0, len)?);
            let q = candle_nn::rotary_emb::rope(&split(0)?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&split(1)?, &cos, &sin)?;
            let mut scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
            if !layer.global && len > self.config.local_attention / 2 + 1 {
                scores = scores.broadcast_add(&self.window_mask(len)?)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let context = probs
                .matmul(&split(2)?)?
                .squeeze(0)?
                .transpose(0, 1)?
                .reshape((len, h))?;
            contexts.push(context);
            start += len;
        }
        Ok(Tensor::cat(&contexts, 0)?)
    }

    /// `[len, len]`: 0 where the key is within `local_attention / 2` tokens of the query,
    /// -inf elsewhere.
    fn window_mask(&self, len: usize) -> anyhow::Result<Tensor> {
        let half = self.config.local_attention / 2;
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| {
                (0..len).map(move |j| {
                    if i.abs_diff(j) <= half {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        Ok(Tensor::from_vec(mask, (len, len), &self.device)?.to_dtype(self.dtype)?)
    }
}

impl Encoder for Model {
    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn max_tokens(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn forward(&self, batch: &Batch) -> anyhow::Result<Tensor> {
        self.run(batch, None)
    }

    /// classifier(LayerNorm(GELU(dense(pooled)))), pooled as `classifier_pooling` says.
    fn score(&self, hidden: &Tensor, lens: &[usize]) -> anyhow::Result<Vec<Vec<f32>>> {
        let head = self
            .head
            .as_ref()
            .context("this model has no classification head")?;
        let mut pooled = Vec::with_capacity(lens.len());
        let mut start = 0;
        for &len in lens {
            pooled.push(match self.config.classifier_pooling {
                Pooling::Cls => hidden.narrow(0, start, 1)?,
                Pooling::Mean => hidden.narrow(0, start, len)?.mean_keepdim(0)?,
            });
            start += len;
        }
        let pooled = Tensor::cat(&pooled, 0)?;
        let features = head
            .norm
            .forward(&head.dense.forward(&pooled)?.gelu_erf()?)?;
        let logits = head.classifier.forward(&features)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec2()?)
    }

    fn observe_activations(&self, batch: &Batch, max: &mut [Vec<f32>]) -> anyhow::Result<()> {
        let groups = smoothed_linears(&self.config).len();
        ensure!(
            max.len() == groups && max.iter().all(|m| m.len() == self.config.hidden_size),
            "expected {groups} maxima of {} channels",
            self.config.hidden_size
        );
        ensure!(
            matches!(self.layers[0].qkv, Linear::Int8(_)),
            "activations are observed on int8 weights on the CPU only"
        );
        self.run(batch, Some(max))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hf_config() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["ModernBertModel"], "model_type": "modernbert",
            "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "intermediate_size": 96,
            "max_position_embeddings": 512, "global_attn_every_n_layers": 3,
            "local_attention": 16, "global_rope_theta": 160000.0, "local_rope_theta": 10000.0
        })
    }

    #[test]
    fn layer_pattern_and_theta_from_either_config_form() {
        let legacy = Config::from_hf(&hf_config()).unwrap();
        assert_eq!(legacy.global_layers, [true, false, false, true]);
        assert_eq!(
            (legacy.global_rope_theta, legacy.local_rope_theta),
            (160000.0, 10000.0)
        );
        let mut json = hf_config();
        json["layer_types"] = serde_json::json!([
            "full_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention"
        ]);
        json["rope_parameters"] = serde_json::json!({
            "full_attention": {"rope_type": "default", "rope_theta": 80000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0}
        });
        let new = Config::from_hf(&json).unwrap();
        assert_eq!(new.global_layers, [true, false, true, false]);
        assert_eq!(
            (new.global_rope_theta, new.local_rope_theta),
            (80000.0, 5000.0)
        );
        // Round trip through the GGUF metadata.
        let metadata: HashMap<String, Value> = new.gguf_metadata().into_iter().collect();
        assert_eq!(Config::from_gguf(&metadata).unwrap(), new);
    }

    #[test]
    fn unsupported_settings_are_named() {
        let mut json = hf_config();
        json["hidden_activation"] = "silu".into();
        let err = Config::from_hf(&json).unwrap_err().to_string();
        assert!(err.contains("hidden_activation \"silu\""), "{err}");
        let mut json = hf_config();
        json["classifier_pooling"] = "max".into();
        let err = Config::from_hf(&json).unwrap_err().to_string();
        assert!(err.contains("classifier_pooling \"max\""), "{err}");
    }
}
