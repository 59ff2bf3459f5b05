//! Every failure the API answers, as a status code plus TEI's `{"error", "error_type"}` body,
//! and the extractor that turns malformed bodies into that shape instead of axum's plain text.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::types::{ErrorResponse, ErrorType};
use crate::queue::QueueError;
use crate::tokenize::TokenizeError;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error_type: ErrorType,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: ErrorType, message: impl Into<String>) -> Self {
        Self {
            status,
            error_type,
            message: message.into(),
        }
    }

    /// 422: the request is well-formed HTTP but not a valid request for this API.
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorType::Validation,
            message,
        )
    }

    /// 424: the route needs a model of another task (TEI answers "backend" here too).
    pub fn wrong_task(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FAILED_DEPENDENCY, ErrorType::Backend, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorResponse {
            error: self.message,
            error_type: self.error_type,
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        let (status, error_type) = match e {
            QueueError::Overloaded(_) => (StatusCode::TOO_MANY_REQUESTS, ErrorType::Overloaded),
            QueueError::Closed => (StatusCode::SERVICE_UNAVAILABLE, ErrorType::Unhealthy),
            QueueError::Backend(_) => (StatusCode::FAILED_DEPENDENCY, ErrorType::Backend),
        };
        Self::new(status, error_type, e.to_string())
    }
}

impl From<TokenizeError> for ApiError {
    fn from(e: TokenizeError) -> Self {
        match e {
            TokenizeError::TooLong { .. } => {
                Self::validation(format!("{e}; send `truncate: true` to cut it"))
            }
            TokenizeError::Failed(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorType::Tokenizer,
                e.to_string(),
            ),
        }
    }
}

/// A JSON body, or our JSON error: 413 over the payload limit, 422 for anything that is not
/// valid JSON of the expected shape (bad syntax, invalid UTF-8, wrong types, missing fields).
/// The content type is not checked: `curl -d` sends form-encoded bodies that are JSON.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorType::PayloadTooLarge,
                    "request body is larger than the payload limit",
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorType::Validation,
                    rejection.body_text(),
                )
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::validation(format!("invalid request body: {e}")))
    }
}
