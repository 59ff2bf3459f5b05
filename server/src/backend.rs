//! The interface between the serving side (queue, HTTP) and a model implementation.

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
/// shares its batch (padding is masked, no cross-row statistics).
pub trait Backend: Send + Sync + 'static {
    /// Pooled sentence embeddings, not normalized (normalization is per request).
    fn embed(&self, batch: &[Encoding]) -> anyhow::Result<Vec<Vec<f32>>>;
    /// Raw relevance logits of (query, text) pairs for a cross-encoder.
    fn score(&self, batch: &[Encoding]) -> anyhow::Result<Vec<f32>>;
}

/// Where a model runs. `Cuda` needs the `cuda` cargo feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}
