//! The quality gate's golden set: inputs with the embeddings or rankings a good version gives
//! (a ConfigMap key, see [`crate::crd::QualityGateSpec`]), the requests that put them to a pod,
//! and how close its answers are.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::crd::Task;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GoldenSet {
    #[serde(default)]
    pub embeddings: Vec<GoldenEmbedding>,
    #[serde(default)]
    pub rankings: Vec<GoldenRanking>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GoldenEmbedding {
    pub input: String,
    pub embedding: Vec<f32>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GoldenRanking {
    pub query: String,
    pub texts: Vec<String>,
    /// Indices into `texts`, most relevant first.
    pub order: Vec<usize>,
}

/// The golden set of `text` for a model of `task`, or why it cannot serve as one.
pub fn parse(text: &str, task: Task) -> Result<GoldenSet, String> {
    let set: GoldenSet =
        serde_json::from_str(text).map_err(|error| format!("not a golden set: {error}"))?;
    match task {
        Task::Embed if set.embeddings.is_empty() => {
            return Err("an embedding model's golden set needs `embeddings`".to_owned());
        }
        Task::Rerank if set.rankings.is_empty() => {
            return Err("a reranker's golden set needs `rankings`".to_owned());
        }
        _ => {}
    }
    for (number, ranking) in set.rankings.iter().enumerate() {
        let mut order = ranking.order.clone();
        order.sort_unstable();
        if order != (0..ranking.texts.len()).collect::<Vec<_>>() {
            return Err(format!(
                "rankings[{number}].order must list each of its {} texts' indices once",
                ranking.texts.len()
            ));
        }
    }
    Ok(set)
}

/// The `/embed` request of the whole embedding set.
pub fn embed_request(set: &GoldenSet) -> String {
    let inputs: Vec<&str> = set.embeddings.iter().map(|e| e.input.as_str()).collect();
    json!({"inputs": inputs, "normalize": true}).to_string()
}

/// The `/rerank` request of one ranking.
pub fn rerank_request(ranking: &GoldenRanking) -> String {
    json!({"query": ranking.query, "texts": ranking.texts}).to_string()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// The lowest cosine between each expected embedding and the `/embed` answer's.
pub fn min_cosine(set: &GoldenSet, answer: &str) -> Result<f64, String> {
    let embeddings: Vec<Vec<f32>> = serde_json::from_str(answer)
        .map_err(|error| format!("/embed answer is not a list of vectors: {error}"))?;
    if embeddings.len() != set.embeddings.len() {
        return Err(format!(
            "/embed answered {} embeddings for {} inputs",
            embeddings.len(),
            set.embeddings.len()
        ));
    }
    set.embeddings
        .iter()
        .zip(&embeddings)
        .map(|(expected, got)| {
            if expected.embedding.len() == got.len() {
                Ok(cosine(&expected.embedding, got))
            } else {
                Err(format!(
                    "/embed answered {} dimensions where the golden set has {}",
                    got.len(),
                    expected.embedding.len()
                ))
            }
        })
        .try_fold(f64::INFINITY, |low, cosine| Ok(low.min(cosine?)))
}

/// The share of text pairs the `/rerank` answer (`[{"index", "score"}]`) orders as `ranking`
/// does (ties count half): 1 for the same order, 0 for the reverse.
pub fn rank_agreement(ranking: &GoldenRanking, answer: &str) -> Result<f64, String> {
    let answer: Vec<Value> = serde_json::from_str(answer)
        .map_err(|error| format!("/rerank answer is not a list: {error}"))?;
    let mut scores = vec![None; ranking.texts.len()];
    for entry in &answer {
        let index = entry["index"].as_u64().map(|i| i as usize);
        let score = entry["score"].as_f64();
        if let (Some(index), Some(score)) = (index, score)
            && index < scores.len()
        {
            scores[index] = Some(score);
        }
    }
    let scores: Vec<f64> = scores
        .into_iter()
        .enumerate()
        .map(|(index, score)| {
            score.ok_or_else(|| format!("/rerank gave no score for text {index}"))
        })
        .collect::<Result<_, _>>()?;
    let mut agreeing = 0.0;
    let mut pairs = 0.0;
    for (rank, &better) in ranking.order.iter().enumerate() {
        for &worse in &ranking.order[rank + 1..] {
            pairs += 1.0;
            agreeing += match scores[better].partial_cmp(&scores[worse]) {
                Some(std::cmp::Ordering::Greater) => 1.0,
                Some(std::cmp::Ordering::Equal) => 0.5,
                _ => 0.0,
            };
        }
    }
    Ok(if pairs > 0.0 { agreeing / pairs } else { 1.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> GoldenSet {
        parse(
            r#"{"embeddings": [{"input": "a", "embedding": [1, 0]}, {"input": "b", "embedding": [0, 2]}],
                "rankings": [{"query": "q", "texts": ["x", "y", "z"], "order": [2, 0, 1]}]}"#,
            Task::Embed,
        )
        .unwrap()
    }

    #[test]
    fn the_lowest_cosine_is_reported() {
        let cosine = min_cosine(&set(), "[[1.0, 0.0], [1.0, 1.0]]").unwrap();
        assert!(
            (cosine - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-6,
            "{cosine}"
        );
        assert_eq!(min_cosine(&set(), "[[3.0, 0.0], [0.0, 0.5]]").unwrap(), 1.0);
    }

    #[test]
    fn answers_of_the_wrong_shape_are_errors() {
        assert!(
            min_cosine(&set(), "[[1.0, 0.0]]")
                .unwrap_err()
                .contains("1 embeddings for 2")
        );
        assert!(
            min_cosine(&set(), "[[1.0], [1.0]]")
                .unwrap_err()
                .contains("1 dimensions")
        );
        assert!(min_cosine(&set(), r#"{"error": "x"}"#).is_err());
    }

    #[test]
    fn rank_agreement_counts_pairs_in_order() {
        let ranking = &set().rankings[0];
        let answer = |scores: [f64; 3]| {
            json!(
                scores
                    .iter()
                    .enumerate()
                    .map(|(index, score)| json!({"index": index, "score": score}))
                    .collect::<Vec<_>>()
            )
            .to_string()
        };
        assert_eq!(
            rank_agreement(ranking, &answer([0.5, 0.1, 0.9])).unwrap(),
            1.0
        );
        assert_eq!(
            rank_agreement(ranking, &answer([0.5, 0.9, 0.1])).unwrap(),
            0.0
        );
        // z > x holds, z > y holds, x > y fails: 2 of 3.
        let two_thirds = rank_agreement(ranking, &answer([0.1, 0.5, 0.9])).unwrap();
        assert!((two_thirds - 2.0 / 3.0).abs() < 1e-9);
        assert!(
            rank_agreement(ranking, r#"[{"index": 0, "score": 1}]"#)
                .unwrap_err()
                .contains("no score for text 1")
        );
    }

    #[test]
    fn bad_golden_sets_are_refused_with_the_reason() {
        assert!(
            parse("{}", Task::Embed)
                .unwrap_err()
                .contains("needs `embeddings`")
        );
        assert!(
            parse("{}", Task::Rerank)
                .unwrap_err()
                .contains("needs `rankings`")
        );
        assert!(
            parse("[1]", Task::Embed)
                .unwrap_err()
                .contains("not a golden set")
        );
        let repeated = r#"{"rankings": [{"query": "q", "texts": ["x", "y"], "order": [0, 0]}]}"#;
        assert!(
            parse(repeated, Task::Rerank)
                .unwrap_err()
                .contains("each of its 2")
        );
    }
}
