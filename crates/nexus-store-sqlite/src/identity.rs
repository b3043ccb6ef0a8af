//! Organizations, projects, members, users, login sessions and stream tickets on SQLite. These are
//! control-plane tables (no tenant column). Writes run as writer jobs, so every conditional update
//! here ("only if not used yet", "only a later step") is also serialised with every other write;
//! reads go through the read pool.

use futures_util::FutureExt;
use nexus_domain::audit::AuditRecord;
use nexus_domain::identity::{AuthSession, AuthSessionId, StreamTicket, TotpState};
use nexus_domain::secret::SecretHash;
use nexus_domain::time::Millis;
use nexus_domain::{Email, Membership, Org, OrgId, Project, Role, TenantId, User, UserId};
use nexus_store::{RefreshOutcome, StoreError, StoreResult};
use sqlx::{Row, SqliteConnection};

use crate::SqliteStore;
use crate::audit::write_audit;
use crate::rows::{
    auth_session_from_row, membership_from_row, org_from_row, project_from_row, role,
    stream_ticket_from_row, unexpected, user_from_row, write_error,
};

fn step_to_sql(step: u64) -> i64 {
    i64::try_from(step).unwrap_or(i64::MAX)
}

// --- organizations, projects, members ----------------------------------------------------------

pub(crate) async fn create_org(
    store: &SqliteStore,
    org: &Org,
    audit: &[AuditRecord],
) -> StoreResult<()> {
    let (org, audit) = (org.clone(), audit.to_vec());
    store
        .writer
        .write(move |conn| {
            async move {
                sqlx::query("INSERT INTO orgs (id, name, created_at) VALUES (?, ?, ?)")
                    .bind(org.id.as_str())
                    .bind(&org.name)
                    .bind(org.created_at)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| write_error("organization", e))?;
                write_audit(conn, &audit).await
            }
            .boxed()
        })
        .await
}

pub(crate) async fn org(store: &SqliteStore, id: &OrgId) -> StoreResult<Option<Org>> {
    let row = sqlx::query("SELECT * FROM orgs WHERE id = ?")
        .bind(id.as_str())
        .fetch_optional(&store.read)
        .await
        .map_err(unexpected)?;
    row.map(|r| org_from_row(&r)).transpose()
}

pub(crate) async fn create_project(
    store: &SqliteStore,
    project: &Project,
    audit: &[AuditRecord],
) -> StoreResult<()> {
    let (p, audit) = (project.clone(), audit.to_vec());
    store
        .writer
        .write(move |conn| {
            async move {
                let org = sqlx::query("SELECT 1 FROM orgs WHERE id = ?")
                    .bind(p.org.as_str())
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(unexpected)?;
                if org.is_none() {
                    return Err(StoreError::Conflict(format!(
                        "organization {} does not exist",
                        p.org
                    )));
                }
                sqlx::query("INSERT INTO projects (org, id, name, created_at) VALUES (?, ?, ?, ?)")
                    .bind(p.org.as_str())
                    .bind(p.id.as_str())
                    .bind(&p.name)
                    .bind(p.created_at)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| write_error("project", e))?;
                write_audit(conn, &audit).await
            }
            .boxed()
        })
        .await
}

pub(crate) async fn project(
    store: &SqliteStore,
    tenant: &TenantId,
) -> StoreResult<Option<Project>> {
    let row = sqlx::query("SELECT * FROM projects WHERE org = ? AND id = ?")
        .bind(tenant.org())
        .bind(tenant.project())
        .fetch_optional(&store.read)
        .await
        .map_err(unexpected)?;
    row.map(|r| project_from_row(&r)).transpose()
}

pub(crate) async fn list_projects(store: &SqliteStore, org: &OrgId) -> StoreResult<Vec<Project>> {
    let rows = sqlx::query("SELECT * FROM projects WHERE org = ? ORDER BY id")
        .bind(org.as_str())
        .fetch_all(&store.read)
        .await
        .map_err(unexpected)?;
    rows.iter().map(project_from_row).collect()
}

pub(crate) async fn put_member(
    store: &SqliteStore,
    org: &OrgId,
    user: &UserId,
    role: Role,
    now: Millis,
    audit: &[AuditRecord],
) -> StoreResult<()> {
    let (org, user, audit) = (org.clone(), user.clone(), audit.to_vec());
    store
        .writer
        .write(move |conn| {
            async move {
                sqlx::query(
                    "INSERT INTO org_members (org, user_id, role, created_at) VALUES (?, ?, ?, ?)
                     ON CONFLICT (org, user_id) DO UPDATE SET role = excluded.role",
                )
                .bind(org.as_str())
                .bind(user.as_str())
                .bind(role.as_str())
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(|e| write_error("member", e))?;
                write_audit(conn, &audit).await
            }
            .boxed()
        })
        .await
}

pub(crate) async fn remove_member(
    store: &SqliteStore,
    org: &OrgId,
    user: &UserId,
    audit: &[AuditRecord],
) -> StoreResult<bool> {
    let (org, user, audit) = (org.clone(), user.clone(), audit.to_vec());
    store
        .writer
        .write(move |conn| {
            async move {
                let done = sqlx::query("DELETE FROM org_members WHERE org = ? AND user_id = ?")
                    .bind(org.as_str())
                    .bind(user.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(unexpected)?;
                if done.rows_affected() != 1 {
                    return Ok(false);
                }
                write_audit(conn, &audit).await?;
                Ok(true)
            }
            .boxed()
        })
        .await
}

pub(crate) async fn member_role(
    store: &SqliteStore,
    org: &OrgId,
    user: &UserId,
) -> StoreResult<Option<Role>> {
    let raw: Option<String> =
        sqlx::query_scalar("SELECT role FROM org_members WHERE org = ? AND user_id = ?")
            .bind(org.as_str())
            .bind(user.as_str())
            .fetch_optional(&store.read)
            .await
            .map_err(unexpected)?;
    raw.as_deref().map(role).transpose()
}

pub(crate) async fn list_members(store: &SqliteStore, org: &OrgId) -> StoreResult<Vec<Membership>> {
    let rows = sqlx::query(
        "SELECT m.org, m.user_id, u.email, u.display_name, m.role, m.created_at
         FROM org_members m JOIN users u ON u.id = m.user_id
         WHERE m.org = ? ORDER BY u.email",
    )
    .bind(org.as_str())
    .fetch_all(&store.read)
    .await
    .map_err(unexpected)?;
    rows.iter().map(membership_from_row).collect()
}

pub(crate) async fn user_orgs(
    store: &SqliteStore,
    user: &UserId,
) -> StoreResult<Vec<(OrgId, Role)>> {
    let rows = sqlx::query("SELECT org, role FROM org_members WHERE user_id = ? ORDER BY org")
        .bind(user.as_str())
        .fetch_all(&store.read)
        .await
        .map_err(unexpected)?;
    rows.iter()
        .map(|r| {
            let org: String = r.try_get("org").map_err(unexpected)?;
            let raw: String = r.try_get("role").map_err(unexpected)?;
            Ok((OrgId::from_trusted(org), role(&raw)?))
        })
        .collect()
}

// --- users -------------------------------------------------------------------------------------

pub(crate) async fn create_user(
    store: &SqliteStore,
    user: &User,
    audit: &[AuditRecord],
) -> StoreResult<()> {
    let (u, audit) = (user.clone(), audit.to_vec());
    store
        .writer
        .write(move |conn| {
            async move {
                sqlx::query(
                    "INSERT INTO users (id, email, display_name, password_hash, password_changed_at,
                                        created_at, totp_secret, totp_enabled, totp_last_step,
                                        failed_logins, last_failed_login_at, disabled)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(u.id.as_str())
                .bind(u.email.as_str())
                .bind(&u.display_name)
                .bind(&u.password_hash)
                .bind(u.password_changed_at)
                .bind(u.created_at)
                .bind(&u.totp.secret)
                .bind(u.totp.enabled)
                .bind(u.totp.last_step.map(step_to_sql))
                .bind(i64::from(u.failed_logins))
                .bind(u.last_failed_login_at)
                .bind(u.disabled)
                .execute(&mut *conn)
                .await
                .map_err(|e| write_error("user (id or email)", e))?;
                write_audit(conn, &audit).await
            }
            .boxed()
        })
        .await
}

pub(crate) async fn user(store: &SqliteStore, id: &UserId) -> StoreResult<Option<User>> {
    let row = sqlx::query("SELECT * FROM users WHERE id = ?")
        .bind(id.as_str())
        .fetch_optional(&store.read)
        .await
        .map_err(unexpected)?;
    row.map(|r| user_from_row(&r)).transpose()
}

pub(crate) async fn user_by_email(store: &SqliteStore, email: &Email) -> StoreResult<Option<User>> {
    let row = sqlx::query("SELECT * FROM users WHERE email = ?")
        .bind(email.as_str())
        .fetch_optional(&store.read)
        .await
        .map_err(unexpected)?;
    row.map(|r| user_from_row(&r)).transpose()
}

pub(crate) async fn list_users(store: &SqliteStore) -> StoreResult<Vec<User>> {
    let rows = sqlx::query("SELECT * FROM users ORDER BY email")
        .fetch_all(&store.read)
        .await
        .map_err(unexpected)?;
    rows.iter().map(user_from_row).collect()
}

pub(crate) async fn count_users(store: &SqliteStore) -> StoreResult<u64> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&store.read)
        .await
        .map_err(unexpected)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

pub(crate) async fn set_password(
    store: &SqliteStore,
    user: &UserId,
    password_hash: &str,
    at: Millis,
    audit: &[AuditRecord],
) -> StoreResult<bool> {
    let (user, hash, audit) = (user.clone(), password_hash.to_owned(), audit.to_vec());
    store
        .writer
        .write(move |conn| {
            async move {
                let done = sqlx::query(
                    "UPDATE users SET password_hash = ?, password_changed_at = ? WHERE id = ?",
                )
                .bind(&hash)
                .bind(at)
                .bind(user.as_str())
                .execute(&mut *conn)
                .await
                .map_err(unexpected)?;
                if done.rows_affected() != 1 {
                    return Ok(false);
                }
                write_audit(conn, &audit).await?;
                Ok(true)
            }
            .boxed()
        })
        .await
}

pub(crate) async fn record_login_failure(
    store: &SqliteStore,
    user: &UserId,
    at: Millis,
) -> StoreResult<u32> {
    let user = user.clone();
    store
        .writer
        .write(move |conn| {
            async move {
                let count: Option<i64> = sqlx::query_scalar(
                    "UPDATE users SET failed_logins = failed_logins + 1, last_failed_login_at = ?
                     WHERE id = ? RETURNING failed_logins",
                )
                .bind(at)
                .bind(user.as_str())
                .fetch_optional(&mut *conn)
                .await
                .map_err(unexpected)?;
                Ok(count.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)))
            }
            .boxed()
        })
        .await
}

pub(crate) async fn clear_login_failures(store: &SqliteStore, user: &UserId) -> StoreResult<()> {
    let user = user.clone();
    store
        .writer
        .write(move |conn| {
            async move {
                sqlx::query(
                    "UPDATE users SET failed_logins = 0, last_failed_login_at = NULL
                     WHERE id = ? AND (failed_logins <> 0 OR last_failed_login_at IS NOT NULL)",
                )
                .bind(user.as_str())
                .execute(&mut *conn)
                .await
                .map_err(unexpected)?;
                Ok(())
            }
            .boxed()
        })
        .await
}

pub(crate) async fn set_totp(
    store: &SqliteStore,
    user: &UserId,
    totp: &TotpState,
    recovery_hashes: &[SecretHash],
    audit: &[AuditRecord],
) -> StoreResult<bool> {
    let (user, totp, codes, audit) = (
        user.clone(),
        totp.clone(),
        recovery_hashes.to_vec(),
        audit.to_vec(),
    );
    store
        .writer
        .write(move |conn| {
            async move {
                let done = sqlx::query(
                    "UPDATE users SET totp_secret = ?, totp_enabled = ?, totp_last_step = ? WHERE id = ?",
                )
                .bind(&totp.secret)
                .bind(totp.enabled)
                .bind(totp.last_step.map(step_to_sql))
                .bind(user.as_str())
                .execute(&mut *conn)
                .await
                .map_err(unexpected)?;
                if done.rows_affected() != 1 {
                    return Ok(false);
                }
                sqlx::query("DELETE FROM user_recovery_codes WHERE user_id = ?")
                    .bind(user.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(unexpected)?;
                for code in &codes {
                    sqlx::query(
                        "INSERT OR IGNORE INTO user_recovery_codes (user_id, code_hash) VALUES (?, ?)",
                    )
                    .bind(user.as_str())
                    .bind(code.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(unexpected)?;
                }
                write_audit(conn, &audit).await?;
                Ok(true)
            }
            .boxed()
        })
        .await
}

pub(crate) async fn use_totp_step(
    store: &SqliteStore,
    user: &UserId,
    step: u64,
) -> StoreResult<bool> {
    let user = user.clone();
    store
        .writer
        .write(move |conn| {
            async move {
                let done = sqlx::query(
                    "UPDATE users SET totp_last_step = ?
                     WHERE id = ? AND (totp_last_step IS NULL OR totp_last_step < ?)",
                )
                .bind(step_to_sql(step))
                .bind(user.as_str())
                .bind(step_to_sql(step))
                .execute(&mut *conn)
                .await
                .map_err(unexpected)?;
                Ok(done.rows_affected() == 1)
            }
            .boxed()
        })
        .await
}

pub(crate) async fn use_recovery_code(
    store: &SqliteStore,
    user: &UserId,
    code_hash: &SecretHash,
) -> StoreResult<bool> {
    let (user, code) = (user.clone(), code_hash.clone());
    store
        .writer
        .write(move |conn| {
            async move {
                let done = sqlx::query(
                    "DELETE FROM user_recovery_codes WHERE user_id = ? AND code_hash = ?",
                )
                .bind(user.as_str())
                .bind(code.as_str())
                .execute(&mut *conn)
                .await
                .map_err(unexpected)?;
                Ok(done.rows_affected() == 1)
            }
            .boxed()
        })
        .await
}

pub(crate) async fn recovery_codes_left(store: &SqliteStore, user: &UserId) -> StoreResult<u32> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM user_recovery_codes WHERE user_id = ?")
        .bind(user.as_str())
        .fetch_one(&store.read)
        .await
        .map_err(unexpected)?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

// --- login sessions ----------------------------------------------------------------------------

pub(crate) async fn create_auth_session(
    store: &SqliteStore,
    session: &AuthSession,
    refresh_hash: &SecretHash,
    audit: &[AuditRecord],
) -> StoreResult<()> {
    let (s, refresh, audit) = (session.clone(), refresh_hash.clone(), audit.to_vec());
    store
        .writer
        .write(move |conn| {
            async move {
                sqlx::query(
                    "INSERT INTO auth_sessions (id, user_id, created_at, last_seen_at, expires_at,
                                                revoked_at, ip, user_agent, mfa)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(s.id.as_str())
                .bind(s.user_id.as_str())
                .bind(s.created_at)
                .bind(s.last_seen_at)
                .bind(s.expires_at)
                .bind(s.revoked_at)
                .bind(&s.ip)
                .bind(&s.user_agent)
                .bind(s.mfa)
                .execute(&mut *conn)
                .await
                .map_err(|e| write_error("login session", e))?;
                sqlx::query(
                    "INSERT INTO refresh_tokens (hash, session_id, issued_at) VALUES (?, ?, ?)",
                )
                .bind(refresh.as_str())
                .bind(s.id.as_str())
                .bind(s.created_at)
                .execute(&mut *conn)
                .await
                .map_err(|e| write_error("refresh token", e))?;
                write_audit(conn, &audit).await
            }
            .boxed()
        })
        .await
}

async fn session_on(conn: &mut SqliteConnection, id: &str) -> StoreResult<Option<AuthSession>> {
    let row = sqlx::query("SELECT * FROM auth_sessions WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(unexpected)?;
    row.map(|r| auth_session_from_row(&r)).transpose()
}

pub(crate) async fn auth_session(
    store: &SqliteStore,
    id: &AuthSessionId,
) -> StoreResult<Option<AuthSession>> {
    let row = sqlx::query("SELECT * FROM auth_sessions WHERE id = ?")
        .bind(id.as_str())
        .fetch_optional(&store.read)
        .await
        .map_err(unexpected)?;
    row.map(|r| auth_session_from_row(&r)).transpose()
}

pub(crate) async fn session_access(
    store: &SqliteStore,
    id: &AuthSessionId,
    tenant: &TenantId,
) -> StoreResult<Option<(AuthSession, Option<Role>)>> {
    let row = sqlx::query(
        "SELECT s.*, (SELECT m.role FROM org_members m
                        JOIN projects p ON p.org = m.org AND p.id = ?
                       WHERE m.org = ? AND m.user_id = s.user_id) AS tenant_role
         FROM auth_sessions s WHERE s.id = ?",
    )
    .bind(tenant.project())
    .bind(tenant.org())
    .bind(id.as_str())
    .fetch_optional(&store.read)
    .await
    .map_err(unexpected)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let raw: Option<String> = row.try_get("tenant_role").map_err(unexpected)?;
    Ok(Some((
        auth_session_from_row(&row)?,
        raw.as_deref().map(role).transpose()?,
    )))
}

pub(crate) async fn list_auth_sessions(
    store: &SqliteStore,
    user: &UserId,
    now: Millis,
) -> StoreResult<Vec<AuthSession>> {
    let rows = sqlx::query(
        "SELECT * FROM auth_sessions WHERE user_id = ? AND revoked_at IS NULL AND expires_at > ?
         ORDER BY created_at DESC, id DESC",
    )
    .bind(user.as_str())
    .bind(now)
    .fetch_all(&store.read)
    .await
    .map_err(unexpected)?;
    rows.iter().map(auth_session_from_row).collect()
}

pub(crate) async fn rotate_refresh_token(
    store: &SqliteStore,
    presented: &SecretHash,
    new_refresh: &SecretHash,
    new_expires_at: Millis,
    now: Millis,
) -> StoreResult<RefreshOutcome<AuthSession>> {
    let (presented, new_refresh) = (presented.clone(), new_refresh.clone());
    store
        .writer
        .write(move |conn| {
            async move {
                let row =
                    sqlx::query("SELECT session_id, used_at FROM refresh_tokens WHERE hash = ?")
                        .bind(presented.as_str())
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(unexpected)?;
                let Some(row) = row else {
                    return Ok(RefreshOutcome::Invalid);
                };
                let session_id: String = row.try_get("session_id").map_err(unexpected)?;
                let used_at: Option<Millis> = row.try_get("used_at").map_err(unexpected)?;
                let Some(session) = session_on(conn, &session_id).await? else {
                    return Ok(RefreshOutcome::Invalid);
                };
                if !session.is_active(now) {
                    return Ok(RefreshOutcome::Invalid);
                }
                if used_at.is_some() {
                    return Ok(RefreshOutcome::Reused(session));
                }
                // The writer serialises rotations; the condition keeps the rule visible anyway.
                let spent = sqlx::query(
                    "UPDATE refresh_tokens SET used_at = ? WHERE hash = ? AND used_at IS NULL",
                )
                .bind(now)
                .bind(presented.as_str())
                .execute(&mut *conn)
                .await
                .map_err(unexpected)?;
                if spent.rows_affected() != 1 {
                    return Ok(RefreshOutcome::Reused(session));
                }
                sqlx::query(
                    "INSERT INTO refresh_tokens (hash, session_id, issued_at) VALUES (?, ?, ?)",
                )
                .bind(new_refresh.as_str())
                .bind(&session_id)
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(|e| write_error("refresh token", e))?;
                let row = sqlx::query(
                    "UPDATE auth_sessions SET expires_at = ?, last_seen_at = ? WHERE id = ?
                     RETURNING *",
                )
                .bind(new_expires_at)
                .bind(now)
                .bind(&session_id)
                .fetch_one(&mut *conn)
                .await
                .map_err(unexpected)?;
                Ok(RefreshOutcome::Rotated(auth_session_from_row(&row)?))
            }
            .boxed()
        })
        .await
}

pub(crate) async fn revoke_auth_session(
    store: &SqliteStore,
    id: &AuthSessionId,
    now: Millis,
    audit: &[AuditRecord],
) -> StoreResult<bool> {
    let (id, audit) = (id.clone(), audit.to_vec());
    store
        .writer
        .write(move |conn| {
            async move {
                let done = sqlx::query(
                    "UPDATE auth_sessions SET revoked_at = ?
                     WHERE id = ? AND revoked_at IS NULL AND expires_at > ?",
                )
                .bind(now)
                .bind(id.as_str())
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(unexpected)?;
                if done.rows_affected() != 1 {
                    return Ok(false);
                }
                write_audit(conn, &audit).await?;
                Ok(true)
            }
            .boxed()
        })
        .await
}

pub(crate) async fn revoke_user_sessions(
    store: &SqliteStore,
    user: &UserId,
    keep: Option<&AuthSessionId>,
    now: Millis,
    audit: &[AuditRecord],
) -> StoreResult<Vec<AuthSessionId>> {
    let (user, keep, audit) = (user.clone(), keep.cloned(), audit.to_vec());
    store
        .writer
        .write(move |conn| {
            async move {
                let ids: Vec<String> = sqlx::query_scalar(
                    "UPDATE auth_sessions SET revoked_at = ?
                     WHERE user_id = ? AND revoked_at IS NULL AND expires_at > ?
                       AND (? IS NULL OR id <> ?)
                     RETURNING id",
                )
                .bind(now)
                .bind(user.as_str())
                .bind(now)
                .bind(keep.as_ref().map(AuthSessionId::as_str))
                .bind(keep.as_ref().map(AuthSessionId::as_str))
                .fetch_all(&mut *conn)
                .await
                .map_err(unexpected)?;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                write_audit(conn, &audit).await?;
                let mut ids: Vec<AuthSessionId> =
                    ids.into_iter().map(AuthSessionId::from_trusted).collect();
                ids.sort();
                Ok(ids)
            }
            .boxed()
        })
        .await
}

// --- stream tickets ----------------------------------------------------------------------------

pub(crate) async fn create_stream_ticket(
    store: &SqliteStore,
    ticket_hash: &SecretHash,
    ticket: &StreamTicket,
) -> StoreResult<()> {
    let (hash, t) = (ticket_hash.clone(), ticket.clone());
    store
        .writer
        .write(move |conn| {
            async move {
                sqlx::query(
                    "INSERT INTO stream_tickets (hash, user_id, auth_session, tenant, session_id, expires_at)
                     VALUES (?, ?, ?, ?, ?, ?)",
                )
                .bind(hash.as_str())
                .bind(t.user_id.as_str())
                .bind(t.auth_session.as_str())
                .bind(t.tenant.to_string())
                .bind(t.session_id.as_str())
                .bind(t.expires_at)
                .execute(&mut *conn)
                .await
                .map_err(|e| write_error("stream ticket", e))?;
                Ok(())
            }
            .boxed()
        })
        .await
}

pub(crate) async fn take_stream_ticket(
    store: &SqliteStore,
    ticket_hash: &SecretHash,
    now: Millis,
) -> StoreResult<Option<StreamTicket>> {
    let hash = ticket_hash.clone();
    store
        .writer
        .write(move |conn| {
            async move {
                // Expired tickets nobody presents again are removed on the way, too.
                sqlx::query("DELETE FROM stream_tickets WHERE expires_at <= ?")
                    .bind(now)
                    .execute(&mut *conn)
                    .await
                    .map_err(unexpected)?;
                let row = sqlx::query("DELETE FROM stream_tickets WHERE hash = ? RETURNING *")
                    .bind(hash.as_str())
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(unexpected)?;
                let Some(row) = row else {
                    return Ok(None);
                };
                stream_ticket_from_row(&row).map(Some)
            }
            .boxed()
        })
        .await
}
