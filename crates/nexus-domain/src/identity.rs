//! Who may act: organizations own projects (a tenant is `org:project`), users are members of an
//! organization with one role, and the permission table below is the single place that says what
//! each role may do. Handlers ask `Role::allows`; nothing else decides.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::prefixed_id;
use crate::time::Millis;
use crate::validation::{ValidationErrors, check_token_chars};

prefixed_id!(
    /// A user account (web console / API).
    UserId, "usr_"
);
prefixed_id!(
    /// A login session: one refresh-token family, ended by logout or reuse detection.
    AuthSessionId, "ses_"
);

const MAX_SLUG_LEN: usize = 64;

fn slug_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

macro_rules! slug {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Same alphabet as the parts of a tenant id, so `org:project` stays unambiguous.
            pub fn parse(field: &str, raw: &str) -> Result<Self, ValidationErrors> {
                check_token_chars(field, raw, MAX_SLUG_LEN, slug_char)?;
                Ok(Self(raw.to_owned()))
            }

            pub fn from_trusted(raw: String) -> Self {
                Self(raw)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

slug!(
    /// An organization: owns projects and has members.
    OrgId
);
slug!(
    /// A project inside an organization; `org:project` is the tenant.
    ProjectId
);

#[derive(Debug, Clone, PartialEq)]
pub struct Org {
    pub id: OrgId,
    pub name: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    pub org: OrgId,
    pub id: ProjectId,
    pub name: String,
    pub created_at: Millis,
}

impl Project {
    pub fn tenant(&self) -> crate::TenantId {
        crate::TenantId::from_parts(&self.org, &self.id)
    }
}

/// A member's role in an organization (the same role in each of its projects).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Operator, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Operator => "operator",
            Self::Viewer => "viewer",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "admin" => Some(Self::Admin),
            "operator" => Some(Self::Operator),
            "viewer" => Some(Self::Viewer),
            _ => None,
        }
    }

    /// The permission table (docs/PERMISSIONS.md is generated from the same data by a test).
    /// Deny unless listed.
    pub fn allows(self, permission: Permission) -> bool {
        use Permission::*;
        match self {
            Self::Admin => true,
            Self::Operator => matches!(
                permission,
                ReadStreams
                    | ReadDevices
                    | ReadMembers
                    | ReadCommands
                    | PairDevices
                    | SendCommands
                    | DecideApprovals
            ),
            Self::Viewer => matches!(
                permission,
                ReadStreams | ReadDevices | ReadMembers | ReadCommands
            ),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a tenant-scoped request can need permission for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Watch a session's live stream and read reports.
    ReadStreams,
    /// List and inspect devices.
    ReadDevices,
    /// List the organization's members.
    ReadMembers,
    /// List and inspect commands and approvals.
    ReadCommands,
    /// Preview and confirm a pairing code (the device joins the tenant).
    PairDevices,
    /// Rename and delete devices.
    ManageDevices,
    /// Propose commands for devices.
    SendCommands,
    /// Approve or deny RED commands.
    DecideApprovals,
    /// Add, re-role and remove members; create projects.
    ManageMembers,
    /// Edit the tenant's policies (risk table, approval settings).
    ManagePolicies,
    /// Read and verify the audit trail.
    ReadAudit,
    /// See unmasked personal data.
    ReadPii,
}

impl Permission {
    pub const ALL: [Permission; 12] = [
        Permission::ReadStreams,
        Permission::ReadDevices,
        Permission::ReadMembers,
        Permission::ReadCommands,
        Permission::PairDevices,
        Permission::ManageDevices,
        Permission::SendCommands,
        Permission::DecideApprovals,
        Permission::ManageMembers,
        Permission::ManagePolicies,
        Permission::ReadAudit,
        Permission::ReadPii,
    ];

    /// What the permission lets a member do, for the docs.
    pub fn description(self) -> &'static str {
        match self {
            Self::ReadStreams => "watch session streams (SSE), get stream tickets",
            Self::ReadDevices => "list and inspect devices",
            Self::ReadMembers => "list the organization's members and projects",
            Self::ReadCommands => "list and inspect commands and approvals",
            Self::PairDevices => "preview and confirm pairing codes",
            Self::ManageDevices => "rename and delete devices",
            Self::SendCommands => "propose commands for devices",
            Self::DecideApprovals => "approve or deny RED commands",
            Self::ManageMembers => "add members, change roles, remove members, create projects",
            Self::ManagePolicies => "edit the tenant's policies",
            Self::ReadAudit => "read and verify the audit trail",
            Self::ReadPii => "see unmasked personal data",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadStreams => "read_streams",
            Self::ReadDevices => "read_devices",
            Self::ReadMembers => "read_members",
            Self::ReadCommands => "read_commands",
            Self::PairDevices => "pair_devices",
            Self::ManageDevices => "manage_devices",
            Self::SendCommands => "send_commands",
            Self::DecideApprovals => "decide_approvals",
            Self::ManageMembers => "manage_members",
            Self::ManagePolicies => "manage_policies",
            Self::ReadAudit => "read_audit",
            Self::ReadPii => "read_pii",
        }
    }
}

/// The role × permission table as Markdown, generated from [`Role::allows`] so the docs
/// (`docs/PERMISSIONS.md`) cannot drift from the code (a test compares them).
pub fn permission_table_markdown() -> String {
    let mut out = String::from(
        "| permission | what it allows | admin | operator | viewer |\n|---|---|:-:|:-:|:-:|\n",
    );
    for p in Permission::ALL {
        let mark = |r: Role| if r.allows(p) { "✓" } else { "—" };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            p.as_str(),
            p.description(),
            mark(Role::Admin),
            mark(Role::Operator),
            mark(Role::Viewer)
        ));
    }
    out
}

/// An email address as the identity key: trimmed and lowercased, so `Ann@X.org` and `ann@x.org`
/// are one account. Only the shape is checked; deliverability is not our business.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub const MAX_LEN: usize = 254;

    pub fn parse(raw: &str) -> Result<Self, ValidationErrors> {
        let email = raw.trim().to_lowercase();
        let valid = email.len() <= Self::MAX_LEN
            && !email.chars().any(|c| c.is_whitespace() || c.is_control())
            && matches!(email.split_once('@'), Some((local, domain))
                if !local.is_empty() && !domain.is_empty() && !domain.contains('@'));
        if !valid {
            return Err(ValidationErrors::single(
                "email",
                "must be an email address like ann@example.com",
            ));
        }
        Ok(Self(email))
    }

    pub fn from_trusted(raw: String) -> Self {
        Self(raw)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What logs and audit entries may show: first letter and domain (`a***@example.com`).
    pub fn masked(&self) -> String {
        match self.0.split_once('@') {
            Some((local, domain)) => {
                let first: String = local.chars().take(1).collect();
                format!("{first}***@{domain}")
            }
            None => "***".into(),
        }
    }
}

impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Email({})", self.masked())
    }
}

/// TOTP second factor state of a user.
#[derive(Clone, PartialEq, Default)]
pub struct TotpState {
    /// Base32 secret; set by setup, kept while enabled.
    pub secret: Option<String>,
    pub enabled: bool,
    /// The last accepted time step; a code for this step or an earlier one is a replay.
    pub last_step: Option<u64>,
}

impl fmt::Debug for TotpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TotpState")
            .field("secret", &self.secret.as_ref().map(|_| "…redacted"))
            .field("enabled", &self.enabled)
            .field("last_step", &self.last_step)
            .finish()
    }
}

#[derive(Clone, PartialEq)]
pub struct User {
    pub id: UserId,
    pub email: Email,
    pub display_name: Option<String>,
    /// PHC string (Argon2id).
    pub password_hash: String,
    pub password_changed_at: Millis,
    pub created_at: Millis,
    pub totp: TotpState,
    /// Consecutive failed logins since the last success (throttling, shared by all replicas).
    pub failed_logins: u32,
    pub last_failed_login_at: Option<Millis>,
    pub disabled: bool,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("id", &self.id)
            .field("email", &self.email)
            .field("totp", &self.totp)
            .field("disabled", &self.disabled)
            .finish_non_exhaustive()
    }
}

/// A member of an organization, as listed.
#[derive(Debug, Clone, PartialEq)]
pub struct Membership {
    pub org: OrgId,
    pub user_id: UserId,
    pub email: Email,
    pub display_name: Option<String>,
    pub role: Role,
    pub created_at: Millis,
}

/// A login session (one refresh-token family). Access tokens name it (`sid`), so ending it
/// ends them at once.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthSession {
    pub id: AuthSessionId,
    pub user_id: UserId,
    pub created_at: Millis,
    pub last_seen_at: Millis,
    /// When the current refresh token expires; refreshing moves it forward.
    pub expires_at: Millis,
    pub revoked_at: Option<Millis>,
    /// Truncated client address (IPv4 /24, IPv6 /48) and user agent at login.
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    /// Whether the login passed a second factor.
    pub mfa: bool,
}

impl AuthSession {
    pub fn is_active(&self, now: Millis) -> bool {
        self.revoked_at.is_none() && now < self.expires_at
    }

    /// Active, and `user`'s (a token or ticket naming another user than its session is void).
    pub fn is_active_for(&self, user: &UserId, now: Millis) -> bool {
        self.user_id == *user && self.is_active(now)
    }
}

/// A one-time ticket that lets a browser's EventSource (which cannot send headers) open one
/// stream: bound to a user, a tenant and a session, valid for a minute.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamTicket {
    pub user_id: UserId,
    pub auth_session: AuthSessionId,
    pub tenant: crate::TenantId,
    pub session_id: crate::SessionId,
    pub expires_at: Millis,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_deny_by_default() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        for p in Permission::ALL {
            assert!(Role::Admin.allows(p));
        }
        assert!(Role::Operator.allows(Permission::DecideApprovals));
        assert!(!Role::Operator.allows(Permission::ManageMembers));
        assert!(!Role::Operator.allows(Permission::ReadAudit));
        assert!(!Role::Operator.allows(Permission::ManageDevices));
        assert!(Role::Viewer.allows(Permission::ReadStreams));
        assert!(!Role::Viewer.allows(Permission::PairDevices));
        assert!(!Role::Viewer.allows(Permission::SendCommands));
        // A lower role never has a permission a higher one lacks.
        for p in Permission::ALL {
            assert!(!Role::Viewer.allows(p) || Role::Operator.allows(p));
        }
    }

    #[test]
    fn the_permission_docs_match_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/PERMISSIONS.md");
        let docs = std::fs::read_to_string(path).unwrap();
        let table = permission_table_markdown();
        assert!(
            docs.contains(&table),
            "docs/PERMISSIONS.md is out of date; paste this table between the role markers:\n{table}"
        );
    }

    #[test]
    fn emails_normalise_and_mask() {
        let e = Email::parse("  Ann.Lee@Example.ORG ").unwrap();
        assert_eq!(e.as_str(), "ann.lee@example.org");
        assert_eq!(e.masked(), "a***@example.org");
        assert!(!format!("{e:?}").contains("ann.lee"));
        for bad in ["", "ann", "@x.org", "ann@", "a b@x.org", "a@b@c"] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn slugs_and_ids() {
        assert!(OrgId::parse("org", "acme-1").is_ok());
        assert!(OrgId::parse("org", "a:b").is_err());
        let u = UserId::generate();
        assert!(u.as_str().starts_with("usr_"));
        assert!(AuthSessionId::parse("sid", u.as_str()).is_err());
    }
}
