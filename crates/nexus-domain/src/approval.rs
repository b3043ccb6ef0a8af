//! Commands proposed by users and the two-phase commit for risky ones (DESIGN.md §7, checklist
//! §8): the tenant's risk policy classifies a command; RED (and, if the policy says so, YELLOW)
//! commands wait for a human decision that expires; an approved RED command reaches its device
//! with an Ed25519 signature over exactly what was approved, so a row written into the database by
//! anyone else can never run.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::command::Risk;
use crate::identity::UserId;
use crate::ids::{CommandId, DeviceId, SessionId, prefixed_id};
use crate::tenant::TenantId;
use crate::time::Millis;
use crate::validation::{FieldError, ValidationErrors};

prefixed_id!(
    /// A pending (or decided) approval of a risky command.
    ApprovalId, "apr_"
);

/// Where a command is in its life. Transitions only go forward (see [`CommandStatus::can_become`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    PendingApproval,
    Queued,
    Delivered,
    Acked,
    Succeeded,
    Failed,
    Denied,
    Expired,
    Cancelled,
    DeliveryTimedOut,
    ExecutionTimedOut,
}

impl CommandStatus {
    pub const ALL: [CommandStatus; 11] = [
        Self::PendingApproval,
        Self::Queued,
        Self::Delivered,
        Self::Acked,
        Self::Succeeded,
        Self::Failed,
        Self::Denied,
        Self::Expired,
        Self::Cancelled,
        Self::DeliveryTimedOut,
        Self::ExecutionTimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PendingApproval => "pending_approval",
            Self::Queued => "queued",
            Self::Delivered => "delivered",
            Self::Acked => "acked",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Denied => "denied",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
            Self::DeliveryTimedOut => "delivery_timed_out",
            Self::ExecutionTimedOut => "execution_timed_out",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            Self::PendingApproval | Self::Queued | Self::Delivered | Self::Acked
        )
    }

    /// The state machine: `pending_approval → queued → delivered → acked → succeeded|failed`,
    /// with `denied`/`expired` from pending, `cancelled` before delivery, and the two timeouts.
    pub fn can_become(self, next: CommandStatus) -> bool {
        use CommandStatus::*;
        matches!(
            (self, next),
            (PendingApproval, Queued | Denied | Expired | Cancelled)
                | (Queued, Delivered | Cancelled | DeliveryTimedOut)
                // A device that pulls again before acking gets the command again (next attempt).
                | (Delivered, Delivered | Acked | Succeeded | Failed | ExecutionTimedOut)
                | (Acked, Succeeded | Failed | ExecutionTimedOut)
        )
    }
}

impl fmt::Display for CommandStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    Pending,
    Approved,
    Denied,
    Expired,
}

impl ApprovalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Expired => "expired",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "pending" => Some(Self::Pending),
            "approved" => Some(Self::Approved),
            "denied" => Some(Self::Denied),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }
}

/// One rule of a tenant's risk table: a command type (`fs.read`) or a prefix (`fs.*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RiskRule {
    pub pattern: String,
    pub risk: Risk,
}

/// A tenant's command policy (editable by its admins through `GET/PUT /policy`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CommandPolicySettings {
    pub rules: Vec<RiskRule>,
    /// YELLOW commands wait for approval too (otherwise they run with a warning report).
    #[serde(default)]
    pub yellow_requires_approval: bool,
    /// How long an approval stays open before it expires (auto-deny).
    #[serde(default = "default_approval_ttl")]
    pub approval_ttl_secs: u64,
    /// Four eyes: the requester cannot approve their own command.
    #[serde(default)]
    pub require_distinct_approver: bool,
    /// A queued command not delivered within this time becomes `delivery_timed_out`.
    #[serde(default = "default_delivery_ttl")]
    pub delivery_ttl_secs: u64,
    /// A delivered command not finished within this time becomes `execution_timed_out`.
    #[serde(default = "default_execution_ttl")]
    pub execution_timeout_secs: u64,
}

fn default_approval_ttl() -> u64 {
    300
}
fn default_delivery_ttl() -> u64 {
    3600
}
fn default_execution_ttl() -> u64 {
    600
}

pub const MAX_RULES: usize = 500;

impl Default for CommandPolicySettings {
    fn default() -> Self {
        use Risk::*;
        let rule = |pattern: &str, risk| RiskRule {
            pattern: pattern.into(),
            risk,
        };
        Self {
            rules: vec![
                rule("fs.read", Green),
                rule("fs.list", Green),
                rule("system.say", Green),
                rule("system.info", Green),
                rule("fs.write", Yellow),
                rule("os.open_url", Yellow),
                rule("os.open_app", Yellow),
                rule("fs.delete", Red),
                rule("system.settings.*", Red),
                rule("shell.exec", Red),
                rule("external_share.*", Red),
                rule("email.send", Red),
            ],
            yellow_requires_approval: false,
            approval_ttl_secs: default_approval_ttl(),
            require_distinct_approver: false,
            delivery_ttl_secs: default_delivery_ttl(),
            execution_timeout_secs: default_execution_ttl(),
        }
    }
}

impl CommandPolicySettings {
    /// An exact rule wins; otherwise the longest matching prefix rule; an unknown type is RED.
    pub fn classify(&self, command_type: &str) -> Risk {
        if let Some(rule) = self.rules.iter().find(|r| r.pattern == command_type) {
            return rule.risk;
        }
        self.rules
            .iter()
            .filter_map(|r| {
                let prefix = r.pattern.strip_suffix('*')?;
                command_type
                    .starts_with(prefix)
                    .then_some((prefix.len(), r.risk))
            })
            .max_by_key(|(len, _)| *len)
            .map_or(Risk::Red, |(_, risk)| risk)
    }

    pub fn needs_approval(&self, risk: Risk) -> bool {
        match risk {
            Risk::Red => true,
            Risk::Yellow => self.yellow_requires_approval,
            Risk::Green => false,
        }
    }

    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        if self.rules.len() > MAX_RULES {
            errors.push(FieldError::new(
                "rules",
                format!("at most {MAX_RULES} rules"),
            ));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let body = rule.pattern.strip_suffix(".*").unwrap_or(&rule.pattern);
            if !crate::command::valid_command_type(body) || body.contains('*') {
                errors.push(FieldError::new(
                    format!("rules[{i}].pattern"),
                    "must be a command type like fs.read or a prefix like fs.*",
                ));
            }
        }
        for (field, value, max) in [
            ("approval_ttl_secs", self.approval_ttl_secs, 7 * 24 * 3600),
            ("delivery_ttl_secs", self.delivery_ttl_secs, 30 * 24 * 3600),
            (
                "execution_timeout_secs",
                self.execution_timeout_secs,
                7 * 24 * 3600,
            ),
        ] {
            if value == 0 || value > max {
                errors.push(FieldError::new(
                    field,
                    format!("must be 1 to {max} seconds"),
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(errors))
        }
    }
}

/// The server's record of a proposed command.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRecord {
    pub id: CommandId,
    pub tenant: TenantId,
    pub device_id: DeviceId,
    pub command_type: String,
    pub params: Value,
    pub risk: Risk,
    pub status: CommandStatus,
    /// Where its progress is reported (the given session, or `device:<device id>`).
    pub session_id: SessionId,
    pub correlation_id: String,
    pub requested_by: UserId,
    pub requested_at: Millis,
    /// SHA-256 of the proposal body: the same id with a different body is a conflict.
    pub request_hash: String,
    pub approval_id: Option<ApprovalId>,
    /// The expired command this one re-proposes.
    pub replaces: Option<CommandId>,
    /// Deliveries so far; an ack must name the current one.
    pub attempt: u32,
    pub updated_at: Millis,
    /// Deadline of the current state (delivery or execution); `None` when it has none.
    pub deadline: Option<Millis>,
    pub result: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Approval {
    pub id: ApprovalId,
    pub tenant: TenantId,
    pub command_id: CommandId,
    pub device_id: DeviceId,
    pub command_type: String,
    pub risk: Risk,
    /// `shell.exec on dev_…`, for lists.
    pub summary: String,
    pub requested_by: UserId,
    pub requested_at: Millis,
    pub expires_at: Millis,
    pub status: ApprovalStatus,
    pub decided_by: Option<UserId>,
    pub decided_at: Option<Millis>,
    pub reason: Option<String>,
}

/// What an approved RED command carries to its device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApprovalGrant {
    #[schema(value_type = String)]
    pub approval_id: ApprovalId,
    #[schema(value_type = String)]
    pub approved_by: UserId,
    /// RFC 3339.
    pub approved_at: String,
    /// RFC 3339: the device refuses to run it later than this.
    pub expires_at: String,
    /// `kid` of the server key that signed (its public key is in `/.well-known/jwks.json` and
    /// was given to the device at pairing).
    pub kid: String,
    /// base64url Ed25519 signature over [`approval_signing_input`].
    pub signature: String,
}

/// The exact bytes an approval signature covers: canonical JSON (sorted keys, no spaces) of the
/// command id, device id, type, params, approval id and expiry. The agent recomputes it from the
/// command it received, so changing any of them breaks the signature.
pub fn approval_signing_input(
    command_id: &CommandId,
    device_id: &DeviceId,
    command_type: &str,
    params: &Value,
    approval_id: &ApprovalId,
    expires_at: &str,
) -> Vec<u8> {
    let body = serde_json::json!({
        "approval_id": approval_id.as_str(),
        "command_id": command_id.as_str(),
        "device_id": device_id.as_str(),
        "expires_at": expires_at,
        "params": params,
        "type": command_type,
    });
    format!(
        "nexus-approval-v1\n{}",
        crate::canonical::to_canonical(&body)
    )
    .into_bytes()
}

/// SHA-256 (hex) of a proposal body, for idempotency checks.
pub fn request_hash(
    device_id: &DeviceId,
    command_type: &str,
    params: &Value,
    session: Option<&str>,
) -> String {
    let body = serde_json::json!({
        "device_id": device_id.as_str(),
        "type": command_type,
        "params": params,
        "session_id": session,
    });
    crate::canonical::sha256_hex(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_classifies_as_the_issue_says() {
        let p = CommandPolicySettings::default();
        for (t, r) in [
            ("fs.read", Risk::Green),
            ("fs.list", Risk::Green),
            ("system.say", Risk::Green),
            ("system.info", Risk::Green),
            ("fs.write", Risk::Yellow),
            ("os.open_url", Risk::Yellow),
            ("os.open_app", Risk::Yellow),
            ("fs.delete", Risk::Red),
            ("system.settings.display", Risk::Red),
            ("shell.exec", Risk::Red),
            ("external_share.drive", Risk::Red),
            ("email.send", Risk::Red),
            ("never.heard.of", Risk::Red),
        ] {
            assert_eq!(p.classify(t), r, "{t}");
        }
        assert!(p.needs_approval(Risk::Red) && !p.needs_approval(Risk::Yellow));
    }

    #[test]
    fn exact_beats_prefix_and_longest_prefix_wins() {
        let p = CommandPolicySettings {
            rules: vec![
                RiskRule {
                    pattern: "fs.*".into(),
                    risk: Risk::Yellow,
                },
                RiskRule {
                    pattern: "fs.tmp.*".into(),
                    risk: Risk::Green,
                },
                RiskRule {
                    pattern: "fs.tmp.wipe".into(),
                    risk: Risk::Red,
                },
            ],
            ..CommandPolicySettings::default()
        };
        assert_eq!(p.classify("fs.write"), Risk::Yellow);
        assert_eq!(p.classify("fs.tmp.read"), Risk::Green);
        assert_eq!(p.classify("fs.tmp.wipe"), Risk::Red);
        assert!(p.validate().is_ok());
        let bad = CommandPolicySettings {
            rules: vec![RiskRule {
                pattern: "f*s".into(),
                risk: Risk::Green,
            }],
            approval_ttl_secs: 0,
            ..CommandPolicySettings::default()
        };
        assert_eq!(bad.validate().unwrap_err().0.len(), 2);
    }

    #[test]
    fn the_state_machine_only_goes_forward() {
        use CommandStatus::*;
        assert!(PendingApproval.can_become(Queued));
        assert!(!PendingApproval.can_become(Delivered));
        assert!(Queued.can_become(Cancelled));
        assert!(!Delivered.can_become(Cancelled));
        assert!(!Denied.can_become(Queued));
        assert!(!Expired.can_become(Queued));
        for s in CommandStatus::ALL {
            assert_eq!(CommandStatus::parse(s.as_str()), Some(s));
            if s.is_terminal() {
                assert!(CommandStatus::ALL.iter().all(|n| !s.can_become(*n)));
            }
        }
    }

    #[test]
    fn signing_input_covers_every_field() {
        let (c, d, a) = (
            CommandId::generate(),
            DeviceId::generate(),
            ApprovalId::generate(),
        );
        let params = serde_json::json!({"b": 1, "a": "x"});
        let base =
            approval_signing_input(&c, &d, "shell.exec", &params, &a, "2026-01-01T00:00:00Z");
        let reordered = serde_json::json!({"a": "x", "b": 1});
        assert_eq!(
            base,
            approval_signing_input(&c, &d, "shell.exec", &reordered, &a, "2026-01-01T00:00:00Z")
        );
        assert_ne!(
            base,
            approval_signing_input(
                &c,
                &d,
                "shell.exec",
                &serde_json::json!({"b": 2, "a": "x"}),
                &a,
                "2026-01-01T00:00:00Z"
            )
        );
        assert_ne!(
            base,
            approval_signing_input(&c, &d, "fs.delete", &params, &a, "2026-01-01T00:00:00Z")
        );
        assert_ne!(
            base,
            approval_signing_input(&c, &d, "shell.exec", &params, &a, "2026-01-01T00:00:01Z")
        );
    }
}
