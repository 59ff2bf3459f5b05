//! `qmodel-server quantize`: a Hugging Face / sentence-transformers checkpoint -> an artifact
//! directory (`model.gguf` at the chosen precision, `tokenizer.json`, `manifest.json`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::artifact::{
    self, MANIFEST_FILE, Manifest, Pooling, Precision, TOKENIZER_FILE, Task, WEIGHTS_FILE,
};
use crate::backend::PackedBatch;
use crate::models::{
    self, Config, Family, INPUT_SCALE, OUTLIER_ROWS, OUTLIER_WEIGHT, Role, Weights, outlier_rows,
    quantize_tensor, storage_dtype,
};
use crate::tokenize::Tokenizer;

#[derive(Debug, Clone, clap::Args)]
pub struct QuantizeArgs {
    /// Checkpoint directory: config.json, model.safetensors, tokenizer.json and, for
    /// sentence-transformers models, 1_Pooling/config.json and sentence_bert_config.json.
    #[arg(long)]
    pub from: PathBuf,
    /// Artifact directory to write (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "int8")]
    pub precision: Precision,
    #[arg(long, default_value = "1")]
    pub model_version: String,
    /// Model id served in /info and OpenAI responses [default: the checkpoint directory's name]
    #[arg(long)]
    pub model_id: Option<String>,
}

/// Writes the artifact and prints what it wrote.
pub fn run(args: &QuantizeArgs) -> anyhow::Result<()> {
    let manifest = quantize(args)?;
    let weights = std::fs::metadata(args.out.join(WEIGHTS_FILE))?.len();
    println!(
        "{}: {} {:?} {:?} model, {:?} pooling, {} max tokens, {WEIGHTS_FILE} {weights} bytes",
        args.out.display(),
        manifest.model_id,
        manifest.task,
        manifest.precision,
        manifest.pooling,
        manifest.max_input_tokens,
    );
    Ok(())
}

/// Converts the checkpoint in `args.from` into an artifact in `args.out`.
pub fn quantize(args: &QuantizeArgs) -> anyhow::Result<Manifest> {
    let from = &args.from;
    let config_path = from.join("config.json");
    let hf_config: serde_json::Value = read_json(&config_path)?;
    let family = Family::of(&hf_config).with_context(|| format!("{}", config_path.display()))?;
    let config = Config::from_hf(family, &hf_config)
        .with_context(|| format!("{}: unsupported config", config_path.display()))?;
    let head = head_of(&hf_config);
    let head_labels = head.as_ref().map_or(0, |h| h.labels.len());
    let task = match head_labels {
        0 => Task::Embed,
        1 => Task::Rerank,
        _ => Task::Classify,
    };
    let pooling = match (task, &config) {
        // A sequence classifier scores the pooled [CLS] state, or ModernBERT's choice.
        (Task::Rerank | Task::Classify, Config::ModernBert(c)) => c.classifier_pooling,
        (Task::Rerank | Task::Classify, Config::Bert(_)) => Pooling::Cls,
        (Task::Embed, _) => pooling_of(from)?,
    };
    let max_input_tokens = max_tokens_of(from)?
        .unwrap_or(config.max_tokens())
        .min(config.max_tokens());

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create", args.out.display()))?;
    // The manifest is written last: until then the directory is not an artifact, even if an
    // earlier run left one there.
    let manifest_path = args.out.join(MANIFEST_FILE);
    if manifest_path.exists() {
        std::fs::remove_file(&manifest_path)
            .with_context(|| format!("{}: cannot remove", manifest_path.display()))?;
    }
    let checkpoint_files = checkpoint_files(from)?;
    let checkpoint = Checkpoint::load(from, family)?;
    let weights = args.out.join(WEIGHTS_FILE);
    write_gguf(
        &checkpoint,
        &weights,
        &config,
        head_labels,
        args.precision,
        None,
    )?;
    let tokenizer = args.out.join(TOKENIZER_FILE);
    std::fs::copy(from.join(TOKENIZER_FILE), &tokenizer)
        .with_context(|| format!("{}: cannot copy", from.join(TOKENIZER_FILE).display()))?;
    if args.precision == Precision::Int8 {
        let max = observe_activations(
            &checkpoint,
            &weights,
            &tokenizer,
            &config,
            task,
            max_input_tokens,
        )
        .context("calibrating the int8 smoothing")?;
        write_gguf(
            &checkpoint,
            &weights,
            &config,
            head_labels,
            args.precision,
            Some(&max),
        )?;
    }

    let files = [WEIGHTS_FILE, TOKENIZER_FILE]
        .into_iter()
        .map(|name| {
            Ok((
                name.to_string(),
                artifact::sha256_file(&args.out.join(name))?,
            ))
        })
        .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
    let model_id = match &args.model_id {
        Some(id) => id.clone(),
        None => from
            .canonicalize()
            .with_context(|| format!("{}: cannot resolve", from.display()))?
            .file_name()
            .context("--from has no directory name; pass --model-id")?
            .to_string_lossy()
            .into_owned(),
    };
    let manifest = Manifest {
        format: artifact::FORMAT_VERSION,
        model_id,
        model_version: args.model_version.clone(),
        task,
        architecture: family.name().into(),
        pooling,
        normalize: task == Task::Embed && normalizes(from)?,
        max_input_tokens,
        precision: args.precision,
        files,
        checkpoint_files,
        prompts: crate::prompts::Prompts::read_checkpoint(from)?,
        multi_label: task == Task::Classify && head.as_ref().is_some_and(|h| h.multi_label),
        labels: match (task, head) {
            (Task::Classify, Some(head)) => head.labels,
            _ => Vec::new(),
        },
    };
    manifest.write(&args.out)?;
    Ok(manifest)
}

/// Texts run through the model to calibrate the int8 smoothing: short queries, passages,
/// code, logs, other languages. Separate from the test sentences that measure accuracy.
const CALIBRATION_TEXTS: &str = include_str!("calibration.txt");

/// SmoothQuant's migration strength: how much of an input channel's range moves into the
/// weights (all-MiniLM-L6-v2, mean cosine vs F32 over the test sentences: 0.5 -> 0.99882,
/// 0.7 -> 0.99889, 0.8 -> 0.99878).
const SMOOTHING_ALPHA: f32 = 0.7;

/// Per channel, the largest |input| of each group of [`Config::smoothed_linears`] over the
/// calibration texts (pairs of consecutive lines for a reranker), measured on the unsmoothed
/// int8 artifact just written.
fn observe_activations(
    checkpoint: &Checkpoint,
    weights: &Path,
    tokenizer: &Path,
    config: &Config,
    task: Task,
    max_input_tokens: usize,
) -> anyhow::Result<Vec<Vec<f32>>> {
    // Without the head: calibration observes the encoder's inputs only.
    let model = models::load(&Weights::open(weights, Device::Cpu)?, 0)?;
    let tokenizer = Tokenizer::from_file(tokenizer, max_input_tokens)?;
    let texts: Vec<&str> = CALIBRATION_TEXTS
        .lines()
        .filter(|l| !l.is_empty())
        .collect();
    let encodings = match task {
        Task::Embed | Task::Classify => texts
            .iter()
            .map(|t| tokenizer.encode(t, true))
            .collect::<Result<Vec<_>, _>>(),
        Task::Rerank => texts
            .windows(2)
            .map(|p| tokenizer.encode_pair(p[0], p[1], true))
            .collect(),
    }
    .map_err(|e| anyhow::anyhow!("tokenizing the calibration texts: {e}"))?;
    let mut max = config
        .smoothed_linears()
        .iter()
        .map(|group| {
            Ok(vec![
                0f32;
                checkpoint
                    .f32(&format!("{}.weight", group[0]))?
                    .dim(1)?
            ])
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for batch in encodings.chunks(8) {
        model.observe_activations(&PackedBatch::new(batch)?.as_batch(), &mut max)?;
    }
    Ok(max)
}

/// SmoothQuant factors `s` of one input: `x * (1/s)` times `W * diag(s)` is `x W^T`, with
/// `s_j = max|x_j|^a / max|W_.j|^(1-a)` balancing the ranges of activations and weights.
fn smoothing_factors(activation_max: &[f32], weight_max: &[f32]) -> Vec<f32> {
    activation_max
        .iter()
        .zip(weight_max)
        .map(|(&x, &w)| {
            if x > 0.0 && w > 0.0 {
                (x.powf(SMOOTHING_ALPHA) / w.powf(1.0 - SMOOTHING_ALPHA)).clamp(1e-2, 1e2)
            } else {
                1.0
            }
        })
        .collect()
}

/// The tensors of a checkpoint's `model.safetensors`, read once, under the names this
/// artifact uses.
struct Checkpoint {
    source: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    fn load(from: &Path, family: Family) -> anyhow::Result<Self> {
        let source = from.join("model.safetensors");
        let loaded = candle_core::safetensors::load(&source, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: {e}", source.display()))?;
        // Sentence-transformers checkpoints name the encoder bare; classification checkpoints
        // put it under a prefix (`bert.`, `roberta.`, ...; their head has none), which wins if
        // both exist.
        let (prefixed, bare): (Vec<_>, Vec<_>) = loaded
            .into_iter()
            .partition(|(name, _)| family.is_prefixed(name));
        let mut tensors = HashMap::new();
        for (name, tensor) in bare.into_iter().chain(prefixed) {
            tensors.insert(family.artifact_name(&name), tensor);
        }
        Ok(Self { source, tensors })
    }

    /// Tensor `name` as F32.
    fn f32(&self, name: &str) -> anyhow::Result<Tensor> {
        let tensor = self
            .tensors
            .get(name)
            .with_context(|| format!("{}: no tensor {name}", self.source.display()))?;
        Ok(tensor.to_dtype(DType::F32)?)
    }
}

/// Writes `model.gguf`. With `activation_max` (int8 only), the inputs of
/// [`Config::smoothed_linears`] are smoothed: their weights stored times `s` per column, and
/// `1/s` stored as each one's `input_scale`.
fn write_gguf(
    checkpoint: &Checkpoint,
    out: &Path,
    config: &Config,
    head_labels: usize,
    precision: Precision,
    activation_max: Option<&[Vec<f32>]>,
) -> anyhow::Result<()> {
    let source = checkpoint.source.display();
    // Linear layer prefix -> its smoothing factors.
    let mut smoothing: HashMap<String, Vec<f32>> = HashMap::new();
    for (group, x_max) in config
        .smoothed_linears()
        .into_iter()
        .zip(activation_max.unwrap_or_default())
    {
        let mut w_max = vec![0f32; x_max.len()];
        for prefix in &group {
            let name = format!("{prefix}.weight");
            let w = checkpoint.f32(&name)?.abs()?.max(0)?.to_vec1::<f32>()?;
            ensure!(
                w.len() == w_max.len(),
                "{name}: {} columns, expected {}",
                w.len(),
                w_max.len()
            );
            w_max.iter_mut().zip(w).for_each(|(m, w)| *m = m.max(w));
        }
        let s = smoothing_factors(x_max, &w_max);
        for prefix in group {
            smoothing.insert(prefix, s.clone());
        }
    }
    let mut quantized = config
        .tensors(head_labels)
        .into_iter()
        .map(|spec| {
            let name = spec.name;
            let mut tensor = checkpoint.f32(&name)?;
            if tensor.dims() != spec.shape {
                bail!(
                    "{source}: tensor {name} has shape {:?}, config.json implies {:?}",
                    tensor.dims(),
                    spec.shape
                );
            }
            let dtype = storage_dtype(spec.role, precision);
            let width = spec.shape.last().copied().unwrap_or(0);
            if !width.is_multiple_of(dtype.block_size()) {
                bail!(
                    "{source}: tensor {name} is {width} wide, not a whole number of {dtype:?} blocks"
                );
            }
            let original = tensor.clone();
            if let Some(s) = name.strip_suffix(".weight").and_then(|p| smoothing.get(p)) {
                tensor =
                    tensor.broadcast_mul(&Tensor::from_slice(s, (1, s.len()), &Device::Cpu)?)?;
            }
            let mut written = Vec::new();
            if spec.role == Role::Linear && precision == Precision::Int8 {
                let prefix = name.strip_suffix(".weight").unwrap_or(&name);
                let (split, outliers) = split_outlier_rows(prefix, &tensor, &original)?;
                tensor = split;
                written.extend(outliers);
            }
            written.push((name, quantize_tensor(&tensor, spec.role, precision)?));
            Ok(written)
        })
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
    let mut smoothed: Vec<_> = smoothing.into_iter().collect();
    smoothed.sort_by(|a, b| a.0.cmp(&b.0));
    for (prefix, s) in smoothed {
        let inverse: Vec<f32> = s.iter().map(|s| 1.0 / s).collect();
        let tensor = Tensor::from_vec(inverse, s.len(), &Device::Cpu)?;
        quantized.push((
            format!("{prefix}.{INPUT_SCALE}"),
            QTensor::quantize(&tensor, GgmlDType::F32)?,
        ));
    }

    let metadata = config.gguf_metadata();
    let metadata: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = quantized.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("{}: cannot create", out.display()))?,
    );
    gguf_file::write(&mut file, &metadata, &tensors)
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    std::io::Write::flush(&mut file).with_context(|| format!("{}: cannot write", out.display()))
}

/// The sha256 of every file under the checkpoint directory `from` (hidden files aside, such as
/// `models/fetch`'s `.fetched`), by path relative to it.
fn checkpoint_files(from: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![from.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("{}: cannot list", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
            } else {
                let relative = path.strip_prefix(from)?.to_string_lossy().into_owned();
                files.insert(relative, artifact::sha256_file(&path)?);
            }
        }
    }
    Ok(files)
}

/// The int8-bound `weight` (smoothed) with its outlier rows ([`outlier_rows`]) zeroed, and the
/// tensors that serve those rows in F32 from the `original` (unsmoothed) weight.
fn split_outlier_rows(
    prefix: &str,
    weight: &Tensor,
    original: &Tensor,
) -> anyhow::Result<(Tensor, Vec<(String, QTensor)>)> {
    let (rows, cols) = weight.dims2()?;
    let mut values: Vec<f32> = weight.flatten_all()?.to_vec1()?;
    let outliers = outlier_rows(&values, rows, cols);
    if outliers.is_empty() {
        return Ok((weight.clone(), Vec::new()));
    }
    let original: Vec<f32> = original.flatten_all()?.to_vec1()?;
    let mut kept = Vec::with_capacity(outliers.len() * cols);
    for &r in &outliers {
        kept.extend_from_slice(&original[r * cols..(r + 1) * cols]);
        values[r * cols..(r + 1) * cols].fill(0.0);
    }
    let indices: Vec<f32> = outliers.iter().map(|&r| r as f32).collect();
    let f32_tensor = |values: Vec<f32>, shape: Vec<usize>| -> anyhow::Result<QTensor> {
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
        Ok(QTensor::quantize(&t, GgmlDType::F32)?)
    };
    let extra = vec![
        (
            format!("{prefix}.{OUTLIER_ROWS}"),
            f32_tensor(indices, vec![outliers.len()])?,
        ),
        (
            format!("{prefix}.{OUTLIER_WEIGHT}"),
            f32_tensor(kept, vec![outliers.len(), cols])?,
        ),
    ];
    Ok((Tensor::from_vec(values, (rows, cols), &Device::Cpu)?, extra))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// Reads an optional file; `None` when it does not exist.
fn read_optional_json<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<Option<T>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A sequence-classification checkpoint's head: its labels in id order (`id2label`, else
/// `num_labels` generic names, else one), and whether they are independent (`problem_type`
/// `multi_label_classification`). `None` for other checkpoints.
struct Head {
    labels: Vec<String>,
    multi_label: bool,
}

fn head_of(config: &serde_json::Value) -> Option<Head> {
    let classifies = config["architectures"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str())
        .any(|a| a.ends_with("ForSequenceClassification"));
    if !classifies {
        return None;
    }
    let mut named: Vec<(u64, String)> = config["id2label"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(id, label)| Some((id.parse().ok()?, label.as_str()?.to_owned())))
        .collect();
    named.sort();
    let labels = if named.is_empty() {
        let count = config["num_labels"].as_u64().unwrap_or(1);
        (0..count).map(|i| format!("LABEL_{i}")).collect()
    } else {
        named.into_iter().map(|(_, label)| label).collect()
    };
    Some(Head {
        labels,
        multi_label: config["problem_type"] == "multi_label_classification",
    })
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

/// The pooling of `1_Pooling/config.json`; mean when the checkpoint has none.
fn pooling_of(from: &Path) -> anyhow::Result<Pooling> {
    let path = from.join("1_Pooling/config.json");
    let Some(config) = read_optional_json::<PoolingConfig>(&path)? else {
        return Ok(Pooling::Mean);
    };
    match (
        config.pooling_mode_cls_token,
        config.pooling_mode_mean_tokens,
        config.pooling_mode_max_tokens || config.pooling_mode_mean_sqrt_len_tokens,
    ) {
        (true, false, false) => Ok(Pooling::Cls),
        (false, true, false) => Ok(Pooling::Mean),
        _ => bail!(
            "{}: unsupported pooling (exactly one of cls or mean is supported)",
            path.display()
        ),
    }
}

/// `max_seq_length` of `sentence_bert_config.json`, when present.
fn max_tokens_of(from: &Path) -> anyhow::Result<Option<usize>> {
    #[derive(Deserialize)]
    struct SentenceBert {
        max_seq_length: Option<usize>,
    }
    let path = from.join("sentence_bert_config.json");
    Ok(read_optional_json::<SentenceBert>(&path)?.and_then(|c| c.max_seq_length))
}

/// Whether the sentence-transformers pipeline ends in a Normalize module. Without a
/// `modules.json`, embeddings are normalized, as text-embeddings-inference does by default.
fn normalizes(from: &Path) -> anyhow::Result<bool> {
    #[derive(Deserialize)]
    struct Module {
        #[serde(rename = "type")]
        kind: String,
    }
    let path = from.join("modules.json");
    Ok(match read_optional_json::<Vec<Module>>(&path)? {
        Some(modules) => modules.iter().any(|m| m.kind.ends_with(".Normalize")),
        None => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_moves_an_outlier_channel_into_the_weights() {
        // Channel 1 carries 50x the activation range of channel 0, same weight range.
        let s = smoothing_factors(&[0.5, 25.0, 0.0, 3.0], &[0.2, 0.2, 0.3, 0.0]);
        assert!(s[1] > 10.0 * s[0], "{s:?}");
        // After smoothing the activation ranges are much closer: 50x -> 50^0.3 ~ 3.2x.
        let ratio = (25.0 / s[1]) / (0.5 / s[0]);
        assert!(
            (ratio - 50f32.powf(1.0 - SMOOTHING_ALPHA)).abs() < 1e-3,
            "{ratio}"
        );
        // A channel never active, or with all-zero weights, is left alone.
        assert_eq!((s[2], s[3]), (1.0, 1.0));
    }
}
