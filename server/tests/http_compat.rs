//! The rest of TEI's routes and the OpenAI and Cohere contracts, in process on the int8
//! MiniLM and the int8 test cross-encoder: token-id inputs, truncation direction, `dimensions`,
//! prompts, `/embed_all`, `/similarity`, `/decode`, `/v1/models`, `/v1/rerank` and
//! `/v2/rerank`, and the documented 4xx error of each new field.

mod http_support;

use std::path::Path;

use axum::http::Method;
use http_support::common::{self, cosine, reranker};
use http_support::{app, app_on, call, post};
use qmodel_server::artifact::Precision;
use qmodel_server::backend::{DeviceKind, load};
use qmodel_server::config::{Limits, PromptArgs};
use qmodel_server::http::router;
use qmodel_server::service::Service;
use qmodel_server::threads::ComputeThreads;
use serde_json::{Value, json};

const TEXTS: [&str; 3] = [
    "The cat sits on the mat.",
    "Kubernetes schedules containers onto nodes.",
    "Zürich liegt am Zürichsee.",
];

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// The ids of `text` with special tokens, from `/tokenize`.
async fn ids(router: &axum::Router, text: &str) -> Vec<u32> {
    let tokens = post(router, "/tokenize", json!({"inputs": text}))
        .await
        .json();
    tokens[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap() as u32)
        .collect()
}

#[tokio::test]
async fn token_ids_embed_like_their_text_and_unknown_ids_are_named() {
    let router = router(&app(Limits::default(), true).await);
    let texts = post(&router, "/embed", json!({"inputs": TEXTS}))
        .await
        .embeddings();
    let mut id_lists = Vec::new();
    for text in TEXTS {
        id_lists.push(ids(&router, text).await);
    }
    // A list of lists of ids, a flat list (one input), and a mix of texts and ids.
    let from_ids = post(&router, "/embed", json!({"inputs": id_lists}))
        .await
        .embeddings();
    assert_eq!(from_ids, texts);
    let one = post(&router, "/embed", json!({"inputs": id_lists[1]}))
        .await
        .embeddings();
    assert_eq!(one, vec![texts[1].clone()]);
    let mixed = post(
        &router,
        "/embed",
        json!({"inputs": [TEXTS[0], id_lists[2]]}),
    )
    .await
    .embeddings();
    assert_eq!(mixed, vec![texts[0].clone(), texts[2].clone()]);
    let openai = post(&router, "/v1/embeddings", json!({"input": id_lists}))
        .await
        .json();
    let first: Vec<f32> = serde_json::from_value(openai["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(first, texts[0]);
    let tokens: usize = id_lists.iter().map(Vec::len).sum();
    assert_eq!(openai["usage"]["prompt_tokens"], tokens);

    for (body, route) in [
        (json!({"inputs": [[101, 30522, 102]]}), "/embed"),
        (json!({"input": [101, 30522]}), "/v1/embeddings"),
        (json!({"ids": [101, 30522]}), "/decode"),
    ] {
        let message = post(&router, route, body)
            .await
            .expect_error(422, "validation");
        assert!(message.contains("30522"), "{route}: {message}");
    }
    for (name, body) in [
        ("negative id", json!({"inputs": [[101, -1]]})),
        ("id over u32", json!({"inputs": [[101, 5_000_000_000u64]]})),
        ("float id", json!({"inputs": [[101, 1.5]]})),
        ("ids mixed with texts", json!({"inputs": [101, "a"]})),
        ("empty ids", json!({"inputs": [[]]})),
        ("text in ids", json!({"inputs": [["a"]]})),
    ] {
        let reply = post(&router, "/embed", body).await;
        assert!(!reply.expect_error(422, "validation").is_empty(), "{name}");
    }
    let reply = post(&router, "/tokenize", json!({"inputs": [[101, 102]]})).await;
    reply.expect_error(422, "validation");
}

#[tokio::test]
async fn truncation_cuts_the_end_it_is_told_to() {
    let router = router(&app(Limits::default(), true).await);
    // Over 256 tokens: the start says one thing, the end another.
    let start = "Cats are small furry pets that purr. ".repeat(40);
    let end = "Stock markets fell sharply on Tuesday. ".repeat(40);
    let long = format!("{start}{end}");
    let embed = |body: Value| {
        let router = router.clone();
        async move { post(&router, "/embed", body).await.embeddings().remove(0) }
    };
    let right = embed(json!({"inputs": long, "truncate": true})).await;
    let default_right =
        embed(json!({"inputs": long, "truncate": true, "truncation_direction": "Right"})).await;
    let left =
        embed(json!({"inputs": long, "truncate": true, "truncation_direction": "left"})).await;
    let cats = embed(json!({"inputs": start, "truncate": true})).await;
    let stocks =
        embed(json!({"inputs": end, "truncate": true, "truncation_direction": "left"})).await;
    assert_eq!(right, default_right);
    assert!(
        cosine(&right, &cats) > 0.99,
        "right truncation keeps the start"
    );
    assert!(
        cosine(&left, &stocks) > 0.99,
        "left truncation keeps the end"
    );
    assert!(cosine(&left, &right) < 0.9);

    // Token ids are cut the same way, keeping the first or the last 256.
    let mut id_list: Vec<u32> = (0..300).map(|i| 2000 + i).collect();
    let kept_left = embed(json!({"inputs": [&id_list[44..]], "truncate": true})).await;
    let cut_left =
        embed(json!({"inputs": [&id_list], "truncate": true, "truncation_direction": "left"}))
            .await;
    assert_eq!(cut_left, kept_left);
    id_list.truncate(256);
    let kept_right = embed(json!({"inputs": [&id_list]})).await;
    let cut_right = embed(
        json!({"inputs": [(0..300).map(|i| 2000 + i).collect::<Vec<u32>>()], "truncate": true}),
    )
    .await;
    assert_eq!(cut_right, kept_right);
    let reply = post(
        &router,
        "/embed",
        json!({"inputs": [(0..300).collect::<Vec<u32>>()], "truncate": false}),
    )
    .await;
    assert!(reply.expect_error(422, "validation").contains("300 tokens"));
    let reply = post(
        &router,
        "/embed",
        json!({"inputs": "a", "truncation_direction": "middle"}),
    )
    .await;
    reply.expect_error(422, "validation");
}

#[tokio::test]
async fn dimensions_keep_a_prefix_renormalized_and_refuse_more_than_the_width() {
    let router = router(&app(Limits::default(), true).await);
    let full = post(
        &router,
        "/embed",
        json!({"inputs": TEXTS[1], "normalize": false}),
    )
    .await
    .embeddings()
    .remove(0);
    let short = post(
        &router,
        "/embed",
        json!({"inputs": TEXTS[1], "dimensions": 64}),
    )
    .await
    .embeddings()
    .remove(0);
    assert_eq!(short.len(), 64);
    assert!((norm(&short) - 1.0).abs() < 1e-5);
    assert!(cosine(&short, &full[..64]) > 0.99999);
    let raw = post(
        &router,
        "/embed",
        json!({"inputs": TEXTS[1], "dimensions": 64, "normalize": false}),
    )
    .await
    .embeddings()
    .remove(0);
    assert_eq!(raw, full[..64]);
    let openai = post(
        &router,
        "/v1/embeddings",
        json!({"input": TEXTS[1], "dimensions": 64}),
    )
    .await
    .json();
    let v: Vec<f32> = serde_json::from_value(openai["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(v, short);
    for dimensions in [json!(0), json!(385), json!(-1), json!("64")] {
        let dimensions = &dimensions;
        for (route, field) in [("/embed", "inputs"), ("/v1/embeddings", "input")] {
            let mut body = json!({"dimensions": dimensions});
            body[field] = json!("a");
            let reply = post(&router, route, body).await;
            reply.expect_error(422, "validation");
        }
    }
    let info = call(&router, Method::GET, "/info", "", None).await.json();
    assert_eq!(info["dimensions"], 384);
}

#[tokio::test]
async fn openai_takes_up_to_2048_inputs_whatever_the_client_batch_size() {
    let limits = Limits {
        max_client_batch_size: 4,
        ..Limits::default()
    };
    let router = router(&app(limits, true).await);
    let inputs: Vec<String> = (0..2048).map(|i| format!("item {}", i % 7)).collect();
    let reply = post(
        &router,
        "/v1/embeddings",
        json!({"input": inputs, "user": "u-1"}),
    )
    .await
    .json();
    let data = reply["data"].as_array().unwrap();
    assert_eq!(data.len(), 2048);
    assert_eq!(data[2047]["index"], 2047);
    assert_eq!(data[7]["embedding"], data[0]["embedding"]);
    let over: Vec<String> = (0..2049).map(|i| format!("item {i}")).collect();
    let reply = post(&router, "/v1/embeddings", json!({"input": over})).await;
    assert!(reply.expect_error(422, "validation").contains("2048"));
    // /embed keeps MAX_CLIENT_BATCH_SIZE.
    let reply = post(
        &router,
        "/embed",
        json!({"inputs": ["a", "b", "c", "d", "e"]}),
    )
    .await;
    reply.expect_error(422, "validation");

    let models = call(&router, Method::GET, "/v1/models", "", None)
        .await
        .json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "all-MiniLM-L6-v2");
    assert_eq!(models["data"][0]["object"], "model");
}

#[tokio::test]
async fn embed_all_similarity_and_decode_agree_with_embed_and_tokenize() {
    let router = router(&app(Limits::default(), true).await);
    let tokens = post(&router, "/embed_all", json!({"inputs": TEXTS}))
        .await
        .json();
    let pooled = post(
        &router,
        "/embed",
        json!({"inputs": TEXTS, "normalize": false}),
    )
    .await
    .embeddings();
    for (i, text) in TEXTS.iter().enumerate() {
        let rows: Vec<Vec<f32>> = serde_json::from_value(tokens[i].clone()).unwrap();
        assert_eq!(
            rows.len(),
            ids(&router, text).await.len(),
            "one vector per token"
        );
        assert!(rows.iter().all(|r| r.len() == 384));
        // Mean pooling of the token vectors is the sentence vector.
        let mean: Vec<f32> = (0..384)
            .map(|d| rows.iter().map(|r| r[d]).sum::<f32>() / rows.len() as f32)
            .collect();
        assert!(cosine(&mean, &pooled[i]) > 0.99999);
    }

    let unit = post(&router, "/embed", json!({"inputs": TEXTS}))
        .await
        .embeddings();
    let similarity = post(
        &router,
        "/similarity",
        json!({"inputs": {"source_sentence": TEXTS[0], "sentences": &TEXTS[1..]}}),
    )
    .await
    .json();
    let scores: Vec<f32> = serde_json::from_value(similarity).unwrap();
    for (score, other) in scores.iter().zip(&unit[1..]) {
        assert!((f64::from(*score) - cosine(&unit[0], other)).abs() < 1e-5);
    }

    let id_lists = [
        ids(&router, "hello world").await,
        ids(&router, "Héllo").await,
    ];
    let texts = post(&router, "/decode", json!({"ids": id_lists}))
        .await
        .json();
    assert_eq!(texts, json!(["hello world", "hello"]));
    let with_special = post(
        &router,
        "/decode",
        json!({"ids": id_lists[0], "skip_special_tokens": false}),
    )
    .await
    .json();
    assert_eq!(with_special, json!(["[CLS] hello world [SEP]"]));

    for (route, body) in [
        ("/embed_all", json!({"inputs": []})),
        ("/embed_all", json!({"inputs": ""})),
        (
            "/similarity",
            json!({"inputs": {"source_sentence": "", "sentences": ["a"]}}),
        ),
        (
            "/similarity",
            json!({"inputs": {"source_sentence": "a", "sentences": []}}),
        ),
        ("/similarity", json!({"inputs": {"source_sentence": "a"}})),
        (
            "/similarity",
            json!({"source_sentence": "a", "sentences": ["b"]}),
        ),
        ("/decode", json!({"ids": []})),
        ("/decode", json!({"ids": [[]]})),
        ("/decode", json!({"ids": "hello"})),
        ("/decode", json!({"ids": [-3]})),
    ] {
        post(&router, route, body)
            .await
            .expect_error(422, "validation");
    }
}

/// A temporary copy of checkpoint `src` (its files linked) with `file` written as `content`.
fn checkpoint_with(src: &Path, file: &str, content: &str) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != file {
            std::os::unix::fs::symlink(entry.path(), copy.path().join(entry.file_name())).unwrap();
        }
    }
    std::fs::write(copy.path().join(file), content).unwrap();
    copy
}

#[tokio::test]
async fn prompts_come_from_the_checkpoint_and_requests_or_flags_pick_them() {
    // MiniLM with e5-style prompts.
    let checkpoint = checkpoint_with(
        &common::minilm(),
        "config_sentence_transformers.json",
        r#"{"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": "passage"}"#,
    );
    let artifact = common::artifact(checkpoint.path(), Precision::Int8);
    let serve = |prompts: PromptArgs| {
        let model = load(artifact.path(), DeviceKind::Cpu).unwrap();
        router(
            &Service::new(
                model,
                Limits::default(),
                &prompts,
                ComputeThreads::detect(None),
            )
            .unwrap(),
        )
    };
    let plain = router(&app(Limits::default(), true).await);
    let embed = |router: &axum::Router, body: Value| {
        let router = router.clone();
        async move { post(&router, "/embed", body).await.embeddings().remove(0) }
    };
    let text = TEXTS[1];

    // The checkpoint's default prompt, a named one, and the flags.
    let served = serve(PromptArgs::default());
    let info = call(&served, Method::GET, "/info", "", None).await.json();
    assert_eq!(
        info["prompts"],
        json!({"passage": "passage: ", "query": "query: "})
    );
    assert_eq!(info["default_prompt"], "passage: ");
    let passage = embed(&plain, json!({"inputs": format!("passage: {text}")})).await;
    let query = embed(&plain, json!({"inputs": format!("query: {text}")})).await;
    assert_eq!(embed(&served, json!({"inputs": text})).await, passage);
    assert_eq!(
        embed(&served, json!({"inputs": text, "prompt_name": "query"})).await,
        query
    );
    let tokens = post(
        &served,
        "/tokenize",
        json!({"inputs": "x", "prompt_name": "query"}),
    )
    .await
    .json();
    assert_eq!(tokens[0][1]["text"], "query");
    let by_name = serve(PromptArgs {
        default_prompt_name: Some("query".into()),
        default_prompt: None,
    });
    assert_eq!(embed(&by_name, json!({"inputs": text})).await, query);
    let by_text = serve(PromptArgs {
        default_prompt_name: None,
        default_prompt: Some("query: ".into()),
    });
    assert_eq!(embed(&by_text, json!({"inputs": text})).await, query);

    for route in ["/embed", "/embed_all", "/tokenize"] {
        let body = json!({"inputs": text, "prompt_name": "title"});
        let message = post(&served, route, body)
            .await
            .expect_error(422, "validation");
        assert!(message.contains("\"title\""), "{route}: {message}");
    }
    let body = json!({"inputs": text, "prompt_name": 5});
    post(&served, "/embed", body)
        .await
        .expect_error(422, "validation");
    let model = load(artifact.path(), DeviceKind::Cpu).unwrap();
    let unknown = PromptArgs {
        default_prompt_name: Some("title".into()),
        default_prompt: None,
    };
    let error = Service::new(
        model,
        Limits::default(),
        &unknown,
        ComputeThreads::detect(None),
    )
    .err()
    .unwrap();
    assert!(error.to_string().contains("\"title\""), "{error}");
}

fn ranks(value: &Value, score: &str) -> Vec<(usize, f32)> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap() as usize,
                r[score].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

#[tokio::test]
async fn cohere_and_jina_rerank_shapes_score_exactly_as_tei_rerank() {
    let router = router(&app_on(&reranker(), Limits::default(), true).await);
    let query = "What is the capital of France?";
    let documents = [
        "Paris is the capital of France.",
        "The mitochondria is the powerhouse of the cell.",
        "France's capital city is Paris, on the Seine.",
        "Rust has no garbage collector.",
    ];
    let tei = post(
        &router,
        "/rerank",
        json!({"query": query, "texts": documents}),
    )
    .await
    .json();
    let tei = ranks(&tei, "score");
    for route in ["/v1/rerank", "/v2/rerank"] {
        let reply = post(
            &router,
            route,
            json!({"model": "m", "query": query, "documents": documents}),
        )
        .await
        .json();
        assert_eq!(ranks(&reply["results"], "relevance_score"), tei, "{route}");
        assert!(reply["results"][0].get("document").is_none());
        assert!(reply["id"].as_str().is_some_and(|id| !id.is_empty()));
        assert_eq!(reply["meta"]["api_version"]["version"], "2");

        let objects: Vec<Value> = documents.iter().map(|d| json!({"text": d})).collect();
        let top = post(
            &router,
            route,
            json!({"query": query, "documents": objects, "top_n": 2, "return_documents": true}),
        )
        .await
        .json();
        let results = top["results"].as_array().unwrap();
        assert_eq!(results.len(), 2);
        for (result, (index, score)) in results.iter().zip(&tei) {
            assert_eq!(result["index"], *index);
            assert_eq!(result["relevance_score"].as_f64().unwrap() as f32, *score);
            assert_eq!(result["document"]["text"], documents[*index]);
        }
        for body in [
            json!({"query": query, "documents": documents, "top_n": 0}),
            json!({"query": query, "documents": []}),
            json!({"query": "", "documents": documents}),
            json!({"query": query, "documents": [""]}),
            json!({"query": query, "documents": [{"title": "x"}]}),
            json!({"query": query, "documents": [5]}),
            json!({"query": query, "documents": documents, "top_n": -1}),
            json!({"query": query}),
        ] {
            post(&router, route, body.clone())
                .await
                .expect_error(422, "validation");
        }
        // Cohere truncates long documents by default; `truncate: false` refuses them.
        // Over the test reranker's 512 positions.
        let long = "word ".repeat(600);
        let reply = post(&router, route, json!({"query": query, "documents": [long]})).await;
        assert_eq!(reply.status, 200, "{}", reply.json());
        let reply = post(
            &router,
            route,
            json!({"query": query, "documents": [long], "truncate": false}),
        )
        .await;
        reply.expect_error(422, "validation");
    }
    // `POST /` on a reranker is /rerank; the embedding routes need an embedding model.
    let root = post(&router, "/", json!({"query": query, "texts": documents}))
        .await
        .json();
    assert_eq!(ranks(&root, "score"), tei);
    for (route, body) in [
        ("/embed_all", json!({"inputs": "a"})),
        (
            "/similarity",
            json!({"inputs": {"source_sentence": "a", "sentences": ["b"]}}),
        ),
        ("/v1/embeddings", json!({"input": "a"})),
    ] {
        post(&router, route, body)
            .await
            .expect_error(424, "backend");
    }
    let embedder = router_of_embedder().await;
    post(
        &embedder,
        "/v2/rerank",
        json!({"query": query, "documents": documents}),
    )
    .await
    .expect_error(424, "backend");
}

async fn router_of_embedder() -> axum::Router {
    router(&app(Limits::default(), true).await)
}

/// The test classifier (`models/make_reranker`), as `precision`, served with default limits;
/// `edit` may change its config.json first (the files are linked into a temporary copy).
fn classifier(precision: Precision, edit: impl FnOnce(&mut Value)) -> axum::Router {
    let src = common::checkpoint(
        "minilm-classifier-test",
        "models/fetch && .venv/bin/python models/make_reranker",
    );
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    let copy = checkpoint_with(&src, "config.json", &config.to_string());
    let artifact = common::artifact(copy.path(), precision);
    let model = load(artifact.path(), DeviceKind::Cpu).unwrap();
    router(
        &Service::new(
            model,
            Limits::default(),
            &PromptArgs::default(),
            ComputeThreads::detect(None),
        )
        .unwrap(),
    )
}

fn predictions(value: &Value) -> Vec<(String, f32)> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["label"].as_str().unwrap().to_owned(),
                p["score"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

#[tokio::test]
async fn predict_scores_every_label_single_or_multi_label() {
    let multi = classifier(Precision::Int8, |_| {});
    let info = call(&multi, Method::GET, "/info", "", None).await.json();
    assert_eq!(info["task"], "classify");
    let text = "You are all idiots and this is spam.";
    let scored = predictions(
        &post(&multi, "/predict", json!({"inputs": text}))
            .await
            .json(),
    );
    let raw = predictions(
        &post(
            &multi,
            "/predict",
            json!({"inputs": text, "raw_scores": true}),
        )
        .await
        .json(),
    );
    let mut labels: Vec<&str> = scored.iter().map(|(l, _)| l.as_str()).collect();
    labels.sort();
    assert_eq!(labels, ["relevant", "spam", "toxic"]);
    assert!(
        scored.windows(2).all(|w| w[0].1 >= w[1].1),
        "highest first: {scored:?}"
    );
    // Multi-label: each label's own sigmoid.
    for (label, logit) in &raw {
        let score = scored.iter().find(|(l, _)| l == label).unwrap().1;
        assert!(
            (score - 1.0 / (1.0 + (-logit).exp())).abs() < 1e-6,
            "{label}"
        );
    }
    // `POST /` is /predict for a classifier; a batch answers a list per input; a list of two
    // texts is one pair, as TEI reads it.
    let root = post(&multi, "/", json!({"inputs": text})).await.json();
    assert_eq!(predictions(&root), scored);
    let batch = post(
        &multi,
        "/predict",
        json!({"inputs": [text, "Hello there.", "A third one."]}),
    )
    .await
    .json();
    assert_eq!(batch.as_array().unwrap().len(), 3);
    assert_eq!(predictions(&batch[0]), scored);
    let pair = post(
        &multi,
        "/predict",
        json!({"inputs": [text, "Hello there."]}),
    )
    .await
    .json();
    assert_eq!(pair.as_array().unwrap().len(), 3, "one input: {pair}");
    assert!(pair[0]["label"].is_string());

    // Single-label: a softmax over the labels.
    let single = classifier(Precision::Int8, |c| {
        c.as_object_mut().unwrap().remove("problem_type");
    });
    let softmax = predictions(
        &post(&single, "/predict", json!({"inputs": text}))
            .await
            .json(),
    );
    let total: f32 = softmax.iter().map(|p| p.1).sum();
    assert!((total - 1.0).abs() < 1e-5, "{softmax:?}");

    for body in [
        json!({"inputs": []}),
        json!({"inputs": ""}),
        json!({"inputs": [["a"]]}),
        json!({"inputs": [["a", "b", "c"]]}),
        json!({"inputs": ["a", ""]}),
        json!({"inputs": 3}),
        json!({"inputs": "a", "raw_scores": "yes"}),
    ] {
        post(&multi, "/predict", body)
            .await
            .expect_error(422, "validation");
    }
    post(&multi, "/rerank", json!({"query": "q", "texts": ["a"]}))
        .await
        .expect_error(424, "backend");
    post(&multi, "/embed", json!({"inputs": "a"}))
        .await
        .expect_error(424, "backend");
    let embedder = router_of_embedder().await;
    post(&embedder, "/predict", json!({"inputs": "a"}))
        .await
        .expect_error(424, "backend");
}

#[tokio::test]
async fn a_classifier_pair_scores_its_first_label_as_the_reranker_does() {
    // F32, so that both models run the same arithmetic (int8 calibrates each on its own).
    let multi = classifier(Precision::F32, |_| {});
    let artifact = common::artifact(&reranker(), Precision::F32);
    let model = load(artifact.path(), DeviceKind::Cpu).unwrap();
    let rerank = router(
        &Service::new(
            model,
            Limits::default(),
            &PromptArgs::default(),
            ComputeThreads::detect(None),
        )
        .unwrap(),
    );
    let (query, passage) = (
        "What is the capital of France?",
        "Paris is the capital of France.",
    );
    let ranked = post(
        &rerank,
        "/rerank",
        json!({"query": query, "texts": [passage], "raw_scores": true}),
    )
    .await
    .json();
    let logit = ranked[0]["score"].as_f64().unwrap() as f32;
    let predicted = post(
        &multi,
        "/predict",
        json!({"inputs": [query, passage], "raw_scores": true}),
    )
    .await
    .json();
    let relevant = predictions(&predicted)
        .into_iter()
        .find(|(label, _)| label == "relevant")
        .unwrap()
        .1;
    assert!((relevant - logit).abs() < 1e-4, "{relevant} vs {logit}");
}
