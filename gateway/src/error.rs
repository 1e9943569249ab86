//! Every API error, mapped to its HTTP status in one place, answered as JSON
//! `{"error": "<what to fix>", …}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

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

/// The body of every error answer (4xx and 5xx): `error` says what was wrong; a config
/// that fails its experiment's schema (422) also names the `field` and the `reason`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub(crate) struct ErrorBody {
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub reason: Option<String>,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>) -> Self {
        ErrorBody {
            error: error.into(),
            field: None,
            reason: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::InvalidConfig { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Database(_) | ApiError::Nats(_) | ApiError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
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
