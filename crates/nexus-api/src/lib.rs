//! Wire types of the NEXUS HTTP API, shared by the server (which documents them in OpenAPI),
//! the agent and the tests, so all three agree on one definition.

use nexus_domain::command::{DeviceCommand, Risk};
use nexus_domain::report::{AgentReport, ApprovalLevel};
use nexus_domain::{DeviceStatus, FieldError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

fn default_device_type() -> String {
    "windows_companion".to_owned()
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

/// RFC 9457 problem details, as every error is answered.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable, snake_case; branch on this, not on `detail`.
    pub code: String,
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StartPairingRequest {
    pub device_name: String,
    #[serde(default = "default_device_type")]
    pub device_type: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StartPairingResponse {
    pub pairing_id: String,
    /// Six digits `ddd-ddd`, shown to the user, valid for 5 minutes.
    pub pairing_code: String,
    /// Keep secret on the device; needed to complete the pairing.
    pub device_nonce: String,
    /// RFC 3339 UTC.
    pub expires_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConfirmByCodeRequest {
    pub pairing_code: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConfirmByCodeResponse {
    pub device_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletePairingRequest {
    pub pairing_id: String,
    pub device_nonce: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletePairingResponse {
    pub device_id: String,
    /// Bearer token for every device endpoint. Returned exactly once.
    pub device_token: String,
    pub token_type: String,
    /// `org:project`.
    pub tenant: String,
    pub org_id: String,
    pub project_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatRequest {
    /// `online` or `offline`.
    pub status: String,
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub metrics: Value,
    #[serde(default)]
    pub agent_version: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatResponse {
    pub ok: bool,
    /// How often the server expects heartbeats.
    pub heartbeat_interval_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OkResponse {
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommandsResponse {
    pub commands: Vec<DeviceCommand>,
    /// Pass back as `cursor` to get only newer commands.
    pub next_cursor: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AckRequest {
    /// When the device received the command (RFC 3339).
    #[serde(default)]
    pub received_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PushReportsRequest {
    /// At most 100 reports; all or nothing.
    #[schema(value_type = Vec<AgentReport>)]
    pub reports: Vec<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PushReportsResponse {
    pub accepted: bool,
    pub count: usize,
    /// One per report, in request order; a repeated report id returns its existing event id.
    pub event_ids: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EmitReportRequest {
    pub session_id: String,
    #[serde(default)]
    pub approval_level: ApprovalLevel,
    pub text: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EmitReportResponse {
    pub accepted: bool,
    pub event_id: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnqueueCommandRequest {
    pub device_id: String,
    #[serde(rename = "type")]
    pub command_type: String,
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub params: Value,
    /// Defaults to RED: an unclassified command never runs without approval.
    #[serde(default)]
    pub risk: Option<Risk>,
    #[serde(default)]
    pub session_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceView {
    pub device_id: String,
    pub device_name: String,
    pub device_type: String,
    pub capabilities: Vec<String>,
    pub status: DeviceStatus,
    pub paired_at: String,
    pub last_heartbeat_at: Option<String>,
    pub agent_version: Option<String>,
    #[schema(value_type = Object)]
    pub metrics: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DevicesResponse {
    pub tenant: String,
    pub devices: Vec<DeviceView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// `ok`, `draining` or `unavailable`.
    pub status: String,
    pub version: String,
}
