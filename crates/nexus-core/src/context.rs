//! Who is asking and from where: the request facts services need for audit entries and
//! throttling, gathered once by the transport.

use std::net::IpAddr;

use nexus_domain::audit::{Actor, AuditRecord, AuditResult, AuditScope, AuditTarget};
use nexus_domain::time::Millis;

/// Longest user agent kept in an audit entry.
const MAX_USER_AGENT: usize = 256;

#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub correlation_id: Option<String>,
}

impl RequestMeta {
    /// The client address as audit entries keep it (IPv4 /24, IPv6 /48): enough to tell networks
    /// apart, not enough to identify a person.
    pub fn truncated_ip(&self) -> Option<String> {
        self.ip.map(nexus_auth::ip::truncate_ip)
    }

    /// An audit record of this request; `details` must hold no secrets or raw emails.
    // Each argument is one field of the record, named at the call site by its type; a builder
    // would only spread the same fields over more lines.
    #[allow(clippy::too_many_arguments)]
    pub fn audit(
        &self,
        scope: AuditScope,
        now: Millis,
        actor: Actor,
        action: &str,
        target: Option<AuditTarget>,
        result: AuditResult,
        details: serde_json::Value,
    ) -> AuditRecord {
        AuditRecord {
            scope,
            ts: now,
            actor,
            action: action.to_owned(),
            target,
            result,
            ip: self.truncated_ip(),
            user_agent: self
                .user_agent
                .as_ref()
                .map(|ua| ua.chars().take(MAX_USER_AGENT).collect()),
            correlation_id: self.correlation_id.clone(),
            details,
        }
    }
}
