//! Commands for devices and their approvals (checklist §8). Proposals and decisions answer
//! 202: their outcome reaches the UI as reports on the command's session stream.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use nexus_api::{
    ApprovalView, ApprovalsResponse, CommandView, CommandsListResponse, DecideRequest,
    DecideResponse, ProposeCommandRequest, ProposeCommandResponse,
};
use nexus_core::commands::{Decision, ProposeRequest, Proposed};
use nexus_domain::approval::{
    Approval, ApprovalStatus, CommandPolicySettings, CommandRecord, CommandStatus,
};
use nexus_domain::command::Risk;
use nexus_domain::time::{now_millis, rfc3339};
use nexus_domain::{DeviceId, ValidationErrors};
use nexus_store::CommandQuery;
use serde::Deserialize;

use crate::error::ApiResult;
use crate::extract::{ApiJson, ApiQuery, Authorized, Meta, perm};
use crate::state::AppState;

fn risk(r: Risk) -> String {
    r.lowercase().into()
}

pub fn command_view(c: &CommandRecord) -> CommandView {
    CommandView {
        command_id: c.id.to_string(),
        command_type: c.command_type.clone(),
        params: c.params.clone(),
        device_id: c.device_id.to_string(),
        session_id: c.session_id.to_string(),
        correlation_id: c.correlation_id.clone(),
        risk: risk(c.risk),
        status: c.status,
        approval_id: c.approval_id.as_ref().map(ToString::to_string),
        requested_by: c.requested_by.to_string(),
        requested_at: rfc3339(c.requested_at),
        updated_at: rfc3339(c.updated_at),
        deadline: c.deadline.map(rfc3339),
        attempt: c.attempt,
        replaces: c.replaces.as_ref().map(ToString::to_string),
        result: c.result.clone(),
    }
}

pub fn approval_view(a: &Approval) -> ApprovalView {
    ApprovalView {
        approval_id: a.id.to_string(),
        command_id: a.command_id.to_string(),
        device_id: a.device_id.to_string(),
        command_type: a.command_type.clone(),
        risk: risk(a.risk),
        summary: a.summary.clone(),
        requested_by: a.requested_by.to_string(),
        requested_at: rfc3339(a.requested_at),
        expires_at: rfc3339(a.expires_at),
        status: a.status,
        decided_by: a.decided_by.as_ref().map(ToString::to_string),
        decided_at: a.decided_at.map(rfc3339),
        reason: a.reason.clone(),
    }
}

fn accepted(p: Proposed) -> (StatusCode, Json<ProposeCommandResponse>) {
    (
        StatusCode::ACCEPTED,
        Json(ProposeCommandResponse {
            accepted: true,
            command_id: p.record.id.to_string(),
            correlation_id: p.record.correlation_id.clone(),
            risk: risk(p.record.risk),
            status: p.record.status,
            approval_id: p.record.approval_id.as_ref().map(ToString::to_string),
        }),
    )
}

/// Proposes a command for a device. The tenant's policy classifies it: GREEN and YELLOW are
/// queued (YELLOW with a warning report), RED waits for approval (`status: pending_approval`).
/// `command_id` is your idempotency key.
#[utoipa::path(post, path = "/sidecar/command", tag = "commands", security(("bearer" = [])),
    params(("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    request_body = ProposeCommandRequest,
    responses((status = 202, body = ProposeCommandResponse),
              (status = 404, description = "no such device in this tenant", body = nexus_api::Problem),
              (status = 409, description = "`command_id_conflict`: the id was used for a different command", body = nexus_api::Problem),
              (status = 422, body = nexus_api::Problem)))]
pub async fn propose(
    State(state): State<AppState>,
    access: Authorized<perm::SendCommands>,
    Meta(meta): Meta,
    ApiJson(body): ApiJson<ProposeCommandRequest>,
) -> ApiResult<(StatusCode, Json<ProposeCommandResponse>)> {
    let request = ProposeRequest {
        command_id: body.command_id,
        command_type: body.command_type,
        params: body.params,
        device_id: body.device_id,
        session_id: body.session_id,
        correlation_id: body.client_context.correlation_id,
    };
    let proposed = state
        .services
        .commands
        .propose(
            &access.principal,
            &access.tenant,
            request,
            &meta,
            now_millis(),
        )
        .await?;
    Ok(accepted(proposed))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CommandsListQuery {
    pub status: Option<String>,
    pub device_id: Option<String>,
    /// 1 to 200 (default 50).
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// The tenant's commands, newest first.
#[utoipa::path(get, path = "/commands", tag = "commands", security(("bearer" = [])),
    params(("x-org-id" = String, Header), ("x-project-id" = String, Header), CommandsListQuery),
    responses((status = 200, body = CommandsListResponse), (status = 422, body = nexus_api::Problem)))]
pub async fn list(
    State(state): State<AppState>,
    access: Authorized<perm::ReadCommands>,
    ApiQuery(query): ApiQuery<CommandsListQuery>,
) -> ApiResult<Json<CommandsListResponse>> {
    let status = match query.status.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(CommandStatus::parse(s).ok_or_else(|| {
            ValidationErrors::single(
                "status",
                "must be a command status like queued or pending_approval",
            )
        })?),
        None => None,
    };
    let device_id = match query.device_id.as_deref().filter(|s| !s.is_empty()) {
        Some(d) => Some(DeviceId::parse("device_id", d)?),
        None => None,
    };
    let limit = page_limit(query.limit)?;
    let before = match query.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => Some(c.parse::<i64>().map_err(|_| {
            ValidationErrors::single("cursor", "must be a next_cursor value from a previous page")
        })?),
        None => None,
    };
    let (commands, next) = state
        .services
        .commands
        .list(
            &access.tenant,
            CommandQuery {
                status,
                device_id,
                before,
                limit,
            },
        )
        .await?;
    Ok(Json(CommandsListResponse {
        commands: commands.iter().map(command_view).collect(),
        next_cursor: next.map(|c| c.to_string()),
    }))
}

/// One command with its status.
#[utoipa::path(get, path = "/commands/{id}", tag = "commands", security(("bearer" = [])),
    params(("id" = String, Path), ("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    responses((status = 200, body = CommandView), (status = 404, body = nexus_api::Problem)))]
pub async fn get(
    State(state): State<AppState>,
    access: Authorized<perm::ReadCommands>,
    Path(id): Path<String>,
) -> ApiResult<Json<CommandView>> {
    let record = state.services.commands.command(&access.tenant, &id).await?;
    Ok(Json(command_view(&record)))
}

/// Cancels a command that has not been delivered yet (deny a pending approval instead).
#[utoipa::path(post, path = "/commands/{id}/cancel", tag = "commands", security(("bearer" = [])),
    params(("id" = String, Path), ("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    responses((status = 202, body = CommandView), (status = 404, body = nexus_api::Problem),
              (status = 409, description = "already delivered or ended", body = nexus_api::Problem)))]
pub async fn cancel(
    State(state): State<AppState>,
    access: Authorized<perm::SendCommands>,
    Meta(meta): Meta,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<CommandView>)> {
    let record = state
        .services
        .commands
        .cancel(&access.principal, &access.tenant, &id, &meta, now_millis())
        .await?;
    Ok((StatusCode::ACCEPTED, Json(command_view(&record))))
}

/// Proposes an expired, denied, cancelled or timed-out command again (new command id, linked to
/// the old one through `replaces`). A command is re-proposed once: asking again (a double click,
/// a colleague) returns that same re-proposal.
#[utoipa::path(post, path = "/commands/{id}/repropose", tag = "commands", security(("bearer" = [])),
    params(("id" = String, Path), ("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    responses((status = 202, body = ProposeCommandResponse), (status = 404, body = nexus_api::Problem),
              (status = 409, description = "the command has not ended", body = nexus_api::Problem)))]
pub async fn repropose(
    State(state): State<AppState>,
    access: Authorized<perm::SendCommands>,
    Meta(meta): Meta,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<ProposeCommandResponse>)> {
    let proposed = state
        .services
        .commands
        .repropose(&access.principal, &access.tenant, &id, &meta, now_millis())
        .await?;
    Ok(accepted(proposed))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ApprovalsQuery {
    /// `pending`, `approved`, `denied` or `expired`.
    pub status: Option<String>,
    /// 1 to 200 (default 50).
    pub limit: Option<u32>,
}

/// The tenant's approvals, newest first.
#[utoipa::path(get, path = "/approvals", tag = "commands", security(("bearer" = [])),
    params(("x-org-id" = String, Header), ("x-project-id" = String, Header), ApprovalsQuery),
    responses((status = 200, body = ApprovalsResponse), (status = 422, body = nexus_api::Problem)))]
pub async fn approvals(
    State(state): State<AppState>,
    access: Authorized<perm::ReadCommands>,
    ApiQuery(query): ApiQuery<ApprovalsQuery>,
) -> ApiResult<Json<ApprovalsResponse>> {
    let status = match query.status.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(ApprovalStatus::parse(s).ok_or_else(|| {
            ValidationErrors::single("status", "must be pending, approved, denied or expired")
        })?),
        None => None,
    };
    let limit = page_limit(query.limit)?;
    let approvals = state
        .services
        .commands
        .approvals(&access.tenant, status, limit)
        .await?;
    Ok(Json(ApprovalsResponse {
        approvals: approvals.iter().map(approval_view).collect(),
    }))
}

/// One approval.
#[utoipa::path(get, path = "/approvals/{id}", tag = "commands", security(("bearer" = [])),
    params(("id" = String, Path), ("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    responses((status = 200, body = ApprovalView), (status = 404, body = nexus_api::Problem)))]
pub async fn approval(
    State(state): State<AppState>,
    access: Authorized<perm::ReadCommands>,
    Path(id): Path<String>,
) -> ApiResult<Json<ApprovalView>> {
    let approval = state
        .services
        .commands
        .approval(&access.tenant, &id)
        .await?;
    Ok(Json(approval_view(&approval)))
}

/// Approves or denies a pending approval. Exactly one decision wins; a decided or expired
/// approval answers 409. With the tenant's four-eyes rule the requester cannot approve.
#[utoipa::path(post, path = "/approvals/{id}/decide", tag = "commands", security(("bearer" = [])),
    params(("id" = String, Path), ("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    request_body = DecideRequest,
    responses((status = 202, body = DecideResponse), (status = 403, description = "`distinct_approver_required`", body = nexus_api::Problem),
              (status = 404, body = nexus_api::Problem),
              (status = 409, description = "`approval_already_decided` or `approval_expired`", body = nexus_api::Problem)))]
pub async fn decide(
    State(state): State<AppState>,
    access: Authorized<perm::DecideApprovals>,
    Meta(meta): Meta,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<DecideRequest>,
) -> ApiResult<(StatusCode, Json<DecideResponse>)> {
    let approve = match body.decision.as_str() {
        "approve" => true,
        "deny" => false,
        _ => {
            return Err(
                ValidationErrors::single("decision", "must be \"approve\" or \"deny\"").into(),
            );
        }
    };
    let (approval, record) = state
        .services
        .commands
        .decide(
            &access.principal,
            &access.tenant,
            &id,
            Decision {
                approve,
                reason: body.reason,
            },
            &meta,
            now_millis(),
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(DecideResponse {
            accepted: true,
            approval_id: approval.id.to_string(),
            status: approval.status,
            command_id: record.id.to_string(),
            command_status: record.status,
        }),
    ))
}

/// The tenant's command policy (risk table, approval settings, timeouts).
#[utoipa::path(get, path = "/policy", tag = "commands", security(("bearer" = [])),
    params(("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    responses((status = 200, body = CommandPolicySettings)))]
pub async fn get_policy(
    State(state): State<AppState>,
    access: Authorized<perm::ReadCommands>,
) -> ApiResult<Json<CommandPolicySettings>> {
    Ok(Json(state.services.commands.policy(&access.tenant).await?))
}

/// Replaces the tenant's command policy (admins). Rules are exact types (`fs.read`) or prefixes
/// (`fs.*`); an exact rule beats a prefix, the longest prefix wins, anything unmatched is RED.
#[utoipa::path(put, path = "/policy", tag = "commands", security(("bearer" = [])),
    params(("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    request_body = CommandPolicySettings,
    responses((status = 200, body = CommandPolicySettings), (status = 403, body = nexus_api::Problem),
              (status = 422, body = nexus_api::Problem)))]
pub async fn put_policy(
    State(state): State<AppState>,
    access: Authorized<perm::ManagePolicies>,
    Meta(meta): Meta,
    ApiJson(body): ApiJson<CommandPolicySettings>,
) -> ApiResult<Json<CommandPolicySettings>> {
    let saved = state
        .services
        .commands
        .put_policy(&access.principal, &access.tenant, body, &meta, now_millis())
        .await?;
    Ok(Json(saved))
}

/// `?limit=` of the list endpoints: 50 unless given, 1 to 200.
fn page_limit(limit: Option<u32>) -> Result<u32, ValidationErrors> {
    let limit = limit.unwrap_or(50);
    if (1..=200).contains(&limit) {
        Ok(limit)
    } else {
        Err(ValidationErrors::single("limit", "must be 1 to 200"))
    }
}
