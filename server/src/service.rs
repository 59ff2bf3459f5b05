//! The request handling that HTTP and gRPC share (after TEI's `core::infer`): limits, inputs,
//! prompts, tokenization, admission, the queue, timeouts, and shaping raw model outputs into
//! vectors, scores and labels. Knows neither HTTP nor gRPC: routes translate their wire types
//! into these calls and [`Error`]s into their status codes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::artifact::{Manifest, Task};
use crate::backend::{DeviceKind, Encoding, LoadedModel};
use crate::config::{Limits, PromptArgs};
use crate::metrics::Metrics;
use crate::queue::{Admission, Queue, QueueError, QueueLimits};
use crate::threads::ComputeThreads;
use crate::tokenize::{Input, Token, TokenizeError, Tokenizer, Truncate, TruncationDirection};

/// OpenAI's limit of inputs per `/v1/embeddings` request (TEI's routes keep
/// `--max-client-batch-size`).
pub const OPENAI_MAX_INPUTS: usize = 2048;

/// The kind of work one queued input asks of the model; a batch holds one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Work {
    /// The pooled sentence vector, not normalized.
    Pooled,
    /// The last hidden state of every token, flattened.
    Tokens,
    /// The classifier's logits.
    Logits,
}

/// What went wrong, in terms both front ends map to their status codes. TEI's names where TEI
/// has the case (`validation`, `tokenizer`, `overloaded`, `backend`, `unhealthy`); our own for
/// what TEI answers without a JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    Validation,
    Tokenizer,
    PayloadTooLarge,
    Overloaded,
    Backend,
    Unhealthy,
    Timeout,
    Unauthorized,
    NotFound,
    MethodNotAllowed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorType,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorType, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorType::Validation, message)
    }

    /// The route needs a model of another task (TEI answers "backend" here too).
    pub fn wrong_task(message: impl Into<String>) -> Self {
        Self::new(ErrorType::Backend, message)
    }
}

impl From<QueueError> for Error {
    fn from(e: QueueError) -> Self {
        let kind = match e {
            QueueError::Overloaded(_) => ErrorType::Overloaded,
            QueueError::Closed => ErrorType::Unhealthy,
            QueueError::Backend(_) => ErrorType::Backend,
        };
        Self::new(kind, e.to_string())
    }
}

impl From<TokenizeError> for Error {
    fn from(e: TokenizeError) -> Self {
        match e {
            TokenizeError::TooLong { .. } => {
                Self::validation(format!("{e}; send `truncate: true` to cut it"))
            }
            TokenizeError::UnknownId { .. } => Self::validation(e.to_string()),
            TokenizeError::Failed(_) => Self::new(ErrorType::Tokenizer, e.to_string()),
        }
    }
}

/// How an input is cut and which prompt goes before it; `None` takes the server's default.
#[derive(Debug, Clone, Default)]
pub struct EncodeOptions {
    pub truncate: Option<bool>,
    pub truncation_direction: TruncationDirection,
    pub prompt_name: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct EmbedOptions {
    pub encode: EncodeOptions,
    /// Defaults to the model's manifest.
    pub normalize: Option<bool>,
    /// Keep the first `dimensions` values (Matryoshka), renormalized when normalizing.
    pub dimensions: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ScoreOptions {
    pub truncate: Option<bool>,
    pub truncation_direction: TruncationDirection,
    /// The logits as they are, rather than through the sigmoid (or softmax).
    pub raw_scores: bool,
}

/// Vectors and the tokens they cost (OpenAI's `usage`).
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: usize,
}

/// One reranked text: its position in the request and its score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked {
    pub index: usize,
    pub score: f32,
}

/// One label's score of a sequence classifier.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub score: f32,
    pub label: String,
}

/// One input of `/predict`: a text, or a pair of texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PredictInput {
    Single(String),
    Pair(String, String),
}

impl PredictInput {
    fn is_empty(&self) -> bool {
        match self {
            PredictInput::Single(text) => text.is_empty(),
            PredictInput::Pair(a, b) => a.is_empty() || b.is_empty(),
        }
    }
}

/// One served model and everything both front ends need.
pub struct Service {
    manifest: Manifest,
    device: DeviceKind,
    width: usize,
    tokenizer: Arc<Tokenizer>,
    queue: Queue<Work, Vec<f32>>,
    limits: Limits,
    /// The prompt put before text inputs that name none, if any.
    default_prompt: Option<String>,
    /// sha256 of the API key: comparing digests in constant time hides the key's length too.
    api_key_digest: Option<[u8; 32]>,
    metrics: Arc<Metrics>,
    compute_threads: ComputeThreads,
    ready: AtomicBool,
}

impl Service {
    /// Starts the batching worker. Not ready until [`Service::warm_up`] has run.
    pub fn new(
        model: LoadedModel,
        limits: Limits,
        prompts: &PromptArgs,
        compute_threads: ComputeThreads,
    ) -> anyhow::Result<Arc<Self>> {
        let LoadedModel {
            manifest,
            tokenizer,
            backend,
            device,
            width,
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
        let default_prompt = match (&prompts.default_prompt, &prompts.default_prompt_name) {
            (Some(text), _) => Some(text.clone()),
            (None, Some(name)) => Some(
                manifest
                    .prompts
                    .get(name)
                    .with_context(|| {
                        format!(
                            "--default-prompt-name {name:?}: the model has no such prompt (it has {:?})",
                            manifest.prompts.names()
                        )
                    })?
                    .to_owned(),
            ),
            (None, None) => manifest.prompts.default_prompt().map(str::to_owned),
        };
        let metrics = Arc::new(Metrics::new());
        let queue = Queue::start(
            Box::new(move |work: Work, batch: &[Encoding]| match work {
                Work::Pooled => backend.embed(batch),
                Work::Tokens => backend.embed_tokens(batch),
                Work::Logits => backend.classify(batch),
            }),
            QueueLimits {
                max_batch_tokens: limits.max_batch_tokens,
                max_batch_requests: limits.max_batch_requests,
                max_concurrent_requests: limits.max_concurrent_requests,
            },
            metrics.clone(),
        );
        let api_key_digest = limits
            .api_key
            .as_ref()
            .map(|key| Sha256::digest(key.as_bytes()).into());
        Ok(Arc::new(Self {
            manifest,
            device,
            width,
            tokenizer: Arc::new(tokenizer),
            queue,
            limits,
            default_prompt,
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
        let (work, encoding) = match self.manifest.task {
            Task::Embed => (Work::Pooled, self.tokenizer.encode(TEXT, true)?),
            Task::Rerank => (Work::Logits, self.tokenizer.encode_pair(TEXT, TEXT, true)?),
            Task::Classify => (Work::Logits, self.tokenizer.encode(TEXT, true)?),
        };
        self.queue
            .submit(self.queue.try_admit()?, work, vec![encoding])?
            .results()
            .await?;
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
        self.queue.shutdown();
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The CPU kernels' path the model runs on (`None` on a GPU).
    pub fn cpu_kernel(&self) -> Option<&'static str> {
        (self.device == DeviceKind::Cpu).then(|| qmodel_kernels::Path::active().name())
    }

    pub fn device(&self) -> DeviceKind {
        self.device
    }

    /// Width of the model's vectors.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Threads of the compute pools, and why that many.
    pub fn compute_threads(&self) -> &ComputeThreads {
        &self.compute_threads
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn default_prompt(&self) -> Option<&str> {
        self.default_prompt.as_deref()
    }

    /// Liveness: the batching worker is alive.
    pub fn is_healthy(&self) -> bool {
        self.queue.is_running()
    }

    /// Readiness: loaded and warmed up.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Whether `token` (the bearer token or gRPC metadata value) may call the model routes.
    pub fn authorized(&self, token: Option<&str>) -> bool {
        let Some(expected) = &self.api_key_digest else {
            return true;
        };
        token
            .map(|token| Sha256::digest(token.trim().as_bytes()))
            .is_some_and(|given| bool::from(given.as_slice().ct_eq(expected)))
    }

    /// One of `--max-concurrent-requests`, or "overloaded" at once.
    pub fn admit(&self) -> Result<Admission, Error> {
        Ok(self.queue.try_admit()?)
    }

    /// Applies `--request-timeout` to the whole of a request's work.
    pub async fn timed<T>(&self, work: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        match self.limits.request_timeout {
            None => work.await,
            Some(limit) => tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorType::Timeout,
                    format!("request took longer than {limit:?}"),
                ))
            }),
        }
    }

    /// Non-empty, at most `max` items (the client batch size, or OpenAI's limit), no empty
    /// item.
    pub fn check_count<T>(
        &self,
        field: &str,
        items: &[T],
        max: usize,
        is_empty: impl Fn(&T) -> bool,
    ) -> Result<(), Error> {
        if items.is_empty() {
            return Err(Error::validation(format!("`{field}` cannot be empty")));
        }
        if items.len() > max {
            return Err(Error::validation(format!(
                "`{field}` has {} items, more than the limit of {max}",
                items.len()
            )));
        }
        if let Some(i) = items.iter().position(is_empty) {
            return Err(Error::validation(format!("`{field}` item {i} is empty")));
        }
        Ok(())
    }

    /// [`Self::check_count`] against `--max-client-batch-size`.
    pub fn check_inputs(&self, field: &str, inputs: &[Input]) -> Result<(), Error> {
        self.check_count(
            field,
            inputs,
            self.limits.max_client_batch_size,
            input_is_empty,
        )
    }

    /// [`Self::check_count`] of texts against `--max-client-batch-size`.
    pub fn check_texts(&self, field: &str, texts: &[String]) -> Result<(), Error> {
        self.check_count(field, texts, self.limits.max_client_batch_size, |t| {
            t.is_empty()
        })
    }

    fn require(&self, task: Task, what: &str) -> Result<(), Error> {
        if self.manifest.task == task {
            Ok(())
        } else {
            let needs = match task {
                Task::Embed => "an embedding",
                Task::Rerank => "a reranker",
                Task::Classify => "a sequence-classification",
            };
            Err(Error::wrong_task(format!(
                "{what} needs {needs} model; this one is not"
            )))
        }
    }

    /// The prompt text for a request: the named one (422 when the model has none of that
    /// name), else the server's default.
    fn prompt(&self, name: Option<&str>) -> Result<Option<String>, Error> {
        match name {
            None => Ok(self.default_prompt.clone()),
            Some(name) => self
                .manifest
                .prompts
                .get(name)
                .map(|text| Some(text.to_owned()))
                .ok_or_else(|| {
                    Error::validation(format!(
                        "`prompt_name` {name:?} is not one of the model's prompts {:?}",
                        self.manifest.prompts.names()
                    ))
                }),
        }
    }

    fn truncate(&self, options: Option<bool>, direction: TruncationDirection) -> Truncate {
        Truncate::new(options.unwrap_or(self.limits.auto_truncate), direction)
    }

    /// Tokenizes off the async runtime (a 2 MB body is a lot of tokenizer work).
    async fn encode_all<T, F>(&self, items: Vec<T>, encode: F) -> Result<Vec<Encoding>, Error>
    where
        T: Send + 'static,
        F: Fn(&Tokenizer, &T) -> Result<Encoding, TokenizeError> + Send + 'static,
    {
        let tokenizer = self.tokenizer.clone();
        let started = Instant::now();
        let encodings = tokio::task::spawn_blocking(move || {
            items
                .iter()
                .map(|item| encode(&tokenizer, item))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|_| Error::new(ErrorType::Tokenizer, "tokenizer failed on this input"))??;
        self.metrics
            .tokenization_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(encodings)
    }

    async fn encode_inputs(
        &self,
        inputs: Vec<Input>,
        options: &EncodeOptions,
    ) -> Result<Vec<Encoding>, Error> {
        let prompt = self.prompt(options.prompt_name.as_deref())?;
        let truncate = self.truncate(options.truncate, options.truncation_direction);
        self.encode_all(inputs, move |tok, input| {
            tok.encode_input(input, prompt.as_deref(), truncate)
        })
        .await
    }

    /// Queues the encodings for `work` and waits for their outputs, in input order.
    async fn run(
        &self,
        admission: Admission,
        work: Work,
        encodings: Vec<Encoding>,
    ) -> Result<Vec<Vec<f32>>, Error> {
        Ok(self
            .queue
            .submit(admission, work, encodings)?
            .results()
            .await?)
    }

    /// Pooled sentence vectors (`/embed`, `/v1/embeddings`, gRPC `Embed`).
    pub async fn embed(
        &self,
        admission: Admission,
        inputs: Vec<Input>,
        options: &EmbedOptions,
    ) -> Result<Embedded, Error> {
        self.require(Task::Embed, "embedding")?;
        match options.dimensions {
            Some(0) => return Err(Error::validation("`dimensions` must be at least 1")),
            Some(d) if d > self.width => {
                return Err(Error::validation(format!(
                    "`dimensions` {d} is more than the model's {} dimensions",
                    self.width
                )));
            }
            _ => {}
        }
        let normalize = options.normalize.unwrap_or(self.manifest.normalize);
        self.timed(async {
            let encodings = self.encode_inputs(inputs, &options.encode).await?;
            let tokens = encodings.iter().map(Encoding::len).sum();
            let mut vectors = self.run(admission, Work::Pooled, encodings).await?;
            for v in &mut vectors {
                if let Some(d) = options.dimensions {
                    v.truncate(d);
                }
                if normalize {
                    l2_normalize(v);
                }
            }
            Ok(Embedded { vectors, tokens })
        })
        .await
    }

    /// Every token's vector of every input (`/embed_all`), as the model's last layer gives it.
    pub async fn embed_all(
        &self,
        admission: Admission,
        inputs: Vec<Input>,
        options: &EncodeOptions,
    ) -> Result<Vec<Vec<Vec<f32>>>, Error> {
        self.require(Task::Embed, "embedding")?;
        let width = self.width;
        self.timed(async {
            let encodings = self.encode_inputs(inputs, options).await?;
            let flat = self.run(admission, Work::Tokens, encodings).await?;
            Ok(flat
                .into_iter()
                .map(|tokens| tokens.chunks_exact(width).map(<[f32]>::to_vec).collect())
                .collect())
        })
        .await
    }

    /// Cosine similarity of `source` to each of `sentences` (`/similarity`).
    pub async fn similarity(
        &self,
        admission: Admission,
        source: String,
        sentences: Vec<String>,
        options: &EncodeOptions,
    ) -> Result<Vec<f32>, Error> {
        if source.is_empty() {
            return Err(Error::validation("`source_sentence` cannot be empty"));
        }
        self.check_texts("sentences", &sentences)?;
        let inputs = std::iter::once(source)
            .chain(sentences)
            .map(Input::Text)
            .collect();
        let options = EmbedOptions {
            encode: options.clone(),
            normalize: Some(true),
            dimensions: None,
        };
        let vectors = self.embed(admission, inputs, &options).await?.vectors;
        let (source, others) = vectors.split_first().expect("the source was embedded");
        Ok(others
            .iter()
            .map(|v| v.iter().zip(source).map(|(a, b)| a * b).sum())
            .collect())
    }

    /// Scores `texts` against `query` with the cross-encoder, highest first (`/rerank`, the
    /// Cohere shape, gRPC `Rerank`): one computation, so every shape gets the same scores.
    pub async fn rerank(
        &self,
        admission: Admission,
        query: String,
        texts: Vec<String>,
        options: ScoreOptions,
    ) -> Result<Vec<Ranked>, Error> {
        self.require(Task::Rerank, "reranking")?;
        if query.is_empty() {
            return Err(Error::validation("`query` cannot be empty"));
        }
        let truncate = self.truncate(options.truncate, options.truncation_direction);
        let query = Arc::new(query);
        let pairs: Vec<(Arc<String>, String)> = texts
            .into_iter()
            .map(|text| (query.clone(), text))
            .collect();
        let logits = self
            .timed(async {
                let encodings = self
                    .encode_all(pairs, move |tok, (query, text)| {
                        tok.encode_pair(query, text, truncate)
                    })
                    .await?;
                self.run(admission, Work::Logits, encodings).await
            })
            .await?;
        let mut ranks: Vec<Ranked> = logits
            .into_iter()
            .enumerate()
            .map(|(index, logits)| Ranked {
                index,
                score: if options.raw_scores {
                    logits[0]
                } else {
                    sigmoid(logits[0])
                },
            })
            .collect();
        ranks.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(ranks)
    }

    /// Every label's score of each input, highest first (`/predict`, gRPC `Predict`): softmax
    /// over the labels, or each label's sigmoid for a multi-label model, or the raw logits.
    pub async fn predict(
        &self,
        admission: Admission,
        inputs: Vec<PredictInput>,
        options: ScoreOptions,
    ) -> Result<Vec<Vec<Prediction>>, Error> {
        self.require(Task::Classify, "classification")?;
        self.check_count(
            "inputs",
            &inputs,
            self.limits.max_client_batch_size,
            PredictInput::is_empty,
        )?;
        let truncate = self.truncate(options.truncate, options.truncation_direction);
        let logits = self
            .timed(async {
                let encodings = self
                    .encode_all(inputs, move |tok, input| match input {
                        PredictInput::Single(text) => tok.encode(text, truncate),
                        PredictInput::Pair(a, b) => tok.encode_pair(a, b, truncate),
                    })
                    .await?;
                self.run(admission, Work::Logits, encodings).await
            })
            .await?;
        let labels = &self.manifest.labels;
        Ok(logits
            .into_iter()
            .map(|logits| {
                let scores = if options.raw_scores {
                    logits
                } else if self.manifest.multi_label {
                    logits.into_iter().map(sigmoid).collect()
                } else {
                    softmax(&logits)
                };
                let mut predictions: Vec<Prediction> = scores
                    .into_iter()
                    .zip(labels)
                    .map(|(score, label)| Prediction {
                        score,
                        label: label.clone(),
                    })
                    .collect();
                predictions.sort_by(|a, b| b.score.total_cmp(&a.score));
                predictions
            })
            .collect())
    }

    /// The tokens of each text (`/tokenize`), after the prompt. Takes an admission: it queues
    /// nothing, but its tokenizer work counts as load.
    pub async fn tokenize(
        &self,
        _admission: Admission,
        texts: Vec<String>,
        add_special_tokens: bool,
        prompt_name: Option<&str>,
    ) -> Result<Vec<Vec<Token>>, Error> {
        let prompt = self.prompt(prompt_name)?.unwrap_or_default();
        let tokenizer = self.tokenizer.clone();
        let tokens = tokio::task::spawn_blocking(move || {
            texts
                .iter()
                .map(|text| tokenizer.tokens(&format!("{prompt}{text}"), add_special_tokens))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|_| Error::new(ErrorType::Tokenizer, "tokenizer crashed"))??;
        Ok(tokens)
    }

    /// The text of each list of token ids (`/decode`).
    pub fn decode(
        &self,
        ids: &[Vec<u32>],
        skip_special_tokens: bool,
    ) -> Result<Vec<String>, Error> {
        self.check_count("ids", ids, self.limits.max_client_batch_size, Vec::is_empty)?;
        Ok(ids
            .iter()
            .map(|ids| self.tokenizer.decode(ids, skip_special_tokens))
            .collect::<Result<_, _>>()?)
    }

    /// The names and texts of the model's prompts.
    pub fn prompts(&self) -> &BTreeMap<String, String> {
        &self.manifest.prompts.prompts
    }
}

fn input_is_empty(input: &Input) -> bool {
    match input {
        Input::Text(text) => text.is_empty(),
        Input::Ids(ids) => ids.is_empty(),
    }
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

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
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

    #[test]
    fn softmax_sums_to_one_and_survives_large_logits() {
        let p = softmax(&[1000.0, 1000.0, -1000.0]);
        assert_eq!(p, vec![0.5, 0.5, 0.0]);
        let p = softmax(&[0.1, 2.0, -1.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6 && p[1] > p[0] && p[0] > p[2]);
    }
}
