//! The reranking routes in process, on the int8 test cross-encoder (`models/make_reranker`).

mod http_support;

use axum::http::Method;
use http_support::common::reranker;
use http_support::{app_on, call, post};
use qmodel_server::config::Limits;
use qmodel_server::http::router;
use serde_json::{Value, json};

const TEXTS: [&str; 4] = [
    "Paris is the capital of France.",
    "The mitochondria is the powerhouse of the cell.",
    "France's capital city is Paris, on the Seine.",
    "Rust has no garbage collector.",
];

fn scores(ranks: &Value) -> Vec<(usize, f64)> {
    ranks
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap() as usize,
                r["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn rerank_answers_tei_ranks_highest_first() {
    let limits = Limits {
        max_client_batch_size: 4,
        ..Limits::default()
    };
    let router = router(&app_on(&reranker(), limits, true).await);
    let query = "What is the capital of France?";

    let raw = post(
        &router,
        "/rerank",
        json!({"query": query, "texts": TEXTS, "raw_scores": true}),
    )
    .await
    .json();
    let raw = scores(&raw);
    let mut indices: Vec<usize> = raw.iter().map(|&(i, _)| i).collect();
    indices.sort();
    assert_eq!(indices, vec![0, 1, 2, 3], "every text ranked once");
    assert!(
        raw.windows(2).all(|w| w[0].1 >= w[1].1),
        "not sorted: {raw:?}"
    );

    // Default scores are the sigmoid of the raw logits, same order.
    let ranks = post(
        &router,
        "/rerank",
        json!({"query": query, "texts": TEXTS, "return_text": true}),
    )
    .await
    .json();
    for (rank, (index, logit)) in ranks.as_array().unwrap().iter().zip(&raw) {
        assert_eq!(rank["index"], *index);
        let expected = 1.0 / (1.0 + (-logit).exp());
        assert!((rank["score"].as_f64().unwrap() - expected).abs() < 1e-6);
        assert_eq!(rank["text"], TEXTS[*index]);
    }
    // No text unless asked for; `POST /` is /rerank for a reranker.
    let root = post(
        &router,
        "/",
        json!({"query": query, "texts": TEXTS, "raw_scores": true}),
    )
    .await;
    assert!(
        root.json()
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r.get("text").is_none())
    );
    assert_eq!(scores(&root.json()), raw);

    // Each pair is scored as if alone.
    for &(index, logit) in &raw {
        let alone = post(
            &router,
            "/rerank",
            json!({"query": query, "texts": [TEXTS[index]], "raw_scores": true}),
        )
        .await
        .json();
        assert_eq!(scores(&alone), vec![(0, logit)]);
    }
}

#[tokio::test]
async fn rerank_refuses_bad_input_and_embedding_routes() {
    let limits = Limits {
        max_client_batch_size: 4,
        ..Limits::default()
    };
    let router = router(&app_on(&reranker(), limits, true).await);
    let cases = [
        (json!({"query": "q", "texts": []}), 422, "validation"),
        (json!({"query": "", "texts": ["a"]}), 422, "validation"),
        (json!({"query": "q", "texts": ["a", ""]}), 422, "validation"),
        (
            json!({"query": "q", "texts": ["a", "b", "c", "d", "e"]}),
            422,
            "validation",
        ),
        (json!({"query": "q", "texts": "a"}), 422, "validation"),
        (json!({"texts": ["a"]}), 422, "validation"),
        (json!({"query": 1, "texts": ["a"]}), 422, "validation"),
        (
            json!({"query": "q", "texts": ["word ".repeat(600)]}),
            422,
            "validation",
        ),
    ];
    for (body, status, error_type) in cases {
        post(&router, "/rerank", body)
            .await
            .expect_error(status, error_type);
    }
    let long = post(
        &router,
        "/rerank",
        json!({"query": "q", "texts": ["word ".repeat(600)], "truncate": true}),
    )
    .await;
    assert_eq!(scores(&long.json()).len(), 1);

    for path in ["/embed", "/v1/embeddings"] {
        call(
            &router,
            Method::POST,
            path,
            r#"{"inputs": "a", "input": "a"}"#,
            None,
        )
        .await
        .expect_error(424, "backend");
    }
}
