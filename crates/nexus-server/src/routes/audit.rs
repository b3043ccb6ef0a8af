//! The tenant's audit trail (admins): read newest first, and verify the hash chains.

use axum::Json;
use axum::extract::State;
use nexus_api::{AuditChainView, AuditLogsResponse, AuditVerifyResponse};
use nexus_core::audit::AuditService;
use nexus_domain::time::Millis;
use nexus_store::AuditQuery;
use serde::Deserialize;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiQuery, Authorized, perm};
use crate::routes::views;
use crate::state::AppState;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditLogsQuery {
    /// RFC 3339; entries at or after.
    pub since: Option<String>,
    /// RFC 3339; entries at or before.
    pub until: Option<String>,
    /// Exact action, e.g. `auth.login`.
    pub action: Option<String>,
    /// Exact actor id (user or device id).
    pub actor_id: Option<String>,
    /// 1 to 500 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

fn time(field: &'static str, raw: &str) -> Result<Millis, ApiError> {
    chrono::DateTime::parse_from_rfc3339(raw.trim())
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            nexus_domain::ValidationErrors::single(
                field,
                "must be an RFC 3339 time like 2026-01-31T09:00:00Z",
            )
            .into()
        })
}

/// Audit entries of this tenant and of its organization, newest first, cursor-paginated.
#[utoipa::path(get, path = "/audit/logs", tag = "audit", security(("bearer" = [])),
    params(("x-org-id" = String, Header), ("x-project-id" = String, Header), AuditLogsQuery),
    responses((status = 200, body = AuditLogsResponse), (status = 403, body = nexus_api::Problem),
              (status = 422, body = nexus_api::Problem)))]
pub async fn logs(
    State(state): State<AppState>,
    access: Authorized<perm::ReadAudit>,
    ApiQuery(query): ApiQuery<AuditLogsQuery>,
) -> ApiResult<Json<AuditLogsResponse>> {
    let before = match query.cursor.as_deref() {
        Some(raw) => Some(raw.trim().parse::<i64>().map_err(|_| {
            ApiError::from(nexus_domain::ValidationErrors::single(
                "cursor",
                "must be a next_cursor value from a previous page",
            ))
        })?),
        None => None,
    };
    let limit = query.limit.unwrap_or(100);
    if !(1..=nexus_core::audit::MAX_PAGE).contains(&limit) {
        return Err(nexus_domain::ValidationErrors::single("limit", "must be 1 to 500").into());
    }
    let page = state
        .services
        .audit
        .list(AuditQuery {
            scopes: AuditService::tenant_scopes(&access.tenant),
            since: query
                .since
                .as_deref()
                .map(|s| time("since", s))
                .transpose()?,
            until: query
                .until
                .as_deref()
                .map(|s| time("until", s))
                .transpose()?,
            action: query.action.filter(|a| !a.is_empty()),
            actor_id: query.actor_id.filter(|a| !a.is_empty()),
            before,
            limit,
        })
        .await?;
    Ok(Json(AuditLogsResponse {
        entries: page.entries.iter().map(views::audit_entry).collect(),
        next_cursor: page.next_cursor.map(|c| c.to_string()),
    }))
}

/// Re-computes this tenant's and its organization's hash chains and names the first broken link.
#[utoipa::path(get, path = "/audit/verify", tag = "audit", security(("bearer" = [])),
    params(("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    responses((status = 200, body = AuditVerifyResponse), (status = 403, body = nexus_api::Problem)))]
pub async fn verify(
    State(state): State<AppState>,
    access: Authorized<perm::ReadAudit>,
) -> ApiResult<Json<AuditVerifyResponse>> {
    let mut chains = Vec::new();
    for scope in AuditService::tenant_scopes(&access.tenant) {
        let report = state.services.audit.verify(&scope).await?;
        chains.push(AuditChainView {
            tenant_id: report.scope.key(),
            entries: report.entries,
            ok: report.broken.is_none(),
            broken: report.broken,
        });
    }
    Ok(Json(AuditVerifyResponse {
        ok: chains.iter().all(|c| c.ok),
        chains,
    }))
}
