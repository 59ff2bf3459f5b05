//! The gRPC API on its own port: TEI's `tei.v1` services (`proto/tei.proto`) over the same
//! [`Service`] as HTTP, so the same limits, prompts, truncation and scores; the API key in the
//! `authorization: Bearer <key>` metadata; every call counted in the same metrics (route =
//! the gRPC method path, status = the gRPC code); the standard `grpc.health.v1` health service,
//! serving once the model is warmed up.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::artifact::{Precision, Task};
use crate::service::{
    EmbedOptions, EncodeOptions, Error, ErrorType, PredictInput, ScoreOptions, Service,
};
use crate::tokenize::{Input, TruncationDirection};

/// The code generated from `proto/tei.proto`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("tei.v1");
}

use pb::embed_server::{Embed, EmbedServer};
use pb::info_server::{Info, InfoServer};
use pb::predict_server::{Predict, PredictServer};
use pb::rerank_server::{Rerank, RerankServer};
use pb::tokenize_server::{Tokenize, TokenizeServer};

/// Each kind of service error as the gRPC code TEI answers it with.
impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = match e.kind {
            ErrorType::Validation => Code::InvalidArgument,
            ErrorType::Tokenizer | ErrorType::Backend => Code::FailedPrecondition,
            ErrorType::PayloadTooLarge | ErrorType::Overloaded => Code::ResourceExhausted,
            ErrorType::Unhealthy => Code::Unavailable,
            ErrorType::Timeout => Code::DeadlineExceeded,
            ErrorType::Unauthorized => Code::Unauthenticated,
            ErrorType::NotFound => Code::NotFound,
            ErrorType::MethodNotAllowed => Code::Unimplemented,
        };
        Status::new(code, e.message)
    }
}

impl From<pb::TruncationDirection> for TruncationDirection {
    fn from(d: pb::TruncationDirection) -> Self {
        match d {
            pb::TruncationDirection::Right => TruncationDirection::Right,
            pb::TruncationDirection::Left => TruncationDirection::Left,
        }
    }
}

/// proto3 has no "unset" bool: `false` leaves the server's `--auto-truncate` in force.
fn truncate(requested: bool) -> Option<bool> {
    requested.then_some(true)
}

fn direction(value: i32) -> Result<TruncationDirection, Status> {
    pb::TruncationDirection::try_from(value)
        .map(Into::into)
        .map_err(|_| Status::invalid_argument(format!("unknown truncation_direction {value}")))
}

/// The per-response metadata this server knows: characters, tokens, wall time.
fn metadata(chars: usize, tokens: usize, started: Instant) -> Option<pb::Metadata> {
    Some(pb::Metadata {
        compute_chars: u32::try_from(chars).unwrap_or(u32::MAX),
        compute_tokens: u32::try_from(tokens).unwrap_or(u32::MAX),
        total_time_ns: u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
        ..Default::default()
    })
}

/// The gRPC front end of one [`Service`].
#[derive(Clone)]
struct Grpc {
    service: Arc<Service>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl Grpc {
    /// Runs one call (or one message of a stream) and counts it under `route`.
    async fn observed<T>(
        &self,
        route: &str,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let started = Instant::now();
        let result = call.await;
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        self.service
            .metrics()
            .observe_request(route, &format!("{code:?}"), started);
        result
    }

    /// [`Self::observed`] for a unary call.
    async fn unary<T>(
        &self,
        route: &str,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        self.observed(route, call).await.map(Response::new)
    }

    /// A bidirectional stream answered message by message, in order; the first error ends it.
    fn each<Req, Resp, F, Fut>(
        &self,
        route: &'static str,
        request: Request<Streaming<Req>>,
        handle: F,
    ) -> Response<BoxStream<Resp>>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
        F: Fn(Grpc, Req) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
    {
        let mut incoming = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let reply = match incoming.message().await {
                    Ok(None) => break,
                    Ok(Some(req)) => this.observed(route, handle(this.clone(), req)).await,
                    Err(status) => Err(status),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
        });
        Response::new(Box::pin(ReceiverStream::new(rx)))
    }

    async fn embed_one(&self, req: pb::EmbedRequest) -> Result<pb::EmbedResponse, Status> {
        let started = Instant::now();
        let options = EmbedOptions {
            encode: EncodeOptions {
                truncate: truncate(req.truncate),
                truncation_direction: direction(req.truncation_direction)?,
                prompt_name: req.prompt_name,
            },
            normalize: Some(req.normalize),
            dimensions: req.dimensions.map(|d| d as usize),
        };
        let chars = req.inputs.chars().count();
        let inputs = vec![Input::Text(req.inputs)];
        self.service.check_inputs("inputs", &inputs)?;
        let admission = self.service.admit()?;
        let mut embedded = self.service.embed(admission, inputs, &options).await?;
        Ok(pb::EmbedResponse {
            embeddings: embedded.vectors.swap_remove(0),
            metadata: metadata(chars, embedded.tokens, started),
        })
    }

    async fn embed_all_one(
        &self,
        req: pb::EmbedAllRequest,
    ) -> Result<pb::EmbedAllResponse, Status> {
        let started = Instant::now();
        let options = EncodeOptions {
            truncate: truncate(req.truncate),
            truncation_direction: direction(req.truncation_direction)?,
            prompt_name: req.prompt_name,
        };
        let chars = req.inputs.chars().count();
        let inputs = vec![Input::Text(req.inputs)];
        self.service.check_inputs("inputs", &inputs)?;
        let admission = self.service.admit()?;
        let tokens = self
            .service
            .embed_all(admission, inputs, &options)
            .await?
            .swap_remove(0);
        Ok(pb::EmbedAllResponse {
            metadata: metadata(chars, tokens.len(), started),
            token_embeddings: tokens
                .into_iter()
                .map(|embeddings| pb::TokenEmbedding { embeddings })
                .collect(),
        })
    }

    async fn rerank_all(
        &self,
        query: String,
        texts: Vec<String>,
        options: ScoreOptions,
        return_text: bool,
    ) -> Result<pb::RerankResponse, Status> {
        let started = Instant::now();
        self.service.check_texts("texts", &texts)?;
        let chars = query.chars().count() + texts.iter().map(|t| t.chars().count()).sum::<usize>();
        let admission = self.service.admit()?;
        let ranked = self
            .service
            .rerank(admission, query, texts.clone(), options)
            .await?;
        Ok(pb::RerankResponse {
            ranks: ranked
                .into_iter()
                .map(|r| pb::Rank {
                    index: r.index as u32,
                    text: return_text.then(|| texts[r.index].clone()),
                    score: r.score,
                })
                .collect(),
            metadata: metadata(chars, 0, started),
        })
    }

    async fn predict_one(
        &self,
        input: PredictInput,
        truncate_requested: bool,
        raw_scores: bool,
        truncation_direction: i32,
    ) -> Result<pb::PredictResponse, Status> {
        let started = Instant::now();
        let options = ScoreOptions {
            truncate: truncate(truncate_requested),
            truncation_direction: direction(truncation_direction)?,
            raw_scores,
        };
        let chars = match &input {
            PredictInput::Single(text) => text.chars().count(),
            PredictInput::Pair(a, b) => a.chars().count() + b.chars().count(),
        };
        let admission = self.service.admit()?;
        let predictions = self
            .service
            .predict(admission, vec![input], options)
            .await?
            .swap_remove(0);
        Ok(pb::PredictResponse {
            predictions: predictions
                .into_iter()
                .map(|p| pb::Prediction {
                    score: p.score,
                    label: p.label,
                })
                .collect(),
            metadata: metadata(chars, 0, started),
        })
    }

    async fn predict_text(&self, req: pb::PredictRequest) -> Result<pb::PredictResponse, Status> {
        let input = PredictInput::Single(req.inputs);
        self.predict_one(
            input,
            req.truncate,
            req.raw_scores,
            req.truncation_direction,
        )
        .await
    }

    async fn predict_text_pair(
        &self,
        req: pb::PredictPairRequest,
    ) -> Result<pb::PredictResponse, Status> {
        let Ok([a, b]) = <[String; 2]>::try_from(req.inputs) else {
            return Err(Status::invalid_argument(
                "`inputs` must hold exactly two texts",
            ));
        };
        let input = PredictInput::Pair(a, b);
        self.predict_one(
            input,
            req.truncate,
            req.raw_scores,
            req.truncation_direction,
        )
        .await
    }

    async fn tokenize_one(&self, req: pb::EncodeRequest) -> Result<pb::EncodeResponse, Status> {
        let texts = vec![req.inputs];
        self.service.check_texts("inputs", &texts)?;
        let admission = self.service.admit()?;
        let tokens = self
            .service
            .tokenize(
                admission,
                texts,
                req.add_special_tokens,
                req.prompt_name.as_deref(),
            )
            .await?
            .swap_remove(0);
        Ok(pb::EncodeResponse {
            tokens: tokens
                .into_iter()
                .map(|t| pb::SimpleToken {
                    id: t.id,
                    text: t.text,
                    special: t.special,
                    start: t.start.map(|s| s as u32),
                    stop: t.stop.map(|s| s as u32),
                })
                .collect(),
        })
    }

    fn decode_one(&self, req: pb::DecodeRequest) -> Result<pb::DecodeResponse, Status> {
        let text = self
            .service
            .decode(&[req.ids], req.skip_special_tokens)?
            .swap_remove(0);
        Ok(pb::DecodeResponse { text })
    }
}

#[tonic::async_trait]
impl Info for Grpc {
    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let s = &self.service;
        let m = s.manifest();
        let l = s.limits();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let info = pb::InfoResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            sha: None,
            docker_label: None,
            model_id: m.model_id.clone(),
            model_sha: None,
            model_dtype: match m.precision {
                Precision::Int8 => "int8",
                Precision::Int4 => "int4",
                Precision::F16 => "float16",
                Precision::F32 => "float32",
            }
            .to_owned(),
            model_type: match m.task {
                Task::Embed => pb::ModelType::Embedding,
                Task::Rerank => pb::ModelType::Reranker,
                Task::Classify => pb::ModelType::Classifier,
            }
            .into(),
            max_concurrent_requests: count(l.max_concurrent_requests),
            max_input_length: count(m.max_input_tokens),
            max_batch_tokens: count(l.max_batch_tokens),
            max_batch_requests: Some(count(l.max_batch_requests)),
            max_client_batch_size: count(l.max_client_batch_size),
            // Tokenization runs on the runtime's blocking pool, one input after another.
            tokenization_workers: 1,
        };
        self.unary("/tei.v1.Info/Info", async { Ok(info) }).await
    }
}

#[tonic::async_trait]
impl Embed for Grpc {
    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        self.unary("/tei.v1.Embed/Embed", self.embed_one(request.into_inner()))
            .await
    }

    type EmbedStreamStream = BoxStream<pb::EmbedResponse>;

    async fn embed_stream(
        &self,
        request: Request<Streaming<pb::EmbedRequest>>,
    ) -> Result<Response<Self::EmbedStreamStream>, Status> {
        Ok(
            self.each("/tei.v1.Embed/EmbedStream", request, |g, req| async move {
                g.embed_one(req).await
            }),
        )
    }

    async fn embed_sparse(
        &self,
        _request: Request<pb::EmbedSparseRequest>,
    ) -> Result<Response<pb::EmbedSparseResponse>, Status> {
        self.unary("/tei.v1.Embed/EmbedSparse", async { Err(no_sparse()) })
            .await
    }

    type EmbedSparseStreamStream = BoxStream<pb::EmbedSparseResponse>;

    async fn embed_sparse_stream(
        &self,
        request: Request<Streaming<pb::EmbedSparseRequest>>,
    ) -> Result<Response<Self::EmbedSparseStreamStream>, Status> {
        Ok(
            self.each("/tei.v1.Embed/EmbedSparseStream", request, |_, _| async {
                Err(no_sparse())
            }),
        )
    }

    async fn embed_all(
        &self,
        request: Request<pb::EmbedAllRequest>,
    ) -> Result<Response<pb::EmbedAllResponse>, Status> {
        self.unary(
            "/tei.v1.Embed/EmbedAll",
            self.embed_all_one(request.into_inner()),
        )
        .await
    }

    type EmbedAllStreamStream = BoxStream<pb::EmbedAllResponse>;

    async fn embed_all_stream(
        &self,
        request: Request<Streaming<pb::EmbedAllRequest>>,
    ) -> Result<Response<Self::EmbedAllStreamStream>, Status> {
        Ok(self.each(
            "/tei.v1.Embed/EmbedAllStream",
            request,
            |g, req| async move { g.embed_all_one(req).await },
        ))
    }
}

#[tonic::async_trait]
impl Predict for Grpc {
    async fn predict(
        &self,
        request: Request<pb::PredictRequest>,
    ) -> Result<Response<pb::PredictResponse>, Status> {
        self.unary(
            "/tei.v1.Predict/Predict",
            self.predict_text(request.into_inner()),
        )
        .await
    }

    async fn predict_pair(
        &self,
        request: Request<pb::PredictPairRequest>,
    ) -> Result<Response<pb::PredictResponse>, Status> {
        self.unary(
            "/tei.v1.Predict/PredictPair",
            self.predict_text_pair(request.into_inner()),
        )
        .await
    }

    type PredictStreamStream = BoxStream<pb::PredictResponse>;

    async fn predict_stream(
        &self,
        request: Request<Streaming<pb::PredictRequest>>,
    ) -> Result<Response<Self::PredictStreamStream>, Status> {
        Ok(self.each(
            "/tei.v1.Predict/PredictStream",
            request,
            |g, req| async move { g.predict_text(req).await },
        ))
    }

    type PredictPairStreamStream = BoxStream<pb::PredictResponse>;

    async fn predict_pair_stream(
        &self,
        request: Request<Streaming<pb::PredictPairRequest>>,
    ) -> Result<Response<Self::PredictPairStreamStream>, Status> {
        Ok(self.each(
            "/tei.v1.Predict/PredictPairStream",
            request,
            |g, req| async move { g.predict_text_pair(req).await },
        ))
    }
}

/// Sparse (SPLADE) embeddings need a masked-language-model head that no served model has.
fn no_sparse() -> Status {
    Status::failed_precondition("this model has no sparse (SPLADE) embeddings")
}

#[tonic::async_trait]
impl Rerank for Grpc {
    async fn rerank(
        &self,
        request: Request<pb::RerankRequest>,
    ) -> Result<Response<pb::RerankResponse>, Status> {
        let req = request.into_inner();
        let call = async {
            let options = ScoreOptions {
                truncate: truncate(req.truncate),
                truncation_direction: direction(req.truncation_direction)?,
                raw_scores: req.raw_scores,
            };
            self.rerank_all(req.query, req.texts, options, req.return_text)
                .await
        };
        self.unary("/tei.v1.Rerank/Rerank", call).await
    }

    /// Collects the stream's (query, text) messages, then ranks them as one request.
    async fn rerank_stream(
        &self,
        request: Request<Streaming<pb::RerankStreamRequest>>,
    ) -> Result<Response<pb::RerankResponse>, Status> {
        let mut incoming = request.into_inner();
        let call = async {
            let mut first: Option<(String, ScoreOptions, bool)> = None;
            let mut texts = Vec::new();
            while let Some(message) = incoming.message().await? {
                if first.is_none() {
                    let options = ScoreOptions {
                        truncate: truncate(message.truncate),
                        truncation_direction: direction(message.truncation_direction)?,
                        raw_scores: message.raw_scores,
                    };
                    first = Some((message.query, options, message.return_text));
                }
                texts.push(message.text);
                if texts.len() > self.service.limits().max_client_batch_size {
                    break; // check_texts refuses it with the limit
                }
            }
            let (query, options, return_text) =
                first.ok_or_else(|| Status::invalid_argument("the stream sent no text"))?;
            self.rerank_all(query, texts, options, return_text).await
        };
        self.unary("/tei.v1.Rerank/RerankStream", call).await
    }
}

#[tonic::async_trait]
impl Tokenize for Grpc {
    async fn tokenize(
        &self,
        request: Request<pb::EncodeRequest>,
    ) -> Result<Response<pb::EncodeResponse>, Status> {
        self.unary(
            "/tei.v1.Tokenize/Tokenize",
            self.tokenize_one(request.into_inner()),
        )
        .await
    }

    type TokenizeStreamStream = BoxStream<pb::EncodeResponse>;

    async fn tokenize_stream(
        &self,
        request: Request<Streaming<pb::EncodeRequest>>,
    ) -> Result<Response<Self::TokenizeStreamStream>, Status> {
        Ok(self.each(
            "/tei.v1.Tokenize/TokenizeStream",
            request,
            |g, req| async move { g.tokenize_one(req).await },
        ))
    }

    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        let req = request.into_inner();
        self.unary("/tei.v1.Tokenize/Decode", async { self.decode_one(req) })
            .await
    }

    type DecodeStreamStream = BoxStream<pb::DecodeResponse>;

    async fn decode_stream(
        &self,
        request: Request<Streaming<pb::DecodeRequest>>,
    ) -> Result<Response<Self::DecodeStreamStream>, Status> {
        Ok(self.each(
            "/tei.v1.Tokenize/DecodeStream",
            request,
            |g, req| async move { g.decode_one(req) },
        ))
    }
}

/// Checks `authorization: Bearer <key>` when the server has an API key.
#[derive(Clone)]
struct RequireApiKey(Arc<Service>);

impl Interceptor for RequireApiKey {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if self.0.authorized(token) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong API key: send `authorization: Bearer <key>` metadata",
            ))
        }
    }
}

/// Serves the gRPC API on `listener` until `shutdown` resolves, then finishes the calls in
/// flight. Health reports NOT_SERVING until the service is ready.
pub async fn serve(
    service: Arc<Service>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let watched = service.clone();
    tokio::spawn(async move {
        while !watched.is_ready() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
    });
    let grpc = Grpc {
        service: service.clone(),
    };
    let auth = RequireApiKey(service.clone());
    let limit = service.limits().payload_limit;
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(InterceptedService::new(
            InfoServer::new(grpc.clone()),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            EmbedServer::new(grpc.clone()).max_decoding_message_size(limit),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            RerankServer::new(grpc.clone()).max_decoding_message_size(limit),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            PredictServer::new(grpc.clone()).max_decoding_message_size(limit),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            TokenizeServer::new(grpc).max_decoding_message_size(limit),
            auth,
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .context("serving gRPC")
}
