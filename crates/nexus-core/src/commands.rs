//! The per-device command queue: devices pull with a cursor and acknowledge receipt.
//! Creating real commands (with risk policy and approvals) belongs to the commands issue;
//! until then only the dev tools enqueue.

use std::sync::Arc;

use nexus_domain::command::{
    ClientContext, CommandPolicy, DeviceCommand, NewCommand, Risk, valid_command_type,
};
use nexus_domain::time::{Millis, rfc3339};
use nexus_domain::{CommandId, DeviceId, TenantId, ValidationErrors};
use nexus_store::Store;

use crate::devices::AuthenticatedDevice;
use crate::error::{CoreError, CoreResult};

/// Most commands one pull returns.
pub const PULL_LIMIT: u32 = 100;

#[derive(Debug, Clone)]
pub struct EnqueueRequest {
    pub device_id: DeviceId,
    pub command_type: String,
    pub params: serde_json::Value,
    pub risk: Option<Risk>,
    pub session_id: Option<String>,
    pub correlation_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Pulled {
    pub commands: Vec<DeviceCommand>,
    pub next_cursor: String,
}

#[derive(Clone)]
pub struct CommandService {
    store: Arc<dyn Store>,
}

impl CommandService {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    pub async fn enqueue(
        &self,
        tenant: &TenantId,
        request: EnqueueRequest,
        now: Millis,
    ) -> CoreResult<DeviceCommand> {
        if !valid_command_type(&request.command_type) {
            return Err(ValidationErrors::single(
                "type",
                "must be 1 to 64 letters, digits, '.', '_' or '-'",
            )
            .into());
        }
        if !request.params.is_object() {
            return Err(ValidationErrors::single("params", "must be an object").into());
        }
        if self
            .store
            .device(tenant, &request.device_id)
            .await?
            .is_none()
        {
            return Err(CoreError::not_found("device_not_found", "no such device"));
        }
        let id = CommandId::generate();
        let command = DeviceCommand {
            command_id: id.clone(),
            command_type: request.command_type,
            params: request.params,
            context: serde_json::Value::Null,
            client_context: ClientContext {
                surface: Some("devtools".into()),
                correlation_id: request.correlation_id,
                session_id: request.session_id,
            },
            // Unknown command types are RED by default (DESIGN.md §7); dev tools may say otherwise.
            policy: CommandPolicy {
                risk: request.risk.unwrap_or(Risk::Red),
                approval_id: None,
            },
            created_at: rfc3339(now),
        };
        let queued = self
            .store
            .enqueue_command(
                &NewCommand {
                    id,
                    tenant: tenant.clone(),
                    device_id: request.device_id,
                    command,
                },
                now,
            )
            .await?;
        Ok(queued.command)
    }

    /// Unacknowledged commands after `cursor` (an opaque string from a previous `next_cursor`).
    pub async fn pull(
        &self,
        device: &AuthenticatedDevice,
        cursor: Option<&str>,
    ) -> CoreResult<Pulled> {
        let after = match cursor.filter(|c| !c.is_empty()) {
            None => 0,
            Some(raw) => raw.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                CoreError::bad_request(
                    "invalid_cursor",
                    "cursor must be a value returned as next_cursor",
                )
            })?,
        };
        let queued = self
            .store
            .pending_commands(&device.tenant, &device.device_id, after, PULL_LIMIT)
            .await?;
        let next = queued.last().map_or(after, |c| c.seq);
        Ok(Pulled {
            commands: queued.into_iter().map(|c| c.command).collect(),
            next_cursor: next.to_string(),
        })
    }

    pub async fn ack(
        &self,
        device: &AuthenticatedDevice,
        command_id: &CommandId,
        now: Millis,
    ) -> CoreResult<()> {
        if !self
            .store
            .ack_command(&device.tenant, &device.device_id, command_id, now)
            .await?
        {
            return Err(CoreError::not_found(
                "command_not_found",
                "no such command for this device",
            ));
        }
        Ok(())
    }
}
