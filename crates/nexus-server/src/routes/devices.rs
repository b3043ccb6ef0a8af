//! The device side: heartbeat, command pull and ack, report push. All bearer-authenticated.

use axum::Json;
use axum::extract::{Path, State};
use nexus_api::{
    AckRequest, CommandsResponse, HeartbeatRequest, HeartbeatResponse, OkResponse,
    PushReportsRequest, PushReportsResponse,
};
use nexus_core::devices::HeartbeatRequest as CoreHeartbeat;
use nexus_core::reports::ReportService;
use nexus_domain::time::now_millis;
use nexus_domain::{CommandId, ValidationErrors};
use serde::Deserialize;

use crate::error::ApiResult;
use crate::extract::{ApiJson, ApiQuery, Device, REPORT_BODY_LIMIT, Tenant};
use crate::state::AppState;

#[utoipa::path(post, path = "/devices/{id}/heartbeat", tag = "devices",
    params(("id" = String, Path)), security(("device_token" = [])),
    request_body = HeartbeatRequest,
    responses((status = 200, body = HeartbeatResponse), (status = 401, body = nexus_api::Problem)))]
pub async fn heartbeat(
    State(state): State<AppState>,
    Device(device): Device,
    ApiJson(body): ApiJson<HeartbeatRequest>,
) -> ApiResult<Json<HeartbeatResponse>> {
    let request = CoreHeartbeat {
        status: body.status,
        metrics: body.metrics,
        agent_version: body.agent_version,
    };
    state
        .services
        .devices
        .heartbeat(&device, request, now_millis())
        .await?;
    Ok(Json(HeartbeatResponse {
        ok: true,
        heartbeat_interval_seconds: state.config.heartbeat_interval.as_secs(),
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct CommandsQuery {
    /// `next_cursor` of the previous pull; omit to get every unacknowledged command.
    pub cursor: Option<String>,
}

#[utoipa::path(get, path = "/devices/{id}/commands", tag = "devices",
    params(("id" = String, Path), CommandsQuery), security(("device_token" = [])),
    responses((status = 200, body = CommandsResponse), (status = 401, body = nexus_api::Problem)))]
pub async fn commands(
    State(state): State<AppState>,
    Device(device): Device,
    ApiQuery(query): ApiQuery<CommandsQuery>,
) -> ApiResult<Json<CommandsResponse>> {
    let pulled = state
        .services
        .commands
        .pull(&device, query.cursor.as_deref())
        .await?;
    Ok(Json(CommandsResponse {
        commands: pulled.commands,
        next_cursor: pulled.next_cursor,
    }))
}

#[derive(Debug, Deserialize)]
pub struct AckPath {
    #[allow(dead_code)] // bound by the Device extractor
    pub id: String,
    pub cid: String,
}

#[utoipa::path(post, path = "/devices/{id}/commands/{cid}/ack", tag = "devices",
    params(("id" = String, Path), ("cid" = String, Path)), security(("device_token" = [])),
    request_body = AckRequest,
    responses((status = 200, body = OkResponse), (status = 404, body = nexus_api::Problem)))]
pub async fn ack(
    State(state): State<AppState>,
    Device(device): Device,
    Path(path): Path<AckPath>,
    ApiJson(body): ApiJson<AckRequest>,
) -> ApiResult<Json<OkResponse>> {
    if let Some(at) = &body.received_at
        && chrono::DateTime::parse_from_rfc3339(at).is_err()
    {
        return Err(
            ValidationErrors::single("received_at", "must be an RFC 3339 timestamp").into(),
        );
    }
    let command_id = CommandId::parse("cid", &path.cid).map_err(|_| {
        nexus_core::CoreError::not_found("command_not_found", "no such command for this device")
    })?;
    state
        .services
        .commands
        .ack(&device, &command_id, now_millis())
        .await?;
    Ok(Json(OkResponse { ok: true }))
}

#[utoipa::path(post, path = "/devices/{id}/reports", tag = "devices",
    params(("id" = String, Path)), security(("device_token" = [])),
    request_body = PushReportsRequest,
    responses((status = 200, body = PushReportsResponse),
              (status = 413, description = "more than 100 reports or 1 MiB", body = nexus_api::Problem),
              (status = 422, description = "a report is invalid; nothing was stored", body = nexus_api::Problem)))]
pub async fn push_reports(
    State(state): State<AppState>,
    Device(device): Device,
    ApiJson(body): ApiJson<PushReportsRequest, REPORT_BODY_LIMIT>,
) -> ApiResult<Json<PushReportsResponse>> {
    let reports = ReportService::validate(&body.reports)?;
    let appended = state
        .services
        .reports
        .ingest(
            &device.tenant,
            Some(&device.device_id),
            reports,
            now_millis(),
        )
        .await?;
    Ok(Json(PushReportsResponse {
        accepted: true,
        count: appended.len(),
        event_ids: appended.iter().map(|e| e.event.event_id).collect(),
    }))
}

/// Deletes (unpairs) a device of the tenant: its token stops working at once, on every replica.
#[utoipa::path(delete, path = "/devices/{id}", tag = "devices",
    params(("id" = String, Path), ("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    responses((status = 204, description = "deleted"), (status = 404, body = nexus_api::Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<axum::http::StatusCode> {
    let not_found = || nexus_core::CoreError::not_found("device_not_found", "no such device");
    let id = nexus_domain::DeviceId::parse("id", &id).map_err(|_| not_found())?;
    state.services.devices.delete(&tenant, &id).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}
