//! Property-based fuzzing of request decoding, validation and tokenization through the real
//! router (in process, `tower::ServiceExt::oneshot`) on the int8 embedding model, the int8
//! test reranker and the int8 test classifier: arbitrary bytes, arbitrary JSON values and well-formed requests carrying
//! arbitrary Unicode, token ids and flags go to every route (TEI's, OpenAI's, Cohere's). Whatever comes in: no panic, never a 5xx, and every 4xx
//! is TEI's JSON error with an `error_type`.
//!
//! Bounded for CI (proptest's default of 256 cases per property, five properties); a longer
//! run: `PROPTEST_CASES=20000 cargo test --release -p qmodel-server --test http_fuzz`.

mod http_support;

use qmodel_server::http::router;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request};
use http_body_util::BodyExt;
use proptest::prelude::*;
use qmodel_server::config::Limits;
use serde_json::{Map, Value, json};
use tower::ServiceExt;

use http_support::{app_on, common};

const POST_ROUTES: [&str; 11] = [
    "/",
    "/embed",
    "/embed_all",
    "/similarity",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
    "/predict",
    "/v1/embeddings",
    "/tokenize",
    "/decode",
];
const GET_ROUTES: [&str; 5] = ["/info", "/health", "/ready", "/metrics", "/v1/models"];
/// Field names the request types know, so generated objects often hit real fields.
const FIELDS: [&str; 26] = [
    "inputs",
    "input",
    "query",
    "texts",
    "normalize",
    "truncate",
    "raw_scores",
    "return_text",
    "encoding_format",
    "model",
    "add_special_tokens",
    "dimensions",
    "truncation_direction",
    "prompt_name",
    "user",
    "documents",
    "top_n",
    "return_documents",
    "text",
    "ids",
    "skip_special_tokens",
    "source_sentence",
    "sentences",
    "parameters",
    "pair",
    "labels",
];

struct Fixture {
    runtime: tokio::runtime::Runtime,
    embed: Router,
    rerank: Router,
    classify: Router,
}

/// The three apps, built once per test binary on one runtime (their batching workers outlive a case).
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let limits = Limits {
            payload_limit: 64 * 1024,
            max_client_batch_size: 8,
            ..Limits::default()
        };
        let (embed, rerank, classify) = runtime.block_on(async {
            let embed: Arc<_> = app_on(&common::minilm(), limits.clone(), true).await;
            let rerank: Arc<_> = app_on(&common::reranker(), limits.clone(), true).await;
            let classifier = common::checkpoint(
                "minilm-classifier-test",
                "models/fetch && .venv/bin/python models/make_reranker",
            );
            let classify: Arc<_> = app_on(&classifier, limits, true).await;
            (router(&embed), router(&rerank), router(&classify))
        });
        Fixture {
            runtime,
            embed,
            rerank,
            classify,
        }
    })
}

/// Sends one request to every app and checks the invariants; `Err` names the violation.
fn check(method: Method, path: &str, body: Vec<u8>) -> Result<(), TestCaseError> {
    let fixture = fixture();
    for router in [&fixture.embed, &fixture.rerank, &fixture.classify] {
        // A path that is not a valid URI never reaches the server over the wire.
        let Ok(request) = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.clone()))
        else {
            return Ok(());
        };
        let (status, reply) = fixture.runtime.block_on(async {
            let response = router.clone().oneshot(request).await.unwrap();
            let status = response.status();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (status, bytes)
        });
        let shown = || {
            format!(
                "{method} {path} body {:?} -> {status} {}",
                String::from_utf8_lossy(&body),
                String::from_utf8_lossy(&reply)
            )
        };
        prop_assert!(!status.is_server_error(), "5xx: {}", shown());
        if status.is_client_error() {
            let json: Value = serde_json::from_slice(&reply).map_err(|e| {
                TestCaseError::fail(format!("error body not JSON ({e}): {}", shown()))
            })?;
            prop_assert!(
                json["error_type"].is_string() && json["error"].is_string(),
                "error body without error/error_type: {}",
                shown()
            );
        } else {
            prop_assert!(status.is_success(), "unexpected status: {}", shown());
        }
    }
    Ok(())
}

/// Text that stresses the tokenizer: any Unicode (controls, combining marks, RTL, emoji,
/// private use), long runs of one character, and repeated words near the 256-token limit.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<String>(),
        2 => "\\PC{0,64}",
        1 => "[\\u{0300}-\\u{036F}\\u{200B}-\\u{200F}\\u{202A}-\\u{202E}\\u{FEFF}]{0,32}",
        1 => (any::<char>(), 0usize..600).prop_map(|(c, n)| c.to_string().repeat(n)),
        1 => ("[a-zé]{1,8} ", 100usize..300).prop_map(|(w, n)| w.repeat(n)),
        1 => Just(String::new()),
    ]
}

fn texts() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(text(), 0..10)
}

/// Any JSON value, objects keyed mostly by the request types' field names.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<u64>().prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        let key = prop_oneof![
            3 => prop::sample::select(FIELDS.to_vec()).prop_map(str::to_owned),
            1 => any::<String>(),
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((key, inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Requests of the right shape for some route, with arbitrary texts and flags.
fn well_formed() -> impl Strategy<Value = Value> {
    let flag = prop::option::of(any::<bool>());
    let one_or_many = prop_oneof![text().prop_map(Value::from), texts().prop_map(Value::from)];
    prop_oneof![
        (one_or_many.clone(), flag.clone(), flag.clone()).prop_map(
            |(inputs, normalize, truncate)| {
                json!({"inputs": inputs, "normalize": normalize, "truncate": truncate})
            }
        ),
        (text(), texts(), any::<bool>(), any::<bool>(), flag.clone()).prop_map(
            |(query, texts, raw_scores, return_text, truncate)| {
                json!({"query": query, "texts": texts, "raw_scores": raw_scores,
                       "return_text": return_text, "truncate": truncate})
            }
        ),
        (
            one_or_many.clone(),
            prop::sample::select(vec!["float", "base64", "int8", ""])
        )
            .prop_map(|(input, format)| {
                json!({"input": input, "model": "x", "encoding_format": format})
            }),
        (one_or_many.clone(), any::<bool>(), prop::option::of(text())).prop_map(
            |(inputs, special, prompt)| {
                json!({"inputs": inputs, "add_special_tokens": special, "prompt_name": prompt})
            }
        ),
        // Token ids: in and out of the vocabulary, flat or nested, empty, mixed with text.
        (
            ids(),
            direction(),
            flag.clone(),
            prop::option::of(0i64..400)
        )
            .prop_map(|(inputs, direction, truncate, dimensions)| {
                json!({"inputs": inputs, "input": inputs, "ids": inputs,
                       "truncation_direction": direction, "truncate": truncate,
                       "dimensions": dimensions})
            }),
        // Cohere / Jina rerank: documents as strings or objects, top_n, return_documents.
        (
            text(),
            prop::collection::vec(document(), 0..10),
            prop::option::of(-2i64..12),
            any::<bool>()
        )
            .prop_map(|(query, documents, top_n, return_documents)| {
                json!({"model": "m", "query": query, "documents": documents, "top_n": top_n,
                       "return_documents": return_documents})
            }),
        // /similarity and /predict.
        (text(), texts(), prop::option::of(text())).prop_map(|(source, sentences, prompt)| {
            json!({"inputs": {"source_sentence": source, "sentences": sentences},
                   "parameters": {"prompt_name": prompt}})
        }),
        (
            prop_oneof![
                text().prop_map(Value::from),
                (text(), text()).prop_map(|(a, b)| json!([a, b])),
                texts().prop_map(Value::from),
            ],
            any::<bool>()
        )
            .prop_map(|(inputs, raw_scores)| json!({"inputs": inputs, "raw_scores": raw_scores})),
    ]
}

/// Token ids: a flat list, a list of lists, some beyond the vocabulary (30522) or `u32`,
/// negative, or mixed with text.
fn ids() -> impl Strategy<Value = Value> {
    let id = prop_oneof![
        8 => (0i64..30522).prop_map(Value::from),
        1 => (30522i64..40000).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => text().prop_map(Value::from),
    ];
    let list = prop::collection::vec(id, 0..300).prop_map(Value::Array);
    prop_oneof![
        list.clone(),
        prop::collection::vec(list, 0..4).prop_map(Value::Array),
    ]
}

fn direction() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![
        json!("left"),
        json!("right"),
        json!("Left"),
        json!("up"),
        json!(1),
        Value::Null,
    ])
}

fn document() -> impl Strategy<Value = Value> {
    prop_oneof![
        text().prop_map(Value::from),
        text().prop_map(|t| json!({"text": t})),
        Just(json!({"title": "x"})),
        any::<i64>().prop_map(Value::from),
    ]
}

fn route() -> impl Strategy<Value = &'static str> {
    prop::sample::select(POST_ROUTES.to_vec())
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_break_a_route(path in route(), body in prop::collection::vec(any::<u8>(), 0..2048)) {
        check(Method::POST, path, body)?;
    }

    #[test]
    fn arbitrary_json_never_breaks_a_route(path in route(), value in json_value()) {
        check(Method::POST, path, value.to_string().into_bytes())?;
    }

    #[test]
    fn well_formed_requests_with_any_text_never_break_a_route(path in route(), value in well_formed()) {
        check(Method::POST, path, value.to_string().into_bytes())?;
    }

    #[test]
    fn json_with_a_byte_flipped_never_breaks_a_route(
        path in route(),
        value in well_formed(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut body = value.to_string().into_bytes();
        let i = at.index(body.len());
        body[i] = byte;
        check(Method::POST, path, body)?;
    }

    #[test]
    fn any_method_and_path_gets_json_or_success(
        method in prop::sample::select(vec![Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::PATCH]),
        path in prop_oneof![
            prop::sample::select(POST_ROUTES.iter().chain(&GET_ROUTES).map(|s| s.to_string()).collect::<Vec<_>>()),
            "/[a-z0-9/._%-]{0,24}",
        ],
        body in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        check(method, &path, body)?;
    }
}
