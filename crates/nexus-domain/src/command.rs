//! Commands queued for devices (the v2 DeviceCommand wire shape) and their risk levels (DESIGN.md §7).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{CommandId, DeviceId};
use crate::tenant::TenantId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Risk {
    Green,
    Yellow,
    Red,
}

impl Risk {
    /// `green`, `yellow` or `red`: how the web API and reports spell it (the device contract
    /// uses the uppercase serde form).
    pub fn lowercase(self) -> &'static str {
        match self {
            Self::Green => "green",
            Self::Yellow => "yellow",
            Self::Red => "red",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CommandPolicy {
    pub risk: Risk,
    pub approval_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClientContext {
    #[serde(default)]
    pub surface: Option<String>,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
}

/// A command as a device receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceCommand {
    #[schema(value_type = String)]
    pub command_id: CommandId,
    #[serde(rename = "type")]
    pub command_type: String,
    #[schema(value_type = Object)]
    pub params: Value,
    #[schema(value_type = Option<Object>)]
    pub context: Value,
    pub client_context: ClientContext,
    pub policy: CommandPolicy,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// This delivery's number (1, 2, …): the ack must name it, so an agent that got an older
    /// delivery cannot complete the command.
    #[serde(default)]
    pub attempt: u32,
    /// RFC 3339: the device skips the command if it would start it after this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_before: Option<String>,
    /// For approved RED commands: who approved and the server's signature over what was approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<crate::approval::ApprovalGrant>,
}

/// What a caller asks to enqueue; the store assigns order and time.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCommand {
    pub id: CommandId,
    pub tenant: TenantId,
    pub device_id: DeviceId,
    pub command: DeviceCommand,
}

/// Command types are short dotted names like `fs.read` or `shell.exec`.
pub fn valid_command_type(raw: &str) -> bool {
    !raw.is_empty()
        && raw.len() <= 64
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
