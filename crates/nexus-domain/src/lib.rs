//! The NEXUS domain: the vocabulary every other crate speaks (tenants, ids, reports, commands,
//! pairing, secrets) and the rules that hold regardless of transport or storage. No I/O lives here,
//! so everything in this crate is unit-testable and shared by the server, the stores and the agent.

pub mod approval;
pub mod audit;
pub mod canonical;
pub mod command;
pub mod device;
pub mod identity;
pub mod ids;
pub mod pairing;
pub mod report;
pub mod secret;
pub mod tenant;
pub mod time;
pub mod validation;

pub use command::{CommandPolicy, DeviceCommand, NewCommand, Risk};
pub use device::{Device, DeviceStatus};
pub use identity::{
    AuthSession, AuthSessionId, Email, Membership, Org, OrgId, Permission, Project, ProjectId,
    Role, User, UserId,
};
pub use ids::{CommandId, DeviceId, EventId, PairingId, SessionId};
pub use pairing::{Pairing, PairingCode, PairingState};
pub use report::AgentReport;
pub use secret::{DeviceToken, SecretHash};
pub use tenant::TenantId;
pub use validation::{FieldError, ValidationErrors};
