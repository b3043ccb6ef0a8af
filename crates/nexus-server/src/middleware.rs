//! Per-request plumbing: the correlation id (accepted or generated, echoed, carried into logs and
//! problem bodies) and the request span whose fields every log line of the request carries.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::{Instrument, field};

pub const CORRELATION_HEADER: &str = "x-correlation-id";

tokio::task_local! {
    static CORRELATION_ID: String;
}

/// The correlation id of the request being handled on this task, if any.
pub fn current_correlation_id() -> Option<String> {
    CORRELATION_ID.try_with(Clone::clone).ok()
}

/// A client-supplied id is kept only if it is short and plain, so it is safe in logs and headers.
fn accepted_correlation_id(request: &Request) -> Option<String> {
    let raw = request.headers().get(CORRELATION_HEADER)?.to_str().ok()?;
    let ok = !raw.is_empty()
        && raw.len() <= 128
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then(|| raw.to_owned())
}

pub async fn request_context(request: Request, next: Next) -> Response {
    let correlation_id = accepted_correlation_id(&request)
        .unwrap_or_else(|| ulid::Ulid::new().to_string().to_ascii_lowercase());
    // The route template, never the raw path: paths carry ids, templates keep cardinality low.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        route = %route,
        correlation_id = %correlation_id,
        tenant_id = field::Empty,
        user_id = field::Empty,
        device_id = field::Empty,
    );
    let started = Instant::now();
    let header_value = HeaderValue::from_str(&correlation_id).ok();
    let mut response = CORRELATION_ID
        .scope(correlation_id, next.run(request))
        .instrument(span.clone())
        .await;
    if let Some(value) = header_value {
        response.headers_mut().insert(CORRELATION_HEADER, value);
    }
    let status = response.status().as_u16();
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| {
        if status >= 500 {
            tracing::warn!(status, latency_ms, "request failed");
        } else {
            tracing::debug!(status, latency_ms, "request finished");
        }
    });
    response
}
