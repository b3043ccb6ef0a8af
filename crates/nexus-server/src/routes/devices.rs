//! The device side: heartbeat, command pull and ack, report push. All bearer-authenticated.

use axum::Json;
use axum::extract::{Path, State};
use nexus_api::{
    AckRequest, CommandsResponse, DeviceTokenRefreshRequest, DeviceTokenRefreshResponse,
    DeviceView, DevicesResponse, HeartbeatRequest, HeartbeatResponse, OkResponse,
    PushReportsRequest, PushReportsResponse, RenameDeviceRequest,
};
use nexus_core::CoreError;
use nexus_core::devices::HeartbeatRequest as CoreHeartbeat;
use nexus_core::reports::ReportService;
use nexus_domain::time::{now_millis, rfc3339};
use nexus_domain::{CommandId, ValidationErrors};
use serde::Deserialize;

use crate::error::ApiResult;
use crate::extract::{ApiJson, ApiQuery, Authorized, Device, Meta, REPORT_BODY_LIMIT, perm};
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
#[into_params(parameter_in = Query)]
pub struct CommandsQuery {
    /// `next_cursor` of the previous pull; omit to get every unacknowledged command.
    pub cursor: Option<String>,
    /// Long-poll: wait up to this many seconds (at most 30) for a command before answering
    /// with an empty list; answers as soon as one is queued.
    pub wait: Option<u64>,
}

#[utoipa::path(get, path = "/devices/{id}/commands", tag = "devices",
    params(("id" = String, Path), CommandsQuery), security(("device_token" = [])),
    responses((status = 200, body = CommandsResponse), (status = 401, body = nexus_api::Problem)))]
pub async fn commands(
    State(state): State<AppState>,
    Device(device): Device,
    ApiQuery(query): ApiQuery<CommandsQuery>,
) -> ApiResult<Json<CommandsResponse>> {
    let wait = std::time::Duration::from_secs(query.wait.unwrap_or(0));
    let pulled = state
        .services
        .commands
        .pull(&device, query.cursor.as_deref(), wait, now_millis)
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
    Meta(meta): Meta,
    ApiJson(body): ApiJson<AckRequest>,
) -> ApiResult<Json<OkResponse>> {
    if let Some(at) = &body.received_at
        && chrono::DateTime::parse_from_rfc3339(at).is_err()
    {
        return Err(
            ValidationErrors::single("received_at", "must be an RFC 3339 timestamp").into(),
        );
    }
    let command_id = command_id(&path.cid).map_err(|_| {
        CoreError::not_found("command_not_found", "no such command for this device")
    })?;
    state
        .services
        .commands
        .ack(&device, &command_id, body.attempt, &meta, now_millis())
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
    Meta(meta): Meta,
    ApiJson(body): ApiJson<PushReportsRequest, REPORT_BODY_LIMIT>,
) -> ApiResult<Json<PushReportsResponse>> {
    let reports = ReportService::validate(&body.reports)?;
    let now = now_millis();
    let appended = state
        .services
        .reports
        .ingest(
            &device.tenant,
            Some(&device.device_id),
            reports.clone(),
            now,
        )
        .await?;
    // Reports that answer a command finish it (a duplicate report changes nothing).
    if reports.iter().any(|r| r.command_id().is_some()) {
        let fresh: Vec<_> = reports
            .into_iter()
            .zip(&appended)
            .filter(|(_, e)| !e.duplicate)
            .collect();
        let (fresh_reports, ids): (Vec<_>, Vec<_>) = fresh
            .into_iter()
            .map(|(r, e)| (r, e.event.event_id))
            .unzip();
        state
            .services
            .commands
            .observe_results(&device, &fresh_reports, &ids, &meta, now)
            .await?;
    }
    Ok(Json(PushReportsResponse {
        accepted: true,
        count: appended.len(),
        event_ids: appended.iter().map(|e| e.event.event_id).collect(),
    }))
}

/// Command ids are chosen by clients (idempotency keys): letters, digits, `_` and `-`.
pub fn command_id(raw: &str) -> Result<CommandId, nexus_domain::ValidationErrors> {
    nexus_domain::validation::check_token_chars("command_id", raw, 64, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
    })?;
    Ok(CommandId::from_trusted(raw.to_owned()))
}

fn device_id(raw: &str) -> Result<nexus_domain::DeviceId, CoreError> {
    nexus_domain::DeviceId::parse("id", raw)
        .map_err(|_| CoreError::not_found("device_not_found", "no such device"))
}

pub fn view(
    services: &nexus_core::Services,
    device: &nexus_domain::Device,
    now: i64,
) -> DeviceView {
    DeviceView {
        device_id: device.id.to_string(),
        device_name: device.name.clone(),
        device_type: device.device_type.clone(),
        capabilities: device.capabilities.clone(),
        status: services.devices.status(device, now),
        paired_at: rfc3339(device.paired_at),
        last_heartbeat_at: device.last_heartbeat_at.map(rfc3339),
        agent_version: device.agent_version.clone(),
        metrics: device.metrics.clone(),
    }
}

/// The tenant's devices with their online status.
#[utoipa::path(get, path = "/devices", tag = "devices", security(("bearer" = [])),
    params(("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    responses((status = 200, body = DevicesResponse), (status = 401, body = nexus_api::Problem),
              (status = 404, body = nexus_api::Problem)))]
pub async fn list(
    State(state): State<AppState>,
    access: Authorized<perm::ReadDevices>,
) -> ApiResult<Json<DevicesResponse>> {
    let now = now_millis();
    let devices = state.services.devices.list(&access.tenant).await?;
    Ok(Json(DevicesResponse {
        tenant: access.tenant.to_string(),
        devices: devices
            .iter()
            .map(|d| view(&state.services, d, now))
            .collect(),
    }))
}

/// One device of the tenant.
#[utoipa::path(get, path = "/devices/{id}", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path), ("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    responses((status = 200, body = DeviceView), (status = 404, body = nexus_api::Problem)))]
pub async fn get(
    State(state): State<AppState>,
    access: Authorized<perm::ReadDevices>,
    Path(id): Path<String>,
) -> ApiResult<Json<DeviceView>> {
    let device = state
        .services
        .devices
        .get(&access.tenant, &device_id(&id)?)
        .await?;
    Ok(Json(view(&state.services, &device, now_millis())))
}

/// Renames a device.
#[utoipa::path(patch, path = "/devices/{id}", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path), ("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    request_body = RenameDeviceRequest,
    responses((status = 200, body = DeviceView), (status = 404, body = nexus_api::Problem),
              (status = 422, body = nexus_api::Problem)))]
pub async fn rename(
    State(state): State<AppState>,
    access: Authorized<perm::ManageDevices>,
    Meta(meta): Meta,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RenameDeviceRequest>,
) -> ApiResult<Json<DeviceView>> {
    let now = now_millis();
    let device = state
        .services
        .devices
        .rename(
            access.principal.actor(),
            &access.tenant,
            &device_id(&id)?,
            &body.name,
            &meta,
            now,
        )
        .await?;
    Ok(Json(view(&state.services, &device, now)))
}

/// Deletes (unpairs) a device of the tenant: its token stops working at once, on every replica.
#[utoipa::path(delete, path = "/devices/{id}", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path), ("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    responses((status = 204, description = "deleted"), (status = 404, body = nexus_api::Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    access: Authorized<perm::ManageDevices>,
    Meta(meta): Meta,
    Path(id): Path<String>,
) -> ApiResult<axum::http::StatusCode> {
    state
        .services
        .devices
        .delete(
            access.principal.actor(),
            &access.tenant,
            &device_id(&id)?,
            &meta,
            now_millis(),
        )
        .await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// The device unpairs itself (`nexus agent unpair`): the device is deleted exactly as by a user's
/// `DELETE /devices/{id}` (its tokens stop working at once, on every replica), audited with the
/// device as the actor. A device token can only remove its own device.
#[utoipa::path(post, path = "/devices/{id}/unpair", tag = "devices",
    params(("id" = String, Path)), security(("device_token" = [])),
    responses((status = 204, description = "deleted"), (status = 401, body = nexus_api::Problem),
              (status = 404, body = nexus_api::Problem)))]
pub async fn unpair(
    State(state): State<AppState>,
    Device(device): Device,
    Meta(meta): Meta,
) -> ApiResult<axum::http::StatusCode> {
    state
        .services
        .devices
        .delete(
            nexus_domain::audit::Actor::device(&device.device_id),
            &device.tenant,
            &device.device_id,
            &meta,
            now_millis(),
        )
        .await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// A device trades its refresh token for a new token pair (both rotate). Presenting a refresh
/// token that was already used revokes all of the device's tokens (it must pair again), except
/// a retry after a lost answer: within `--device-refresh-retry-grace` of the first trade, and
/// only while the pair it produced is unused, the same token gets a fresh pair instead (the
/// undelivered pair stops working, and presenting it later counts as reuse).
#[utoipa::path(post, path = "/devices/token/refresh", tag = "devices",
    request_body = DeviceTokenRefreshRequest,
    responses((status = 200, body = DeviceTokenRefreshResponse),
              (status = 401, description = "`invalid_refresh_token` or `refresh_token_reused`", body = nexus_api::Problem)))]
pub async fn refresh_token(
    State(state): State<AppState>,
    Meta(meta): Meta,
    ApiJson(body): ApiJson<DeviceTokenRefreshRequest>,
) -> ApiResult<Json<DeviceTokenRefreshResponse>> {
    let issued = state
        .services
        .devices
        .refresh_tokens(&body.device_id, &body.refresh_token, &meta, now_millis())
        .await?;
    Ok(Json(DeviceTokenRefreshResponse {
        device_id: body.device_id,
        device_token: issued.access_token.expose().to_owned(),
        token_type: "Bearer".into(),
        expires_at: rfc3339(issued.access_expires_at),
        refresh_token: issued.refresh_token.expose().to_owned(),
        refresh_expires_at: rfc3339(issued.refresh_expires_at),
    }))
}
