//! The one HTTP error type: every failure leaves as RFC 9457 problem+json with a stable `code`.
//! Internal details never reach clients; a 5xx is logged exactly once, here, with the
//! correlation id of the request.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use nexus_api::Problem;
use nexus_core::CoreError;
use nexus_domain::{FieldError, ValidationErrors};

use crate::middleware::current_correlation_id;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub errors: Vec<FieldError>,
    /// Seconds for `Retry-After` (429 and 503).
    pub retry_after: Option<u64>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
        }
    }

    pub fn validation(errors: ValidationErrors) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "validation_failed",
            detail: "the request has invalid fields; see errors".into(),
            errors: errors.0,
            retry_after: None,
        }
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this method is not allowed on this resource",
        )
    }

    fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "an unexpected error occurred; quote the correlation id when reporting it",
        )
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::Validation(errors) => Self::validation(errors),
            CoreError::BadRequest { code, detail } => {
                Self::new(StatusCode::BAD_REQUEST, code, detail)
            }
            CoreError::Unauthorized { code, detail } => {
                Self::new(StatusCode::UNAUTHORIZED, code, detail)
            }
            CoreError::Forbidden { code, detail } => Self::new(StatusCode::FORBIDDEN, code, detail),
            CoreError::NotFound { code, detail } => Self::new(StatusCode::NOT_FOUND, code, detail),
            CoreError::Conflict { code, detail } => Self::new(StatusCode::CONFLICT, code, detail),
            CoreError::Gone { code, detail } => Self::new(StatusCode::GONE, code, detail),
            CoreError::TooLarge { code, detail } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, code, detail)
            }
            CoreError::TooManyRequests {
                code,
                detail,
                retry_after_secs,
            } => Self {
                retry_after: Some(retry_after_secs),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, detail)
            },
            CoreError::Unavailable(cause) => {
                tracing::error!(error = %format!("{cause:#}"), "dependency unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service_unavailable",
                    "the service is temporarily unavailable; retry shortly",
                )
            }
            CoreError::Unexpected(cause) => {
                tracing::error!(error = %format!("{cause:#}"), "unexpected error");
                Self::internal()
            }
        }
    }
}

impl From<ValidationErrors> for ApiError {
    fn from(e: ValidationErrors) -> Self {
        Self::validation(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem {
            problem_type: format!("urn:nexus:problem:{}", self.code),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail,
            code: self.code.to_owned(),
            correlation_id: current_correlation_id(),
            errors: self.errors,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match self.status {
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
                let secs = self.retry_after.unwrap_or(1).to_string();
                if let Ok(value) = HeaderValue::from_str(&secs) {
                    headers.insert(header::RETRY_AFTER, value);
                }
            }
            _ => {}
        }
        response
    }
}
