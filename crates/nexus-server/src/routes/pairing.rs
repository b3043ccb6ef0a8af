//! Device pairing (NEXUS v2 contract): start → confirm_by_code → complete.

use axum::Json;
use axum::extract::State;
use nexus_api::{
    CompletePairingRequest, CompletePairingResponse, ConfirmByCodeRequest, ConfirmByCodeResponse,
    PairingPreviewResponse, StartPairingRequest, StartPairingResponse,
};
use nexus_core::pairing::PairingRequest;
use nexus_domain::time::{now_millis, rfc3339};
use nexus_domain::{PairingCode, PairingId};

use crate::error::ApiResult;
use crate::extract::{ApiJson, Authorized, Meta, OptionalTenant, perm};
use crate::state::AppState;

/// A device asks for a pairing code to show its user.
#[utoipa::path(post, path = "/devices/pairing/start", tag = "pairing",
    params(("x-org-id" = Option<String>, Header, description = "optional: pre-select the tenant"),
           ("x-project-id" = Option<String>, Header, description = "optional: pre-select the tenant")),
    request_body = StartPairingRequest,
    responses((status = 200, body = StartPairingResponse), (status = 422, body = nexus_api::Problem)))]
pub async fn start(
    State(state): State<AppState>,
    OptionalTenant(tenant): OptionalTenant,
    Meta(meta): Meta,
    ApiJson(body): ApiJson<StartPairingRequest>,
) -> ApiResult<Json<StartPairingResponse>> {
    let request = PairingRequest {
        device_name: body.device_name,
        device_type: body.device_type,
        capabilities: body.capabilities,
        agent_version: body.agent_version,
    };
    let started = state
        .services
        .pairing
        .start(request, tenant, &meta, now_millis())
        .await?;
    Ok(Json(StartPairingResponse {
        pairing_id: started.pairing_id.to_string(),
        pairing_code: started.code.to_string(),
        device_nonce: started.device_nonce,
        expires_at: rfc3339(started.expires_at),
        fingerprint: started.fingerprint,
    }))
}

/// Shows what the device behind a code said about itself (name, type, capabilities, agent
/// version, address, time, fingerprint), so the user can check it is really theirs before
/// confirming (RFC 8628 §5.4). Wrong codes count against the user and the address: at most 5 per
/// 10 minutes.
#[utoipa::path(post, path = "/devices/pairing/preview", tag = "pairing", security(("bearer" = [])),
    params(("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    request_body = ConfirmByCodeRequest,
    responses((status = 200, body = PairingPreviewResponse),
              (status = 404, description = "no live pairing with this code in this tenant", body = nexus_api::Problem),
              (status = 410, description = "expired", body = nexus_api::Problem),
              (status = 429, description = "too many wrong codes", body = nexus_api::Problem)))]
pub async fn preview(
    State(state): State<AppState>,
    access: Authorized<perm::PairDevices>,
    Meta(meta): Meta,
    ApiJson(body): ApiJson<ConfirmByCodeRequest>,
) -> ApiResult<Json<PairingPreviewResponse>> {
    let code = PairingCode::parse(&body.pairing_code)?;
    let preview = state
        .services
        .pairing
        .preview(
            &access.principal,
            &access.tenant,
            &code,
            &meta,
            now_millis(),
        )
        .await?;
    let p = preview.pairing;
    Ok(Json(PairingPreviewResponse {
        pairing_id: p.id.to_string(),
        device_name: p.device_name,
        device_type: p.device_type,
        capabilities: p.capabilities,
        agent_version: p.agent_version,
        client_ip: p.client_ip,
        requested_at: rfc3339(p.created_at),
        expires_at: rfc3339(p.expires_at),
        fingerprint: preview.fingerprint,
        state: p.state.as_str().to_owned(),
    }))
}

/// A user of the tenant confirms the code their device shows; the device joins that tenant.
#[utoipa::path(post, path = "/devices/pairing/confirm_by_code", tag = "pairing", security(("bearer" = [])),
    params(("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    request_body = ConfirmByCodeRequest,
    responses((status = 200, body = ConfirmByCodeResponse),
              (status = 404, description = "no live pairing with this code in this tenant", body = nexus_api::Problem),
              (status = 409, description = "already confirmed", body = nexus_api::Problem),
              (status = 410, description = "expired", body = nexus_api::Problem),
              (status = 429, description = "too many wrong codes", body = nexus_api::Problem)))]
pub async fn confirm_by_code(
    State(state): State<AppState>,
    access: Authorized<perm::PairDevices>,
    Meta(meta): Meta,
    ApiJson(body): ApiJson<ConfirmByCodeRequest>,
) -> ApiResult<Json<ConfirmByCodeResponse>> {
    let code = PairingCode::parse(&body.pairing_code)?;
    let device_id = state
        .services
        .pairing
        .confirm_by_code(
            &access.principal,
            &access.tenant,
            &code,
            &meta,
            now_millis(),
        )
        .await?;
    Ok(Json(ConfirmByCodeResponse {
        device_id: device_id.to_string(),
    }))
}

/// The device claims its credentials, once, after the code was confirmed.
#[utoipa::path(post, path = "/devices/pairing/complete", tag = "pairing",
    request_body = CompletePairingRequest,
    responses((status = 200, body = CompletePairingResponse),
              (status = 403, description = "wrong nonce", body = nexus_api::Problem),
              (status = 404, description = "unknown pairing", body = nexus_api::Problem),
              (status = 409, description = "not confirmed yet, or already completed", body = nexus_api::Problem),
              (status = 410, description = "expired", body = nexus_api::Problem)))]
pub async fn complete(
    State(state): State<AppState>,
    Meta(meta): Meta,
    ApiJson(body): ApiJson<CompletePairingRequest>,
) -> ApiResult<Json<CompletePairingResponse>> {
    let pairing_id = PairingId::parse("pairing_id", &body.pairing_id)?;
    let done = state
        .services
        .pairing
        .complete(&pairing_id, &body.device_nonce, &meta, now_millis())
        .await?;
    Ok(Json(CompletePairingResponse {
        device_id: done.device_id.to_string(),
        device_token: done.tokens.access_token.expose().to_owned(),
        token_type: "Bearer".into(),
        expires_at: rfc3339(done.tokens.access_expires_at),
        refresh_token: done.tokens.refresh_token.expose().to_owned(),
        refresh_expires_at: rfc3339(done.tokens.refresh_expires_at),
        server_keys: state.services.auth.jwks(),
        tenant: done.tenant.to_string(),
        org_id: done.tenant.org().to_owned(),
        project_id: done.tenant.project().to_owned(),
    }))
}
