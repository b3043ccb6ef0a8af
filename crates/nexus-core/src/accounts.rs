//! Organizations, projects, members and user accounts, including the first-run bootstrap.
//! Used by the API (members, projects) and by `nexus admin` (users, orgs) alike.

use std::sync::Arc;

use nexus_domain::audit::{Actor, AuditResult, AuditScope, AuditTarget};
use nexus_domain::time::Millis;
use nexus_domain::{
    Email, Membership, Org, OrgId, Project, ProjectId, Role, TenantId, User, UserId,
    ValidationErrors,
};
use nexus_store::{Store, StoreError};
use serde_json::json;

use crate::auth::AuthService;
use crate::context::RequestMeta;
use crate::error::{CoreError, CoreResult};

pub const DEFAULT_ORG: &str = "default";
pub const DEFAULT_PROJECT: &str = "default";
pub const DEFAULT_ADMIN_EMAIL: &str = "admin@localhost";

/// What the first start created, so the caller can tell the operator once.
#[derive(Debug, Clone)]
pub struct Bootstrapped {
    pub email: Email,
    /// Set when the password was generated (not given by the operator).
    pub generated_password: Option<String>,
}

/// A new member: the existing account with this email, or a new account with a generated
/// password that is returned once.
#[derive(Debug, Clone)]
pub struct AddedMember {
    pub membership: Membership,
    pub initial_password: Option<String>,
}

#[derive(Clone)]
pub struct AccountService {
    store: Arc<dyn Store>,
    auth: AuthService,
}

fn name_of(raw: Option<&str>, fallback: &str) -> CoreResult<String> {
    let name = raw.unwrap_or(fallback).trim().to_owned();
    if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(
            ValidationErrors::single("name", "must be 1 to 128 printable characters").into(),
        );
    }
    Ok(name)
}

/// A readable random password that satisfies both policies (24 chars, has a special character).
pub fn generate_password() -> String {
    let secret = nexus_domain::secret::random_secret("");
    let body: String = secret
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(20)
        .collect();
    format!(
        "{}-{}!",
        &body[..10.min(body.len())],
        &body[10.min(body.len())..]
    )
}

impl AccountService {
    pub fn new(store: Arc<dyn Store>, auth: AuthService) -> Self {
        Self { store, auth }
    }

    /// On an empty store: org `default`, project `default` and an admin. Several replicas may
    /// start at once; whoever loses the race finds the user already there and does nothing.
    pub async fn bootstrap(
        &self,
        email: Option<&str>,
        password: Option<&str>,
        now: Millis,
    ) -> CoreResult<Option<Bootstrapped>> {
        if self.store.count_users().await? > 0 {
            return Ok(None);
        }
        let email = Email::parse(email.unwrap_or(DEFAULT_ADMIN_EMAIL))?;
        let (password, generated) = match password {
            Some(p) => (p.to_owned(), None),
            None => {
                let p = generate_password();
                (p.clone(), Some(p))
            }
        };
        self.auth.check_password(&password, &email)?;
        let org = OrgId::from_trusted(DEFAULT_ORG.into());
        let meta = RequestMeta::default();
        match self
            .create_org_as(&org, Some("Default"), None, &meta, now)
            .await
        {
            Ok(()) | Err(CoreError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
        let project = Project {
            org: org.clone(),
            id: ProjectId::from_trusted(DEFAULT_PROJECT.into()),
            name: "Default".into(),
            created_at: now,
        };
        match self.store.create_project(&project, &[]).await {
            Ok(()) | Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let user = match self.create_user(&email, &password, None, now).await {
            Ok(user) => user,
            Err(CoreError::Conflict { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        self.store
            .put_member(&org, &user.id, Role::Admin, now, &[])
            .await?;
        Ok(Some(Bootstrapped {
            email,
            generated_password: generated,
        }))
    }

    /// Creates an account (policy-checked password). No membership yet.
    pub async fn create_user(
        &self,
        email: &Email,
        password: &str,
        display_name: Option<&str>,
        now: Millis,
    ) -> CoreResult<User> {
        self.auth.check_password(password, email)?;
        let user = User {
            id: UserId::generate(),
            email: email.clone(),
            display_name: display_name
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty()),
            password_hash: self.auth.hash_password(password).await?,
            password_changed_at: now,
            created_at: now,
            totp: Default::default(),
            failed_logins: 0,
            last_failed_login_at: None,
            disabled: false,
        };
        let audit = RequestMeta::default().audit(
            AuditScope::System,
            now,
            Actor::system(),
            "user.create",
            Some(AuditTarget::new("user", &user.id)),
            AuditResult::Success,
            json!({}),
        );
        match self.store.create_user(&user, &[audit]).await {
            Ok(()) => Ok(user),
            Err(StoreError::Conflict(_)) => Err(CoreError::conflict(
                "email_taken",
                "an account with this email already exists",
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Sets a new password as an administrator (`nexus admin user reset-password`) and ends the
    /// user's sessions.
    pub async fn reset_password(
        &self,
        email: &Email,
        password: &str,
        now: Millis,
    ) -> CoreResult<()> {
        let user = self
            .store
            .user_by_email(email)
            .await?
            .ok_or_else(|| CoreError::not_found("user_not_found", "no such user"))?;
        self.auth.check_password(password, &user.email)?;
        let hash = self.auth.hash_password(password).await?;
        let audit = RequestMeta::default().audit(
            AuditScope::System,
            now,
            Actor::system(),
            "user.password_reset",
            Some(AuditTarget::new("user", &user.id)),
            AuditResult::Success,
            json!({}),
        );
        self.store
            .set_password(&user.id, &hash, now, &[audit])
            .await?;
        self.store.clear_login_failures(&user.id).await?;
        self.store
            .revoke_user_sessions(&user.id, None, now, &[])
            .await?;
        Ok(())
    }

    pub async fn users(&self) -> CoreResult<Vec<(User, Vec<(OrgId, Role)>)>> {
        let mut out = Vec::new();
        for user in self.store.list_users().await? {
            let orgs = self.store.user_orgs(&user.id).await?;
            out.push((user, orgs));
        }
        Ok(out)
    }

    pub async fn user_by_email(&self, email: &Email) -> CoreResult<User> {
        self.store
            .user_by_email(email)
            .await?
            .ok_or_else(|| CoreError::not_found("user_not_found", "no such user"))
    }

    /// Creates an organization; `creator` (if any) becomes its admin.
    pub async fn create_org_as(
        &self,
        id: &OrgId,
        name: Option<&str>,
        creator: Option<&UserId>,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<()> {
        let org = Org {
            id: id.clone(),
            name: name_of(name, id.as_str())?,
            created_at: now,
        };
        let actor = creator.map(Actor::user).unwrap_or_else(Actor::system);
        let audit = meta.audit(
            AuditScope::Org(id.clone()),
            now,
            actor.clone(),
            "org.create",
            Some(AuditTarget::new("org", id)),
            AuditResult::Success,
            json!({}),
        );
        match self.store.create_org(&org, &[audit]).await {
            Ok(()) => {}
            Err(StoreError::Conflict(_)) => {
                return Err(CoreError::conflict(
                    "org_exists",
                    "this organization id is taken",
                ));
            }
            Err(e) => return Err(e.into()),
        }
        if let Some(user) = creator {
            let audit = meta.audit(
                AuditScope::Org(id.clone()),
                now,
                actor,
                "member.add",
                Some(AuditTarget::new("user", user)),
                AuditResult::Success,
                json!({"role": "admin"}),
            );
            self.store
                .put_member(id, user, Role::Admin, now, &[audit])
                .await?;
        }
        Ok(())
    }

    pub async fn create_project(
        &self,
        org: &OrgId,
        id: &ProjectId,
        name: Option<&str>,
        actor: Actor,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<Project> {
        let project = Project {
            org: org.clone(),
            id: id.clone(),
            name: name_of(name, id.as_str())?,
            created_at: now,
        };
        let audit = meta.audit(
            AuditScope::Org(org.clone()),
            now,
            actor,
            "project.create",
            Some(AuditTarget::new("project", project.tenant())),
            AuditResult::Success,
            json!({}),
        );
        match self.store.create_project(&project, &[audit]).await {
            Ok(()) => Ok(project),
            Err(StoreError::Conflict(_)) => Err(CoreError::conflict(
                "project_exists",
                "this project id is taken in the organization (or the organization does not exist)",
            )),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn projects(&self, org: &OrgId) -> CoreResult<Vec<Project>> {
        Ok(self.store.list_projects(org).await?)
    }

    pub async fn project(&self, tenant: &TenantId) -> CoreResult<Option<Project>> {
        Ok(self.store.project(tenant).await?)
    }

    pub async fn members(&self, org: &OrgId) -> CoreResult<Vec<Membership>> {
        Ok(self.store.list_members(org).await?)
    }

    async fn membership(&self, org: &OrgId, user: &UserId) -> CoreResult<Membership> {
        self.store
            .list_members(org)
            .await?
            .into_iter()
            .find(|m| &m.user_id == user)
            .ok_or_else(|| CoreError::not_found("member_not_found", "no such member"))
    }

    /// Adds the account with `email` (created with a one-time password if it does not exist).
    pub async fn add_member(
        &self,
        org: &OrgId,
        email: &Email,
        role: Role,
        actor: Actor,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<AddedMember> {
        let (user, initial_password) = match self.store.user_by_email(email).await? {
            Some(user) => (user, None),
            None => {
                let password = generate_password();
                let user = self.create_user(email, &password, None, now).await?;
                (user, Some(password))
            }
        };
        if self.store.member_role(org, &user.id).await?.is_some() {
            return Err(CoreError::conflict(
                "already_member",
                "this user is already a member; change their role instead",
            ));
        }
        let audit = meta.audit(
            AuditScope::Org(org.clone()),
            now,
            actor,
            "member.add",
            Some(AuditTarget::new("user", &user.id)),
            AuditResult::Success,
            json!({"role": role}),
        );
        self.store
            .put_member(org, &user.id, role, now, &[audit])
            .await?;
        Ok(AddedMember {
            membership: self.membership(org, &user.id).await?,
            initial_password,
        })
    }

    /// An organization keeps at least one admin: the last one cannot be demoted or removed.
    async fn ensure_not_last_admin(&self, org: &OrgId, user: &UserId) -> CoreResult<()> {
        let members = self.store.list_members(org).await?;
        let admins: Vec<_> = members.iter().filter(|m| m.role == Role::Admin).collect();
        if admins.len() == 1 && &admins[0].user_id == user {
            return Err(CoreError::conflict(
                "last_admin",
                "an organization needs at least one admin; make someone else admin first",
            ));
        }
        Ok(())
    }

    pub async fn set_role(
        &self,
        org: &OrgId,
        user: &UserId,
        role: Role,
        actor: Actor,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<Membership> {
        let current = self.membership(org, user).await?;
        if current.role == Role::Admin && role != Role::Admin {
            self.ensure_not_last_admin(org, user).await?;
        }
        let audit = meta.audit(
            AuditScope::Org(org.clone()),
            now,
            actor,
            "member.role_change",
            Some(AuditTarget::new("user", user)),
            AuditResult::Success,
            json!({"from": current.role, "to": role}),
        );
        self.store
            .put_member(org, user, role, now, &[audit])
            .await?;
        self.membership(org, user).await
    }

    pub async fn remove_member(
        &self,
        org: &OrgId,
        user: &UserId,
        actor: Actor,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<()> {
        let current = self.membership(org, user).await?;
        if current.role == Role::Admin {
            self.ensure_not_last_admin(org, user).await?;
        }
        let audit = meta.audit(
            AuditScope::Org(org.clone()),
            now,
            actor,
            "member.remove",
            Some(AuditTarget::new("user", user)),
            AuditResult::Success,
            json!({"role": current.role}),
        );
        if !self.store.remove_member(org, user, &[audit]).await? {
            return Err(CoreError::not_found("member_not_found", "no such member"));
        }
        Ok(())
    }

    /// `nexus admin user set-role`: by email, adding the membership if needed.
    pub async fn set_role_by_email(
        &self,
        org: &OrgId,
        email: &Email,
        role: Role,
        now: Millis,
    ) -> CoreResult<()> {
        let user = self.user_by_email(email).await?;
        if self.store.org(org).await?.is_none() {
            return Err(CoreError::not_found(
                "org_not_found",
                "no such organization",
            ));
        }
        let meta = RequestMeta::default();
        match self.store.member_role(org, &user.id).await? {
            Some(_) => {
                self.set_role(org, &user.id, role, Actor::system(), &meta, now)
                    .await?;
            }
            None => {
                let audit = meta.audit(
                    AuditScope::Org(org.clone()),
                    now,
                    Actor::system(),
                    "member.add",
                    Some(AuditTarget::new("user", &user.id)),
                    AuditResult::Success,
                    json!({"role": role}),
                );
                self.store
                    .put_member(org, &user.id, role, now, &[audit])
                    .await?;
            }
        }
        Ok(())
    }
}
