//! Development-only endpoints (mounted only with `--dev`): emit a report without a device, list a
//! tenant's devices, enqueue a command. They exist so the flows are testable end to end before
//! the console and the commands API exist.

use axum::Json;
use axum::extract::State;
use nexus_api::{DeviceView, DevicesResponse, EmitReportRequest, EmitReportResponse};
use nexus_core::reports::ReportService;
use nexus_domain::time::{now_millis, rfc3339};
use nexus_domain::{SessionId, ValidationErrors};
use serde_json::json;

use crate::error::ApiResult;
use crate::extract::{ApiJson, Authorized, Tenant, perm};
use crate::middleware::current_correlation_id;
use crate::state::AppState;

#[utoipa::path(post, path = "/devtools/emit_report", tag = "devtools",
    security(("bearer" = [])), params(("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    request_body = EmitReportRequest,
    responses((status = 200, body = EmitReportResponse)))]
pub async fn emit_report(
    State(state): State<AppState>,
    Authorized { tenant, .. }: Authorized<perm::SendCommands>,
    ApiJson(body): ApiJson<EmitReportRequest>,
) -> ApiResult<Json<EmitReportResponse>> {
    SessionId::parse("session_id", &body.session_id)?;
    if body.text.len() > 64 * 1024 {
        return Err(ValidationErrors::single("text", "must be at most 65536 bytes").into());
    }
    let raw = json!({
        "meta": {
            "report_id": format!("r_dev_{}", ulid::Ulid::new().to_string().to_ascii_lowercase()),
            "created_at": rfc3339(now_millis()),
            "session_id": body.session_id,
            "approval_level": body.approval_level,
            "causality": {"correlation_id": current_correlation_id().unwrap_or_default(), "type": "devtools.emit"},
        },
        "rationale": body.text,
    });
    let reports = ReportService::validate(&[raw])?;
    let appended = state
        .services
        .reports
        .ingest(&tenant, None, reports, now_millis())
        .await?;
    Ok(Json(EmitReportResponse {
        accepted: true,
        event_id: appended.first().map_or(0, |e| e.event.event_id),
    }))
}

/// The tenant's devices WITHOUT authentication (tenant headers only): the same work as
/// `GET /devices` minus the auth layer, so the benchmark can measure what authentication costs.
/// Dev mode only, like every devtools route.
#[utoipa::path(get, path = "/devtools/devices", tag = "devtools",
    params(("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    responses((status = 200, body = DevicesResponse)))]
pub async fn devices(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
) -> ApiResult<Json<DevicesResponse>> {
    let now = now_millis();
    let devices = state.services.devices.list(&tenant).await?;
    Ok(Json(DevicesResponse {
        tenant: tenant.to_string(),
        devices: devices
            .into_iter()
            .map(|d| DeviceView {
                status: state.services.devices.status(&d, now),
                device_id: d.id.to_string(),
                device_name: d.name,
                device_type: d.device_type,
                capabilities: d.capabilities,
                paired_at: rfc3339(d.paired_at),
                last_heartbeat_at: d.last_heartbeat_at.map(rfc3339),
                agent_version: d.agent_version,
                metrics: d.metrics,
            })
            .collect(),
    }))
}
