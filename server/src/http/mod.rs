//! HTTP routes. Knows nothing of tensors: it reads the wire types of [`types`], calls the
//! [`Service`] both front ends share, and shapes the answers.

pub mod errors;
pub mod types;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;

use self::errors::{ApiError, ApiJson};
use self::types::{
    CohereApiVersion, CohereBilledUnits, CohereMeta, CohereRerankRequest, CohereRerankResponse,
    CohereRerankResult, DecodeRequest, DocumentText, EmbedAllRequest, EmbedRequest, EmbeddingValue,
    EncodingFormat, ErrorType, Info, Inputs, OpenAiEmbedding, OpenAiEmbeddingsRequest,
    OpenAiEmbeddingsResponse, OpenAiModel, OpenAiModels, OpenAiUsage, PredictInputs,
    PredictRequest, PredictResponse, Prediction, Rank, RerankRequest, SimilarityRequest,
    TokenizeRequest,
};
use crate::artifact::Task;
use crate::service::{EmbedOptions, EncodeOptions, OPENAI_MAX_INPUTS, ScoreOptions, Service};
use crate::tokenize::{Input, Token};

type AppState = State<Arc<Service>>;

pub fn router(service: &Arc<Service>) -> Router {
    // TEI routes `POST /` by the model's task (huggingface_hub's InferenceClient posts there).
    let root = match service.manifest().task {
        Task::Embed => post(embed),
        Task::Rerank => post(rerank),
        Task::Classify => post(predict),
    };
    let guarded = Router::new()
        .route("/", root)
        .route("/embed", post(embed))
        .route("/embed_all", post(embed_all))
        .route("/similarity", post(similarity))
        .route("/rerank", post(rerank))
        .route("/predict", post(predict))
        .route("/v1/rerank", post(cohere_rerank))
        .route("/v2/rerank", post(cohere_rerank))
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/v1/models", get(openai_models))
        .route("/tokenize", post(tokenize))
        .route("/decode", post(decode))
        .route("/info", get(info))
        .route_layer(middleware::from_fn_with_state(
            service.clone(),
            require_api_key,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(guarded)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, ErrorType::NotFound, "no such route")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorType::MethodNotAllowed,
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(service.limits().payload_limit))
        .layer(middleware::from_fn_with_state(
            service.clone(),
            count_requests,
        ))
        .with_state(service.clone())
}

/// An admission to the queue, taken before the body is read so that an overloaded server
/// refuses without buffering it.
struct Admitted(crate::queue::Admission);

impl FromRequestParts<Arc<Service>> for Admitted {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, service: &Arc<Service>) -> Result<Self, ApiError> {
        Ok(Admitted(service.admit()?))
    }
}

async fn embed(
    State(service): AppState,
    Admitted(admission): Admitted,
    ApiJson(req): ApiJson<EmbedRequest>,
) -> Result<Json<Vec<Vec<f32>>>, ApiError> {
    let options = req.options();
    let Inputs(inputs) = req.inputs;
    service.check_inputs("inputs", &inputs)?;
    let embedded = service.embed(admission, inputs, &options).await?;
    Ok(Json(embedded.vectors))
}

async fn embed_all(
    State(service): AppState,
    Admitted(admission): Admitted,
    ApiJson(req): ApiJson<EmbedAllRequest>,
) -> Result<Json<Vec<Vec<Vec<f32>>>>, ApiError> {
    let options = req.encode.options();
    let Inputs(inputs) = req.inputs;
    service.check_inputs("inputs", &inputs)?;
    Ok(Json(service.embed_all(admission, inputs, &options).await?))
}

async fn similarity(
    State(service): AppState,
    Admitted(admission): Admitted,
    ApiJson(req): ApiJson<SimilarityRequest>,
) -> Result<Json<Vec<f32>>, ApiError> {
    let options = req.parameters.options();
    let scores = service
        .similarity(
            admission,
            req.inputs.source_sentence,
            req.inputs.sentences,
            &options,
        )
        .await?;
    Ok(Json(scores))
}

async fn openai_embeddings(
    State(service): AppState,
    Admitted(admission): Admitted,
    ApiJson(req): ApiJson<OpenAiEmbeddingsRequest>,
) -> Result<Json<OpenAiEmbeddingsResponse>, ApiError> {
    let Inputs(inputs) = req.input;
    service.check_count("input", &inputs, OPENAI_MAX_INPUTS, |input| match input {
        Input::Text(text) => text.is_empty(),
        Input::Ids(ids) => ids.is_empty(),
    })?;
    let options = EmbedOptions {
        encode: EncodeOptions::default(),
        normalize: None,
        dimensions: req.dimensions,
    };
    let embedded = service.embed(admission, inputs, &options).await?;
    let data = embedded
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| OpenAiEmbedding {
            object: "embedding",
            embedding: match req.encoding_format {
                EncodingFormat::Float => EmbeddingValue::Float(vector),
                EncodingFormat::Base64 => {
                    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                    EmbeddingValue::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            },
            index,
        })
        .collect();
    Ok(Json(OpenAiEmbeddingsResponse {
        object: "list",
        data,
        model: service.manifest().model_id.clone(),
        usage: OpenAiUsage {
            prompt_tokens: embedded.tokens,
            total_tokens: embedded.tokens,
        },
    }))
}

async fn openai_models(State(service): AppState) -> Json<OpenAiModels> {
    Json(OpenAiModels {
        object: "list",
        data: vec![OpenAiModel {
            id: service.manifest().model_id.clone(),
            object: "model",
            created: 0,
            owned_by: "qmodel",
        }],
    })
}

async fn rerank(
    State(service): AppState,
    Admitted(admission): Admitted,
    ApiJson(req): ApiJson<RerankRequest>,
) -> Result<Json<Vec<Rank>>, ApiError> {
    service.check_texts("texts", &req.texts)?;
    let options = req.options();
    let ranked = service
        .rerank(admission, req.query, req.texts.clone(), options)
        .await?;
    Ok(Json(
        ranked
            .into_iter()
            .map(|r| Rank {
                index: r.index,
                text: req.return_text.then(|| req.texts[r.index].clone()),
                score: r.score,
            })
            .collect(),
    ))
}

async fn predict(
    State(service): AppState,
    Admitted(admission): Admitted,
    ApiJson(req): ApiJson<PredictRequest>,
) -> Result<Json<PredictResponse>, ApiError> {
    let options = req.options();
    let (inputs, single) = match req.inputs {
        PredictInputs::Single(sequence) => (vec![sequence.into()], true),
        PredictInputs::Batch(batch) => (batch.into_iter().map(Into::into).collect(), false),
    };
    let mut predicted: Vec<Vec<Prediction>> = service
        .predict(admission, inputs, options)
        .await?
        .into_iter()
        .map(|labels| {
            labels
                .into_iter()
                .map(|p| Prediction {
                    score: p.score,
                    label: p.label,
                })
                .collect()
        })
        .collect();
    Ok(Json(if single {
        PredictResponse::Single(predicted.swap_remove(0))
    } else {
        PredictResponse::Batch(predicted)
    }))
}

/// Cohere's `/v2/rerank` (and `/v1/rerank`, Cohere's and Jina's): the same scores as `/rerank`.
async fn cohere_rerank(
    State(service): AppState,
    Admitted(admission): Admitted,
    ApiJson(req): ApiJson<CohereRerankRequest>,
) -> Result<Json<CohereRerankResponse>, ApiError> {
    if req.top_n == Some(0) {
        return Err(ApiError::validation("`top_n` must be at least 1"));
    }
    let texts: Vec<String> = req.documents.into_iter().map(|d| d.into_text()).collect();
    service.check_texts("documents", &texts)?;
    let options = ScoreOptions {
        truncate: Some(req.truncate.unwrap_or(true)),
        truncation_direction: req.truncation_direction,
        raw_scores: false,
    };
    let mut ranked = service
        .rerank(admission, req.query, texts.clone(), options)
        .await?;
    ranked.truncate(req.top_n.unwrap_or(usize::MAX));
    let results = ranked
        .into_iter()
        .map(|r| CohereRerankResult {
            index: r.index,
            relevance_score: r.score,
            document: req.return_documents.then(|| DocumentText {
                text: texts[r.index].clone(),
            }),
        })
        .collect();
    Ok(Json(CohereRerankResponse {
        id: response_id(),
        results,
        meta: CohereMeta {
            api_version: CohereApiVersion { version: "2" },
            billed_units: CohereBilledUnits { search_units: 1 },
        },
        model: service.manifest().model_id.clone(),
    }))
}

/// A unique id per response (Cohere's `id`): time and a counter, in hex.
fn response_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:x}-{n:x}")
}

async fn tokenize(
    State(service): AppState,
    Admitted(admission): Admitted,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<Vec<Vec<Token>>>, ApiError> {
    let texts = req.inputs.texts("inputs")?;
    service.check_texts("inputs", &texts)?;
    let tokens = service
        .tokenize(
            admission,
            texts,
            req.add_special_tokens,
            req.prompt_name.as_deref(),
        )
        .await?;
    Ok(Json(tokens))
}

async fn decode(
    State(service): AppState,
    ApiJson(req): ApiJson<DecodeRequest>,
) -> Result<Json<Vec<String>>, ApiError> {
    Ok(Json(service.decode(&req.ids.0, req.skip_special_tokens)?))
}

async fn info(State(service): AppState) -> Json<Info> {
    let m = service.manifest();
    let l = service.limits();
    Json(Info {
        model_id: m.model_id.clone(),
        model_version: m.model_version.clone(),
        task: m.task,
        precision: m.precision,
        device: service.device(),
        pooling: m.pooling,
        normalize: m.normalize,
        dimensions: service.width(),
        max_input_length: m.max_input_tokens,
        max_batch_tokens: l.max_batch_tokens,
        max_batch_requests: l.max_batch_requests,
        max_client_batch_size: l.max_client_batch_size,
        max_concurrent_requests: l.max_concurrent_requests,
        auto_truncate: l.auto_truncate,
        prompts: service.prompts().clone(),
        default_prompt: service.default_prompt().map(str::to_owned),
        compute_threads: service.compute_threads().count,
        compute_threads_reason: service.compute_threads().reason.clone(),
        cpu_kernel: service.cpu_kernel().map(str::to_owned),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

/// Liveness: the batching worker is alive.
async fn health(State(service): AppState) -> Result<StatusCode, ApiError> {
    if service.is_healthy() {
        Ok(StatusCode::OK)
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::Unhealthy,
            "the batching worker has stopped",
        ))
    }
}

/// Readiness: loaded and warmed up.
async fn ready(State(service): AppState) -> Result<StatusCode, ApiError> {
    if service.is_ready() {
        Ok(StatusCode::OK)
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::Unhealthy,
            "not ready: the model is warming up or shutting down",
        ))
    }
}

async fn metrics(State(service): AppState) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        service.metrics().render(),
    )
        .into_response()
}

async fn require_api_key(
    State(service): AppState,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if service.authorized(token) {
        Ok(next.run(request).await)
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorType::Unauthorized,
            "missing or wrong API key: send `Authorization: Bearer <key>`",
        ))
    }
}

async fn count_requests(State(service): AppState, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |path| path.as_str())
        .to_owned();
    let started = Instant::now();
    let _in_flight = (!matches!(route.as_str(), "/health" | "/ready" | "/metrics"))
        .then(|| service.metrics().in_flight());
    let response = next.run(request).await;
    service
        .metrics()
        .observe_request(&route, response.status().as_str(), started);
    response
}

/// Binds nothing: the caller owns the listener, so tests can serve on an ephemeral port.
pub async fn serve(
    service: Arc<Service>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, router(&service))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")
}
