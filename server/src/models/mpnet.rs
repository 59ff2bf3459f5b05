//! MPNet (`MPNetModel` and `MPNetForMaskedLM` checkpoints as embedders,
//! `MPNetForSequenceClassification`), as in Hugging Face's `modeling_mpnet`: BERT's
//! post-LayerNorm encoder ([`bert`]) with RoBERTa's position ids (from `padding_idx + 1`), no
//! token types, and a learned attention bias per head over bucketed relative positions (T5's
//! bidirectional scheme), computed once and added to the scores of every layer.

use anyhow::{Context, ensure};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::{Weights, bert, xlm_roberta};

/// Where a task model (`MPNetForMaskedLM`, `...ForSequenceClassification`) keeps the encoder.
pub const PREFIX: &str = "mpnet.";

/// The bias table's name in the artifact (and in the checkpoint, under `mpnet.` or bare).
pub const BIAS_TABLE: &str = "encoder.relative_attention_bias.weight";

/// Hugging Face's `relative_position_bucket` default, which MPNet never overrides.
const MAX_DISTANCE: usize = 128;

/// MPNet's relative attention: `buckets` learned biases per head, over distances up to
/// `max_distance` (log-spaced beyond `buckets / 4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelativeAttention {
    pub buckets: usize,
    pub max_distance: usize,
}

/// Reads a Hugging Face `config.json` of this family.
pub fn config_from_hf(json: &serde_json::Value) -> anyhow::Result<bert::Config> {
    #[derive(Deserialize)]
    struct Hf {
        #[serde(default = "thirty_two")]
        relative_attention_num_buckets: usize,
    }
    fn thirty_two() -> usize {
        32
    }
    let hf = Hf::deserialize(json)?;
    ensure!(
        hf.relative_attention_num_buckets >= 4,
        "relative_attention_num_buckets {} is too small",
        hf.relative_attention_num_buckets
    );
    let mut config = bert::Config::from_hf(json)?;
    config.position_offset = xlm_roberta::padding_idx(json)? + 1;
    config.type_vocab_size = 0;
    config.relative_attention = Some(RelativeAttention {
        buckets: hf.relative_attention_num_buckets,
        max_distance: MAX_DISTANCE,
    });
    Ok(config)
}

/// The artifact's name (BERT's) of checkpoint tensor `name`.
pub fn artifact_name(name: &str) -> String {
    let name = name.strip_prefix(PREFIX).unwrap_or(name);
    const RENAMES: [(&str, &str); 5] = [
        (".attention.attn.q.", ".attention.self.query."),
        (".attention.attn.k.", ".attention.self.key."),
        (".attention.attn.v.", ".attention.self.value."),
        (".attention.attn.o.", ".attention.output.dense."),
        (".attention.LayerNorm.", ".attention.output.LayerNorm."),
    ];
    for (from, to) in RENAMES {
        if name.contains(from) {
            return name.replacen(from, to, 1);
        }
    }
    xlm_roberta::classification_head_name(name)
}

/// The bucket of relative position `relative` (key position minus query position), exactly
/// as Hugging Face computes it: half the buckets per direction, the first half of those exact,
/// the rest log-spaced up to `max_distance` (f32 arithmetic, truncated, as torch does).
pub fn relative_position_bucket(relative: i64, attention: RelativeAttention) -> usize {
    let half = (attention.buckets / 2) as i64;
    let n = -relative;
    let direction = if n < 0 { half } else { 0 };
    let n = n.abs();
    let max_exact = half / 2;
    let offset = if n < max_exact {
        n
    } else {
        let log_ratio = (n as f32 / max_exact as f32).ln()
            / (attention.max_distance as f32 / max_exact as f32).ln();
        (max_exact + (log_ratio * (half - max_exact) as f32) as i64).min(half - 1)
    };
    (direction + offset) as usize
}

/// The attention bias of every (query, key) pair of an input, per head.
pub struct RelativeBias {
    heads: usize,
    /// `[buckets, heads]`, as the checkpoint stores it.
    table: Vec<f32>,
    /// The bucket of relative position `r` at `r + max_len`.
    bucket_of: Vec<usize>,
    max_len: usize,
}

impl RelativeBias {
    pub fn load(
        weights: &Weights,
        config: &bert::Config,
        attention: RelativeAttention,
    ) -> anyhow::Result<Self> {
        let heads = config.num_attention_heads;
        let table = weights.values(BIAS_TABLE)?;
        ensure!(
            table.len() == attention.buckets * heads,
            "{BIAS_TABLE} has {} values, not {} buckets x {heads} heads",
            table.len(),
            attention.buckets
        );
        let max_len = config.max_tokens();
        let bucket_of = (-(max_len as i64)..=max_len as i64)
            .map(|r| relative_position_bucket(r, attention))
            .collect();
        Ok(Self {
            heads,
            table,
            bucket_of,
            max_len,
        })
    }

    fn bias(&self, head: usize, query: usize, key: usize) -> f32 {
        let bucket = self.bucket_of[key + self.max_len - query];
        self.table[bucket * self.heads + head]
    }

    /// Adds `head`'s bias to the scores of query `query` against keys `0..scores.len()`.
    pub fn add_row(&self, head: usize, query: usize, scores: &mut [f32]) {
        for (key, s) in scores.iter_mut().enumerate() {
            *s += self.bias(head, query, key);
        }
    }

    /// The `[heads, len, len]` bias of an input of `len` tokens.
    pub fn tensor(&self, len: usize, dtype: DType, device: &Device) -> anyhow::Result<Tensor> {
        let values: Vec<f32> = (0..self.heads)
            .flat_map(|h| (0..len).flat_map(move |i| (0..len).map(move |j| (h, i, j))))
            .map(|(h, i, j)| self.bias(h, i, j))
            .collect();
        Tensor::from_vec(values, (self.heads, len, len), device)
            .and_then(|t| t.to_dtype(dtype))
            .context("building the relative attention bias")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hugging Face's `relative_position_bucket(num_buckets=32, max_distance=128)` worked by
    /// hand, away from the log boundaries (where f32 rounding could go either way): 16 buckets
    /// per direction, 0-7 exact, 8-15 log-spaced up to 128.
    #[test]
    fn buckets_follow_hugging_faces_formula() {
        let attention = RelativeAttention {
            buckets: 32,
            max_distance: MAX_DISTANCE,
        };
        // Keys after the query (relative > 0) take the upper half.
        let cases = [
            (0, 0),
            (-1, 1),
            (-7, 7),
            (-8, 8),
            (-11, 8),
            (-20, 10),
            (-40, 12),
            (-127, 15),
            (-500, 15),
            (1, 17),
            (7, 23),
            (8, 24),
            (20, 26),
            (500, 31),
        ];
        for (relative, bucket) in cases {
            assert_eq!(
                relative_position_bucket(relative, attention),
                bucket,
                "relative position {relative}"
            );
        }
    }

    #[test]
    fn checkpoint_names_map_onto_berts() {
        for (from, to) in [
            (
                "encoder.layer.0.attention.attn.q.weight",
                "encoder.layer.0.attention.self.query.weight",
            ),
            (
                "mpnet.encoder.layer.11.attention.attn.o.bias",
                "encoder.layer.11.attention.output.dense.bias",
            ),
            (
                "encoder.layer.2.attention.LayerNorm.weight",
                "encoder.layer.2.attention.output.LayerNorm.weight",
            ),
            (
                "encoder.layer.2.output.LayerNorm.weight",
                "encoder.layer.2.output.LayerNorm.weight",
            ),
            (BIAS_TABLE, BIAS_TABLE),
            ("classifier.out_proj.weight", "classifier.weight"),
        ] {
            assert_eq!(artifact_name(from), to);
        }
    }
}
