//! Wire types of the NEXUS HTTP API, shared by the server (which documents them in OpenAPI),
//! the agent and the tests, so all three agree on one definition.

use nexus_domain::approval::{ApprovalStatus, CommandStatus};
use nexus_domain::audit::{Actor, AuditResult, AuditTarget, BrokenLink};
use nexus_domain::command::DeviceCommand;
use nexus_domain::report::{AgentReport, ApprovalLevel};
use nexus_domain::{DeviceStatus, FieldError, Role};
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
    /// Shown to the confirming user in the preview.
    #[serde(default)]
    pub agent_version: Option<String>,
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
    /// Show this next to the code; the user compares it with the preview (`ABCD-1234`).
    pub fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PairingPreviewResponse {
    pub pairing_id: String,
    pub device_name: String,
    pub device_type: String,
    pub capabilities: Vec<String>,
    pub agent_version: Option<String>,
    /// The address the device called from when it started pairing.
    pub client_ip: Option<String>,
    /// When the device started pairing (RFC 3339).
    pub requested_at: String,
    pub expires_at: String,
    pub fingerprint: String,
    /// `pending` or `confirmed`.
    pub state: String,
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
    /// When `device_token` stops working (RFC 3339); refresh before.
    pub expires_at: String,
    /// Trade it at `POST /devices/token/refresh` for a new pair; single use.
    pub refresh_token: String,
    pub refresh_expires_at: String,
    /// The server's public keys (JWK Set): approved RED commands carry a signature by one of
    /// them, which the device checks before running the command.
    #[schema(value_type = Object)]
    pub server_keys: Value,
    /// `org:project`.
    pub tenant: String,
    pub org_id: String,
    pub project_id: String,
}

/// `GET /.well-known/nexus-server-keys.json`: the signing keys with endorsements, so a device
/// that pinned an older key at pairing can adopt keys added since (`nexus admin keys rotate`)
/// without trusting the answer itself.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerKeysResponse {
    /// The public keys, newest (signing) first, as JWKs (the `keys` of `/.well-known/jwks.json`).
    #[schema(value_type = Vec<Object>)]
    pub keys: Vec<Value>,
    /// Every key signed by every older key still in the ring.
    pub endorsements: Vec<KeyEndorsementView>,
}

/// Key `kid` endorsed by key `signed_by`: an Ed25519 signature (base64url) over
/// `"nexus-key-endorsement-v1\n" + kid + "\n" + x`, where `x` is the endorsed JWK's `x`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyEndorsementView {
    pub kid: String,
    pub signed_by: String,
    pub signature: String,
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
    /// The delivery being acknowledged (`attempt` of the pulled command); 1 if omitted. An ack
    /// for an older delivery than the latest is refused (409 `stale_attempt`).
    #[serde(default)]
    pub attempt: Option<u32>,
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

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceTokenRefreshRequest {
    pub device_id: String,
    pub refresh_token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceTokenRefreshResponse {
    pub device_id: String,
    pub device_token: String,
    pub token_type: String,
    pub expires_at: String,
    pub refresh_token: String,
    pub refresh_expires_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RenameDeviceRequest {
    pub name: String,
}

// --- identity ------------------------------------------------------------------------------

#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
    /// Six-digit TOTP code or a recovery code, when the account has two-factor authentication.
    #[serde(default)]
    pub totp_code: Option<String>,
}

impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginRequest { .. redacted }")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OrgMembershipView {
    pub org_id: String,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub user_id: String,
    pub email: String,
    pub display_name: Option<String>,
    pub mfa_enabled: bool,
    pub created_at: String,
    #[serde(default)]
    pub orgs: Vec<OrgMembershipView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    /// Ed25519-signed JWT (`kid` header; keys at `/.well-known/jwks.json`).
    pub access_token: String,
    pub token_type: String,
    /// Seconds (900).
    pub expires_in: u64,
    /// Opaque `nxr_…`, single use: every refresh returns a new one.
    pub refresh_token: String,
    /// Seconds (604800).
    pub refresh_expires_in: u64,
    pub session_id: String,
    pub user: UserView,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    pub session_id: String,
    pub created_at: String,
    pub last_seen_at: String,
    pub expires_at: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub mfa: bool,
    /// The session this request was made with.
    pub current: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionsResponse {
    pub sessions: Vec<SessionView>,
}

#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct ChangePasswordRequest {
    pub current_password: String,
    pub new_password: String,
}

impl std::fmt::Debug for ChangePasswordRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChangePasswordRequest { .. redacted }")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TotpSetupResponse {
    /// Base32, for typing into an authenticator app.
    pub secret: String,
    pub otpauth_uri: String,
    /// The URI as a QR code (SVG document).
    pub qr_svg: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TotpCodeRequest {
    pub code: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RecoveryCodesResponse {
    /// Ten single-use codes, shown this once.
    pub recovery_codes: Vec<String>,
}

#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct TotpDisableRequest {
    pub password: String,
    pub code: String,
}

impl std::fmt::Debug for TotpDisableRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TotpDisableRequest { .. redacted }")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StreamTicketRequest {
    pub session_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StreamTicketResponse {
    /// Pass as `?ticket=` to `/agent/reports/stream` within 60 s; single use.
    pub ticket: String,
    pub expires_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateOrgRequest {
    pub org_id: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OrgView {
    pub org_id: String,
    pub name: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateProjectRequest {
    pub project_id: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProjectView {
    pub org_id: String,
    pub project_id: String,
    pub name: String,
    /// `org:project`.
    pub tenant: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProjectsResponse {
    pub projects: Vec<ProjectView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemberView {
    pub user_id: String,
    pub email: String,
    pub display_name: Option<String>,
    pub role: Role,
    pub added_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MembersResponse {
    pub members: Vec<MemberView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AddMemberRequest {
    pub email: String,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AddMemberResponse {
    pub member: MemberView,
    /// Set when no account existed: a generated password, shown this once; the user should
    /// change it at first sign-in.
    pub initial_password: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UpdateMemberRequest {
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEntryView {
    pub id: String,
    pub seq: u64,
    pub ts: String,
    /// `org:project`, or `org:*` for organization-level entries.
    pub tenant_id: String,
    pub actor: Actor,
    pub action: String,
    pub target: Option<AuditTarget>,
    pub result: AuditResult,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub correlation_id: Option<String>,
    #[schema(value_type = Object)]
    pub details: Value,
    pub prev_hash: String,
    pub hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditLogsResponse {
    pub entries: Vec<AuditEntryView>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditChainView {
    pub tenant_id: String,
    pub entries: u64,
    pub ok: bool,
    pub broken: Option<BrokenLink>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditVerifyResponse {
    pub ok: bool,
    pub chains: Vec<AuditChainView>,
}

// --- commands and approvals ------------------------------------------------------------------

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ProposeClientContext {
    #[serde(default)]
    pub correlation_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProposeCommandRequest {
    /// Your idempotency key (1 to 64 of `[A-Za-z0-9_-]`): repeating the request returns the same
    /// answer; the same id with a different body is 409.
    pub command_id: String,
    #[serde(rename = "type")]
    pub command_type: String,
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub params: Value,
    pub device_id: String,
    /// Where progress is reported (default `device:<device_id>`).
    #[serde(default)]
    pub session_id: Option<String>,
    #[serde(default)]
    pub client_context: ProposeClientContext,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProposeCommandResponse {
    pub accepted: bool,
    pub command_id: String,
    pub correlation_id: String,
    /// `green`, `yellow` or `red`.
    pub risk: String,
    /// `queued` or `pending_approval` (or the current status when the request was repeated).
    pub status: CommandStatus,
    pub approval_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommandView {
    pub command_id: String,
    #[serde(rename = "type")]
    pub command_type: String,
    #[schema(value_type = Object)]
    pub params: Value,
    pub device_id: String,
    pub session_id: String,
    pub correlation_id: String,
    pub risk: String,
    pub status: CommandStatus,
    pub approval_id: Option<String>,
    pub requested_by: String,
    pub requested_at: String,
    pub updated_at: String,
    /// Deadline of the current state (delivery or execution), if any.
    pub deadline: Option<String>,
    pub attempt: u32,
    /// The command this one re-proposes.
    pub replaces: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommandsListResponse {
    pub commands: Vec<CommandView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApprovalView {
    pub approval_id: String,
    pub command_id: String,
    pub device_id: String,
    #[serde(rename = "type")]
    pub command_type: String,
    pub risk: String,
    pub summary: String,
    pub requested_by: String,
    pub requested_at: String,
    pub expires_at: String,
    pub status: ApprovalStatus,
    pub decided_by: Option<String>,
    pub decided_at: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApprovalsResponse {
    pub approvals: Vec<ApprovalView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DecideRequest {
    /// `approve` or `deny`.
    pub decision: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DecideResponse {
    pub accepted: bool,
    pub approval_id: String,
    pub status: ApprovalStatus,
    pub command_id: String,
    pub command_status: CommandStatus,
}
