//! XLM-RoBERTa (`XLMRobertaModel`, `XLMRobertaForSequenceClassification`), and RoBERTa and
//! CamemBERT, whose code is the same: BERT's post-LayerNorm encoder ([`bert`]) with position
//! ids counted from `padding_idx + 1`, a single token type, and a classification head over
//! `<s>` (`classifier.dense`, tanh, `classifier.out_proj`) that is BERT's pooler + classifier
//! under other names. The sentencepiece tokenizer and its pair template (`<s> A </s></s> B
//! </s>`) come with the checkpoint's `tokenizer.json`.

use serde::Deserialize;

use super::bert;

/// Where a task model (`...ForSequenceClassification`) keeps the encoder.
pub const PREFIX: &str = "roberta.";

/// Reads a Hugging Face `config.json` of this family.
pub fn config_from_hf(json: &serde_json::Value) -> anyhow::Result<bert::Config> {
    let mut config = bert::Config::from_hf(json)?;
    config.position_offset = padding_idx(json)? + 1;
    Ok(config)
}

/// `pad_token_id`, which RoBERTa-style position ids count from (1 in every released model).
pub fn padding_idx(json: &serde_json::Value) -> anyhow::Result<usize> {
    #[derive(Deserialize)]
    struct Padding {
        #[serde(default = "one")]
        pad_token_id: usize,
    }
    fn one() -> usize {
        1
    }
    Ok(Padding::deserialize(json)?.pad_token_id)
}

/// The artifact's name (BERT's) of checkpoint tensor `name`.
pub fn artifact_name(name: &str) -> String {
    classification_head_name(name.strip_prefix(PREFIX).unwrap_or(name))
}

/// RoBERTa's classification head under BERT's names: `classifier.dense` is the pooler,
/// `classifier.out_proj` the classifier (MPNet's head is the same).
pub fn classification_head_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("classifier.dense.") {
        format!("pooler.dense.{rest}")
    } else if let Some(rest) = name.strip_prefix("classifier.out_proj.") {
        format!("classifier.{rest}")
    } else {
        name.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_map_onto_berts() {
        assert_eq!(
            artifact_name("roberta.encoder.layer.3.attention.self.query.weight"),
            "encoder.layer.3.attention.self.query.weight"
        );
        assert_eq!(
            artifact_name("classifier.dense.weight"),
            "pooler.dense.weight"
        );
        assert_eq!(artifact_name("classifier.out_proj.bias"), "classifier.bias");
        assert_eq!(
            artifact_name("embeddings.word_embeddings.weight"),
            "embeddings.word_embeddings.weight"
        );
    }

    #[test]
    fn positions_start_after_the_padding_id() {
        let json = serde_json::json!({
            "vocab_size": 250002, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 256,
            "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
            "pad_token_id": 1
        });
        let config = config_from_hf(&json).unwrap();
        assert_eq!(config.position_offset, 2);
        assert_eq!(config.max_tokens(), 512);
    }
}
