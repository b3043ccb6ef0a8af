//! Extractors: where raw requests become domain types. Tenant scoping and device authentication
//! each live in exactly one extractor, so handlers cannot skip them and the identity issue can
//! put user authentication in front of `Tenant` without touching any handler.

use axum::body::Bytes;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use futures::StreamExt;
use nexus_core::RequestMeta;
use nexus_core::auth::Principal;
use nexus_core::devices::AuthenticatedDevice;
use nexus_domain::time::now_millis;
use nexus_domain::validation::serde_error_field;
use nexus_domain::{FieldError, Permission, Role, TenantId, ValidationErrors};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::middleware::current_correlation_id;
use crate::state::AppState;

/// Default cap for JSON bodies.
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;
/// Cap for report pushes (DESIGN: at most 1 MiB per request).
pub const REPORT_BODY_LIMIT: usize = 1024 * 1024;

/// A JSON body, read with a size cap and parsed with precise, problem+json errors:
/// 413 when too large, 415 when not JSON, 400 when malformed, 422 naming the field when the
/// shape is wrong.
pub struct ApiJson<T, const LIMIT: usize = DEFAULT_BODY_LIMIT>(pub T);

impl<S, T, const LIMIT: usize> FromRequest<S> for ApiJson<T, LIMIT>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json"
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            });
        if is_json != Some(true) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with content-type: application/json",
            ));
        }
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let mut body = request.into_body().into_data_stream();
        let mut bytes = Vec::with_capacity(declared.unwrap_or(0).min(LIMIT));
        while let Some(chunk) = body.next().await {
            let chunk: Bytes = chunk.map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "body_read_failed",
                    "the request body could not be read",
                )
            })?;
            if bytes.len() + chunk.len() > LIMIT {
                drain(body).await;
                return Err(too_large(LIMIT));
            }
            bytes.extend_from_slice(&chunk);
        }
        parse_json(&bytes).map(ApiJson)
    }
}

/// Reads and discards the rest of an oversized body (up to a bound) so the 413 reaches the client:
/// closing a socket with unread input makes the kernel reset the connection, and the client would
/// see "connection reset" instead of our answer. Beyond the bound we stop and accept that.
async fn drain(mut body: axum::body::BodyDataStream) {
    const DRAIN_LIMIT: usize = 8 * 1024 * 1024;
    let mut drained = 0;
    while drained < DRAIN_LIMIT {
        match body.next().await {
            Some(Ok(chunk)) => drained += chunk.len(),
            _ => break,
        }
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the body must be at most {limit} bytes"),
    )
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    if value.is_ok() {
        de.end().map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("the body is not valid JSON: {e}"),
            )
        })?;
    }
    value.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() || inner.is_io() {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("the body is not valid JSON: {inner}"),
            )
        } else {
            let message = inner.to_string();
            let field = serde_error_field(&path, &message);
            // Strip serde's "at line x column y" position: the field name says more.
            let message = message
                .split(" at line ")
                .next()
                .unwrap_or(&message)
                .to_owned();
            ApiError::validation(ValidationErrors(vec![FieldError::new(field, message)]))
        }
    })
}

/// The tenant a web request acts in (`x-org-id` + `x-project-id`, DESIGN.md §3).
/// The single place where tenant access is decided.
#[derive(Debug, Clone)]
pub struct Tenant(pub TenantId);

fn header_str<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).and_then(|v| v.to_str().ok())
}

fn tenant_from_headers(parts: &Parts) -> Result<Option<TenantId>, ApiError> {
    match (
        header_str(parts, "x-org-id"),
        header_str(parts, "x-project-id"),
    ) {
        (None, None) => Ok(None),
        (Some(org), Some(project)) => {
            let tenant = TenantId::parse(org, project).map_err(|e| {
                let mut err = ApiError::validation(e);
                err.status = StatusCode::BAD_REQUEST;
                err.code = "invalid_tenant";
                err.detail =
                    "x-org-id and x-project-id must be 1 to 64 letters, digits, '-', '_' or '.'"
                        .into();
                err
            })?;
            tracing::Span::current().record("tenant_id", tracing::field::display(&tenant));
            Ok(Some(tenant))
        }
        _ => Err(tenant_required()),
    }
}

pub fn tenant_required() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "tenant_required",
        "send both x-org-id and x-project-id headers",
    )
}

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        tenant_from_headers(parts)?
            .map(Tenant)
            .ok_or_else(tenant_required)
    }
}

/// Tenant headers where they are optional (a device may name its tenant when it starts pairing).
#[derive(Debug, Clone)]
pub struct OptionalTenant(pub Option<TenantId>);

impl<S: Send + Sync> FromRequestParts<S> for OptionalTenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        tenant_from_headers(parts).map(OptionalTenant)
    }
}

/// A device authenticated by its bearer token, for the device named in the path (`{id}`).
/// Its tenant comes from the token, never from what the device sends.
#[derive(Debug, Clone)]
pub struct Device(pub AuthenticatedDevice);

impl FromRequestParts<AppState> for Device {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::not_found())?;
        let path_device = params
            .iter()
            .find(|(k, _)| *k == "id")
            .map(|(_, v)| v.to_owned())
            .ok_or_else(ApiError::not_found)?;
        let bearer = header_str(parts, header::AUTHORIZATION.as_str()).and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        let device = state
            .services
            .devices
            .authenticate(bearer, &path_device, now_millis())
            .await?;
        let span = tracing::Span::current();
        span.record("device_id", tracing::field::display(&device.device_id));
        span.record("tenant_id", tracing::field::display(&device.tenant));
        Ok(Device(device))
    }
}

/// Query parameters with the same error contract as bodies: 422 naming the parameter.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(ApiQuery)
            .map_err(|e| {
                let path = e.path().to_string();
                let message = e.into_inner().to_string();
                let field = serde_error_field(&path, &message);
                ApiError::validation(ValidationErrors(vec![FieldError::new(field, message)]))
            })
    }
}

/// The request facts services record in audit entries: client address (the TCP peer), user
/// agent and correlation id.
#[derive(Debug, Clone)]
pub struct Meta(pub RequestMeta);

impl<S: Send + Sync> FromRequestParts<S> for Meta {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        Ok(Meta(RequestMeta {
            ip,
            user_agent: header_str(parts, header::USER_AGENT.as_str()).map(str::to_owned),
            correlation_id: current_correlation_id(),
        }))
    }
}

fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
}

fn authentication_required() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "authentication_required",
        "sign in and send the access token as Authorization: Bearer",
    )
}

/// The signed-in user of a request with these headers.
pub async fn signed_in(
    state: &AppState,
    headers: &axum::http::HeaderMap,
) -> Result<Principal, ApiError> {
    let token = bearer(headers).ok_or_else(authentication_required)?;
    let principal = state
        .services
        .auth
        .authenticate(token, now_millis())
        .await?;
    tracing::Span::current().record("user_id", tracing::field::display(&principal.user_id));
    Ok(principal)
}

/// A signed-in user (`Authorization: Bearer <access token>`), with an active session.
#[derive(Debug, Clone)]
pub struct SignedIn(pub Principal);

impl FromRequestParts<AppState> for SignedIn {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(SignedIn(signed_in(state, &parts.headers).await?))
    }
}

/// A permission a handler needs, named in its signature: `Authorized<perm::PairDevices>`.
pub trait Requires: Send + Sync + 'static {
    const PERMISSION: Permission;
}

/// One marker type per permission (see `nexus_domain::identity::Role::allows` for the table).
pub mod perm {
    use nexus_domain::Permission;

    macro_rules! markers {
        ($($name:ident),*) => {$(
            #[derive(Debug, Clone, Copy)]
            pub struct $name;
            impl super::Requires for $name {
                const PERMISSION: Permission = Permission::$name;
            }
        )*};
    }

    markers!(
        ReadStreams,
        ReadDevices,
        ReadMembers,
        ReadCommands,
        PairDevices,
        ManageDevices,
        SendCommands,
        DecideApprovals,
        ManageMembers,
        ManagePolicies,
        ReadAudit,
        ReadPii
    );
}

/// A signed-in member of the tenant in `x-org-id`/`x-project-id` whose role allows `P`: the one
/// place where web requests are authenticated, scoped to a tenant and authorized. Not a member →
/// 404 (another tenant's objects do not exist for you); member without the permission → 403.
#[derive(Debug, Clone)]
pub struct Authorized<P: Requires> {
    pub principal: Principal,
    pub tenant: TenantId,
    pub role: Role,
    _permission: std::marker::PhantomData<P>,
}

impl<P: Requires> FromRequestParts<AppState> for Authorized<P> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let (principal, tenant, role) = authorize_bearer(
            state,
            &parts.headers,
            || tenant_from_headers(parts),
            P::PERMISSION,
        )
        .await?;
        Ok(Self {
            principal,
            tenant,
            role,
            _permission: std::marker::PhantomData,
        })
    }
}

/// The bearer's user, in the tenant `tenant` names, with a role that allows `permission`: the
/// same answers as `signed_in` then `authorize`, in one store round trip. The token is checked
/// first (401), then the tenant (400 when missing), then session, membership and role (401,
/// 404, 403).
pub async fn authorize_bearer(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    tenant: impl FnOnce() -> Result<Option<TenantId>, ApiError>,
    permission: Permission,
) -> Result<(Principal, TenantId, Role), ApiError> {
    let token = bearer(headers).ok_or_else(authentication_required)?;
    let now = now_millis();
    let verified = state.services.auth.verify_access_token(token, now)?;
    let tenant = tenant()?.ok_or_else(tenant_required)?;
    let (principal, role) = state
        .services
        .auth
        .authenticate_in(&verified, &tenant, now)
        .await?;
    let span = tracing::Span::current();
    span.record("user_id", tracing::field::display(&principal.user_id));
    span.record("tenant_id", tracing::field::display(&tenant));
    let role = nexus_core::auth::AccessService::permit(role, permission)?;
    Ok((principal, tenant, role))
}
