//! Domain objects as the API shows them.

use nexus_api::{
    AuditEntryView, MemberView, OrgMembershipView, ProjectView, SessionView, UserView,
};
use nexus_domain::audit::AuditEntry;
use nexus_domain::time::rfc3339;
use nexus_domain::{AuthSession, AuthSessionId, Membership, OrgId, Project, Role, User};

pub fn user(user: &User, orgs: &[(OrgId, Role)]) -> UserView {
    UserView {
        user_id: user.id.to_string(),
        email: user.email.as_str().to_owned(),
        display_name: user.display_name.clone(),
        mfa_enabled: user.totp.enabled,
        created_at: rfc3339(user.created_at),
        orgs: orgs
            .iter()
            .map(|(org, role)| OrgMembershipView {
                org_id: org.to_string(),
                role: *role,
            })
            .collect(),
    }
}

pub fn session(session: &AuthSession, current: &AuthSessionId) -> SessionView {
    SessionView {
        session_id: session.id.to_string(),
        created_at: rfc3339(session.created_at),
        last_seen_at: rfc3339(session.last_seen_at),
        expires_at: rfc3339(session.expires_at),
        ip: session.ip.clone(),
        user_agent: session.user_agent.clone(),
        mfa: session.mfa,
        current: &session.id == current,
    }
}

pub fn project(project: &Project) -> ProjectView {
    ProjectView {
        org_id: project.org.to_string(),
        project_id: project.id.to_string(),
        name: project.name.clone(),
        tenant: project.tenant().to_string(),
        created_at: rfc3339(project.created_at),
    }
}

pub fn member(member: &Membership) -> MemberView {
    MemberView {
        user_id: member.user_id.to_string(),
        email: member.email.as_str().to_owned(),
        display_name: member.display_name.clone(),
        role: member.role,
        added_at: rfc3339(member.created_at),
    }
}

pub fn audit_entry(entry: &AuditEntry) -> AuditEntryView {
    let r = &entry.record;
    AuditEntryView {
        id: entry.id.clone(),
        seq: entry.seq,
        ts: rfc3339(r.ts),
        tenant_id: r.scope.key(),
        actor: r.actor.clone(),
        action: r.action.clone(),
        target: r.target.clone(),
        result: r.result,
        ip: r.ip.clone(),
        user_agent: r.user_agent.clone(),
        correlation_id: r.correlation_id.clone(),
        details: r.details.clone(),
        prev_hash: entry.prev_hash.clone(),
        hash: entry.hash.clone(),
    }
}
