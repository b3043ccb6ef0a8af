//! Organizations, their projects and members. Org-level routes name the org in the path; the
//! caller's role in that org decides (the same permission table as tenant routes).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use nexus_api::{
    AddMemberRequest, AddMemberResponse, CreateOrgRequest, CreateProjectRequest, MemberView,
    MembersResponse, OrgView, ProjectView, ProjectsResponse, UpdateMemberRequest,
};
use nexus_core::CoreError;
use nexus_core::auth::Principal;
use nexus_domain::time::{now_millis, rfc3339};
use nexus_domain::{Email, OrgId, Permission, ProjectId, UserId};

use crate::error::ApiResult;
use crate::extract::{ApiJson, Meta, SignedIn};
use crate::routes::views;
use crate::state::AppState;

fn org_id(raw: &str) -> Result<OrgId, CoreError> {
    OrgId::parse("org", raw).map_err(|_| {
        CoreError::not_found(
            "org_not_found",
            "no such organization, or you are not a member",
        )
    })
}

/// The org named in the path, once the caller's role there allows `permission`.
async fn member_of(
    state: &AppState,
    principal: &Principal,
    raw: &str,
    permission: Permission,
) -> Result<OrgId, CoreError> {
    let org = org_id(raw)?;
    state
        .services
        .access
        .authorize_org(principal, &org, permission)
        .await?;
    Ok(org)
}

fn member_id(raw: &str) -> Result<UserId, CoreError> {
    UserId::parse("user_id", raw)
        .map_err(|_| CoreError::not_found("member_not_found", "no such member"))
}

/// Creates an organization; the caller becomes its admin.
#[utoipa::path(post, path = "/orgs", tag = "orgs", security(("bearer" = [])),
    request_body = CreateOrgRequest,
    responses((status = 201, body = OrgView), (status = 409, description = "`org_exists`", body = nexus_api::Problem)))]
pub async fn create_org(
    State(state): State<AppState>,
    SignedIn(principal): SignedIn,
    Meta(meta): Meta,
    ApiJson(body): ApiJson<CreateOrgRequest>,
) -> ApiResult<(StatusCode, Json<OrgView>)> {
    let id = OrgId::parse("org_id", &body.org_id)?;
    let now = now_millis();
    state
        .services
        .accounts
        .create_org_as(
            &id,
            body.name.as_deref(),
            Some(&principal.user_id),
            &meta,
            now,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(OrgView {
            org_id: id.to_string(),
            name: body
                .name
                .unwrap_or_else(|| id.to_string())
                .trim()
                .to_owned(),
            created_at: rfc3339(now),
        }),
    ))
}

/// Creates a project in the organization (admins).
#[utoipa::path(post, path = "/orgs/{org}/projects", tag = "orgs", security(("bearer" = [])),
    params(("org" = String, Path)), request_body = CreateProjectRequest,
    responses((status = 201, body = ProjectView), (status = 403, body = nexus_api::Problem),
              (status = 404, body = nexus_api::Problem), (status = 409, body = nexus_api::Problem)))]
pub async fn create_project(
    State(state): State<AppState>,
    SignedIn(principal): SignedIn,
    Meta(meta): Meta,
    Path(org): Path<String>,
    ApiJson(body): ApiJson<CreateProjectRequest>,
) -> ApiResult<(StatusCode, Json<ProjectView>)> {
    let org = member_of(&state, &principal, &org, Permission::ManageMembers).await?;
    let id = ProjectId::parse("project_id", &body.project_id)?;
    let project = state
        .services
        .accounts
        .create_project(
            &org,
            &id,
            body.name.as_deref(),
            principal.actor(),
            &meta,
            now_millis(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(views::project(&project))))
}

/// The organization's projects (any member).
#[utoipa::path(get, path = "/orgs/{org}/projects", tag = "orgs", security(("bearer" = [])),
    params(("org" = String, Path)),
    responses((status = 200, body = ProjectsResponse), (status = 404, body = nexus_api::Problem)))]
pub async fn list_projects(
    State(state): State<AppState>,
    SignedIn(principal): SignedIn,
    Path(org): Path<String>,
) -> ApiResult<Json<ProjectsResponse>> {
    let org = member_of(&state, &principal, &org, Permission::ReadMembers).await?;
    let projects = state.services.accounts.projects(&org).await?;
    Ok(Json(ProjectsResponse {
        projects: projects.iter().map(views::project).collect(),
    }))
}

/// The organization's members (any member).
#[utoipa::path(get, path = "/orgs/{org}/members", tag = "orgs", security(("bearer" = [])),
    params(("org" = String, Path)),
    responses((status = 200, body = MembersResponse), (status = 404, body = nexus_api::Problem)))]
pub async fn list_members(
    State(state): State<AppState>,
    SignedIn(principal): SignedIn,
    Path(org): Path<String>,
) -> ApiResult<Json<MembersResponse>> {
    let org = member_of(&state, &principal, &org, Permission::ReadMembers).await?;
    let members = state.services.accounts.members(&org).await?;
    Ok(Json(MembersResponse {
        members: members.iter().map(views::member).collect(),
    }))
}

/// Adds a member by email (admins). Without an account for that email one is created with a
/// generated password, returned once.
#[utoipa::path(post, path = "/orgs/{org}/members", tag = "orgs", security(("bearer" = [])),
    params(("org" = String, Path)), request_body = AddMemberRequest,
    responses((status = 201, body = AddMemberResponse), (status = 403, body = nexus_api::Problem),
              (status = 409, description = "`already_member`", body = nexus_api::Problem)))]
pub async fn add_member(
    State(state): State<AppState>,
    SignedIn(principal): SignedIn,
    Meta(meta): Meta,
    Path(org): Path<String>,
    ApiJson(body): ApiJson<AddMemberRequest>,
) -> ApiResult<(StatusCode, Json<AddMemberResponse>)> {
    let org = member_of(&state, &principal, &org, Permission::ManageMembers).await?;
    let email = Email::parse(&body.email)?;
    let added = state
        .services
        .accounts
        .add_member(
            &org,
            &email,
            body.role,
            principal.actor(),
            &meta,
            now_millis(),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(AddMemberResponse {
            member: views::member(&added.membership),
            initial_password: added.initial_password,
        }),
    ))
}

/// Changes a member's role (admins). The last admin cannot be demoted.
#[utoipa::path(patch, path = "/orgs/{org}/members/{user_id}", tag = "orgs", security(("bearer" = [])),
    params(("org" = String, Path), ("user_id" = String, Path)), request_body = UpdateMemberRequest,
    responses((status = 200, body = MemberView), (status = 403, body = nexus_api::Problem),
              (status = 404, body = nexus_api::Problem), (status = 409, description = "`last_admin`", body = nexus_api::Problem)))]
pub async fn update_member(
    State(state): State<AppState>,
    SignedIn(principal): SignedIn,
    Meta(meta): Meta,
    Path((org, user)): Path<(String, String)>,
    ApiJson(body): ApiJson<UpdateMemberRequest>,
) -> ApiResult<Json<MemberView>> {
    let org = member_of(&state, &principal, &org, Permission::ManageMembers).await?;
    let user = member_id(&user)?;
    let member = state
        .services
        .accounts
        .set_role(
            &org,
            &user,
            body.role,
            principal.actor(),
            &meta,
            now_millis(),
        )
        .await?;
    Ok(Json(views::member(&member)))
}

/// Removes a member (admins). The last admin cannot be removed.
#[utoipa::path(delete, path = "/orgs/{org}/members/{user_id}", tag = "orgs", security(("bearer" = [])),
    params(("org" = String, Path), ("user_id" = String, Path)),
    responses((status = 204, description = "removed"), (status = 403, body = nexus_api::Problem),
              (status = 404, body = nexus_api::Problem), (status = 409, body = nexus_api::Problem)))]
pub async fn remove_member(
    State(state): State<AppState>,
    SignedIn(principal): SignedIn,
    Meta(meta): Meta,
    Path((org, user)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let org = member_of(&state, &principal, &org, Permission::ManageMembers).await?;
    let user = member_id(&user)?;
    state
        .services
        .accounts
        .remove_member(&org, &user, principal.actor(), &meta, now_millis())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
