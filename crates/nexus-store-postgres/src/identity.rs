//! Organizations, projects, members, users, login sessions and stream tickets on PostgreSQL. These
//! are control-plane tables without row-level security (they are read before a tenant is known;
//! see `migrations/0002_identity.sql`). Every "only once" rule is one conditional statement, so it
//! holds across replicas: a TOTP step is accepted by `UPDATE ... WHERE last_step < $step`, a
//! recovery code is spent by `DELETE`, a refresh token by `UPDATE ... WHERE used_at IS NULL`, a
//! stream ticket is taken by `DELETE ... RETURNING`.

use nexus_domain::audit::AuditRecord;
use nexus_domain::identity::{AuthSession, AuthSessionId, StreamTicket, TotpState};
use nexus_domain::secret::SecretHash;
use nexus_domain::time::Millis;
use nexus_domain::{Email, Membership, Org, OrgId, Project, Role, TenantId, User, UserId};
use nexus_store::{RefreshOutcome, StoreError, StoreResult};
use sqlx::Row;

use crate::PostgresStore;
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
    store: &PostgresStore,
    org: &Org,
    audit: &[AuditRecord],
) -> StoreResult<()> {
    let mut tx = store.pool.begin().await.map_err(unexpected)?;
    sqlx::query("INSERT INTO orgs (id, name, created_at) VALUES ($1, $2, $3)")
        .bind(org.id.as_str())
        .bind(&org.name)
        .bind(org.created_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| write_error("organization", e))?;
    write_audit(&mut tx, audit).await?;
    tx.commit().await.map_err(unexpected)
}

pub(crate) async fn org(store: &PostgresStore, id: &OrgId) -> StoreResult<Option<Org>> {
    let row = sqlx::query("SELECT * FROM orgs WHERE id = $1")
        .bind(id.as_str())
        .fetch_optional(&store.pool)
        .await
        .map_err(unexpected)?;
    row.map(|r| org_from_row(&r)).transpose()
}

pub(crate) async fn create_project(
    store: &PostgresStore,
    p: &Project,
    audit: &[AuditRecord],
) -> StoreResult<()> {
    let mut tx = store.pool.begin().await.map_err(unexpected)?;
    // A missing org is a Conflict like a taken id (the foreign key says the same, but this names it).
    let inserted = sqlx::query(
        "INSERT INTO projects (org, id, name, created_at)
         SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM orgs WHERE id = $1)",
    )
    .bind(p.org.as_str())
    .bind(p.id.as_str())
    .bind(&p.name)
    .bind(p.created_at)
    .execute(&mut *tx)
    .await
    .map_err(|e| write_error("project", e))?;
    if inserted.rows_affected() != 1 {
        return Err(StoreError::Conflict(format!(
            "organization {} does not exist",
            p.org
        )));
    }
    write_audit(&mut tx, audit).await?;
    tx.commit().await.map_err(unexpected)
}

pub(crate) async fn project(
    store: &PostgresStore,
    tenant: &TenantId,
) -> StoreResult<Option<Project>> {
    let row = sqlx::query("SELECT * FROM projects WHERE org = $1 AND id = $2")
        .bind(tenant.org())
        .bind(tenant.project())
        .fetch_optional(&store.pool)
        .await
        .map_err(unexpected)?;
    row.map(|r| project_from_row(&r)).transpose()
}

pub(crate) async fn list_projects(store: &PostgresStore, org: &OrgId) -> StoreResult<Vec<Project>> {
    let rows = sqlx::query("SELECT * FROM projects WHERE org = $1 ORDER BY id")
        .bind(org.as_str())
        .fetch_all(&store.pool)
        .await
        .map_err(unexpected)?;
    rows.iter().map(project_from_row).collect()
}

pub(crate) async fn put_member(
    store: &PostgresStore,
    org: &OrgId,
    user: &UserId,
    role: Role,
    now: Millis,
    audit: &[AuditRecord],
) -> StoreResult<()> {
    let mut tx = store.pool.begin().await.map_err(unexpected)?;
    sqlx::query(
        "INSERT INTO org_members (org, user_id, role, created_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (org, user_id) DO UPDATE SET role = excluded.role",
    )
    .bind(org.as_str())
    .bind(user.as_str())
    .bind(role.as_str())
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(|e| write_error("member", e))?;
    write_audit(&mut tx, audit).await?;
    tx.commit().await.map_err(unexpected)
}

pub(crate) async fn remove_member(
    store: &PostgresStore,
    org: &OrgId,
    user: &UserId,
    audit: &[AuditRecord],
) -> StoreResult<bool> {
    let mut tx = store.pool.begin().await.map_err(unexpected)?;
    let done = sqlx::query("DELETE FROM org_members WHERE org = $1 AND user_id = $2")
        .bind(org.as_str())
        .bind(user.as_str())
        .execute(&mut *tx)
        .await
        .map_err(unexpected)?;
    if done.rows_affected() != 1 {
        return Ok(false);
    }
    write_audit(&mut tx, audit).await?;
    tx.commit().await.map_err(unexpected)?;
    Ok(true)
}

pub(crate) async fn member_role(
    store: &PostgresStore,
    org: &OrgId,
    user: &UserId,
) -> StoreResult<Option<Role>> {
    let raw: Option<String> =
        sqlx::query_scalar("SELECT role FROM org_members WHERE org = $1 AND user_id = $2")
            .bind(org.as_str())
            .bind(user.as_str())
            .fetch_optional(&store.pool)
            .await
            .map_err(unexpected)?;
    raw.as_deref().map(role).transpose()
}

pub(crate) async fn list_members(
    store: &PostgresStore,
    org: &OrgId,
) -> StoreResult<Vec<Membership>> {
    let rows = sqlx::query(
        "SELECT m.org, m.user_id, u.email, u.display_name, m.role, m.created_at
         FROM org_members m JOIN users u ON u.id = m.user_id
         WHERE m.org = $1 ORDER BY u.email",
    )
    .bind(org.as_str())
    .fetch_all(&store.pool)
    .await
    .map_err(unexpected)?;
    rows.iter().map(membership_from_row).collect()
}

pub(crate) async fn user_orgs(
    store: &PostgresStore,
    user: &UserId,
) -> StoreResult<Vec<(OrgId, Role)>> {
    let rows = sqlx::query("SELECT org, role FROM org_members WHERE user_id = $1 ORDER BY org")
        .bind(user.as_str())
        .fetch_all(&store.pool)
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
    store: &PostgresStore,
    u: &User,
    audit: &[AuditRecord],
) -> StoreResult<()> {
    let mut tx = store.pool.begin().await.map_err(unexpected)?;
    sqlx::query(
        "INSERT INTO users (id, email, display_name, password_hash, password_changed_at,
                            created_at, totp_secret, totp_enabled, totp_last_step,
                            failed_logins, last_failed_login_at, disabled)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
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
    .bind(i32::try_from(u.failed_logins).unwrap_or(i32::MAX))
    .bind(u.last_failed_login_at)
    .bind(u.disabled)
    .execute(&mut *tx)
    .await
    .map_err(|e| write_error("user (id or email)", e))?;
    write_audit(&mut tx, audit).await?;
    tx.commit().await.map_err(unexpected)
}

pub(crate) async fn user(store: &PostgresStore, id: &UserId) -> StoreResult<Option<User>> {
    let row = sqlx::query("SELECT * FROM users WHERE id = $1")
        .bind(id.as_str())
        .fetch_optional(&store.pool)
        .await
        .map_err(unexpected)?;
    row.map(|r| user_from_row(&r)).transpose()
}

pub(crate) async fn user_by_email(
    store: &PostgresStore,
    email: &Email,
) -> StoreResult<Option<User>> {
    let row = sqlx::query("SELECT * FROM users WHERE email = $1")
        .bind(email.as_str())
        .fetch_optional(&store.pool)
        .await
        .map_err(unexpected)?;
    row.map(|r| user_from_row(&r)).transpose()
}

pub(crate) async fn list_users(store: &PostgresStore) -> StoreResult<Vec<User>> {
    let rows = sqlx::query("SELECT * FROM users ORDER BY email")
        .fetch_all(&store.pool)
        .await
        .map_err(unexpected)?;
    rows.iter().map(user_from_row).collect()
}

pub(crate) async fn count_users(store: &PostgresStore) -> StoreResult<u64> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&store.pool)
        .await
        .map_err(unexpected)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

pub(crate) async fn set_password(
    store: &PostgresStore,
    user: &UserId,
    password_hash: &str,
    at: Millis,
    audit: &[AuditRecord],
) -> StoreResult<bool> {
    let mut tx = store.pool.begin().await.map_err(unexpected)?;
    let done =
        sqlx::query("UPDATE users SET password_hash = $1, password_changed_at = $2 WHERE id = $3")
            .bind(password_hash)
            .bind(at)
            .bind(user.as_str())
            .execute(&mut *tx)
            .await
            .map_err(unexpected)?;
    if done.rows_affected() != 1 {
        return Ok(false);
    }
    write_audit(&mut tx, audit).await?;
    tx.commit().await.map_err(unexpected)?;
    Ok(true)
}

pub(crate) async fn record_login_failure(
    store: &PostgresStore,
    user: &UserId,
    at: Millis,
) -> StoreResult<u32> {
    let count: Option<i32> = sqlx::query_scalar(
        "UPDATE users SET failed_logins = failed_logins + 1, last_failed_login_at = $1
         WHERE id = $2 RETURNING failed_logins",
    )
    .bind(at)
    .bind(user.as_str())
    .fetch_optional(&store.pool)
    .await
    .map_err(unexpected)?;
    Ok(count.map_or(0, |n| u32::try_from(n).unwrap_or(0)))
}

pub(crate) async fn clear_login_failures(store: &PostgresStore, user: &UserId) -> StoreResult<()> {
    // Conditional, so the common case (nothing to clear) writes no row version.
    sqlx::query(
        "UPDATE users SET failed_logins = 0, last_failed_login_at = NULL
         WHERE id = $1 AND (failed_logins <> 0 OR last_failed_login_at IS NOT NULL)",
    )
    .bind(user.as_str())
    .execute(&store.pool)
    .await
    .map_err(unexpected)?;
    Ok(())
}

pub(crate) async fn set_totp(
    store: &PostgresStore,
    user: &UserId,
    totp: &TotpState,
    recovery_hashes: &[SecretHash],
    audit: &[AuditRecord],
) -> StoreResult<bool> {
    let mut tx = store.pool.begin().await.map_err(unexpected)?;
    let done = sqlx::query(
        "UPDATE users SET totp_secret = $1, totp_enabled = $2, totp_last_step = $3 WHERE id = $4",
    )
    .bind(&totp.secret)
    .bind(totp.enabled)
    .bind(totp.last_step.map(step_to_sql))
    .bind(user.as_str())
    .execute(&mut *tx)
    .await
    .map_err(unexpected)?;
    if done.rows_affected() != 1 {
        return Ok(false);
    }
    sqlx::query("DELETE FROM user_recovery_codes WHERE user_id = $1")
        .bind(user.as_str())
        .execute(&mut *tx)
        .await
        .map_err(unexpected)?;
    let hashes: Vec<String> = recovery_hashes
        .iter()
        .map(|h| h.as_str().to_owned())
        .collect();
    sqlx::query(
        "INSERT INTO user_recovery_codes (user_id, code_hash)
         SELECT $1, h FROM unnest($2::text[]) AS h ON CONFLICT DO NOTHING",
    )
    .bind(user.as_str())
    .bind(&hashes)
    .execute(&mut *tx)
    .await
    .map_err(unexpected)?;
    write_audit(&mut tx, audit).await?;
    tx.commit().await.map_err(unexpected)?;
    Ok(true)
}

pub(crate) async fn use_totp_step(
    store: &PostgresStore,
    user: &UserId,
    step: u64,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE users SET totp_last_step = $1
         WHERE id = $2 AND (totp_last_step IS NULL OR totp_last_step < $1)",
    )
    .bind(step_to_sql(step))
    .bind(user.as_str())
    .execute(&store.pool)
    .await
    .map_err(unexpected)?;
    Ok(done.rows_affected() == 1)
}

pub(crate) async fn use_recovery_code(
    store: &PostgresStore,
    user: &UserId,
    code_hash: &SecretHash,
) -> StoreResult<bool> {
    let done = sqlx::query("DELETE FROM user_recovery_codes WHERE user_id = $1 AND code_hash = $2")
        .bind(user.as_str())
        .bind(code_hash.as_str())
        .execute(&store.pool)
        .await
        .map_err(unexpected)?;
    Ok(done.rows_affected() == 1)
}

pub(crate) async fn recovery_codes_left(store: &PostgresStore, user: &UserId) -> StoreResult<u32> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM user_recovery_codes WHERE user_id = $1")
        .bind(user.as_str())
        .fetch_one(&store.pool)
        .await
        .map_err(unexpected)?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

// --- login sessions ----------------------------------------------------------------------------

pub(crate) async fn create_auth_session(
    store: &PostgresStore,
    s: &AuthSession,
    refresh: &SecretHash,
    audit: &[AuditRecord],
) -> StoreResult<()> {
    let mut tx = store.pool.begin().await.map_err(unexpected)?;
    sqlx::query(
        "INSERT INTO auth_sessions (id, user_id, created_at, last_seen_at, expires_at,
                                    revoked_at, ip, user_agent, mfa)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
    .execute(&mut *tx)
    .await
    .map_err(|e| write_error("login session", e))?;
    sqlx::query("INSERT INTO refresh_tokens (hash, session_id, issued_at) VALUES ($1, $2, $3)")
        .bind(refresh.as_str())
        .bind(s.id.as_str())
        .bind(s.created_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| write_error("refresh token", e))?;
    write_audit(&mut tx, audit).await?;
    tx.commit().await.map_err(unexpected)
}

pub(crate) async fn auth_session(
    store: &PostgresStore,
    id: &AuthSessionId,
) -> StoreResult<Option<AuthSession>> {
    let row = sqlx::query("SELECT * FROM auth_sessions WHERE id = $1")
        .bind(id.as_str())
        .fetch_optional(&store.pool)
        .await
        .map_err(unexpected)?;
    row.map(|r| auth_session_from_row(&r)).transpose()
}

pub(crate) async fn session_access(
    store: &PostgresStore,
    id: &AuthSessionId,
    tenant: &TenantId,
) -> StoreResult<Option<(AuthSession, Option<Role>)>> {
    let row = sqlx::query(
        "SELECT s.*, (SELECT m.role FROM org_members m
                        JOIN projects p ON p.org = m.org AND p.id = $1
                       WHERE m.org = $2 AND m.user_id = s.user_id) AS tenant_role
         FROM auth_sessions s WHERE s.id = $3",
    )
    .bind(tenant.project())
    .bind(tenant.org())
    .bind(id.as_str())
    .fetch_optional(&store.pool)
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
    store: &PostgresStore,
    user: &UserId,
    now: Millis,
) -> StoreResult<Vec<AuthSession>> {
    let rows = sqlx::query(
        "SELECT * FROM auth_sessions WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2
         ORDER BY created_at DESC, id DESC",
    )
    .bind(user.as_str())
    .bind(now)
    .fetch_all(&store.pool)
    .await
    .map_err(unexpected)?;
    rows.iter().map(auth_session_from_row).collect()
}

/// Unknown, revoked or expired → Invalid; spent → Reused (nothing changes); else the token is
/// spent by a conditional UPDATE, so of two concurrent rotations of one token exactly one gets
/// `Rotated` (the other waits for its row lock, then matches nothing and answers `Reused`).
pub(crate) async fn rotate_refresh_token(
    store: &PostgresStore,
    presented: &SecretHash,
    new_refresh: &SecretHash,
    new_expires_at: Millis,
    now: Millis,
) -> StoreResult<RefreshOutcome<AuthSession>> {
    let mut tx = store.pool.begin().await.map_err(unexpected)?;
    let row = sqlx::query(
        "SELECT r.used_at AS token_used_at, s.* FROM refresh_tokens r
         JOIN auth_sessions s ON s.id = r.session_id WHERE r.hash = $1",
    )
    .bind(presented.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(unexpected)?;
    let Some(row) = row else {
        return Ok(RefreshOutcome::Invalid);
    };
    let used_at: Option<Millis> = row.try_get("token_used_at").map_err(unexpected)?;
    let session = auth_session_from_row(&row)?;
    if !session.is_active(now) {
        return Ok(RefreshOutcome::Invalid);
    }
    if used_at.is_some() {
        return Ok(RefreshOutcome::Reused(session));
    }
    let spent =
        sqlx::query("UPDATE refresh_tokens SET used_at = $1 WHERE hash = $2 AND used_at IS NULL")
            .bind(now)
            .bind(presented.as_str())
            .execute(&mut *tx)
            .await
            .map_err(unexpected)?;
    if spent.rows_affected() != 1 {
        // Another rotation of the same token committed first.
        let current = sqlx::query("SELECT * FROM auth_sessions WHERE id = $1")
            .bind(session.id.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(unexpected)?;
        return Ok(RefreshOutcome::Reused(auth_session_from_row(&current)?));
    }
    sqlx::query("INSERT INTO refresh_tokens (hash, session_id, issued_at) VALUES ($1, $2, $3)")
        .bind(new_refresh.as_str())
        .bind(session.id.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| write_error("refresh token", e))?;
    // Revoked meanwhile (logout, reuse detected elsewhere): then nothing is rotated.
    let updated = sqlx::query(
        "UPDATE auth_sessions SET expires_at = $1, last_seen_at = $2
         WHERE id = $3 AND revoked_at IS NULL RETURNING *",
    )
    .bind(new_expires_at)
    .bind(now)
    .bind(session.id.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(unexpected)?;
    let Some(updated) = updated else {
        return Ok(RefreshOutcome::Invalid);
    };
    let session = auth_session_from_row(&updated)?;
    tx.commit().await.map_err(unexpected)?;
    Ok(RefreshOutcome::Rotated(session))
}

pub(crate) async fn revoke_auth_session(
    store: &PostgresStore,
    id: &AuthSessionId,
    now: Millis,
    audit: &[AuditRecord],
) -> StoreResult<bool> {
    let mut tx = store.pool.begin().await.map_err(unexpected)?;
    let done = sqlx::query(
        "UPDATE auth_sessions SET revoked_at = $1
         WHERE id = $2 AND revoked_at IS NULL AND expires_at > $1",
    )
    .bind(now)
    .bind(id.as_str())
    .execute(&mut *tx)
    .await
    .map_err(unexpected)?;
    if done.rows_affected() != 1 {
        return Ok(false);
    }
    write_audit(&mut tx, audit).await?;
    tx.commit().await.map_err(unexpected)?;
    Ok(true)
}

pub(crate) async fn revoke_user_sessions(
    store: &PostgresStore,
    user: &UserId,
    keep: Option<&AuthSessionId>,
    now: Millis,
    audit: &[AuditRecord],
) -> StoreResult<Vec<AuthSessionId>> {
    let mut tx = store.pool.begin().await.map_err(unexpected)?;
    let ids: Vec<String> = sqlx::query_scalar(
        "UPDATE auth_sessions SET revoked_at = $1
         WHERE user_id = $2 AND revoked_at IS NULL AND expires_at > $1
           AND ($3::text IS NULL OR id <> $3)
         RETURNING id",
    )
    .bind(now)
    .bind(user.as_str())
    .bind(keep.map(AuthSessionId::as_str))
    .fetch_all(&mut *tx)
    .await
    .map_err(unexpected)?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    write_audit(&mut tx, audit).await?;
    tx.commit().await.map_err(unexpected)?;
    let mut ids: Vec<AuthSessionId> = ids.into_iter().map(AuthSessionId::from_trusted).collect();
    ids.sort();
    Ok(ids)
}

// --- stream tickets ----------------------------------------------------------------------------

pub(crate) async fn create_stream_ticket(
    store: &PostgresStore,
    hash: &SecretHash,
    t: &StreamTicket,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO stream_tickets (hash, user_id, auth_session, tenant, session_id, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(hash.as_str())
    .bind(t.user_id.as_str())
    .bind(t.auth_session.as_str())
    .bind(t.tenant.to_string())
    .bind(t.session_id.as_str())
    .bind(t.expires_at)
    .execute(&store.pool)
    .await
    .map_err(|e| write_error("stream ticket", e))?;
    Ok(())
}

/// One statement: expired tickets (this one included) are deleted, and this one is deleted and
/// returned only if it is still valid. Two concurrent takes of one ticket cannot both get it.
pub(crate) async fn take_stream_ticket(
    store: &PostgresStore,
    hash: &SecretHash,
    now: Millis,
) -> StoreResult<Option<StreamTicket>> {
    let row = sqlx::query(
        "WITH expired AS (DELETE FROM stream_tickets WHERE expires_at <= $2)
         DELETE FROM stream_tickets WHERE hash = $1 AND expires_at > $2 RETURNING *",
    )
    .bind(hash.as_str())
    .bind(now)
    .fetch_optional(&store.pool)
    .await
    .map_err(unexpected)?;
    row.map(|r| stream_ticket_from_row(&r)).transpose()
}
