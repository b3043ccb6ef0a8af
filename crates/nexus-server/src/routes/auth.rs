//! Web sign-in and the signed-in user's own account: sessions, password, two-factor, stream tickets.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use nexus_api::{
    ChangePasswordRequest, LoginRequest, RecoveryCodesResponse, RefreshRequest, SessionsResponse,
    StreamTicketRequest, StreamTicketResponse, TokenResponse, TotpCodeRequest, TotpDisableRequest,
    TotpSetupResponse, UserView,
};
use nexus_core::auth::{IssuedTokens, LoginRequest as CoreLogin};
use nexus_domain::time::{now_millis, rfc3339};
use nexus_domain::{AuthSessionId, SessionId};

use crate::error::ApiResult;
use crate::extract::{ApiJson, Authorized, Meta, SignedIn, perm};
use crate::routes::views;
use crate::state::AppState;

fn tokens(
    issued: IssuedTokens,
    orgs: &[(nexus_domain::OrgId, nexus_domain::Role)],
) -> TokenResponse {
    TokenResponse {
        access_token: issued.access_token,
        token_type: "Bearer".into(),
        expires_in: issued.expires_in,
        refresh_token: issued.refresh_token.expose().to_owned(),
        refresh_expires_in: issued.refresh_expires_in,
        session_id: issued.session_id.to_string(),
        user: views::user(&issued.user, orgs),
    }
}

/// Signs in with email and password (and a TOTP or recovery code when two-factor is on).
/// Wrong email and wrong password get the same answer; repeated failures are slowed down and
/// then locked out for a while (429 with `Retry-After`).
#[utoipa::path(post, path = "/auth/login", tag = "auth",
    request_body = LoginRequest,
    responses((status = 200, body = TokenResponse),
              (status = 401, description = "`invalid_credentials`, `mfa_required` or `invalid_mfa_code`", body = nexus_api::Problem),
              (status = 429, description = "too many failed attempts", body = nexus_api::Problem)))]
pub async fn login(
    State(state): State<AppState>,
    Meta(meta): Meta,
    ApiJson(body): ApiJson<LoginRequest>,
) -> ApiResult<Json<TokenResponse>> {
    let request = CoreLogin {
        email: body.email,
        password: body.password,
        totp_code: body.totp_code,
    };
    let issued = state
        .services
        .auth
        .login(request, &meta, now_millis())
        .await?;
    let orgs = state
        .services
        .store
        .user_orgs(&issued.user.id)
        .await
        .map_err(nexus_core::CoreError::from)?;
    Ok(Json(tokens(issued, &orgs)))
}

/// Trades a refresh token for a new access token and a new refresh token. The old refresh
/// token stops working; presenting it again ends the whole session (reuse detection).
#[utoipa::path(post, path = "/auth/refresh", tag = "auth",
    request_body = RefreshRequest,
    responses((status = 200, body = TokenResponse),
              (status = 401, description = "`invalid_refresh_token` or `refresh_token_reused`", body = nexus_api::Problem)))]
pub async fn refresh(
    State(state): State<AppState>,
    Meta(meta): Meta,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> ApiResult<Json<TokenResponse>> {
    let issued = state
        .services
        .auth
        .refresh(&body.refresh_token, &meta, now_millis())
        .await?;
    let orgs = state
        .services
        .store
        .user_orgs(&issued.user.id)
        .await
        .map_err(nexus_core::CoreError::from)?;
    Ok(Json(tokens(issued, &orgs)))
}

/// Ends this session: its access and refresh tokens stop working at once.
#[utoipa::path(post, path = "/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 204, description = "signed out"), (status = 401, body = nexus_api::Problem)))]
pub async fn logout(
    State(state): State<AppState>,
    SignedIn(principal): SignedIn,
    Meta(meta): Meta,
) -> ApiResult<StatusCode> {
    state
        .services
        .auth
        .logout(&principal, &meta, now_millis())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The signed-in user and their organizations.
#[utoipa::path(get, path = "/auth/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = UserView), (status = 401, body = nexus_api::Problem)))]
pub async fn me(
    State(state): State<AppState>,
    SignedIn(principal): SignedIn,
) -> ApiResult<Json<UserView>> {
    let (user, orgs) = state.services.auth.me(&principal).await?;
    Ok(Json(views::user(&user, &orgs)))
}

/// The signed-in user's active sessions.
#[utoipa::path(get, path = "/auth/sessions", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = SessionsResponse), (status = 401, body = nexus_api::Problem)))]
pub async fn sessions(
    State(state): State<AppState>,
    SignedIn(principal): SignedIn,
) -> ApiResult<Json<SessionsResponse>> {
    let sessions = state
        .services
        .auth
        .sessions(&principal, now_millis())
        .await?;
    Ok(Json(SessionsResponse {
        sessions: sessions
            .iter()
            .map(|s| views::session(s, &principal.session_id))
            .collect(),
    }))
}

/// Ends one of the signed-in user's sessions (e.g. a lost laptop).
#[utoipa::path(delete, path = "/auth/sessions/{id}", tag = "auth", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 204, description = "ended"), (status = 404, body = nexus_api::Problem)))]
pub async fn end_session(
    State(state): State<AppState>,
    SignedIn(principal): SignedIn,
    Meta(meta): Meta,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = AuthSessionId::parse("id", &id)
        .map_err(|_| nexus_core::CoreError::not_found("session_not_found", "no such session"))?;
    state
        .services
        .auth
        .end_session(&principal, &id, &meta, now_millis())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Changes the password (policy-checked) and ends every other session of the user.
#[utoipa::path(post, path = "/auth/password", tag = "auth", security(("bearer" = [])),
    request_body = ChangePasswordRequest,
    responses((status = 204, description = "changed"),
              (status = 403, description = "`wrong_password`", body = nexus_api::Problem),
              (status = 422, description = "the new password breaks the policy", body = nexus_api::Problem)))]
pub async fn change_password(
    State(state): State<AppState>,
    SignedIn(principal): SignedIn,
    Meta(meta): Meta,
    ApiJson(body): ApiJson<ChangePasswordRequest>,
) -> ApiResult<StatusCode> {
    state
        .services
        .auth
        .change_password(
            &principal,
            &body.current_password,
            &body.new_password,
            &meta,
            now_millis(),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts TOTP enrolment: a secret to put into an authenticator app (also as a QR code).
#[utoipa::path(post, path = "/auth/mfa/totp/setup", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = TotpSetupResponse), (status = 409, body = nexus_api::Problem)))]
pub async fn totp_setup(
    State(state): State<AppState>,
    SignedIn(principal): SignedIn,
    Meta(meta): Meta,
) -> ApiResult<Json<TotpSetupResponse>> {
    let setup = state
        .services
        .auth
        .totp_setup(&principal, &meta, now_millis())
        .await?;
    Ok(Json(TotpSetupResponse {
        secret: setup.secret,
        otpauth_uri: setup.otpauth_uri,
        qr_svg: setup.qr_svg,
    }))
}

/// Turns two-factor on with a current code; answers the ten recovery codes, this once.
#[utoipa::path(post, path = "/auth/mfa/totp/enable", tag = "auth", security(("bearer" = [])),
    request_body = TotpCodeRequest,
    responses((status = 200, body = RecoveryCodesResponse),
              (status = 401, description = "`invalid_mfa_code`", body = nexus_api::Problem),
              (status = 409, body = nexus_api::Problem)))]
pub async fn totp_enable(
    State(state): State<AppState>,
    SignedIn(principal): SignedIn,
    Meta(meta): Meta,
    ApiJson(body): ApiJson<TotpCodeRequest>,
) -> ApiResult<Json<RecoveryCodesResponse>> {
    let codes = state
        .services
        .auth
        .totp_enable(&principal, &body.code, &meta, now_millis())
        .await?;
    Ok(Json(RecoveryCodesResponse {
        recovery_codes: codes,
    }))
}

/// Turns two-factor off; needs the password and a current code (or a recovery code).
#[utoipa::path(post, path = "/auth/mfa/totp/disable", tag = "auth", security(("bearer" = [])),
    request_body = TotpDisableRequest,
    responses((status = 204, description = "disabled"),
              (status = 401, body = nexus_api::Problem), (status = 403, body = nexus_api::Problem),
              (status = 409, body = nexus_api::Problem)))]
pub async fn totp_disable(
    State(state): State<AppState>,
    SignedIn(principal): SignedIn,
    Meta(meta): Meta,
    ApiJson(body): ApiJson<TotpDisableRequest>,
) -> ApiResult<StatusCode> {
    state
        .services
        .auth
        .totp_disable(&principal, &body.password, &body.code, &meta, now_millis())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A one-time ticket (60 s) for opening one session's stream from a browser's EventSource,
/// which cannot send headers: `GET /agent/reports/stream?session_id=S&ticket=T`.
#[utoipa::path(post, path = "/auth/stream-ticket", tag = "auth", security(("bearer" = [])),
    params(("x-org-id" = String, Header), ("x-project-id" = String, Header)),
    request_body = StreamTicketRequest,
    responses((status = 200, body = StreamTicketResponse), (status = 404, body = nexus_api::Problem)))]
pub async fn stream_ticket(
    State(state): State<AppState>,
    access: Authorized<perm::ReadStreams>,
    ApiJson(body): ApiJson<StreamTicketRequest>,
) -> ApiResult<Json<StreamTicketResponse>> {
    let session = SessionId::parse("session_id", &body.session_id)?;
    let (ticket, expires_at) = state
        .services
        .auth
        .stream_ticket(&access.principal, &access.tenant, &session, now_millis())
        .await?;
    Ok(Json(StreamTicketResponse {
        ticket: ticket.expose().to_owned(),
        expires_at: rfc3339(expires_at),
    }))
}

/// The signing keys with endorsements: each key signed by every older key still kept. Devices
/// pin the keys given at pairing and adopt a newer key only through an endorsement by a key they
/// already trust, so after `nexus admin keys rotate` they keep accepting approval signatures.
#[utoipa::path(get, path = "/.well-known/nexus-server-keys.json", tag = "auth",
    responses((status = 200, body = nexus_api::ServerKeysResponse)))]
pub async fn server_keys(State(state): State<AppState>) -> Json<nexus_api::ServerKeysResponse> {
    let (keys, endorsements) = state.services.auth.server_keys();
    Json(nexus_api::ServerKeysResponse {
        keys,
        endorsements: endorsements
            .into_iter()
            .map(|e| nexus_api::KeyEndorsementView {
                kid: e.kid,
                signed_by: e.signed_by,
                signature: e.signature,
            })
            .collect(),
    })
}

/// The public keys access tokens are signed with (JWK Set, Ed25519).
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth",
    responses((status = 200, description = "JWK Set", body = Object)))]
pub async fn jwks(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(state.services.auth.jwks())
}
