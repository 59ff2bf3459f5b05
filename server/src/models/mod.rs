//! Model families, one file each (after candle-transformers): plain structs and functions over
//! candle tensors. This module holds what they share: the [`Family`] a checkpoint belongs to,
//! the [`Encoder`] interface every model implements, reading weights from a GGUF file, the
//! swappable [`Linear`] layer and the int8 one, embedding-row lookup straight from the quantized
//! bytes of the memory-mapped file, and pooling.
//!
//! BERT, XLM-RoBERTa (and RoBERTa, CamemBERT) and MPNet are the same post-LayerNorm encoder
//! ([`bert`]) with different position ids, token types and, for MPNet, a relative-position
//! attention bias; their files say how their checkpoints map onto it. ModernBERT (pre-norm,
//! rotary, GeGLU, local attention) is its own encoder.

pub mod bert;
pub mod modernbert;
pub mod mpnet;
pub mod xlm_roberta;

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail, ensure};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};
use memmap2::Mmap;
use qmodel_kernels::{
    Activation, Exec, InputQuant, QuantizedWeight, gelu_inplace_with, linear_quant_with,
    linear_with, matmul_nt_with, quantize_rows_i8,
};

use crate::artifact::{Pooling, Precision};

/// The model families `quantize` reads, decided by `config.json`'s `architectures` (else its
/// `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Bert,
    XlmRoberta,
    MPNet,
    ModernBert,
}

/// `config.json` `architectures` entries and the family each belongs to.
const ARCHITECTURES: &[(&str, Family)] = &[
    ("BertModel", Family::Bert),
    ("BertForMaskedLM", Family::Bert),
    ("BertForSequenceClassification", Family::Bert),
    ("XLMRobertaModel", Family::XlmRoberta),
    ("XLMRobertaForMaskedLM", Family::XlmRoberta),
    ("XLMRobertaForSequenceClassification", Family::XlmRoberta),
    ("RobertaModel", Family::XlmRoberta),
    ("RobertaForMaskedLM", Family::XlmRoberta),
    ("RobertaForSequenceClassification", Family::XlmRoberta),
    ("CamembertModel", Family::XlmRoberta),
    ("CamembertForMaskedLM", Family::XlmRoberta),
    ("CamembertForSequenceClassification", Family::XlmRoberta),
    ("MPNetModel", Family::MPNet),
    ("MPNetForMaskedLM", Family::MPNet),
    ("MPNetForSequenceClassification", Family::MPNet),
    ("ModernBertModel", Family::ModernBert),
    ("ModernBertForMaskedLM", Family::ModernBert),
    ("ModernBertForSequenceClassification", Family::ModernBert),
];

/// `config.json` `model_type` values, for checkpoints without `architectures`.
const MODEL_TYPES: &[(&str, Family)] = &[
    ("bert", Family::Bert),
    ("xlm-roberta", Family::XlmRoberta),
    ("roberta", Family::XlmRoberta),
    ("camembert", Family::XlmRoberta),
    ("mpnet", Family::MPNet),
    ("modernbert", Family::ModernBert),
];

impl Family {
    /// The family of a Hugging Face `config.json`, or an error naming what is supported.
    pub fn of(config: &serde_json::Value) -> anyhow::Result<Self> {
        let architectures: Vec<&str> = config["architectures"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .collect();
        let model_type = config["model_type"].as_str();
        let found = match architectures.first() {
            Some(arch) => ARCHITECTURES.iter().find(|(a, _)| a == arch),
            None => model_type.and_then(|t| MODEL_TYPES.iter().find(|(m, _)| *m == t)),
        };
        match found {
            Some(&(_, family)) => Ok(family),
            None => {
                let supported: Vec<&str> = ARCHITECTURES.iter().map(|(a, _)| *a).collect();
                bail!(
                    "architecture {} (model_type {}) is not supported; supported: {}",
                    architectures
                        .first()
                        .map_or("(none)".into(), |a| format!("{a:?}")),
                    model_type.map_or("(none)".into(), |t| format!("{t:?}")),
                    supported.join(", ")
                )
            }
        }
    }

    /// The manifest's `architecture`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bert => "bert",
            Self::XlmRoberta => "xlm-roberta",
            Self::MPNet => "mpnet",
            Self::ModernBert => "modernbert",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Bert, Self::XlmRoberta, Self::MPNet, Self::ModernBert]
            .into_iter()
            .find(|f| f.name() == name)
    }

    /// The checkpoint's tensor `name` under the artifact's name. The encoder of a task model
    /// sits under a prefix ([`Self::is_prefixed`]); a bare name and a prefixed one may both
    /// exist, and `quantize` takes the prefixed one.
    pub fn artifact_name(self, name: &str) -> String {
        match self {
            Self::Bert | Self::ModernBert => {
                name.strip_prefix(self.prefix()).unwrap_or(name).to_owned()
            }
            Self::XlmRoberta => xlm_roberta::artifact_name(name),
            Self::MPNet => mpnet::artifact_name(name),
        }
    }

    /// The artifact's first linear weight, whose storage tells the artifact's precision.
    pub fn first_linear_weight(self) -> &'static str {
        match self {
            Self::Bert | Self::XlmRoberta | Self::MPNet => {
                "encoder.layer.0.attention.self.query.weight"
            }
            Self::ModernBert => "layers.0.attn.Wqkv.weight",
        }
    }

    /// Where a task model (`...ForSequenceClassification`, `...ForMaskedLM`) keeps the encoder.
    fn prefix(self) -> &'static str {
        match self {
            Self::Bert => "bert.",
            Self::XlmRoberta => xlm_roberta::PREFIX,
            Self::MPNet => mpnet::PREFIX,
            Self::ModernBert => "model.",
        }
    }

    /// Whether a checkpoint name is under the task model's encoder prefix.
    pub fn is_prefixed(self, name: &str) -> bool {
        name.starts_with(self.prefix())
    }
}

/// An architecture's configuration, as `quantize` reads it from `config.json` and the server
/// from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub enum Config {
    /// BERT, XLM-RoBERTa, MPNet: the post-LayerNorm encoder of [`bert`].
    Bert(bert::Config),
    ModernBert(modernbert::Config),
}

impl Config {
    pub fn from_hf(family: Family, json: &serde_json::Value) -> anyhow::Result<Self> {
        Ok(match family {
            Family::Bert => Self::Bert(bert::Config::from_hf(json)?),
            Family::XlmRoberta => Self::Bert(xlm_roberta::config_from_hf(json)?),
            Family::MPNet => Self::Bert(mpnet::config_from_hf(json)?),
            Family::ModernBert => Self::ModernBert(modernbert::Config::from_hf(json)?),
        })
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Bert(c) => c.hidden_size,
            Self::ModernBert(c) => c.hidden_size,
        }
    }

    /// The longest input the model's positions allow.
    pub fn max_tokens(&self) -> usize {
        match self {
            Self::Bert(c) => c.max_tokens(),
            Self::ModernBert(c) => c.max_position_embeddings,
        }
    }

    /// Every tensor the artifact holds; `labels` > 0 adds the classification head.
    pub fn tensors(&self, labels: usize) -> Vec<TensorSpec> {
        match self {
            Self::Bert(c) => bert::tensors(c, labels),
            Self::ModernBert(c) => modernbert::tensors(c, labels),
        }
    }

    /// The linear layers of an int8 artifact whose inputs are smoothed, grouped by the input
    /// they share.
    pub fn smoothed_linears(&self) -> Vec<Vec<String>> {
        match self {
            Self::Bert(c) => bert::smoothed_linears(c),
            Self::ModernBert(c) => modernbert::smoothed_linears(c),
        }
    }

    pub fn gguf_metadata(&self) -> Vec<(String, gguf_file::Value)> {
        match self {
            Self::Bert(c) => c.gguf_metadata(),
            Self::ModernBert(c) => c.gguf_metadata(),
        }
    }
}

/// One tensor a model reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub role: Role,
    pub shape: Vec<usize>,
}

/// A batch packed without padding: the inputs' tokens back to back, `lens[i]` of them for
/// input `i`. Attention runs per input over its own tokens, so an input's result is computed
/// by exactly the same operations whatever else shares its batch (padded attention differs in
/// the last bits, and quantizing activations turns those bits into visible differences).
pub struct Batch<'a> {
    pub ids: &'a [u32],
    pub type_ids: &'a [u32],
    pub lens: &'a [usize],
}

impl Batch<'_> {
    /// Checks the batch against the model's limits: lengths agree, no input is longer than
    /// `max_tokens`.
    pub fn check(&self, max_tokens: usize) -> anyhow::Result<()> {
        let tokens = self.ids.len();
        ensure!(
            self.type_ids.len() == tokens && self.lens.iter().sum::<usize>() == tokens,
            "inconsistent batch: {tokens} ids, {} type ids, lengths summing to {}",
            self.type_ids.len(),
            self.lens.iter().sum::<usize>()
        );
        let max_len = self.lens.iter().copied().max().unwrap_or(0);
        ensure!(
            max_len <= max_tokens,
            "{max_len} tokens exceed the model's {max_tokens} positions"
        );
        Ok(())
    }
}

/// What the serving side needs of a model, whatever its family.
pub trait Encoder: Send + Sync {
    fn hidden_size(&self) -> usize;

    /// The longest input the model's positions allow.
    fn max_tokens(&self) -> usize;

    /// The last hidden state of every token, `[tokens, hidden]` in the compute dtype.
    fn forward(&self, batch: &Batch) -> anyhow::Result<Tensor>;

    /// The classifier's logits (one per label) of each input, from the last hidden state of a
    /// batch with these input lengths.
    fn score(&self, hidden: &Tensor, lens: &[usize]) -> anyhow::Result<Vec<Vec<f32>>>;

    /// Raises `max` (one vector per group of [`Config::smoothed_linears`]) to the largest
    /// |input| per channel that `batch` brings to those layers: the calibration of smoothing,
    /// run on an unsmoothed int8 model.
    fn observe_activations(&self, batch: &Batch, max: &mut [Vec<f32>]) -> anyhow::Result<()>;
}

/// The model in `weights`, by its GGUF `general.architecture`; `labels`: outputs of the
/// classification head, 0 for none.
pub fn load(weights: &Weights, labels: usize) -> anyhow::Result<Box<dyn Encoder>> {
    let arch = weights
        .metadata()
        .get("general.architecture")
        .context("GGUF metadata has no general.architecture")?
        .to_string()?
        .clone();
    Ok(match arch.as_str() {
        bert::ARCHITECTURE => Box::new(bert::Model::load(weights, labels)?),
        modernbert::ARCHITECTURE => Box::new(modernbert::Model::load(weights, labels)?),
        other => bail!(
            "GGUF architecture {other:?} is not supported ({:?} or {:?})",
            bert::ARCHITECTURE,
            modernbert::ARCHITECTURE
        ),
    })
}

/// Raises each of `max`'s channels to the largest |value| that channel takes in `rows`.
pub fn raise_to_abs_max(max: &mut [f32], rows: &[f32]) {
    for row in rows.chunks_exact(max.len()) {
        max.iter_mut()
            .zip(row)
            .for_each(|(m, x)| *m = m.max(x.abs()));
    }
}

/// What a tensor is for, which decides how the artifact stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The token embedding table: large, and only a few rows are read per input.
    Embedding,
    /// The `[out, in]` weight of a linear layer.
    Linear,
    /// Biases, LayerNorm parameters, position tables, tiny heads: kept F32.
    Plain,
}

/// The GGUF storage type of a tensor of `role` in an artifact of `precision`.
pub fn storage_dtype(role: Role, precision: Precision) -> GgmlDType {
    match (role, precision) {
        (Role::Plain, _) | (_, Precision::F32) => GgmlDType::F32,
        (_, Precision::F16) => GgmlDType::F16,
        // Q4_0 embeddings cost more accuracy than they save: the table is read, not multiplied.
        (Role::Embedding, Precision::Int8 | Precision::Int4) => GgmlDType::Q8_0,
        (Role::Linear, Precision::Int8) => GgmlDType::Q8_0,
        (Role::Linear, Precision::Int4) => GgmlDType::Q4_0,
    }
}

/// `tensor` in the storage of a `role` tensor at `precision` ([`storage_dtype`]). Int8 linear
/// weights are per-row Q8_0 ([`per_row_q8_0`]); everything else is candle's quantization.
pub fn quantize_tensor(
    tensor: &Tensor,
    role: Role,
    precision: Precision,
) -> candle_core::Result<QTensor> {
    let dtype = storage_dtype(role, precision);
    if role == Role::Linear && precision == Precision::Int8 {
        let (rows, cols) = tensor.dims2()?;
        let values: Vec<f32> = tensor.flatten_all()?.to_vec1()?;
        let bytes = per_row_q8_0(&values, rows, cols);
        return candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &bytes,
            vec![rows, cols],
            &Device::Cpu,
        );
    }
    QTensor::quantize(tensor, dtype)
}

/// Suffix of the tensor holding a smoothed linear layer's input scale.
pub const INPUT_SCALE: &str = "input_scale";
/// Suffixes of an int8 layer's outlier rows: their indices, and their F32 weights.
pub const OUTLIER_ROWS: &str = "outlier_rows";
pub const OUTLIER_WEIGHT: &str = "outlier_weight";

/// A row whose largest |weight| is over this many times the median row's is an outlier row.
/// all-mpnet-base-v2 INT8 vs F32, mean / min cosine over the test sentences: no outlier rows
/// 0.99778 / 0.9849; factor 4 0.99879 / 0.9864; 2.5 0.99892 / 0.9956; 1.8 0.99891 / 0.9919.
const OUTLIER_FACTOR: f32 = 2.5;

/// The outlier rows of a `[rows, cols]` int8-bound weight, largest first, at most `rows / 32`:
/// one large weight sets its row's int8 step, so a row far above the others loses most of its
/// precision (all-mpnet-base-v2 has a few such rows in every feed-forward output layer, the
/// residual stream's outlier channels; quantized, they cost up to 0.015 of cosine).
/// Those rows are served in F32 instead ([`OutlierRows`]).
pub fn outlier_rows(w: &[f32], rows: usize, cols: usize) -> Vec<usize> {
    let row_max: Vec<f32> = w
        .chunks_exact(cols.max(1))
        .map(|row| row.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect();
    let mut sorted = row_max.clone();
    sorted.sort_by(f32::total_cmp);
    let median = sorted.get(rows / 2).copied().unwrap_or(0.0);
    let mut outliers: Vec<usize> = (0..rows)
        .filter(|&r| row_max[r] > OUTLIER_FACTOR * median)
        .collect();
    outliers.sort_by(|&a, &b| row_max[b].total_cmp(&row_max[a]));
    outliers.truncate(rows / 32);
    outliers
}

const Q8_0_BLOCK: usize = 32;
const Q8_0_BYTES: usize = 34;

/// Q8_0 blocks of a `[rows, cols]` matrix (`cols` a multiple of 32) in which every block of a
/// row carries the row's scale `d` = `max|w| / 127` rounded up to an f16, and `q = round(w /
/// d)` (ties to even) in [-127, 127]: per-output-channel int8 that any GGUF reader decodes.
pub fn per_row_q8_0(w: &[f32], rows: usize, cols: usize) -> Vec<u8> {
    assert_eq!(w.len(), rows * cols);
    assert!(cols.is_multiple_of(Q8_0_BLOCK));
    let mut out = Vec::with_capacity(rows * cols / Q8_0_BLOCK * Q8_0_BYTES);
    for row in w.chunks_exact(cols.max(1)) {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut d = half::f16::from_f32(max / 127.0);
        if d.to_f32() < max / 127.0 {
            d = half::f16::from_bits(d.to_bits() + 1);
        }
        let df = d.to_f32();
        let inv = if df > 0.0 { 1.0 / df } else { 0.0 };
        for block in row.chunks_exact(Q8_0_BLOCK) {
            out.extend_from_slice(&d.to_le_bytes());
            out.extend(
                block
                    .iter()
                    .map(|&v| (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8 as u8),
            );
        }
    }
    out
}

/// The inverse of [`per_row_q8_0`]: `(q [rows, cols], scales [rows])`, or `None` when a row's
/// blocks do not share one scale or a value is -128 (plain Q8_0, not written by this format).
pub fn decode_per_row_q8_0(bytes: &[u8], rows: usize, cols: usize) -> Option<(Vec<i8>, Vec<f32>)> {
    let blocks = cols / Q8_0_BLOCK;
    if !cols.is_multiple_of(Q8_0_BLOCK) || bytes.len() != rows * blocks * Q8_0_BYTES {
        return None;
    }
    let mut q = Vec::with_capacity(rows * cols);
    let mut scales = Vec::with_capacity(rows);
    for row in bytes.chunks_exact((blocks * Q8_0_BYTES).max(1)) {
        let d = &row[..2];
        for block in row.chunks_exact(Q8_0_BYTES) {
            if &block[..2] != d {
                return None;
            }
            q.extend(block[2..].iter().map(|&b| b as i8));
        }
        scales.push(half::f16::from_le_bytes([d[0], d[1]]).to_f32());
    }
    (!q.contains(&i8::MIN)).then_some((q, scales))
}

/// A GGUF file and the device its tensors are loaded onto. Dense and linear tensors are read
/// into memory once; the embedding table is served from a memory map of the file.
pub struct Weights {
    path: PathBuf,
    /// Tensors are read through the file rather than the map so that their pages are not
    /// also counted in the process's resident memory after being copied.
    file: std::fs::File,
    mmap: Arc<Mmap>,
    content: gguf_file::Content,
    device: Device,
}

impl Weights {
    pub fn open(path: &Path, device: Device) -> anyhow::Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: the artifact is read-only once written (an image layer); a file changed
        // under the map is outside what the server promises.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot map", path.display()))?;
        let content = gguf_file::Content::read(&mut Cursor::new(&mmap[..]))
            .map_err(|e| anyhow::anyhow!("{}: not a valid GGUF file: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            mmap: Arc::new(mmap),
            content,
            device,
        })
    }

    pub fn metadata(&self) -> &HashMap<String, gguf_file::Value> {
        &self.content.metadata
    }

    /// The dtype activations are computed in: F32 on CPU, F16 on a GPU.
    pub fn compute_dtype(&self) -> DType {
        if self.device.is_cpu() {
            DType::F32
        } else {
            DType::F16
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Checks that every tensor of `specs` is present with its shape, so that a malformed
    /// file fails here, naming the tensor, rather than in the middle of a request.
    pub fn check(&self, specs: &[TensorSpec]) -> anyhow::Result<()> {
        for spec in specs {
            let info = self
                .content
                .tensor_infos
                .get(&spec.name)
                .with_context(|| format!("{}: no tensor {}", self.path.display(), spec.name))?;
            ensure!(
                info.shape.dims() == spec.shape,
                "{}: tensor {} has shape {:?}, the model needs {:?}",
                self.path.display(),
                spec.name,
                info.shape.dims(),
                spec.shape
            );
        }
        Ok(())
    }

    fn qtensor(&self, name: &str) -> anyhow::Result<QTensor> {
        self.content
            .tensor(&mut &self.file, name, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: tensor {name}: {e}", self.path.display()))
    }

    /// A tensor dequantized into the compute dtype, on the device.
    pub fn tensor(&self, name: &str) -> anyhow::Result<Tensor> {
        let t = self.qtensor(name)?.dequantize(&Device::Cpu)?;
        Ok(t.to_dtype(self.compute_dtype())?.to_device(&self.device)?)
    }

    /// Whether the file has tensor `name`.
    pub fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// `prefix.bias` in the compute dtype, if the layer has one (ModernBERT's do not).
    fn bias(&self, prefix: &str) -> anyhow::Result<Option<Tensor>> {
        let name = format!("{prefix}.bias");
        self.has(&name).then(|| self.tensor(&name)).transpose()
    }

    /// A linear layer `prefix.weight` (`[out, in]`) + `prefix.bias` if present. Block-quantized
    /// weights stay quantized on CPU; on a GPU every weight is dense in the compute dtype, and
    /// a smoothed weight is unsmoothed (its columns multiplied back by the input scale).
    pub fn linear(&self, prefix: &str) -> anyhow::Result<Linear> {
        let weight = self.qtensor(&format!("{prefix}.weight"))?;
        let bias = self.bias(prefix)?;
        let input_scale = self.input_scale(prefix)?;
        let quantized = !matches!(weight.dtype(), GgmlDType::F32 | GgmlDType::F16);
        if quantized && self.device.is_cpu() {
            ensure!(
                input_scale.is_none() && !self.has(&format!("{prefix}.{OUTLIER_ROWS}")),
                "{}: {prefix} is smoothed or has outlier rows, which only the int8 kernels serve",
                self.path.display()
            );
            Ok(Linear::Quantized {
                weight: QMatMul::from_qtensor(weight)?,
                bias,
            })
        } else {
            let mut weight = weight.dequantize(&Device::Cpu)?;
            if let Some(scale) = input_scale {
                let columns = scale.len();
                weight =
                    weight.broadcast_mul(&Tensor::from_vec(scale, (1, columns), &Device::Cpu)?)?;
            }
            if let Some(outliers) = self.outliers(prefix)? {
                let (rows, cols) = weight.dims2()?;
                let mut values: Vec<f32> = weight.flatten_all()?.to_vec1()?;
                for (&r, w) in outliers.rows.iter().zip(outliers.weight.chunks_exact(cols)) {
                    values[r * cols..(r + 1) * cols].copy_from_slice(w);
                }
                weight = Tensor::from_vec(values, (rows, cols), &Device::Cpu)?;
            }
            let weight = weight
                .to_dtype(self.compute_dtype())?
                .to_device(&self.device)?;
            Ok(Linear::Dense { weight, bias })
        }
    }

    /// Whether linear layer `prefix` is stored as Q8_0 and runs on the CPU: the case served by
    /// `qmodel-kernels`' int8 GEMM ([`Int8Linear`]).
    pub fn int8_on_cpu(&self, prefix: &str) -> bool {
        self.device.is_cpu()
            && self
                .content
                .tensor_infos
                .get(&format!("{prefix}.weight"))
                .is_some_and(|info| info.ggml_dtype == GgmlDType::Q8_0)
    }

    /// A tensor as F32 values, flattened.
    pub fn values(&self, name: &str) -> anyhow::Result<Vec<f32>> {
        let t = self.qtensor(name)?.dequantize(&Device::Cpu)?;
        Ok(t.flatten_all()?.to_vec1()?)
    }

    /// The per-row int8 weight `prefix.weight` (format-2 per-row Q8_0) as `(q [out, in],
    /// scales [out], out, in)`.
    pub fn int8_rows(&self, prefix: &str) -> anyhow::Result<(Vec<i8>, Vec<f32>, usize, usize)> {
        let name = format!("{prefix}.weight");
        let t = self.qtensor(&name)?;
        let (rows, cols) = t.shape().dims2()?;
        let data = t.data()?;
        let (q, scales) = decode_per_row_q8_0(&data, rows, cols).with_context(|| {
            format!(
                "{}: tensor {name} is not per-row int8 (Q8_0 blocks of a row must share one \
                 scale): re-run `qmodel-server quantize`",
                self.path.display()
            )
        })?;
        Ok((q, scales, rows, cols))
    }

    /// Linear layer `prefix` for `qmodel-kernels`, its input quantized as `activations`.
    pub fn int8_linear(
        &self,
        prefix: &str,
        activations: Activations,
    ) -> anyhow::Result<Int8Linear> {
        let (q, scales, rows, cols) = self.int8_rows(prefix)?;
        let bias = format!("{prefix}.bias");
        let bias = if self.has(&bias) {
            self.values(&bias)?
        } else {
            vec![0.0; rows]
        };
        let linear = Int8Linear::new(&q, &scales, (rows, cols), bias, activations)
            .with_context(|| format!("{}: {prefix}", self.path.display()))?;
        Ok(linear.with_outliers(self.outliers(prefix)?))
    }

    /// Linear layer `prefix`'s outlier rows ([`outlier_rows`]), if the artifact has any.
    pub fn outliers(&self, prefix: &str) -> anyhow::Result<Option<OutlierRows>> {
        let rows_name = format!("{prefix}.{OUTLIER_ROWS}");
        if !self.has(&rows_name) {
            return Ok(None);
        }
        let rows: Vec<usize> = self
            .values(&rows_name)?
            .iter()
            .map(|&r| r as usize)
            .collect();
        let weight = self.values(&format!("{prefix}.{OUTLIER_WEIGHT}"))?;
        let (out, inp) = self
            .content
            .tensor_infos
            .get(&format!("{prefix}.weight"))
            .with_context(|| format!("{}: no tensor {prefix}.weight", self.path.display()))?
            .shape
            .dims2()?;
        ensure!(
            rows.iter().all(|&r| r < out) && weight.len() == rows.len() * inp,
            "{}: {prefix}'s outlier rows do not fit its {out} x {inp} weight",
            self.path.display()
        );
        Ok(Some(OutlierRows { rows, weight }))
    }

    /// The smoothing of linear layer `prefix`'s input (`prefix.input_scale`, see
    /// [`Activations::Smoothed`]), if the artifact has one.
    pub fn input_scale(&self, prefix: &str) -> anyhow::Result<Option<Vec<f32>>> {
        let name = format!("{prefix}.{INPUT_SCALE}");
        if !self.content.tensor_infos.contains_key(&name) {
            return Ok(None);
        }
        let scale = self.values(&name)?;
        ensure!(
            scale.iter().all(|s| s.is_finite() && *s > 0.0),
            "{}: {name} has a value that is not a positive number",
            self.path.display()
        );
        Ok(Some(scale))
    }

    /// LayerNorm `prefix.weight` + `prefix.bias`, or without a bias where the file has none.
    pub fn layer_norm(&self, prefix: &str, eps: f64) -> anyhow::Result<candle_nn::LayerNorm> {
        let weight = self.tensor(&format!("{prefix}.weight"))?;
        Ok(match self.bias(prefix)? {
            Some(bias) => candle_nn::LayerNorm::new(weight, bias, eps),
            None => candle_nn::LayerNorm::new_no_bias(weight, eps),
        })
    }

    /// An embedding table whose rows are decoded from the mapped file on lookup, so the
    /// table itself never lands in anonymous memory.
    pub fn rows(&self, name: &str) -> anyhow::Result<RowTable> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .with_context(|| format!("{}: no tensor {name}", self.path.display()))?;
        let (rows, dim) = info.shape.dims2()?;
        ensure!(rows > 0, "{}: tensor {name} is empty", self.path.display());
        let dtype = info.ggml_dtype;
        ensure!(
            matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::Q8_0),
            "{}: tensor {name}: unsupported embedding storage {dtype:?}",
            self.path.display()
        );
        ensure!(
            dim.is_multiple_of(dtype.block_size()),
            "{}: tensor {name}: width {dim} is not a whole number of {dtype:?} blocks",
            self.path.display()
        );
        let row_bytes = dim / dtype.block_size() * dtype.type_size();
        let start = usize::try_from(self.content.tensor_data_offset + info.offset)?;
        let end = start
            .checked_add(rows * row_bytes)
            .filter(|&end| end <= self.mmap.len())
            .with_context(|| {
                format!(
                    "{}: tensor {name} runs past the end of the file",
                    self.path.display()
                )
            })?;
        Ok(RowTable {
            mmap: self.mmap.clone(),
            range: start..end,
            rows,
            dim,
            dtype,
        })
    }
}

/// A linear layer `y = x W^T + b` over 2-D input `[tokens, in]`, for the candle engine: int4
/// (Q4_0) on CPU, dense weights everywhere, and int8 on the kernels for families whose int8
/// path is the candle one (ModernBERT; BERT's int8 engine calls [`Int8Linear`] directly).
pub enum Linear {
    /// Block-quantized weight: candle quantizes each input row on the fly (per row, so
    /// results do not depend on the other rows in the batch).
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
    },
    /// Dense weight in the compute dtype.
    Dense {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// Int8 weight on `qmodel-kernels` (CPU, F32 activations).
    Int8(Int8Linear),
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (ys, bias) = match self {
            Self::Quantized { weight, bias } => (weight.forward(xs)?, bias),
            Self::Dense { weight, bias } => (xs.matmul(&weight.t()?)?, bias),
            Self::Int8(linear) => {
                let rows = xs.dim(0)?;
                let x: Vec<f32> = xs.flatten_all()?.to_vec1()?;
                let mut out = vec![0f32; rows * linear.out_features()];
                linear.forward(&x, rows, Activation::None, &mut out);
                return Tensor::from_vec(out, (rows, linear.out_features()), xs.device());
            }
        };
        match bias {
            Some(bias) => ys.broadcast_add(bias),
            None => Ok(ys),
        }
    }
}

/// How an [`Int8Linear`] quantizes its input, per token.
pub enum Activations {
    /// One int8 pass.
    PerToken,
    /// One int8 pass over `x * input_scale` (SmoothQuant): the artifact's weight columns were
    /// multiplied by `1 / input_scale` before quantization, moving the input's outlier
    /// channels into the weights, which are quantized per output channel and absorb them.
    Smoothed(Vec<f32>),
    /// One pass on a 256-level grid from the token's min to its max (with a zero point): for
    /// one-sided inputs (GELU outputs, >= -0.17), twice the resolution of symmetric int8.
    Asymmetric,
    /// Two passes: `x = a + r` with `a` on the per-token int8 grid, both halves through the
    /// int8 GEMM, so activations carry ~15 bits (twice the int8 work).
    TwoPass,
}

/// A linear layer on `qmodel-kernels`: per-output-channel int8 weight, F32 bias, activations
/// quantized per token at run time (so a token's result never depends on the other tokens).
pub struct Int8Linear {
    pub weight: QuantizedWeight,
    pub bias: Vec<f32>,
    pub activations: Activations,
    /// Rows served in F32 (their int8 rows are zero).
    pub outliers: Option<OutlierRows>,
}

/// Rows of a linear layer kept in F32: `out[t][rows[i]] += x[t] . weight[i]`, `weight` being
/// `[rows.len(), in]` of the layer's original (unsmoothed) weights.
pub struct OutlierRows {
    pub rows: Vec<usize>,
    pub weight: Vec<f32>,
}

impl OutlierRows {
    /// Adds the rows' products to `out` (`[tokens, out_features]`) for input `x` (`[tokens,
    /// in]`), tokens split over the kernels' pool; the products are the kernels'
    /// `matmul_nt_with`, whose result for a token does not depend on the tokens around it.
    fn add_to(&self, x: &[f32], tokens: usize, out_features: usize, out: &mut [f32]) {
        const TOKENS_PER_TASK: usize = 16;
        let k = x.len() / tokens.max(1);
        assert!(x.len() == tokens * k && out.len() == tokens * out_features);
        let shared = SharedOut(out.as_mut_ptr());
        let path = Exec::global().path;
        let n = self.rows.len();
        qmodel_kernels::ThreadPool::global().run(tokens.div_ceil(TOKENS_PER_TASK), &|task| {
            let first = task * TOKENS_PER_TASK;
            let last = (first + TOKENS_PER_TASK).min(tokens);
            let mut products = vec![0f32; (last - first) * n];
            matmul_nt_with(
                path,
                &x[first * k..last * k],
                k,
                &self.weight,
                &mut products,
            );
            for (t, products) in (first..last).zip(products.chunks_exact(n)) {
                for (&r, p) in self.rows.iter().zip(products) {
                    // SAFETY: token t's row of `out` (checked above) is this task's alone.
                    unsafe { *shared.ptr().add(t * out_features + r) += p };
                }
            }
        });
    }
}

/// A pointer the pool's tasks write disjoint parts of.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: every user has each task write only its own part.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Through a method, so closures capture the whole (`Sync`) wrapper, not the raw field.
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

impl Int8Linear {
    pub fn new(
        q: &[i8],
        scales: &[f32],
        (out, inp): (usize, usize),
        bias: Vec<f32>,
        activations: Activations,
    ) -> anyhow::Result<Self> {
        ensure!(
            bias.len() == out,
            "bias has {} values, not {out}",
            bias.len()
        );
        if let Activations::Smoothed(s) = &activations {
            ensure!(
                s.len() == inp,
                "input scale has {} values, not {inp}",
                s.len()
            );
        }
        let weight = QuantizedWeight::from_int8(q, scales, out, inp)
            .map_err(|e| anyhow::anyhow!("cannot pack the int8 weight: {e}"))?;
        Ok(Self {
            weight,
            bias,
            activations,
            outliers: None,
        })
    }

    pub fn with_outliers(mut self, outliers: Option<OutlierRows>) -> Self {
        self.outliers = outliers;
        self
    }

    pub fn out_features(&self) -> usize {
        self.weight.out_features()
    }

    /// `out[rows, out] = act(x[rows, in] W^T + b)` on the process-wide pool
    /// (`QMODEL_THREADS`), kernel path `QMODEL_KERNEL` or the best the CPU has.
    pub fn forward(&self, x: &[f32], rows: usize, act: Activation, out: &mut [f32]) {
        let Some(outliers) = &self.outliers else {
            return self.forward_int8(x, rows, act, out);
        };
        // The activation comes after the outlier rows' products are in.
        self.forward_int8(x, rows, Activation::None, out);
        outliers.add_to(x, rows, self.out_features(), out);
        if act == Activation::Gelu {
            gelu_inplace_with(Exec::global().path, out);
        }
    }

    fn forward_int8(&self, x: &[f32], rows: usize, act: Activation, out: &mut [f32]) {
        let exec = Exec::global();
        let bias = Some(&self.bias[..]);
        let input = match &self.activations {
            Activations::PerToken => InputQuant::default(),
            Activations::Smoothed(scale) => InputQuant {
                scale: Some(scale),
                asymmetric: false,
            },
            Activations::Asymmetric => InputQuant {
                scale: None,
                asymmetric: true,
            },
            Activations::TwoPass => {
                // The second pass multiplies what the kernels' per-token quantization of `x`
                // leaves out: `x - scale * q`.
                let k = self.weight.in_features();
                let (q, scales) = quantize_rows_i8(x, rows, k);
                let rest: Vec<f32> = x
                    .iter()
                    .zip(&q)
                    .enumerate()
                    .map(|(i, (v, q))| v - f32::from(*q) * scales[i / k])
                    .collect();
                let mut low = vec![0f32; out.len()];
                let none = Activation::None;
                linear_with(&exec, &rest, rows, &self.weight, None, none, &mut low);
                linear_with(&exec, x, rows, &self.weight, bias, none, out);
                out.iter_mut().zip(&low).for_each(|(o, l)| *o += l);
                if act == Activation::Gelu {
                    gelu_inplace_with(exec.path, out);
                }
                return;
            }
        };
        linear_quant_with(&exec, x, input, rows, &self.weight, bias, act, out);
    }
}

/// Rows of a `[rows, dim]` table in a mapped GGUF file, stored F32, F16 or Q8_0.
pub struct RowTable {
    mmap: Arc<Mmap>,
    range: std::ops::Range<usize>,
    rows: usize,
    dim: usize,
    dtype: GgmlDType,
}

impl RowTable {
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Appends the rows `ids` to `out`, decoded to f32.
    pub fn gather(&self, ids: &[u32], out: &mut Vec<f32>) -> anyhow::Result<()> {
        let bytes = &self.mmap[self.range.clone()];
        let row_bytes = bytes.len() / self.rows;
        out.reserve(ids.len() * self.dim);
        for &id in ids {
            let id = id as usize;
            if id >= self.rows {
                bail!(
                    "token id {id} is outside the vocabulary of {} rows",
                    self.rows
                );
            }
            let row = &bytes[id * row_bytes..(id + 1) * row_bytes];
            match self.dtype {
                GgmlDType::F32 => out.extend(
                    row.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                ),
                GgmlDType::F16 => out.extend(
                    row.chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
                ),
                // Q8_0 block: an f16 scale, then 32 signed bytes.
                GgmlDType::Q8_0 => {
                    for block in row.chunks_exact(GgmlDType::Q8_0.type_size()) {
                        let scale = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                        out.extend(block[2..].iter().map(|&q| f32::from(q as i8) * scale));
                    }
                }
                other => bail!("unsupported embedding storage {other:?}"),
            }
        }
        Ok(())
    }
}

/// Pools the last hidden state of a packed batch (`hidden` is `[tokens, dim]`, row-major,
/// inputs back to back with `lens` tokens each) over each input's own tokens.
pub fn pool(hidden: &[f32], dim: usize, lens: &[usize], pooling: Pooling) -> Vec<Vec<f32>> {
    let mut start = 0;
    lens.iter()
        .map(|&len| {
            let rows = &hidden[start * dim..(start + len) * dim];
            start += len;
            match pooling {
                Pooling::Cls => rows[..dim].to_vec(),
                Pooling::Mean => {
                    let mut sum = vec![0f32; dim];
                    for row in rows.chunks_exact(dim) {
                        sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                    }
                    sum.iter_mut().for_each(|s| *s /= len as f32);
                    sum
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows decoded from the mapped bytes equal candle's own dequantization of the table.
    #[test]
    fn row_lookup_matches_dequantization() {
        let values: Vec<f32> = (0..6 * 64)
            .map(|i| ((i * 37) % 101) as f32 / 7.0 - 7.0)
            .collect();
        let table = Tensor::from_vec(values, (6, 64), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::F32, GgmlDType::F16, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&table, dtype).unwrap();
            let expected = q.dequantize(&Device::Cpu).unwrap();
            let file = tempfile::NamedTempFile::new().unwrap();
            gguf_file::write(&mut file.reopen().unwrap(), &[], &[("table", &q)]).unwrap();
            let rows = Weights::open(file.path(), Device::Cpu)
                .unwrap()
                .rows("table")
                .unwrap();
            let mut got = Vec::new();
            rows.gather(&[5, 0, 5, 2], &mut got).unwrap();
            let ids = Tensor::new(&[5u32, 0, 5, 2], &Device::Cpu).unwrap();
            let want: Vec<f32> = expected
                .index_select(&ids, 0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, want, "{dtype:?}");
            assert!(rows.gather(&[6], &mut got).is_err(), "{dtype:?}");
        }
    }

    /// Per-row Q8_0 decodes back to its int8 values and row scales, candle dequantizes it to
    /// `scale * q`, and plain Q8_0 (a scale per block) is not taken for it.
    #[test]
    fn per_row_q8_0_round_trips() {
        let (rows, cols) = (3, 64);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let bytes = per_row_q8_0(&w, rows, cols);
        let (q, scales) = decode_per_row_q8_0(&bytes, rows, cols).unwrap();
        let t = candle_core::quantized::ggml_file::qtensor_from_ggml(
            GgmlDType::Q8_0,
            &bytes,
            vec![rows, cols],
            &Device::Cpu,
        )
        .unwrap();
        let deq: Vec<f32> = t
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for r in 0..rows {
            let max = w[r * cols..(r + 1) * cols]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            assert!(scales[r] >= max / 127.0 && scales[r] < max / 127.0 * 1.001);
            for c in 0..cols {
                let i = r * cols + c;
                assert_eq!(deq[i], f32::from(q[i]) * scales[r]);
                assert!((deq[i] - w[i]).abs() <= scales[r] / 2.0 * 1.0001);
            }
        }
        let plain = QTensor::quantize(
            &Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        assert!(decode_per_row_q8_0(&plain.data().unwrap(), rows, cols).is_none());
    }

    #[test]
    fn pooling_sees_only_each_inputs_own_tokens() {
        // Two inputs of 2 and 1 tokens, dim 2, packed back to back.
        let hidden = [1.0, 2.0, 3.0, 4.0, 10.0, 20.0];
        assert_eq!(
            pool(&hidden, 2, &[2, 1], Pooling::Mean),
            [vec![2.0, 3.0], vec![10.0, 20.0]]
        );
        assert_eq!(
            pool(&hidden, 2, &[2, 1], Pooling::Cls),
            [vec![1.0, 2.0], vec![10.0, 20.0]]
        );
    }
}
