//! The interface between the serving side (queue, HTTP) and a model implementation, and
//! [`load`], which builds one from an artifact directory.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, ensure};
use candle_core::{DType, Device, Tensor};

use crate::artifact::{self, MANIFEST_FILE, Manifest, Pooling, TOKENIZER_FILE, Task, WEIGHTS_FILE};
use crate::models::{self, Batch, Encoder, Weights, pool};
use crate::tokenize::Tokenizer;

/// One tokenized input, unpadded. `type_ids` are 0 for a single text and 0/1 for a pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl Encoding {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A loaded model. Calls are blocking and CPU/GPU-bound: the queue runs them off the async
/// runtime. Results must be batch-invariant: an input's output does not depend on what else
/// shares its batch (no padding leaks into real tokens, no cross-row statistics).
pub trait Backend: Send + Sync + 'static {
    /// Pooled sentence embeddings, not normalized (normalization is per request).
    fn embed(&self, batch: &[Encoding]) -> anyhow::Result<Vec<Vec<f32>>>;
    /// The last hidden state of every token of each input (`len x width`, row-major).
    fn embed_tokens(&self, batch: &[Encoding]) -> anyhow::Result<Vec<Vec<f32>>>;
    /// The classification head's raw logits (one per label) of each input: a cross-encoder's
    /// one relevance logit per (query, text) pair, a classifier's per-label logits.
    fn classify(&self, batch: &[Encoding]) -> anyhow::Result<Vec<Vec<f32>>>;
}

/// Where a model runs. `Cuda` needs the `cuda` cargo feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// A model ready to serve: what `serve` holds after startup.
pub struct LoadedModel {
    pub manifest: Manifest,
    pub tokenizer: Tokenizer,
    pub backend: Arc<dyn Backend>,
    pub device: DeviceKind,
    /// Width of the embeddings (the hidden size).
    pub width: usize,
}

/// Loads an artifact directory: checks the sha256 of every file the manifest lists, maps the
/// weights and builds the model on `device`. A missing, truncated or corrupt file is an error
/// whose one-line message names it. On CPU, int8 weights run on `qmodel-kernels`' int8 GEMM
/// (per-channel weights, per-token activations), int4 weights stay candle Q4_0, the rest runs
/// in F32; on CUDA every weight is converted to F16 and the model runs in F16.
pub fn load(dir: &Path, device: DeviceKind) -> anyhow::Result<LoadedModel> {
    let manifest = artifact::verify(dir)?;
    let tokenizer = Tokenizer::from_file(&dir.join(TOKENIZER_FILE), manifest.max_input_tokens)?;
    let candle_device = match device {
        DeviceKind::Cpu => {
            // A bad QMODEL_KERNEL fails the load with its reason, not the first product.
            qmodel_kernels::Path::from_env().map_err(anyhow::Error::msg)?;
            Device::Cpu
        }
        DeviceKind::Cuda => cuda_device()?,
    };
    let weights_path = dir.join(WEIGHTS_FILE);
    let weights = Weights::open(&weights_path, candle_device)?;
    let model = models::load(&weights, manifest.head_labels())
        .with_context(|| format!("{}: cannot build the model", weights_path.display()))?;
    ensure!(
        manifest.max_input_tokens <= model.max_tokens(),
        "{}: max_input_tokens {} exceeds the model's {} positions",
        dir.join(MANIFEST_FILE).display(),
        manifest.max_input_tokens,
        model.max_tokens()
    );
    let width = model.hidden_size();
    let backend = Arc::new(EncoderBackend {
        model,
        task: manifest.task,
        pooling: manifest.pooling,
    });
    Ok(LoadedModel {
        manifest,
        tokenizer,
        backend,
        device,
        width,
    })
}

#[cfg(feature = "cuda")]
fn cuda_device() -> anyhow::Result<Device> {
    Device::new_cuda(0).context("--device cuda: no usable CUDA GPU")
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> anyhow::Result<Device> {
    anyhow::bail!("--device cuda: this binary was built without the `cuda` feature")
}

/// `e` and its causes on one line ("outer: inner"), as `{e:#}` prints them but without the
/// backtrace candle appends to its errors' text when `RUST_BACKTRACE` is set: a load failure
/// stays one line (a pod's termination message) and an inference failure one JSON string,
/// whatever the environment.
pub fn error_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|cause| match cause.downcast_ref::<candle_core::Error>() {
            Some(candle) => candle_error_line(candle),
            None => cause.to_string(),
        })
        .flat_map(|text| {
            text.lines()
                .map(|line| line.trim().to_owned())
                .filter(|line| !line.is_empty())
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join(": ")
}

fn candle_error_line(e: &candle_core::Error) -> String {
    use candle_core::Error;
    match e {
        Error::WithBacktrace { inner, .. } => candle_error_line(inner),
        Error::Context { inner, context } => format!("{context}: {}", candle_error_line(inner)),
        Error::WithPath { inner, path } => {
            format!("{}: {}", path.display(), candle_error_line(inner))
        }
        other => other.to_string(),
    }
}

/// Any [`Encoder`] behind the [`Backend`] interface: pooling, token states, scores.
struct EncoderBackend {
    model: Box<dyn Encoder>,
    task: Task,
    pooling: Pooling,
}

impl EncoderBackend {
    /// Runs the encoder on the batch packed without padding (see [`Batch`]); returns
    /// the last hidden state of every token and the inputs' lengths.
    fn encode(&self, batch: &[Encoding]) -> anyhow::Result<(Tensor, Vec<usize>)> {
        let packed = PackedBatch::new(batch)?;
        let hidden = self.model.forward(&packed.as_batch())?;
        Ok((hidden, packed.lens))
    }

    /// [`Self::encode`] as `f32` values, for an embedding model (nothing for no inputs).
    fn embedder_states(&self, batch: &[Encoding]) -> anyhow::Result<(Vec<f32>, Vec<usize>)> {
        ensure!(
            self.task == Task::Embed,
            "this model is a classifier: it scores, it does not embed"
        );
        if batch.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let (hidden, lens) = self.encode(batch)?;
        Ok((hidden.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, lens))
    }
}

/// Encodings back to back without padding: the buffers a [`Batch`] borrows.
pub struct PackedBatch {
    ids: Vec<u32>,
    type_ids: Vec<u32>,
    lens: Vec<usize>,
}

impl PackedBatch {
    pub fn new(batch: &[Encoding]) -> anyhow::Result<Self> {
        let lens: Vec<usize> = batch.iter().map(Encoding::len).collect();
        ensure!(!lens.contains(&0), "an input has no tokens");
        ensure!(
            batch.iter().all(|e| e.type_ids.len() == e.ids.len()),
            "an input has a different number of ids and type ids"
        );
        Ok(Self {
            ids: batch.iter().flat_map(|e| e.ids.iter().copied()).collect(),
            type_ids: batch
                .iter()
                .flat_map(|e| e.type_ids.iter().copied())
                .collect(),
            lens,
        })
    }

    pub fn as_batch(&self) -> Batch<'_> {
        Batch {
            ids: &self.ids,
            type_ids: &self.type_ids,
            lens: &self.lens,
        }
    }
}

impl Backend for EncoderBackend {
    fn embed(&self, batch: &[Encoding]) -> anyhow::Result<Vec<Vec<f32>>> {
        let (hidden, lens) = self.embedder_states(batch)?;
        Ok(pool(&hidden, self.model.hidden_size(), &lens, self.pooling))
    }

    fn embed_tokens(&self, batch: &[Encoding]) -> anyhow::Result<Vec<Vec<f32>>> {
        let (hidden, lens) = self.embedder_states(batch)?;
        let width = self.model.hidden_size();
        let mut rest = hidden.as_slice();
        Ok(lens
            .iter()
            .map(|&len| {
                let (input, tail) = rest.split_at(len * width);
                rest = tail;
                input.to_vec()
            })
            .collect())
    }

    fn classify(&self, batch: &[Encoding]) -> anyhow::Result<Vec<Vec<f32>>> {
        ensure!(
            self.task != Task::Embed,
            "this model embeds: it has no classification head"
        );
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (hidden, lens) = self.encode(batch)?;
        self.model.score(&hidden, &lens)
    }
}

#[cfg(test)]
mod tests {
    use std::backtrace::Backtrace;

    use super::error_line;

    #[test]
    fn error_line_drops_candle_backtraces_and_keeps_every_cause() {
        let with_backtrace = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("CUDA_ERROR_NO_DEVICE".into())),
            backtrace: Box::new(Backtrace::force_capture()),
        };
        let candle = with_backtrace
            .context("cuInit")
            .with_path("/models/x/model.safetensors");
        let e = anyhow::Error::from(candle).context("--device cuda: no usable CUDA GPU");
        assert!(
            format!("{e:#}").lines().count() > 1,
            "the backtrace is in candle's own text"
        );
        assert_eq!(
            error_line(&e),
            "--device cuda: no usable CUDA GPU: /models/x/model.safetensors: cuInit: CUDA_ERROR_NO_DEVICE"
        );
    }

    #[test]
    fn error_line_joins_the_lines_of_any_other_error() {
        let e = anyhow::anyhow!("first\n  second\n").context("outer");
        assert_eq!(error_line(&e), "outer: first: second");
    }
}
