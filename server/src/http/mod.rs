//! Routes. Knows nothing of tensors: it validates and tokenizes requests, hands encodings to the
//! queue, and shapes the answers.

pub mod errors;
pub mod types;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use self::errors::{ApiError, ApiJson};
use self::types::{
    EmbedRequest, EmbeddingValue, EncodingFormat, ErrorType, Info, Inputs, OpenAiEmbedding,
    OpenAiEmbeddingsRequest, OpenAiEmbeddingsResponse, OpenAiUsage, Rank, RerankRequest,
    TokenizeRequest,
};
use crate::artifact::{Manifest, Task};
use crate::backend::{DeviceKind, Encoding, LoadedModel};
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::queue::{Admission, Queue, QueueError, QueueLimits, Ticket};
use crate::threads::ComputeThreads;
use crate::tokenize::{Token, TokenizeError, Tokenizer};

/// The model's queue; its output type follows the model's task.
enum Engine {
    Embed(Queue<Vec<f32>>),
    Rerank(Queue<f32>),
}

impl Engine {
    fn try_admit(&self) -> Result<Admission, QueueError> {
        match self {
            Engine::Embed(queue) => queue.try_admit(),
            Engine::Rerank(queue) => queue.try_admit(),
        }
    }

    fn is_running(&self) -> bool {
        match self {
            Engine::Embed(queue) => queue.is_running(),
            Engine::Rerank(queue) => queue.is_running(),
        }
    }

    fn shutdown(&self) {
        match self {
            Engine::Embed(queue) => queue.shutdown(),
            Engine::Rerank(queue) => queue.shutdown(),
        }
    }
}

/// One served model and everything the routes need.
pub struct App {
    manifest: Manifest,
    device: DeviceKind,
    tokenizer: Arc<Tokenizer>,
    engine: Engine,
    limits: Limits,
    /// sha256 of the API key: comparing digests in constant time hides the key's length too.
    api_key_digest: Option<[u8; 32]>,
    metrics: Arc<Metrics>,
    compute_threads: ComputeThreads,
    ready: AtomicBool,
}

impl App {
    /// Starts the batching worker. Not ready until [`App::warm_up`] has run.
    pub fn new(
        model: LoadedModel,
        limits: Limits,
        compute_threads: ComputeThreads,
    ) -> anyhow::Result<Arc<Self>> {
        let LoadedModel {
            manifest,
            tokenizer,
            backend,
            device,
        } = model;
        anyhow::ensure!(
            limits.max_batch_tokens >= manifest.max_input_tokens,
            "max batch tokens ({}) must be at least the model's max input tokens ({})",
            limits.max_batch_tokens,
            manifest.max_input_tokens
        );
        for (name, value) in [
            ("max batch requests", limits.max_batch_requests),
            ("max concurrent requests", limits.max_concurrent_requests),
            ("max client batch size", limits.max_client_batch_size),
        ] {
            anyhow::ensure!(value > 0, "{name} must be at least 1");
        }
        let metrics = Arc::new(Metrics::new());
        let queue_limits = QueueLimits {
            max_batch_tokens: limits.max_batch_tokens,
            max_batch_requests: limits.max_batch_requests,
            max_concurrent_requests: limits.max_concurrent_requests,
        };
        let engine = match manifest.task {
            Task::Embed => Engine::Embed(Queue::start(
                Box::new(move |batch: &[Encoding]| backend.embed(batch)),
                queue_limits,
                metrics.clone(),
            )),
            Task::Rerank => Engine::Rerank(Queue::start(
                Box::new(move |batch: &[Encoding]| backend.score(batch)),
                queue_limits,
                metrics.clone(),
            )),
        };
        let api_key_digest = limits
            .api_key
            .as_ref()
            .map(|key| Sha256::digest(key.as_bytes()).into());
        Ok(Arc::new(Self {
            manifest,
            device,
            tokenizer: Arc::new(tokenizer),
            engine,
            limits,
            api_key_digest,
            metrics,
            compute_threads,
            ready: AtomicBool::new(false),
        }))
    }

    /// Runs one input through the whole path (tokenizer, queue, backend), then marks the
    /// server ready.
    pub async fn warm_up(&self) -> anyhow::Result<()> {
        const TEXT: &str = "warm-up";
        match &self.engine {
            Engine::Embed(queue) => {
                let encoding = self.tokenizer.encode(TEXT, true)?;
                queue
                    .submit(queue.try_admit()?, vec![encoding])?
                    .results()
                    .await?;
            }
            Engine::Rerank(queue) => {
                let encoding = self.tokenizer.encode_pair(TEXT, TEXT, true)?;
                queue
                    .submit(queue.try_admit()?, vec![encoding])?
                    .results()
                    .await?;
            }
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// `/ready` answers 503 from now on; every other route keeps serving.
    pub fn withdraw_readiness(&self) {
        self.ready.store(false, Ordering::Release);
    }

    /// Finishes queued work and stops the batching worker (blocks until it has).
    pub fn shutdown(&self) {
        self.withdraw_readiness();
        self.engine.shutdown();
    }

    pub fn router(self: &Arc<Self>) -> Router {
        let wrong_task = |route: &'static str, needs: &'static str| -> MethodRouter<Arc<App>> {
            post(move || async move {
                ApiError::wrong_task(format!("{route} needs a {needs} model; this one is not"))
            })
        };
        let (embed_route, rerank_route) = match self.manifest.task {
            Task::Embed => (post(embed), wrong_task("/rerank", "reranker")),
            Task::Rerank => (wrong_task("/embed", "embedding"), post(rerank)),
        };
        let openai = match self.manifest.task {
            Task::Embed => post(openai_embeddings),
            Task::Rerank => wrong_task("/v1/embeddings", "embedding"),
        };
        let root = match self.manifest.task {
            Task::Embed => post(embed),
            Task::Rerank => post(rerank),
        };
        let guarded = Router::new()
            .route("/", root)
            .route("/embed", embed_route)
            .route("/rerank", rerank_route)
            .route("/v1/embeddings", openai)
            .route("/tokenize", post(tokenize))
            .route("/info", get(info))
            .route_layer(middleware::from_fn_with_state(
                self.clone(),
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
            .layer(DefaultBodyLimit::max(self.limits.payload_limit))
            .layer(middleware::from_fn_with_state(self.clone(), count_requests))
            .with_state(self.clone())
    }

    /// Tokenizes off the async runtime (a 2 MB body is a lot of tokenizer work).
    async fn tokenize<T, F>(&self, texts: Vec<T>, encode: F) -> Result<Vec<Encoding>, ApiError>
    where
        T: Send + 'static,
        F: Fn(&Tokenizer, &T) -> Result<Encoding, TokenizeError> + Send + 'static,
    {
        let tokenizer = self.tokenizer.clone();
        let started = Instant::now();
        let encodings = tokio::task::spawn_blocking(move || {
            texts
                .iter()
                .map(|text| encode(&tokenizer, text))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorType::Tokenizer,
                "tokenizer failed on this input",
            )
        })??;
        self.metrics
            .tokenization_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(encodings)
    }

    /// Applies `--request-timeout` to the whole of a request's work.
    async fn timed<T>(
        &self,
        work: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        match self.limits.request_timeout {
            None => work.await,
            Some(limit) => tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
                Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    ErrorType::Timeout,
                    format!("request took longer than {limit:?}"),
                ))
            }),
        }
    }

    fn truncate(&self, requested: Option<bool>) -> bool {
        requested.unwrap_or(self.limits.auto_truncate)
    }

    /// Non-empty, within the client batch size, no empty text.
    fn check_texts(&self, field: &str, texts: &[String]) -> Result<(), ApiError> {
        if texts.is_empty() {
            return Err(ApiError::validation(format!("`{field}` cannot be empty")));
        }
        if texts.len() > self.limits.max_client_batch_size {
            return Err(ApiError::validation(format!(
                "`{field}` has {} items, more than the limit of {} (max client batch size)",
                texts.len(),
                self.limits.max_client_batch_size
            )));
        }
        if let Some(i) = texts.iter().position(|t| t.is_empty()) {
            return Err(ApiError::validation(format!(
                "`{field}` item {i} is an empty string"
            )));
        }
        Ok(())
    }

    fn embedder(&self) -> Result<&Queue<Vec<f32>>, ApiError> {
        match &self.engine {
            Engine::Embed(queue) => Ok(queue),
            Engine::Rerank(_) => Err(ApiError::wrong_task("this is not an embedding model")),
        }
    }

    /// Pooled embeddings of `texts` and their total token count.
    async fn embed_texts(
        &self,
        admission: Admission,
        texts: Vec<String>,
        truncate: bool,
        normalize: bool,
    ) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
        let queue = self.embedder()?;
        let encodings = self
            .tokenize(texts, move |tok, text: &String| tok.encode(text, truncate))
            .await?;
        let tokens = encodings.iter().map(Encoding::len).sum();
        let mut vectors = results(queue.submit(admission, encodings)).await?;
        if normalize {
            vectors.iter_mut().for_each(|v| l2_normalize(v));
        }
        Ok((vectors, tokens))
    }
}

async fn results<O>(ticket: Result<Ticket<O>, QueueError>) -> Result<Vec<O>, ApiError> {
    Ok(ticket?.results().await?)
}

fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// An admission to the queue, taken before the body is read so that an overloaded server
/// refuses without buffering it.
struct Admitted(Admission);

impl FromRequestParts<Arc<App>> for Admitted {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        Ok(Admitted(app.engine.try_admit()?))
    }
}

async fn embed(
    State(app): State<Arc<App>>,
    Admitted(admission): Admitted,
    ApiJson(req): ApiJson<EmbedRequest>,
) -> Result<Json<Vec<Vec<f32>>>, ApiError> {
    let Inputs(texts) = req.inputs;
    app.check_texts("inputs", &texts)?;
    let truncate = app.truncate(req.truncate);
    let normalize = req.normalize.unwrap_or(app.manifest.normalize);
    let (vectors, _) = app
        .timed(app.embed_texts(admission, texts, truncate, normalize))
        .await?;
    Ok(Json(vectors))
}

async fn openai_embeddings(
    State(app): State<Arc<App>>,
    Admitted(admission): Admitted,
    ApiJson(req): ApiJson<OpenAiEmbeddingsRequest>,
) -> Result<Json<OpenAiEmbeddingsResponse>, ApiError> {
    let Inputs(texts) = req.input;
    app.check_texts("input", &texts)?;
    let truncate = app.truncate(None);
    let (vectors, tokens) = app
        .timed(app.embed_texts(admission, texts, truncate, app.manifest.normalize))
        .await?;
    let data = vectors
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
        model: app.manifest.model_id.clone(),
        usage: OpenAiUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    }))
}

async fn rerank(
    State(app): State<Arc<App>>,
    Admitted(admission): Admitted,
    ApiJson(req): ApiJson<RerankRequest>,
) -> Result<Json<Vec<Rank>>, ApiError> {
    let Engine::Rerank(queue) = &app.engine else {
        return Err(ApiError::wrong_task("this is not a reranker model"));
    };
    if req.query.is_empty() {
        return Err(ApiError::validation("`query` cannot be empty"));
    }
    app.check_texts("texts", &req.texts)?;
    let truncate = app.truncate(req.truncate);
    let query = Arc::new(req.query);
    let pairs: Vec<(Arc<String>, String)> = req
        .texts
        .iter()
        .map(|text| (query.clone(), text.clone()))
        .collect();
    let logits = app
        .timed(async {
            let encodings = app
                .tokenize(pairs, move |tok, (query, text)| {
                    tok.encode_pair(query, text, truncate)
                })
                .await?;
            results(queue.submit(admission, encodings)).await
        })
        .await?;
    let mut ranks: Vec<Rank> = logits
        .into_iter()
        .zip(req.texts)
        .enumerate()
        .map(|(index, (logit, text))| Rank {
            index,
            text: req.return_text.then_some(text),
            score: if req.raw_scores {
                logit
            } else {
                sigmoid(logit)
            },
        })
        .collect();
    ranks.sort_by(|a, b| b.score.total_cmp(&a.score));
    Ok(Json(ranks))
}

/// Takes an admission too: it queues nothing, but its tokenizer work counts as load.
async fn tokenize(
    State(app): State<Arc<App>>,
    Admitted(_admission): Admitted,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<Vec<Vec<Token>>>, ApiError> {
    let Inputs(texts) = req.inputs;
    app.check_texts("inputs", &texts)?;
    let add_special = req.add_special_tokens;
    let tokenizer = app.tokenizer.clone();
    let tokens = tokio::task::spawn_blocking(move || {
        texts
            .iter()
            .map(|text| tokenizer.tokens(text, add_special))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|_| ApiError::from(TokenizeError::Failed("tokenizer crashed".into())))??;
    Ok(Json(tokens))
}

async fn info(State(app): State<Arc<App>>) -> Json<Info> {
    let m = &app.manifest;
    let l = &app.limits;
    Json(Info {
        model_id: m.model_id.clone(),
        model_version: m.model_version.clone(),
        task: m.task,
        precision: m.precision,
        device: app.device,
        pooling: m.pooling,
        normalize: m.normalize,
        max_input_length: m.max_input_tokens,
        max_batch_tokens: l.max_batch_tokens,
        max_batch_requests: l.max_batch_requests,
        max_client_batch_size: l.max_client_batch_size,
        max_concurrent_requests: l.max_concurrent_requests,
        auto_truncate: l.auto_truncate,
        compute_threads: app.compute_threads.count,
        compute_threads_reason: app.compute_threads.reason.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

/// Liveness: the batching worker is alive.
async fn health(State(app): State<Arc<App>>) -> Result<StatusCode, ApiError> {
    if app.engine.is_running() {
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
async fn ready(State(app): State<Arc<App>>) -> Result<StatusCode, ApiError> {
    if app.ready.load(Ordering::Acquire) {
        Ok(StatusCode::OK)
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::Unhealthy,
            "not ready: the model is warming up or shutting down",
        ))
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

async fn require_api_key(
    State(app): State<Arc<App>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(expected) = &app.api_key_digest else {
        return Ok(next.run(request).await);
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(|token| Sha256::digest(token.trim().as_bytes()));
    match given {
        Some(given) if bool::from(given.as_slice().ct_eq(expected)) => Ok(next.run(request).await),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorType::Unauthorized,
            "missing or wrong API key: send `Authorization: Bearer <key>`",
        )),
    }
}

async fn count_requests(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |path| path.as_str())
        .to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let m = &app.metrics;
    m.request_duration
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    m.requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    response
}

/// Binds nothing: the caller owns the listener, so tests can serve on an ephemeral port.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, app.router())
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_to_unit_length_and_leaves_zero_alone() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut zero = vec![0.0, 0.0];
        l2_normalize(&mut zero);
        assert_eq!(zero, vec![0.0, 0.0]);
    }

    #[test]
    fn sigmoid_maps_logits_into_the_unit_interval() {
        assert_eq!(sigmoid(0.0), 0.5);
        assert!(sigmoid(10.0) > 0.9999 && sigmoid(-10.0) < 0.0001);
    }
}
