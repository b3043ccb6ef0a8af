//! Web authentication: sign-in with password (+ TOTP), Ed25519 access tokens tied to a stored
//! session, rotating refresh tokens with reuse detection, logout that ends access at once,
//! password changes, MFA enrolment and one-time stream tickets.
//!
//! Every access token names its session (`sid`); [`AuthService::authenticate`] checks that the
//! session is still active on each request, so logout, reuse detection and password changes take
//! effect immediately on every replica (the session lives in the shared store), not at token expiry.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use nexus_auth::jwt::{AccessClaims, KeyRing};
use nexus_auth::password::PasswordPolicy;
use nexus_auth::sealed::SecretBox;
use nexus_auth::throttle::Backoff;
use nexus_auth::tokens::{RefreshToken, StreamTicket as TicketSecret};
use nexus_domain::audit::{Actor, AuditRecord, AuditResult, AuditScope, AuditTarget};
use nexus_domain::identity::{StreamTicket, TotpState};
use nexus_domain::time::{Millis, duration_millis};
use nexus_domain::{
    AuthSession, AuthSessionId, Email, OrgId, Permission, Role, SessionId, TenantId, User, UserId,
    ValidationErrors,
};
use nexus_store::{RefreshOutcome, Store};
use serde_json::json;

use crate::attempts::{AttemptCounter, AttemptCounters};
use crate::context::RequestMeta;
use crate::error::{CoreError, CoreResult};
use crate::locks::StripedLocks;

pub const ISSUER: &str = "nexus";
pub const AUDIENCE: &str = "nexus-api";
/// Failed sign-ins one client address may make per window before it is refused outright.
const IP_FAILURES_PER_WINDOW: u32 = 30;
const IP_WINDOW: Duration = Duration::from_secs(10 * 60);
const STREAM_TICKET_TTL_MILLIS: Millis = 60_000;

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    pub password_policy: PasswordPolicy,
    pub login_backoff: Backoff,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            access_ttl: Duration::from_secs(900),
            refresh_ttl: Duration::from_secs(7 * 24 * 3600),
            password_policy: PasswordPolicy::default_rule(),
            login_backoff: Backoff::default(),
        }
    }
}

/// A signed-in user, as every authenticated web request acts.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub user_id: UserId,
    pub session_id: AuthSessionId,
    pub mfa: bool,
}

impl Principal {
    pub fn actor(&self) -> Actor {
        Actor::user(&self.user_id)
    }
}

#[derive(Debug, Clone)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
    pub totp_code: Option<String>,
}

/// What sign-in and refresh hand out.
#[derive(Debug, Clone)]
pub struct IssuedTokens {
    pub access_token: String,
    pub expires_in: u64,
    pub refresh_token: RefreshToken,
    pub refresh_expires_in: u64,
    pub session_id: AuthSessionId,
    pub user: User,
}

#[derive(Debug, Clone)]
pub struct TotpSetup {
    pub secret: String,
    pub otpauth_uri: String,
    pub qr_svg: String,
}

#[derive(Clone)]
pub struct AuthService {
    store: Arc<dyn Store>,
    keys: Arc<RwLock<KeyRing>>,
    /// Seals TOTP seeds at rest (`nexus_auth::sealed`).
    secrets: Arc<SecretBox>,
    config: Arc<AuthConfig>,
    /// Sign-ins of one account across replicas (see `login_locks`).
    shared_attempts: Arc<dyn AttemptCounters>,
    /// Failures per client address (shared by the replicas when Redis is configured).
    ip_failures: Arc<dyn AttemptCounter>,
    /// Failures for emails with no account, so they are throttled exactly like real accounts
    /// and the answer never tells the two apart.
    unknown_failures: Arc<dyn AttemptCounter>,
    /// Sign-ins of one account run one at a time on this replica (striped by email), so the
    /// failure count read before checking a password is the count after the previous attempt:
    /// concurrent guesses cannot all pass the backoff check together.
    login_locks: Arc<StripedLocks>,
}

fn invalid_credentials() -> CoreError {
    CoreError::unauthorized("invalid_credentials", "the email or password is wrong")
}

fn blocking_failed(e: tokio::task::JoinError) -> CoreError {
    CoreError::Unexpected(anyhow::anyhow!("password hashing task failed: {e}"))
}

impl AuthService {
    pub fn new(
        store: Arc<dyn Store>,
        keys: Arc<RwLock<KeyRing>>,
        secrets: SecretBox,
        attempts: Arc<dyn AttemptCounters>,
        config: AuthConfig,
    ) -> Self {
        Self {
            store,
            keys,
            secrets: Arc::new(secrets),
            config: Arc::new(config),
            ip_failures: attempts.counter("login-ip", IP_WINDOW),
            unknown_failures: attempts.counter("login-unknown", IP_WINDOW),
            shared_attempts: attempts,
            login_locks: Arc::new(StripedLocks::new(64)),
        }
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    pub fn jwks(&self) -> serde_json::Value {
        match self.keys.read() {
            Ok(keys) => keys.jwks(),
            Err(_) => json!({"keys": []}),
        }
    }

    /// The public keys (JWKs, newest first) and their endorsements by older keys.
    pub fn server_keys(&self) -> (Vec<serde_json::Value>, Vec<nexus_auth::jwt::KeyEndorsement>) {
        match self.keys.read() {
            Ok(keys) => (keys.public_jwks(), keys.endorsements()),
            Err(_) => (Vec::new(), Vec::new()),
        }
    }

    /// Signs `message` with the current signing key (approval grants): `(kid, signature)`.
    pub fn sign_detached(&self, message: &[u8]) -> CoreResult<(String, String)> {
        self.keys
            .read()
            .map_err(|_| CoreError::Unexpected(anyhow::anyhow!("key ring lock poisoned")))?
            .sign_detached(message)
            .map_err(|e| CoreError::Unexpected(anyhow::anyhow!("signing: {e}")))
    }

    /// Checks a signature made by [`AuthService::sign_detached`] with key `kid` of the ring.
    pub fn verify_detached(&self, kid: &str, message: &[u8], signature: &str) -> bool {
        self.keys
            .read()
            .is_ok_and(|keys| keys.verify_detached(kid, message, signature))
    }

    /// Replaces the key ring (after a rotation on disk); tokens of every key still in it stay valid.
    pub fn replace_keys(&self, ring: KeyRing) {
        if let Ok(mut keys) = self.keys.write() {
            *keys = ring;
        }
    }

    /// Argon2id on the blocking pool: it takes tens of milliseconds of CPU by design.
    pub async fn hash_password(&self, password: &str) -> CoreResult<String> {
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || nexus_auth::password::hash_password(&password))
            .await
            .map_err(blocking_failed)?
            .map_err(|e| CoreError::Unexpected(anyhow::anyhow!("hashing a password: {e}")))
    }

    async fn verify_password(&self, hash: Option<String>, password: &str) -> CoreResult<bool> {
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || match hash {
            Some(hash) => nexus_auth::password::verify_password(&hash, &password),
            None => {
                nexus_auth::password::dummy_verify(&password);
                false
            }
        })
        .await
        .map_err(blocking_failed)
    }

    /// Checks a new password against the configured policy.
    pub fn check_password(&self, password: &str, email: &Email) -> CoreResult<()> {
        self.config
            .password_policy
            .check(password, email.as_str())
            .map_err(|rejected| ValidationErrors::single("password", rejected.to_string()).into())
    }

    /// Where the user's account events go: the chains of their organizations, so each org's
    /// admins see their members' sign-ins; the system chain for a user in no org.
    async fn account_scopes(&self, user: &UserId) -> CoreResult<Vec<AuditScope>> {
        let orgs = self.store.user_orgs(user).await?;
        if orgs.is_empty() {
            return Ok(vec![AuditScope::System]);
        }
        Ok(orgs
            .into_iter()
            .map(|(org, _)| AuditScope::Org(org))
            .collect())
    }

    async fn account_audit(
        &self,
        meta: &RequestMeta,
        user: &UserId,
        now: Millis,
        action: &str,
        result: AuditResult,
        details: serde_json::Value,
    ) -> CoreResult<Vec<AuditRecord>> {
        Ok(self
            .account_scopes(user)
            .await?
            .into_iter()
            .map(|scope| {
                meta.audit(
                    scope,
                    now,
                    Actor::user(user),
                    action,
                    Some(AuditTarget::new("user", user)),
                    result,
                    details.clone(),
                )
            })
            .collect())
    }

    fn too_many(wait_millis: Millis) -> CoreError {
        let secs = u64::try_from(wait_millis.max(0) / 1000 + 1).unwrap_or(1);
        CoreError::TooManyRequests {
            code: "too_many_attempts",
            detail: format!("too many failed attempts; try again in {secs} s"),
            retry_after_secs: secs,
        }
    }

    pub async fn login(
        &self,
        request: LoginRequest,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<IssuedTokens> {
        let ip_key = meta.ip.map(|ip| ip.to_string());
        if let Some(ip) = &ip_key
            && self.ip_failures.recent(ip, now).await.0 >= IP_FAILURES_PER_WINDOW
        {
            return Err(Self::too_many(duration_millis(IP_WINDOW) / 4));
        }
        if request.password.len() > nexus_auth::password::MAX_PASSWORD_BYTES {
            return Err(invalid_credentials());
        }
        let email = Email::parse(&request.email)?;
        let _one_at_a_time = self.login_locks.lock(email.as_str()).await;
        // And across replicas, when they share a store for it (Redis).
        let _one_at_a_time_everywhere = self
            .shared_attempts
            .exclusive("login", email.as_str())
            .await;
        let user = self.store.user_by_email(&email).await?;
        // Throttle before the expensive hash; unknown emails are throttled the same way.
        let (failures, last_failure) = match &user {
            Some(u) => (u.failed_logins, u.last_failed_login_at),
            None => self.unknown_failures.recent(email.as_str(), now).await,
        };
        if let Some(last) = last_failure
            && let Some(wait) = self.config.login_backoff.next_allowed(failures, last, now)
        {
            return Err(Self::too_many(wait));
        }
        let password_ok = self
            .verify_password(
                user.as_ref().map(|u| u.password_hash.clone()),
                &request.password,
            )
            .await?;
        let user = match user {
            Some(user) if password_ok && !user.disabled => user,
            other => {
                let known = other.as_ref().map(|u| &u.id);
                return Err(self.login_failed(&email, known, meta, now).await);
            }
        };
        if user.totp.enabled {
            let Some(code) = request
                .totp_code
                .as_deref()
                .filter(|c| !c.trim().is_empty())
            else {
                return Err(CoreError::unauthorized(
                    "mfa_required",
                    "this account uses two-factor authentication: send totp_code",
                ));
            };
            if !self.second_factor(&user, code, now).await? {
                let _ = self.store.record_login_failure(&user.id, now).await;
                let records = self
                    .account_audit(
                        meta,
                        &user.id,
                        now,
                        "auth.login",
                        AuditResult::Failure,
                        json!({"reason": "mfa"}),
                    )
                    .await?;
                self.store.append_audit(&records).await?;
                return Err(CoreError::unauthorized(
                    "invalid_mfa_code",
                    "the two-factor code is wrong or was already used",
                ));
            }
        }
        if user.failed_logins > 0 {
            self.store.clear_login_failures(&user.id).await?;
        }
        // Only a factor that was checked counts: a code sent for an account without two-factor
        // authentication is ignored, and must not mark the session (and its tokens' `mfa`).
        let mfa = user.totp.enabled;
        let issued = self.start_session(user, meta, now, mfa).await?;
        Ok(issued)
    }

    /// Records a failed sign-in (account counter, client address, audit) and returns the error
    /// to answer with: the same for unknown emails and wrong passwords.
    async fn login_failed(
        &self,
        email: &Email,
        user: Option<&UserId>,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreError {
        if let Some(ip) = meta.ip {
            self.ip_failures.record(&ip.to_string(), now).await;
        }
        let result: CoreResult<()> = async {
            match user {
                Some(user) => {
                    self.store.record_login_failure(user, now).await?;
                    let records = self
                        .account_audit(
                            meta,
                            user,
                            now,
                            "auth.login",
                            AuditResult::Failure,
                            json!({"reason": "password"}),
                        )
                        .await?;
                    self.store.append_audit(&records).await?;
                }
                None => {
                    self.unknown_failures.record(email.as_str(), now).await;
                    let record = meta.audit(
                        AuditScope::System,
                        now,
                        Actor {
                            kind: nexus_domain::audit::ActorType::User,
                            id: email.masked(),
                        },
                        "auth.login",
                        None,
                        AuditResult::Failure,
                        json!({"reason": "unknown_account"}),
                    );
                    self.store.append_audit(&[record]).await?;
                }
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => invalid_credentials(),
            Err(e) => e,
        }
    }

    /// A TOTP code (each time step once) or a recovery code (each code once).
    async fn second_factor(&self, user: &User, code: &str, now: Millis) -> CoreResult<bool> {
        let code = code.trim();
        if code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()) {
            let Some(secret) = self.totp_secret(user) else {
                return Ok(false);
            };
            let unix = u64::try_from(now / 1000).unwrap_or(0);
            return match nexus_auth::totp::verify(&secret, code, unix) {
                Some(step) => Ok(self.store.use_totp_step(&user.id, step).await?),
                None => Ok(false),
            };
        }
        match nexus_auth::totp::normalize_recovery_code(code) {
            Some(normalized) => Ok(self
                .store
                .use_recovery_code(&user.id, &nexus_domain::SecretHash::of(&normalized))
                .await?),
            None => Ok(false),
        }
    }

    /// The user's TOTP seed, opened. Seeds stored before sealing existed are plain base32 and
    /// still work (they are sealed when MFA is next set up). A seal that does not open (another
    /// data key, an edited row) counts as no seed: the code is refused, loudly.
    fn totp_secret(&self, user: &User) -> Option<nexus_auth::totp::TotpSecret> {
        let stored = user.totp.secret.as_deref()?;
        let base32 = if SecretBox::is_sealed(stored) {
            match self.secrets.open(&totp_context(&user.id), stored) {
                Ok(bytes) => String::from_utf8(bytes).ok()?,
                Err(e) => {
                    tracing::error!(user_id = %user.id, error = %e,
                        "a stored TOTP secret does not open; is the data key (data.key) the one it was sealed with?");
                    return None;
                }
            }
        } else {
            stored.to_owned()
        };
        nexus_auth::totp::TotpSecret::from_base32(&base32).ok()
    }

    async fn start_session(
        &self,
        user: User,
        meta: &RequestMeta,
        now: Millis,
        mfa: bool,
    ) -> CoreResult<IssuedTokens> {
        let refresh = RefreshToken::generate();
        let session = AuthSession {
            id: AuthSessionId::generate(),
            user_id: user.id.clone(),
            created_at: now,
            last_seen_at: now,
            expires_at: now.saturating_add(duration_millis(self.config.refresh_ttl)),
            revoked_at: None,
            ip: meta.truncated_ip(),
            user_agent: meta
                .user_agent
                .as_ref()
                .map(|ua| ua.chars().take(256).collect()),
            mfa,
        };
        let audit = self
            .account_audit(
                meta,
                &user.id,
                now,
                "auth.login",
                AuditResult::Success,
                json!({"session_id": session.id, "mfa": mfa}),
            )
            .await?;
        self.store
            .create_auth_session(&session, &refresh.hash(), &audit)
            .await?;
        tracing::info!(user_id = %user.id, "signed in");
        self.issue(user, &session, refresh, now)
    }

    fn issue(
        &self,
        user: User,
        session: &AuthSession,
        refresh_token: RefreshToken,
        now: Millis,
    ) -> CoreResult<IssuedTokens> {
        let now_secs = u64::try_from(now / 1000).unwrap_or(0);
        let claims = AccessClaims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: user.id.to_string(),
            sid: session.id.to_string(),
            iat: now_secs,
            exp: now_secs + self.config.access_ttl.as_secs(),
            jti: ulid::Ulid::new().to_string(),
            mfa: session.mfa,
        };
        let access_token = self
            .keys
            .read()
            .map_err(|_| CoreError::Unexpected(anyhow::anyhow!("key ring lock poisoned")))?
            .sign(&claims)
            .map_err(|e| CoreError::Unexpected(anyhow::anyhow!("signing a token: {e}")))?;
        Ok(IssuedTokens {
            access_token,
            expires_in: self.config.access_ttl.as_secs(),
            refresh_token,
            refresh_expires_in: u64::try_from((session.expires_at - now).max(0) / 1000)
                .unwrap_or(0),
            session_id: session.id.clone(),
            user,
        })
    }

    pub async fn refresh(
        &self,
        presented: &str,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<IssuedTokens> {
        let invalid = || {
            CoreError::unauthorized(
                "invalid_refresh_token",
                "the refresh token is invalid, expired or was revoked; sign in again",
            )
        };
        let token = RefreshToken::from_presented(presented).ok_or_else(invalid)?;
        let next = RefreshToken::generate();
        let expires_at = now.saturating_add(duration_millis(self.config.refresh_ttl));
        match self
            .store
            .rotate_refresh_token(&token.hash(), &next.hash(), expires_at, now)
            .await?
        {
            // The user store never answers `Retried` (no retry window for people: a browser
            // shares one refresh between its tabs); it would mean the same as `Rotated`.
            RefreshOutcome::Rotated(session) | RefreshOutcome::Retried(session) => {
                let user = self
                    .store
                    .user(&session.user_id)
                    .await?
                    .filter(|u| !u.disabled)
                    .ok_or_else(invalid)?;
                self.issue(user, &session, next, now)
            }
            RefreshOutcome::Reused(session) => {
                // Someone holds a copy of a spent token: end the whole family, so neither the
                // thief nor the victim can go on with it.
                let audit = self
                    .account_audit(
                        meta,
                        &session.user_id,
                        now,
                        "auth.refresh_reuse",
                        AuditResult::Denied,
                        json!({"session_id": session.id}),
                    )
                    .await?;
                self.store
                    .revoke_auth_session(&session.id, now, &audit)
                    .await?;
                tracing::warn!(user_id = %session.user_id, session_id = %session.id,
                    "refresh token reused; session revoked");
                Err(CoreError::unauthorized(
                    "refresh_token_reused",
                    "this refresh token was already used; the session has been ended, sign in again",
                ))
            }
            RefreshOutcome::Invalid => Err(invalid()),
        }
    }

    /// Resolves a bearer access token to the signed-in user, checking its session is active.
    pub async fn authenticate(&self, bearer: &str, now: Millis) -> CoreResult<Principal> {
        let token = self.verify_access_token(bearer, now)?;
        let session = self
            .store
            .auth_session(&token.session_id)
            .await?
            .ok_or_else(invalid_token)?;
        Self::principal(session, &token.subject, now)
    }

    /// [`AuthService::authenticate`] for a token already verified, plus the user's role in
    /// `tenant` (`None`: not a member, or no such project), in one store round trip: the path of
    /// every tenant-scoped request.
    pub async fn authenticate_in(
        &self,
        token: &VerifiedToken,
        tenant: &TenantId,
        now: Millis,
    ) -> CoreResult<(Principal, Option<Role>)> {
        let (session, role) = self
            .store
            .session_access(&token.session_id, tenant)
            .await?
            .ok_or_else(invalid_token)?;
        Ok((Self::principal(session, &token.subject, now)?, role))
    }

    /// Checks the JWT itself (signature, expiry, issuer, audience). No I/O: whether its session
    /// is still active is for [`AuthService::authenticate`] / [`AuthService::authenticate_in`].
    pub fn verify_access_token(&self, bearer: &str, now: Millis) -> CoreResult<VerifiedToken> {
        let now_secs = u64::try_from(now / 1000).unwrap_or(0);
        let claims = self
            .keys
            .read()
            .map_err(|_| CoreError::Unexpected(anyhow::anyhow!("key ring lock poisoned")))?
            .verify(bearer, now_secs, ISSUER, AUDIENCE)
            .map_err(|e| match e {
                nexus_auth::jwt::TokenError::Expired => CoreError::unauthorized(
                    "token_expired",
                    "the access token has expired; refresh it",
                ),
                _ => invalid_token(),
            })?;
        let session_id = AuthSessionId::parse("sid", &claims.sid).map_err(|_| invalid_token())?;
        Ok(VerifiedToken {
            session_id,
            subject: claims.sub,
        })
    }

    /// The session must belong to the token's subject and still be active.
    fn principal(session: AuthSession, subject: &str, now: Millis) -> CoreResult<Principal> {
        if session.user_id.as_str() != subject || !session.is_active(now) {
            return Err(CoreError::unauthorized(
                "session_ended",
                "this session has ended; sign in again",
            ));
        }
        Ok(Principal {
            user_id: session.user_id,
            session_id: session.id,
            mfa: session.mfa,
        })
    }

    pub async fn logout(
        &self,
        principal: &Principal,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<()> {
        let audit = self
            .account_audit(
                meta,
                &principal.user_id,
                now,
                "auth.logout",
                AuditResult::Success,
                json!({"session_id": principal.session_id}),
            )
            .await?;
        self.store
            .revoke_auth_session(&principal.session_id, now, &audit)
            .await?;
        Ok(())
    }

    pub async fn sessions(
        &self,
        principal: &Principal,
        now: Millis,
    ) -> CoreResult<Vec<AuthSession>> {
        Ok(self
            .store
            .list_auth_sessions(&principal.user_id, now)
            .await?)
    }

    /// Ends one of the caller's own sessions; another user's session is "not found".
    pub async fn end_session(
        &self,
        principal: &Principal,
        id: &AuthSessionId,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<()> {
        let not_found = || CoreError::not_found("session_not_found", "no such session");
        let session = self.store.auth_session(id).await?.ok_or_else(not_found)?;
        if !session.is_active_for(&principal.user_id, now) {
            return Err(not_found());
        }
        let audit = self
            .account_audit(
                meta,
                &principal.user_id,
                now,
                "auth.session_revoke",
                AuditResult::Success,
                json!({"session_id": id}),
            )
            .await?;
        self.store.revoke_auth_session(id, now, &audit).await?;
        Ok(())
    }

    pub async fn me(&self, principal: &Principal) -> CoreResult<(User, Vec<(OrgId, Role)>)> {
        let user = self.current_user(principal).await?;
        let orgs = self.store.user_orgs(&principal.user_id).await?;
        Ok((user, orgs))
    }

    async fn current_user(&self, principal: &Principal) -> CoreResult<User> {
        self.store
            .user(&principal.user_id)
            .await?
            .ok_or_else(|| CoreError::unauthorized("invalid_token", "the user no longer exists"))
    }

    /// Changes the password and ends every other session of the user.
    pub async fn change_password(
        &self,
        principal: &Principal,
        current: &str,
        new: &str,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<()> {
        let user = self.current_user(principal).await?;
        if !self
            .verify_password(Some(user.password_hash.clone()), current)
            .await?
        {
            return Err(CoreError::forbidden(
                "wrong_password",
                "the current password is wrong",
            ));
        }
        self.check_password(new, &user.email)?;
        let hash = self.hash_password(new).await?;
        let audit = self
            .account_audit(
                meta,
                &user.id,
                now,
                "auth.password_change",
                AuditResult::Success,
                json!({}),
            )
            .await?;
        self.store
            .set_password(&user.id, &hash, now, &audit)
            .await?;
        self.store
            .revoke_user_sessions(&user.id, Some(&principal.session_id), now, &[])
            .await?;
        Ok(())
    }

    /// Starts TOTP enrolment: a new secret, not yet required at sign-in.
    pub async fn totp_setup(
        &self,
        principal: &Principal,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<TotpSetup> {
        let user = self.current_user(principal).await?;
        if user.totp.enabled {
            return Err(CoreError::conflict(
                "mfa_already_enabled",
                "two-factor authentication is already on; disable it first",
            ));
        }
        let secret = nexus_auth::totp::TotpSecret::generate();
        let uri = nexus_auth::totp::otpauth_uri(&secret, "NEXUS", user.email.as_str());
        let qr_svg = nexus_auth::totp::qr_svg(&uri)
            .map_err(|e| CoreError::Unexpected(anyhow::anyhow!("QR code: {e}")))?;
        let sealed = self
            .secrets
            .seal(&totp_context(&user.id), secret.as_base32().as_bytes())
            .map_err(|e| CoreError::Unexpected(anyhow::anyhow!("sealing the TOTP secret: {e}")))?;
        let state = TotpState {
            secret: Some(sealed),
            enabled: false,
            last_step: None,
        };
        let audit = self
            .account_audit(
                meta,
                &user.id,
                now,
                "auth.mfa_setup",
                AuditResult::Success,
                json!({}),
            )
            .await?;
        self.store.set_totp(&user.id, &state, &[], &audit).await?;
        Ok(TotpSetup {
            secret: secret.as_base32(),
            otpauth_uri: uri,
            qr_svg,
        })
    }

    /// Turns TOTP on after the user proves their authenticator works; returns the recovery
    /// codes, shown this once (only their hashes are kept).
    pub async fn totp_enable(
        &self,
        principal: &Principal,
        code: &str,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<Vec<String>> {
        let user = self.current_user(principal).await?;
        if user.totp.enabled {
            return Err(CoreError::conflict(
                "mfa_already_enabled",
                "two-factor authentication is already on",
            ));
        }
        let Some(secret) = self.totp_secret(&user) else {
            return Err(CoreError::conflict(
                "mfa_not_set_up",
                "call /auth/mfa/totp/setup first",
            ));
        };
        let unix = u64::try_from(now / 1000).unwrap_or(0);
        let Some(step) = nexus_auth::totp::verify(&secret, code.trim(), unix) else {
            return Err(CoreError::unauthorized(
                "invalid_mfa_code",
                "the two-factor code is wrong",
            ));
        };
        let codes = nexus_auth::totp::generate_recovery_codes();
        let hashes: Vec<_> = codes
            .iter()
            .filter_map(|c| nexus_auth::totp::normalize_recovery_code(c))
            .map(|c| nexus_domain::SecretHash::of(&c))
            .collect();
        let state = TotpState {
            secret: user.totp.secret.clone(),
            enabled: true,
            last_step: Some(step),
        };
        let audit = self
            .account_audit(
                meta,
                &user.id,
                now,
                "auth.mfa_enable",
                AuditResult::Success,
                json!({}),
            )
            .await?;
        self.store
            .set_totp(&user.id, &state, &hashes, &audit)
            .await?;
        Ok(codes)
    }

    pub async fn totp_disable(
        &self,
        principal: &Principal,
        password: &str,
        code: &str,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<()> {
        let user = self.current_user(principal).await?;
        if !user.totp.enabled {
            return Err(CoreError::conflict(
                "mfa_not_enabled",
                "two-factor authentication is not on",
            ));
        }
        if !self
            .verify_password(Some(user.password_hash.clone()), password)
            .await?
        {
            return Err(CoreError::forbidden(
                "wrong_password",
                "the password is wrong",
            ));
        }
        if !self.second_factor(&user, code, now).await? {
            return Err(CoreError::unauthorized(
                "invalid_mfa_code",
                "the two-factor code is wrong or was already used",
            ));
        }
        let audit = self
            .account_audit(
                meta,
                &user.id,
                now,
                "auth.mfa_disable",
                AuditResult::Success,
                json!({}),
            )
            .await?;
        self.store
            .set_totp(&user.id, &TotpState::default(), &[], &audit)
            .await?;
        Ok(())
    }

    /// A one-time ticket for one stream (browsers' EventSource cannot send headers). The caller
    /// has already been authorized for the tenant.
    pub async fn stream_ticket(
        &self,
        principal: &Principal,
        tenant: &TenantId,
        session: &SessionId,
        now: Millis,
    ) -> CoreResult<(TicketSecret, Millis)> {
        let secret = TicketSecret::generate();
        let ticket = StreamTicket {
            user_id: principal.user_id.clone(),
            auth_session: principal.session_id.clone(),
            tenant: tenant.clone(),
            session_id: session.clone(),
            expires_at: now + STREAM_TICKET_TTL_MILLIS,
        };
        self.store
            .create_stream_ticket(&secret.hash(), &ticket)
            .await?;
        Ok((secret, ticket.expires_at))
    }

    /// Spends a stream ticket for `session`; its login session must still be active. Returns the
    /// user and the tenant the ticket was issued for (the caller re-checks membership).
    pub async fn redeem_stream_ticket(
        &self,
        presented: &str,
        session: &SessionId,
        now: Millis,
    ) -> CoreResult<(Principal, TenantId, Option<Role>)> {
        let invalid = || {
            CoreError::unauthorized(
                "invalid_ticket",
                "the stream ticket is invalid, expired or already used",
            )
        };
        let secret = TicketSecret::from_presented(presented).ok_or_else(invalid)?;
        let ticket = self
            .store
            .take_stream_ticket(&secret.hash(), now)
            .await?
            .ok_or_else(invalid)?;
        if &ticket.session_id != session {
            return Err(invalid());
        }
        let (auth_session, role) = self
            .store
            .session_access(&ticket.auth_session, &ticket.tenant)
            .await?
            .filter(|(s, _)| s.is_active_for(&ticket.user_id, now))
            .ok_or_else(invalid)?;
        Ok((
            Principal {
                user_id: ticket.user_id,
                session_id: ticket.auth_session,
                mfa: auth_session.mfa,
            },
            ticket.tenant,
            role,
        ))
    }

    /// Whether `principal`'s session is still active, and its role in `tenant` now (`None`: no
    /// longer a member, or the project is gone): one store round trip, for long-lived requests.
    pub async fn access_now(
        &self,
        principal: &Principal,
        tenant: &TenantId,
        now: Millis,
    ) -> CoreResult<(bool, Option<Role>)> {
        Ok(
            match self
                .store
                .session_access(&principal.session_id, tenant)
                .await?
            {
                Some((session, role)) => (session.is_active_for(&principal.user_id, now), role),
                None => (false, None),
            },
        )
    }
}

/// Tenant authorization: the one place that decides whether a signed-in user may do something in
/// a tenant. Not a member (or no such project) answers 404, like any other tenant's object; a
/// member whose role lacks the permission gets 403.
#[derive(Clone)]
pub struct AccessService {
    store: Arc<dyn Store>,
}

impl AccessService {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// The decision for a tenant, given the caller's role there as looked up together with the
    /// session (`AuthService::authenticate_in`, `access_now`, `redeem_stream_ticket`): `None`
    /// (not a member, or no such project) is "not found", a role without `permission` is
    /// "forbidden".
    pub fn permit(role: Option<Role>, permission: Permission) -> CoreResult<Role> {
        let role = role.ok_or_else(|| {
            CoreError::not_found(
                "tenant_not_found",
                "no such organization or project, or you are not a member",
            )
        })?;
        Self::check(role, permission)?;
        Ok(role)
    }

    /// Org-level actions (members, projects).
    pub async fn authorize_org(
        &self,
        principal: &Principal,
        org: &OrgId,
        permission: Permission,
    ) -> CoreResult<Role> {
        let role = self
            .store
            .member_role(org, &principal.user_id)
            .await?
            .ok_or_else(|| {
                CoreError::not_found(
                    "org_not_found",
                    "no such organization, or you are not a member",
                )
            })?;
        Self::check(role, permission)?;
        Ok(role)
    }

    fn check(role: Role, permission: Permission) -> CoreResult<()> {
        if role.allows(permission) {
            Ok(())
        } else {
            Err(CoreError::forbidden(
                "permission_denied",
                format!("your role ({role}) does not allow {}", permission.as_str()),
            ))
        }
    }
}

fn invalid_token() -> CoreError {
    CoreError::unauthorized("invalid_token", "a valid access token is required")
}

/// An access token whose signature and lifetime were checked (its session not yet).
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    session_id: AuthSessionId,
    subject: String,
}

/// What a user's sealed TOTP seed is bound to (its row): a seal copied elsewhere does not open.
fn totp_context(user: &UserId) -> String {
    format!("totp:{user}")
}
