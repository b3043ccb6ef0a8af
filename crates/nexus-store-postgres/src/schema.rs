//! Schema management: migrations run as the schema owner, the application role gets exactly the
//! privileges it needs, and a server refuses to start on a schema other than the one it was built for.

use std::collections::HashMap;
use std::str::FromStr;

use anyhow::Context;
use sqlx::migrate::MigrateError;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgPool, Row};

use crate::MIGRATOR;

/// Tables the application role may read and append to but never change: the audit trail (see
/// `migrations/0002_identity.sql`). Even a compromised application cannot rewrite history.
pub const APPEND_ONLY_TABLES: [&str; 1] = ["audit_log"];

/// The role the application connects as unless configured otherwise.
pub const DEFAULT_APP_ROLE: &str = "nexus_app";

/// What [`crate::PostgresStore::migrate_with`] grants to whom.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The role the servers connect as. It must exist, and must be neither superuser, nor BYPASSRLS,
    /// nor the owner running the migration.
    pub app_role: String,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            app_role: DEFAULT_APP_ROLE.to_owned(),
        }
    }
}

/// Why a database cannot be used by this build. Returned (inside `anyhow::Error`) by `connect` and
/// `migrate`, so callers can tell the operator exactly what to do.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "the database has no NEXUS schema yet: run `nexus migrate` (as the schema owner) first"
    )]
    NotMigrated,
    #[error(
        "the database schema is at version {applied}, newer than this build of NEXUS understands \
         (it knows versions up to {known}): upgrade NEXUS, or point it at the right database"
    )]
    Newer { applied: i64, known: i64 },
    #[error("the database lacks migration(s) {missing:?}: run `nexus migrate` to apply them")]
    Missing { missing: Vec<i64> },
    #[error("migration {0} failed part-way in this database: repair it, then run `nexus migrate`")]
    Failed(i64),
    #[error("migration {0} in the database differs from the one in this build of NEXUS")]
    Modified(i64),
    #[error(
        "role {role:?} cannot read the migration history: run `nexus migrate`, which grants it access"
    )]
    NoAccess { role: String },
    #[error(
        "connected as role {role:?}, which bypasses row-level security ({why}); connect as the \
         application role (default `nexus_app`) so that the database enforces tenant isolation"
    )]
    PrivilegedRole { role: String, why: String },
}

/// Versions of the up-migrations this build knows, with their checksums.
fn known_migrations() -> HashMap<i64, &'static [u8]> {
    MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| (m.version, &*m.checksum))
        .collect()
}

fn newest_known() -> i64 {
    known_migrations().keys().copied().max().unwrap_or(0)
}

/// Checks, as the application role, that the schema is exactly this build's and that the role is
/// subject to row-level security.
pub(crate) async fn check(pool: &PgPool, allow_privileged_role: bool) -> anyhow::Result<()> {
    let rows = match sqlx::query(
        "SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(pool)
    .await
    {
        Ok(rows) => rows,
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => {
            return Err(SchemaError::NotMigrated.into());
        }
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42501") => {
            let role: String = sqlx::query_scalar("SELECT current_user::text")
                .fetch_one(pool)
                .await
                .context("reading the current role")?;
            return Err(SchemaError::NoAccess { role }.into());
        }
        Err(e) => return Err(anyhow::Error::new(e).context("reading the migration history")),
    };
    let known = known_migrations();
    let mut applied = HashMap::new();
    for row in &rows {
        let version: i64 = row.try_get("version")?;
        let success: bool = row.try_get("success")?;
        let checksum: Vec<u8> = row.try_get("checksum")?;
        applied.insert(version, (success, checksum));
    }
    if let Some(newer) = applied.keys().filter(|v| !known.contains_key(v)).max() {
        return Err(SchemaError::Newer {
            applied: *newer,
            known: newest_known(),
        }
        .into());
    }
    let mut versions: Vec<_> = applied.iter().collect();
    versions.sort_by_key(|(v, _)| **v);
    for (version, (success, checksum)) in versions {
        if !success {
            return Err(SchemaError::Failed(*version).into());
        }
        if known
            .get(version)
            .is_some_and(|k| *k != checksum.as_slice())
        {
            return Err(SchemaError::Modified(*version).into());
        }
    }
    let mut missing: Vec<i64> = known
        .keys()
        .filter(|v| !applied.contains_key(v))
        .copied()
        .collect();
    if !missing.is_empty() {
        missing.sort_unstable();
        return Err(SchemaError::Missing { missing }.into());
    }

    let row = sqlx::query(
        "SELECT current_user::text AS role, r.rolsuper, r.rolbypassrls,
                pg_has_role(current_user, c.relowner, 'MEMBER') AS owner
         FROM pg_roles r, pg_class c
         WHERE r.rolname = current_user AND c.oid = 'public.events'::regclass",
    )
    .fetch_one(pool)
    .await
    .context("checking the application role")?;
    let role: String = row.try_get("role")?;
    let mut why = Vec::new();
    if row.try_get::<bool, _>("rolsuper")? {
        why.push("superuser");
    }
    if row.try_get::<bool, _>("rolbypassrls")? {
        why.push("BYPASSRLS");
    }
    if row.try_get::<bool, _>("owner")? {
        why.push("owner of the tables");
    }
    if !why.is_empty() {
        if !allow_privileged_role {
            return Err(SchemaError::PrivilegedRole {
                role,
                why: why.join(", "),
            }
            .into());
        }
        tracing::warn!(role = %role, reason = %why.join(", "), "the PostgreSQL role bypasses row-level security");
    }
    Ok(())
}

/// A role name we can quote safely (PostgreSQL identifiers, no quoting tricks).
fn quoted_role(role: &str) -> anyhow::Result<String> {
    let valid = role.len() <= 63
        && role
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && role.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    anyhow::ensure!(
        valid,
        "invalid application role name {role:?} (letters, digits and _ only)"
    );
    Ok(format!("\"{role}\""))
}

pub(crate) async fn migrate(owner_url: &str, options: &MigrateOptions) -> anyhow::Result<()> {
    let app_role = quoted_role(&options.app_role)?;
    let mut conn = PgConnectOptions::from_str(owner_url)
        .context("parsing the PostgreSQL owner URL (postgres://user:password@host:port/database)")?
        .options([("search_path", "public")])
        .application_name("nexus-migrate")
        .disable_statement_logging()
        .connect()
        .await
        .context("connecting to PostgreSQL as the schema owner")?;

    let owner: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut conn)
        .await?;
    let role = sqlx::query("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = $1")
        .bind(&options.app_role)
        .fetch_optional(&mut conn)
        .await
        .context("looking up the application role")?;
    let Some(role) = role else {
        anyhow::bail!(
            "the application role {:?} does not exist: create it first, e.g. \
             CREATE ROLE {} LOGIN PASSWORD '...'; (not SUPERUSER, not BYPASSRLS)",
            options.app_role,
            options.app_role
        );
    };
    anyhow::ensure!(
        options.app_role != owner,
        "the application role must not be the schema owner ({owner}): the owner can switch row-level security off"
    );
    anyhow::ensure!(
        !role.try_get::<bool, _>("rolsuper")? && !role.try_get::<bool, _>("rolbypassrls")?,
        "the application role {:?} bypasses row-level security (SUPERUSER or BYPASSRLS): \
         ALTER ROLE {} NOSUPERUSER NOBYPASSRLS",
        options.app_role,
        options.app_role
    );

    MIGRATOR.run(&mut conn).await.map_err(|e| match e {
        MigrateError::VersionMissing(applied) => anyhow::Error::new(SchemaError::Newer {
            applied,
            known: newest_known(),
        }),
        other => anyhow::Error::new(other).context("applying migrations"),
    })?;

    // Grants are re-applied on every run, so tables and functions added by later migrations are
    // covered without each migration naming the (deployment-specific) application role.
    let mut tx = conn.begin().await?;
    // Usually granted to PUBLIC already; a no-op warning if the owner may not grant it.
    sqlx::query(&format!("GRANT USAGE ON SCHEMA public TO {app_role}"))
        .execute(&mut *tx)
        .await?;
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, quote_ident(c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user)
           AND c.relname <> '_sqlx_migrations'",
    )
    .fetch_all(&mut *tx)
    .await?;
    for (name, table) in tables {
        // No TRUNCATE: it ignores row-level security.
        let grant = if APPEND_ONLY_TABLES.contains(&name.as_str()) {
            // Also taken back explicitly, in case an older build or an operator granted it.
            sqlx::query(&format!(
                "REVOKE UPDATE, DELETE, TRUNCATE ON TABLE public.{table} FROM {app_role}"
            ))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("revoking changes to {table}"))?;
            "SELECT, INSERT"
        } else {
            "SELECT, INSERT, UPDATE, DELETE"
        };
        sqlx::query(&format!(
            "GRANT {grant} ON TABLE public.{table} TO {app_role}"
        ))
        .execute(&mut *tx)
        .await
        .with_context(|| format!("granting access to {table}"))?;
    }
    sqlx::query(&format!(
        "GRANT SELECT ON TABLE public._sqlx_migrations TO {app_role}"
    ))
    .execute(&mut *tx)
    .await?;
    let functions: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'public' AND p.proname LIKE 'nexus\\_%' AND p.proowner = (SELECT oid FROM pg_roles WHERE rolname = current_user)",
    )
    .fetch_all(&mut *tx)
    .await?;
    for function in functions {
        sqlx::query(&format!(
            "GRANT EXECUTE ON FUNCTION {function} TO {app_role}"
        ))
        .execute(&mut *tx)
        .await
        .with_context(|| format!("granting {function}"))?;
    }
    tx.commit().await?;
    conn.close().await?;
    Ok(())
}
