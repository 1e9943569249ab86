//! Every API error, mapped to its HTTP status in one place, answered as JSON
//! `{"error": "<what to fix>", …}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("config field `{field}` {reason}")]
    InvalidConfig { field: String, reason: String },
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("the database is unavailable: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error("NATS is unavailable: {0}")]
    Nats(String),
    #[error("{0}")]
    Unavailable(String),
    /// Too busy for this now (503 with `Retry-After`); not a failure to log.
    #[error("{0}")]
    Busy(String),
}

impl ApiError {
    /// An error shared by several waiters (moka's coalesced initialisation).
    pub(crate) fn shared(error: &ApiError) -> ApiError {
        match error {
            ApiError::NotFound(m) => ApiError::NotFound(m.clone()),
            ApiError::BadRequest(m) => ApiError::BadRequest(m.clone()),
            ApiError::Nats(m) => ApiError::Nats(m.clone()),
            other => ApiError::Unavailable(other.to_string()),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

pub(crate) use athanor_schemas::api::ErrorBody;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::InvalidConfig { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Database(_)
            | ApiError::Nats(_)
            | ApiError::Unavailable(_)
            | ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        if let ApiError::Busy(message) = &self {
            let mut response = (status, Json(ErrorBody::new(message.clone()))).into_response();
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("5"),
            );
            return response;
        }
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let body = match &self {
            ApiError::InvalidConfig { field, reason } => ErrorBody {
                field: Some(field.clone()),
                reason: Some(reason.clone()),
                ..ErrorBody::new(self.to_string())
            },
            _ => ErrorBody::new(self.to_string()),
        };
        (status, Json(body)).into_response()
    }
}
