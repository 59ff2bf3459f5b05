//! The HTTP API in process, on the real int8 MiniLM: shapes, bad input, auth, readiness, metrics.

mod http_support;

use axum::http::{Method, StatusCode};
use base64::Engine as _;
use http_support::{app, call, metric, post};
use qmodel_server::config::Limits;
use qmodel_server::http::router;
use serde_json::json;

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

#[tokio::test]
async fn bad_input_gets_a_json_error_with_the_right_code() {
    let limits = Limits {
        payload_limit: 2_000_000,
        ..Limits::default()
    };
    let router = router(&app(limits, true).await);
    let many: Vec<String> = (0..10_000).map(|i| format!("text {i}")).collect();
    let megabyte = "word ".repeat(200_000);
    let too_large = "x".repeat(2_100_000);
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "invalid JSON",
            "/embed",
            b"{\"inputs\": ".to_vec(),
            422,
            "validation",
        ),
        (
            "not JSON at all",
            "/embed",
            b"inputs=hello".to_vec(),
            422,
            "validation",
        ),
        ("empty body", "/embed", Vec::new(), 422, "validation"),
        (
            "inputs is a number",
            "/embed",
            br#"{"inputs": 5}"#.to_vec(),
            422,
            "validation",
        ),
        (
            "inputs holds a number",
            "/embed",
            br#"{"inputs": ["a", 5]}"#.to_vec(),
            422,
            "validation",
        ),
        (
            "normalize is a string",
            "/embed",
            br#"{"inputs": "a", "normalize": "yes"}"#.to_vec(),
            422,
            "validation",
        ),
        (
            "missing inputs",
            "/embed",
            br#"{"input": "a"}"#.to_vec(),
            422,
            "validation",
        ),
        (
            "empty string",
            "/embed",
            br#"{"inputs": ""}"#.to_vec(),
            422,
            "validation",
        ),
        (
            "empty string in a list",
            "/embed",
            br#"{"inputs": ["a", ""]}"#.to_vec(),
            422,
            "validation",
        ),
        (
            "empty list",
            "/embed",
            br#"{"inputs": []}"#.to_vec(),
            422,
            "validation",
        ),
        (
            "empty OpenAI input",
            "/v1/embeddings",
            br#"{"input": []}"#.to_vec(),
            422,
            "validation",
        ),
        (
            "OpenAI token id outside the vocabulary",
            "/v1/embeddings",
            br#"{"input": [[101, 99999]]}"#.to_vec(),
            422,
            "validation",
        ),
        (
            "unknown encoding format",
            "/v1/embeddings",
            br#"{"input": "a", "encoding_format": "int8"}"#.to_vec(),
            422,
            "validation",
        ),
        (
            "10k inputs",
            "/embed",
            json!({"inputs": many}).to_string().into_bytes(),
            422,
            "validation",
        ),
        (
            "1 MB string, truncate=false",
            "/embed",
            json!({"inputs": megabyte}).to_string().into_bytes(),
            422,
            "validation",
        ),
        (
            "over the payload limit",
            "/embed",
            json!({"inputs": too_large}).to_string().into_bytes(),
            413,
            "payload_too_large",
        ),
        (
            "invalid UTF-8",
            "/embed",
            b"{\"inputs\": \"caf\xe9\"}".to_vec(),
            422,
            "validation",
        ),
        (
            "invalid UTF-8 to /tokenize",
            "/tokenize",
            b"{\"inputs\": \"\xff\xfe\"}".to_vec(),
            422,
            "validation",
        ),
        (
            "rerank on an embedding model",
            "/rerank",
            br#"{"query": "q", "texts": ["a"]}"#.to_vec(),
            424,
            "backend",
        ),
    ];
    for (name, path, body, status, error_type) in cases {
        let reply = call(&router, Method::POST, path, body, None).await;
        assert_eq!(
            reply.content_type.as_deref(),
            Some("application/json"),
            "{name}: not a JSON error"
        );
        let message = reply.expect_error(status, error_type);
        assert!(!message.is_empty(), "{name}: empty message");
    }

    // Truncation makes the same megabyte fine.
    let reply = post(
        &router,
        "/embed",
        json!({"inputs": "word ".repeat(200_000), "truncate": true}),
    )
    .await;
    assert_eq!(reply.embeddings()[0].len(), 384);

    let reply = call(&router, Method::GET, "/nope", "", None).await;
    reply.expect_error(404, "not_found");
    let reply = call(&router, Method::GET, "/embed", "", None).await;
    reply.expect_error(405, "method_not_allowed");
}

#[tokio::test]
async fn embed_routes_answer_in_tei_and_openai_shapes() {
    let router = router(&app(Limits::default(), true).await);
    let texts = ["The cat sits on the mat.", "Rust is a systems language."];

    let single = post(&router, "/embed", json!({"inputs": texts[0]}))
        .await
        .embeddings();
    assert_eq!((single.len(), single[0].len()), (1, 384));
    let batch = post(&router, "/embed", json!({"inputs": texts}))
        .await
        .embeddings();
    assert_eq!(batch.len(), 2);
    assert_eq!(
        batch[0], single[0],
        "a batch of one request is not batch-invariant"
    );
    for v in &batch {
        assert!((norm(v) - 1.0).abs() < 1e-4, "the manifest says normalize");
    }
    let raw = post(
        &router,
        "/embed",
        json!({"inputs": texts[0], "normalize": false}),
    )
    .await
    .embeddings();
    assert!(
        (norm(&raw[0]) - 1.0).abs() > 1e-2,
        "normalize=false still normalized"
    );
    let rescaled: Vec<f32> = raw[0].iter().map(|x| x / norm(&raw[0])).collect();
    assert!(http_support::common::cosine(&rescaled, &single[0]) > 0.99999);

    // `POST /` is /embed for an embedding model (huggingface_hub posts there).
    let root = post(&router, "/", json!({"inputs": texts}))
        .await
        .embeddings();
    assert_eq!(root, batch);

    let openai = post(
        &router,
        "/v1/embeddings",
        json!({"input": texts, "model": "x", "user": "u"}),
    )
    .await
    .json();
    assert_eq!(openai["object"], "list");
    assert_eq!(openai["model"], "all-MiniLM-L6-v2");
    let data = openai["data"].as_array().unwrap();
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        let v: Vec<f32> = serde_json::from_value(item["embedding"].clone()).unwrap();
        assert_eq!(v, batch[i]);
    }
    // [CLS] + words + [SEP] of both texts.
    let tokens = post(&router, "/tokenize", json!({"inputs": texts}))
        .await
        .json();
    let count: usize = tokens
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_array().unwrap().len())
        .sum();
    assert_eq!(openai["usage"]["prompt_tokens"], count);
    assert_eq!(openai["usage"]["total_tokens"], count);

    let b64 = post(
        &router,
        "/v1/embeddings",
        json!({"input": texts[1], "encoding_format": "base64"}),
    )
    .await
    .json();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, batch[1]);

    let tokens = post(
        &router,
        "/tokenize",
        json!({"inputs": "Héllo", "add_special_tokens": false}),
    )
    .await
    .json();
    assert_eq!(
        tokens,
        json!([[{"id": 7592, "text": "hello", "special": false, "start": 0, "stop": 6}]])
    );
}

#[tokio::test]
async fn info_describes_the_model_and_the_limits() {
    let limits = Limits {
        max_client_batch_size: 7,
        max_concurrent_requests: 9,
        ..Limits::default()
    };
    let router = router(&app(limits, true).await);
    let info = call(&router, Method::GET, "/info", "", None).await.json();
    for (field, value) in [
        ("model_id", json!("all-MiniLM-L6-v2")),
        ("task", json!("embed")),
        ("precision", json!("int8")),
        ("device", json!("cpu")),
        ("pooling", json!("mean")),
        ("max_input_length", json!(256)),
        ("max_batch_tokens", json!(16384)),
        ("max_client_batch_size", json!(7)),
        ("max_concurrent_requests", json!(9)),
        ("version", json!(env!("CARGO_PKG_VERSION"))),
    ] {
        assert_eq!(info[field], value, "{field} in {info}");
    }
    assert!(info["model_version"].is_string());
}

#[tokio::test]
async fn an_api_key_guards_everything_but_health_ready_and_metrics() {
    let limits = Limits {
        api_key: Some("s3cret".into()),
        ..Limits::default()
    };
    let router = router(&app(limits, true).await);
    let body = json!({"inputs": "hello"}).to_string();
    for (path, method) in [
        ("/embed", Method::POST),
        ("/", Method::POST),
        ("/v1/embeddings", Method::POST),
        ("/tokenize", Method::POST),
        ("/rerank", Method::POST),
        ("/info", Method::GET),
    ] {
        for token in [None, Some("wrong"), Some("s3cret2"), Some("")] {
            let reply = call(&router, method.clone(), path, body.clone(), token).await;
            reply.expect_error(401, "unauthorized");
        }
    }
    let ok = call(&router, Method::POST, "/embed", body, Some("s3cret")).await;
    assert_eq!(ok.embeddings().len(), 1);
    for path in ["/health", "/ready", "/metrics"] {
        let reply = call(&router, Method::GET, path, "", None).await;
        assert_eq!(reply.status, StatusCode::OK, "{path} is not open");
    }
}

#[tokio::test]
async fn ready_only_after_warm_up_and_health_while_the_worker_runs() {
    let app = app(Limits::default(), false).await;
    let router = router(&app);
    let get = |path: &'static str| call(&router, Method::GET, path, "", None);
    get("/ready").await.expect_error(503, "unhealthy");
    assert_eq!(get("/health").await.status, StatusCode::OK);
    app.warm_up().await.unwrap();
    assert_eq!(get("/ready").await.status, StatusCode::OK);
    app.shutdown();
    get("/ready").await.expect_error(503, "unhealthy");
    get("/health").await.expect_error(503, "unhealthy");
    // Work after shutdown is refused, not lost in a queue nobody reads.
    post(&router, "/embed", json!({"inputs": "late"}))
        .await
        .expect_error(503, "unhealthy");
}

#[tokio::test]
async fn metrics_count_requests_and_time_every_stage() {
    let router = router(&app(Limits::default(), true).await);
    post(&router, "/embed", json!({"inputs": ["a b c", "d e f"]}))
        .await
        .embeddings();
    post(&router, "/embed", json!({"inputs": []}))
        .await
        .expect_error(422, "validation");
    let reply = call(&router, Method::GET, "/metrics", "", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.content_type.unwrap().starts_with("text/plain"));
    let text = String::from_utf8(reply.body).unwrap();
    let value = |series: &str| metric(&text, series);
    assert_eq!(
        value(r#"qmodel_requests_total{route="/embed",status="200"}"#),
        1.0
    );
    assert_eq!(
        value(r#"qmodel_requests_total{route="/embed",status="422"}"#),
        1.0
    );
    // Warm-up ran one batch, the request one more (its two inputs have the same length).
    assert_eq!(value("qmodel_batch_size_count"), 2.0);
    assert_eq!(value("qmodel_batch_size_sum"), 3.0);
    assert_eq!(value("qmodel_inference_duration_seconds_count"), 2.0);
    assert_eq!(value("qmodel_queue_duration_seconds_count"), 3.0);
    assert_eq!(value("qmodel_tokenization_duration_seconds_count"), 1.0);
    assert!(value("qmodel_batch_tokens_sum") >= 2.0 * 5.0);
    assert!(text.contains("qmodel_queue_depth 0"));
    assert!(text.contains("qmodel_request_duration_seconds_bucket{route=\"/embed\""));
}

#[tokio::test]
async fn overload_is_refused_with_429_before_the_body_is_read() {
    let limits = Limits {
        max_concurrent_requests: 2,
        max_batch_requests: 1,
        ..Limits::default()
    };
    let router = router(&app(limits, true).await);
    let long = "tokens and queues ".repeat(80);
    let inputs: Vec<String> = (0..32).map(|i| format!("{i} {long}")).collect();
    let body = json!({"inputs": inputs, "truncate": true}).to_string();
    let replies: Vec<_> = (0..24)
        .map(|_| {
            let router = router.clone();
            let body = body.clone();
            tokio::spawn(async move { call(&router, Method::POST, "/embed", body, None).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for reply in replies {
        let reply = reply.await.unwrap();
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            reply.expect_error(429, "overloaded");
        } else {
            assert_eq!(reply.embeddings().len(), 32);
        }
        statuses.push(reply.status.as_u16());
    }
    let refused = statuses.iter().filter(|&&s| s == 429).count();
    assert!(refused > 0, "nothing refused: {statuses:?}");
    assert!(refused < statuses.len(), "everything refused: {statuses:?}");
    // Slots come back: once the burst is over the server accepts again.
    let after = call(
        &router,
        Method::POST,
        "/embed",
        json!({"inputs": "x"}).to_string(),
        None,
    )
    .await;
    assert_eq!(after.embeddings().len(), 1);
}
