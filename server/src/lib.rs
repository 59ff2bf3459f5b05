//! qmodel-server: BERT-family sentence embeddings and cross-encoder reranking over HTTP.
//!
//! Layout (after text-embeddings-inference): `artifact` (on-disk model format), `quantize`
//! (checkpoint -> artifact), `models` (one file per model family, tensors only), `backend`
//! (the one interface the serving side sees), `tokenize`, `queue` (dynamic batcher),
//! `service` (request handling shared by both front ends), `http` and `grpc` (routes and wire
//! types; know nothing of tensors), `threads` (the compute thread budget from the container's
//! CPU limit).

pub mod artifact;
pub mod backend;
pub mod config;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod models;
pub mod prompts;
pub mod quantize;
pub mod queue;
pub mod service;
pub mod threads;
pub mod tokenize;
