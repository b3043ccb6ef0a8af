//! The audit trail: append-only entries, each chained to the previous entry of its scope by a
//! SHA-256 hash over a canonical form, so editing, deleting or reordering a stored entry breaks
//! the chain at that point and `verify_chain` names it. Both stores compute hashes with the
//! functions here, so a chain written by one backend verifies the same way everywhere.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::identity::OrgId;
use crate::tenant::TenantId;
use crate::time::Millis;

/// The hash a chain starts from.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Which chain an entry belongs to, and who may read it: a tenant's actions (devices, pairing,
/// commands), an organization's (members, projects, and its members' sign-ins), or the system's
/// (sign-in attempts for unknown accounts, command-line administration).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AuditScope {
    Tenant(TenantId),
    Org(OrgId),
    System,
}

impl AuditScope {
    /// Stored form: `org:project`, `org:*`, `*`. None of these collide (tenant parts cannot
    /// contain `*`).
    pub fn key(&self) -> String {
        match self {
            Self::Tenant(t) => t.to_string(),
            Self::Org(o) => format!("{o}:*"),
            Self::System => "*".into(),
        }
    }

    pub fn parse_key(key: &str) -> Option<Self> {
        if key == "*" {
            return Some(Self::System);
        }
        if let Some(org) = key.strip_suffix(":*") {
            return OrgId::parse("org", org).ok().map(Self::Org);
        }
        TenantId::parse_joined(key).ok().map(Self::Tenant)
    }
}

impl fmt::Display for AuditScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActorType {
    User,
    Device,
    System,
}

impl ActorType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Device => "device",
            Self::System => "system",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "user" => Some(Self::User),
            "device" => Some(Self::Device),
            "system" => Some(Self::System),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Actor {
    #[serde(rename = "type")]
    pub kind: ActorType,
    /// User or device id; `nexus` for the system; for a failed sign-in of an unknown account
    /// the masked email.
    pub id: String,
}

impl Actor {
    pub fn user(id: &crate::identity::UserId) -> Self {
        Self {
            kind: ActorType::User,
            id: id.to_string(),
        }
    }

    pub fn device(id: &crate::DeviceId) -> Self {
        Self {
            kind: ActorType::Device,
            id: id.to_string(),
        }
    }

    pub fn system() -> Self {
        Self {
            kind: ActorType::System,
            id: "nexus".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditTarget {
    /// `user`, `device`, `pairing`, `session`, `org`, `project`, `member`, `command`, ...
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
}

impl AuditTarget {
    pub fn new(kind: &str, id: impl fmt::Display) -> Self {
        Self {
            kind: kind.into(),
            id: id.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuditResult {
    Success,
    Failure,
    Denied,
}

impl AuditResult {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Denied => "denied",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "success" => Some(Self::Success),
            "failure" => Some(Self::Failure),
            "denied" => Some(Self::Denied),
            _ => None,
        }
    }
}

/// What a service records. It never holds passwords, tokens or raw emails: `ip` is already
/// truncated (IPv4 /24, IPv6 /48) and `details` carries only ids and outcomes.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub scope: AuditScope,
    pub ts: Millis,
    pub actor: Actor,
    /// Dotted, stable: `auth.login`, `auth.logout`, `auth.refresh_reuse`, `pairing.confirm`, ...
    pub action: String,
    pub target: Option<AuditTarget>,
    pub result: AuditResult,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub correlation_id: Option<String>,
    pub details: Value,
}

/// A stored entry: the record plus its place in its scope's chain.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// `aud_` + ULID.
    pub id: String,
    /// 1, 2, 3, … within the scope.
    pub seq: u64,
    pub record: AuditRecord,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditEntry {
    /// Chains `record` after an entry with `prev_hash` at position `seq`.
    pub fn chain(record: AuditRecord, seq: u64, prev_hash: &str) -> Self {
        let id = format!("aud_{}", ulid::Ulid::new().to_string().to_ascii_lowercase());
        let hash = entry_hash(&id, seq, &record, prev_hash);
        Self {
            id,
            seq,
            record,
            prev_hash: prev_hash.to_owned(),
            hash,
        }
    }
}

/// SHA-256 over the canonical JSON of every field (keys sorted at every level, so a database that
/// reorders JSON object keys, as PostgreSQL's jsonb does, still verifies).
pub fn entry_hash(id: &str, seq: u64, record: &AuditRecord, prev_hash: &str) -> String {
    let body = serde_json::json!({
        "id": id,
        "seq": seq,
        "scope": record.scope.key(),
        "ts": record.ts,
        "actor": {"type": record.actor.kind.as_str(), "id": record.actor.id},
        "action": record.action,
        "target": record.target.as_ref().map(|t| serde_json::json!({"type": t.kind, "id": t.id})),
        "result": record.result.as_str(),
        "ip": record.ip,
        "user_agent": record.user_agent,
        "correlation_id": record.correlation_id,
        "details": record.details,
        "prev_hash": prev_hash,
    });
    crate::canonical::sha256_hex(&body)
}

/// The first place a chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BrokenLink {
    pub seq: u64,
    pub entry_id: String,
    /// `hash_mismatch` (the entry was edited), `prev_mismatch` (an entry before it was removed
    /// or replaced), `seq_gap` (entries missing or reordered).
    pub reason: String,
}

/// Walks one scope's entries in `seq` order, continuing from `(last_seq, last_hash)` (use
/// `(0, GENESIS_HASH)` from the start), and returns the new position or the first broken link.
pub fn verify_chain<'a>(
    entries: impl IntoIterator<Item = &'a AuditEntry>,
    from: (u64, String),
) -> Result<(u64, String), BrokenLink> {
    let (mut last_seq, mut last_hash) = from;
    for entry in entries {
        let broken = |reason: &str| BrokenLink {
            seq: entry.seq,
            entry_id: entry.id.clone(),
            reason: reason.into(),
        };
        if entry.seq != last_seq + 1 {
            return Err(broken("seq_gap"));
        }
        if entry.prev_hash != last_hash {
            return Err(broken("prev_mismatch"));
        }
        if entry_hash(&entry.id, entry.seq, &entry.record, &entry.prev_hash) != entry.hash {
            return Err(broken("hash_mismatch"));
        }
        last_seq = entry.seq;
        last_hash = entry.hash.clone();
    }
    Ok((last_seq, last_hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(action: &str, details: Value) -> AuditRecord {
        AuditRecord {
            scope: AuditScope::Tenant(TenantId::parse("acme", "web").unwrap()),
            ts: 1_700_000_000_000,
            actor: Actor::system(),
            action: action.into(),
            target: Some(AuditTarget::new("device", "dev_1")),
            result: AuditResult::Success,
            ip: Some("203.0.113.0/24".into()),
            user_agent: None,
            correlation_id: Some("c1".into()),
            details,
        }
    }

    fn chain(n: u64) -> Vec<AuditEntry> {
        let mut prev = GENESIS_HASH.to_owned();
        (1..=n)
            .map(|seq| {
                let e = AuditEntry::chain(
                    record(
                        "device.delete",
                        serde_json::json!({"n": seq, "a": [1, {"z": 1, "b": 2}]}),
                    ),
                    seq,
                    &prev,
                );
                prev = e.hash.clone();
                e
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies() {
        let entries = chain(5);
        let (seq, hash) = verify_chain(&entries, (0, GENESIS_HASH.into())).unwrap();
        assert_eq!(seq, 5);
        assert_eq!(hash, entries[4].hash);
        // Resuming from the middle gives the same end.
        let resumed = verify_chain(&entries[2..], (2, entries[1].hash.clone())).unwrap();
        assert_eq!(resumed, (seq, hash));
    }

    #[test]
    fn key_order_does_not_matter() {
        let a = record("x", serde_json::json!({"b": 1, "a": {"d": 2, "c": 3}}));
        let b = record("x", serde_json::json!({"a": {"c": 3, "d": 2}, "b": 1}));
        assert_eq!(
            entry_hash("aud_1", 1, &a, GENESIS_HASH),
            entry_hash("aud_1", 1, &b, GENESIS_HASH)
        );
    }

    #[test]
    fn edits_removals_and_reorders_are_found() {
        let mut edited = chain(4);
        edited[2].record.result = AuditResult::Failure;
        let broken = verify_chain(&edited, (0, GENESIS_HASH.into())).unwrap_err();
        assert_eq!((broken.seq, broken.reason.as_str()), (3, "hash_mismatch"));

        let mut removed = chain(4);
        removed.remove(1);
        let broken = verify_chain(&removed, (0, GENESIS_HASH.into())).unwrap_err();
        assert_eq!((broken.seq, broken.reason.as_str()), (3, "seq_gap"));

        // Re-numbered after a removal: the hash link still breaks.
        let mut renumbered = chain(4);
        renumbered.remove(1);
        for (i, e) in renumbered.iter_mut().enumerate() {
            e.seq = i as u64 + 1;
        }
        let broken = verify_chain(&renumbered, (0, GENESIS_HASH.into())).unwrap_err();
        assert_eq!(broken.seq, 2);
    }

    #[test]
    fn scope_keys_round_trip() {
        for scope in [
            AuditScope::System,
            AuditScope::Org(OrgId::parse("o", "acme").unwrap()),
            AuditScope::Tenant(TenantId::parse("acme", "web").unwrap()),
        ] {
            assert_eq!(AuditScope::parse_key(&scope.key()), Some(scope));
        }
    }
}
