//! Health endpoints for load balancers and orchestrators.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use nexus_api::HealthResponse;

use crate::state::AppState;

const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

fn body(status: &str) -> Json<HealthResponse> {
    Json(HealthResponse {
        status: status.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

async fn store_reachable(state: &AppState) -> bool {
    matches!(
        tokio::time::timeout(STORE_CHECK_TIMEOUT, state.services.store.ping()).await,
        Ok(Ok(()))
    )
}

/// Overall health: 200 when ready, 503 when draining or the store is unreachable.
#[utoipa::path(get, path = "/health", tag = "health", responses((status = 200, body = HealthResponse), (status = 503, body = HealthResponse)))]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<HealthResponse>) {
    ready(State(state)).await
}

/// The process is up and serving HTTP.
#[utoipa::path(get, path = "/health/live", tag = "health", responses((status = 200, body = HealthResponse)))]
pub async fn live() -> Json<HealthResponse> {
    body("ok")
}

/// Ready for traffic: the store answers and the server is not draining.
#[utoipa::path(get, path = "/health/ready", tag = "health", responses((status = 200, body = HealthResponse), (status = 503, body = HealthResponse)))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<HealthResponse>) {
    if state.lifecycle.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, body("draining"));
    }
    if !store_reachable(&state).await {
        return (StatusCode::SERVICE_UNAVAILABLE, body("unavailable"));
    }
    (StatusCode::OK, body("ok"))
}
