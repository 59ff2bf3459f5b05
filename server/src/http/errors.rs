//! Every failure the API answers, as a status code plus TEI's `{"error", "error_type"}` body,
//! and the extractor that turns malformed bodies into that shape instead of axum's plain text.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::types::{ErrorResponse, ErrorType};
use crate::service::Error;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: Error,
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: ErrorType, message: impl Into<String>) -> Self {
        Self {
            status,
            error: Error::new(error_type, message),
        }
    }

    /// 422: the request is well-formed HTTP but not a valid request for this API.
    pub fn validation(message: impl Into<String>) -> Self {
        Error::validation(message).into()
    }
}

/// The status of each kind of service error.
impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        let status = match error.kind {
            ErrorType::Validation | ErrorType::Tokenizer => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorType::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorType::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            // The route needs another task, or inference failed: TEI's 424 for both.
            ErrorType::Backend => StatusCode::FAILED_DEPENDENCY,
            ErrorType::Unhealthy => StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorType::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorType::NotFound => StatusCode::NOT_FOUND,
            ErrorType::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        };
        Self { status, error }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorResponse {
            error: self.error.message,
            error_type: self.error.kind,
        };
        (self.status, axum::Json(body)).into_response()
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
