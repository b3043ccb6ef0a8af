//! Commands for devices and the two-phase commit for risky ones (checklist §8).
//!
//! propose → classify by the tenant's policy → GREEN/YELLOW are queued at once (YELLOW with a
//! warning report); RED (and YELLOW when the policy says so) waits for a decision that expires →
//! approve queues it with a server signature over exactly what was approved, deny or expiry ends
//! it → the device pulls (long-poll), acks the delivery attempt, and its report with
//! `causality.command_id` finishes it. Every transition is one compare-and-set in the store, is
//! audited in the same transaction, and is published on the command's session stream as a report:
//! the stream is the single source of truth for the UI.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexus_domain::approval::{
    Approval, ApprovalGrant, ApprovalId, ApprovalStatus, CommandPolicySettings, CommandRecord,
    CommandStatus, approval_signing_input, request_hash,
};
use nexus_domain::audit::{Actor, AuditRecord, AuditResult, AuditScope, AuditTarget};
use nexus_domain::command::{
    ClientContext, CommandPolicy, DeviceCommand, Risk, valid_command_type,
};
use nexus_domain::report::ValidatedReport;
use nexus_domain::time::{Millis, duration_millis, rfc3339};
use nexus_domain::validation::check_token_chars;
use nexus_domain::{CommandId, DeviceId, SessionId, TenantId, ValidationErrors};
use nexus_store::{AckOutcome, CommandChange, CommandQuery, Created, Store};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::auth::{AuthService, Principal};
use crate::bus::EventBus;
use crate::context::RequestMeta;
use crate::devices::AuthenticatedDevice;
use crate::error::{CoreError, CoreResult};
use crate::reports::ReportService;

/// Most commands one pull returns.
pub const PULL_LIMIT: u32 = 100;
/// Longest long-poll a device may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// How often the sweeper looks for expired approvals and timed-out commands.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);
const SWEEP_BATCH: u32 = 200;
const MAX_PARAMS_BYTES: usize = 32 * 1024;

#[derive(Debug, Clone)]
pub struct ProposeRequest {
    /// The client's idempotency key.
    pub command_id: String,
    pub command_type: String,
    pub params: Value,
    pub device_id: String,
    pub session_id: Option<String>,
    pub correlation_id: Option<String>,
}

/// A human's answer to an approval.
#[derive(Debug, Clone)]
pub struct Decision {
    pub approve: bool,
    pub reason: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Proposed {
    pub record: CommandRecord,
    pub approval: Option<Approval>,
}

#[derive(Debug, Clone)]
pub struct Pulled {
    pub commands: Vec<DeviceCommand>,
    pub next_cursor: String,
}

#[derive(Clone)]
pub struct CommandService {
    store: Arc<dyn Store>,
    reports: ReportService,
    auth: AuthService,
    bus: Arc<dyn EventBus>,
    /// How often a waiting long-poll re-reads the store, for commands queued on another replica
    /// whose bus message was lost.
    recheck: Duration,
    waiters: Arc<Mutex<HashMap<DeviceId, Arc<Notify>>>>,
}

fn secs(s: u64) -> Millis {
    duration_millis(Duration::from_secs(s))
}

fn not_found() -> CoreError {
    CoreError::not_found("command_not_found", "no such command")
}

impl CommandService {
    pub fn new(
        store: Arc<dyn Store>,
        reports: ReportService,
        auth: AuthService,
        bus: Arc<dyn EventBus>,
        recheck: Duration,
    ) -> Self {
        Self {
            store,
            reports,
            auth,
            bus,
            recheck: recheck.max(Duration::from_millis(10)),
            waiters: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub async fn policy(&self, tenant: &TenantId) -> CoreResult<CommandPolicySettings> {
        Ok(self.store.command_policy(tenant).await?.unwrap_or_default())
    }

    pub async fn put_policy(
        &self,
        principal: &Principal,
        tenant: &TenantId,
        policy: CommandPolicySettings,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<CommandPolicySettings> {
        policy.validate()?;
        let audit = meta.audit(
            AuditScope::Tenant(tenant.clone()),
            now,
            principal.actor(),
            "policy.update",
            Some(AuditTarget::new("policy", "commands")),
            AuditResult::Success,
            json!({"rules": policy.rules.len(), "yellow_requires_approval": policy.yellow_requires_approval,
                   "require_distinct_approver": policy.require_distinct_approver,
                   "approval_ttl_secs": policy.approval_ttl_secs}),
        );
        self.store
            .put_command_policy(tenant, &policy, now, &[audit])
            .await?;
        Ok(policy)
    }

    fn audit(
        meta: &RequestMeta,
        record: &CommandRecord,
        now: Millis,
        actor: Actor,
        action: &str,
        details: Value,
    ) -> AuditRecord {
        let mut audit = meta.audit(
            AuditScope::Tenant(record.tenant.clone()),
            now,
            actor,
            action,
            Some(AuditTarget::new("command", &record.id)),
            AuditResult::Success,
            details,
        );
        if audit.correlation_id.is_none() {
            audit.correlation_id = Some(record.correlation_id.clone());
        }
        audit
    }

    pub async fn propose(
        &self,
        principal: &Principal,
        tenant: &TenantId,
        request: ProposeRequest,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<Proposed> {
        self.propose_linked(principal, tenant, request, None, meta, now)
            .await
    }

    async fn propose_linked(
        &self,
        principal: &Principal,
        tenant: &TenantId,
        request: ProposeRequest,
        replaces: Option<CommandId>,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<Proposed> {
        let mut errors = Vec::new();
        let id_chars = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-');
        if let Err(e) = check_token_chars("command_id", &request.command_id, 64, id_chars) {
            errors.extend(e.0);
        }
        if !valid_command_type(&request.command_type) {
            errors.push(nexus_domain::FieldError::new(
                "type",
                "must be 1 to 64 letters, digits, '.', '_' or '-'",
            ));
        }
        if !request.params.is_object() {
            errors.push(nexus_domain::FieldError::new("params", "must be an object"));
        } else if request.params.to_string().len() > MAX_PARAMS_BYTES {
            errors.push(nexus_domain::FieldError::new(
                "params",
                format!("at most {MAX_PARAMS_BYTES} bytes"),
            ));
        }
        let session = match request.session_id.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => match SessionId::parse("session_id", s) {
                Ok(s) => Some(s),
                Err(e) => {
                    errors.extend(e.0);
                    None
                }
            },
            None => None,
        };
        if let Some(c) = &request.correlation_id
            && let Err(e) = check_token_chars("client_context.correlation_id", c, 128, |c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
            })
        {
            errors.extend(e.0);
        }
        if !errors.is_empty() {
            return Err(ValidationErrors(errors).into());
        }
        let device_id = DeviceId::parse("device_id", &request.device_id)
            .map_err(|_| CoreError::not_found("device_not_found", "no such device"))?;
        if self.store.device(tenant, &device_id).await?.is_none() {
            return Err(CoreError::not_found("device_not_found", "no such device"));
        }
        let policy = self.policy(tenant).await?;
        let risk = policy.classify(&request.command_type);
        let hash = request_hash(
            &device_id,
            &request.command_type,
            &request.params,
            session.as_ref().map(SessionId::as_str),
        );
        let id = CommandId::from_trusted(request.command_id.clone());
        let session = match session {
            Some(s) => s,
            None => SessionId::from_trusted(format!("device:{device_id}")),
        };
        let correlation_id = request
            .correlation_id
            .clone()
            .or_else(|| meta.correlation_id.clone())
            .unwrap_or_else(|| ulid::Ulid::new().to_string().to_ascii_lowercase());
        let needs_approval = policy.needs_approval(risk);
        let approval_id = needs_approval.then(ApprovalId::generate);
        let record = CommandRecord {
            id: id.clone(),
            tenant: tenant.clone(),
            device_id: device_id.clone(),
            command_type: request.command_type.clone(),
            params: request.params.clone(),
            risk,
            status: if needs_approval {
                CommandStatus::PendingApproval
            } else {
                CommandStatus::Queued
            },
            session_id: session,
            correlation_id,
            requested_by: principal.user_id.clone(),
            requested_at: now,
            request_hash: hash.clone(),
            approval_id: approval_id.clone(),
            replaces,
            attempt: 0,
            updated_at: now,
            deadline: (!needs_approval).then(|| now.saturating_add(secs(policy.delivery_ttl_secs))),
            result: None,
        };
        let approval = approval_id.map(|aid| Approval {
            id: aid,
            tenant: tenant.clone(),
            command_id: id.clone(),
            device_id: device_id.clone(),
            command_type: record.command_type.clone(),
            risk,
            summary: format!("{} on {}", record.command_type, device_id),
            requested_by: principal.user_id.clone(),
            requested_at: now,
            expires_at: now.saturating_add(secs(policy.approval_ttl_secs)),
            status: ApprovalStatus::Pending,
            decided_by: None,
            decided_at: None,
            reason: None,
        });
        let queue = (!needs_approval).then(|| Self::device_command(&record, None));
        let audit = Self::audit(
            meta,
            &record,
            now,
            principal.actor(),
            "command.propose",
            json!({"type": record.command_type, "device_id": device_id, "risk": risk.lowercase(),
                   "status": record.status, "approval_id": record.approval_id, "replaces": record.replaces}),
        );
        match self
            .store
            .create_command(&record, approval.as_ref(), queue.as_ref(), &[audit])
            .await?
        {
            Created::Existing(existing) => {
                if existing.request_hash != hash || existing.requested_by != principal.user_id {
                    return Err(CoreError::conflict(
                        "command_id_conflict",
                        "this command_id was already used for a different command",
                    ));
                }
                self.with_approval(tenant, existing).await
            }
            Created::New(record) => {
                self.publish(&record, approval.as_ref(), now).await;
                if record.status == CommandStatus::Queued {
                    self.wake(&record.device_id);
                }
                tracing::info!(command_id = %record.id, device_id = %record.device_id,
                    risk = risk.lowercase(), status = %record.status, "command proposed");
                Ok(Proposed { record, approval })
            }
        }
    }

    /// The body a device receives (attempt and deadline are filled in at delivery).
    fn device_command(record: &CommandRecord, grant: Option<ApprovalGrant>) -> DeviceCommand {
        DeviceCommand {
            command_id: record.id.clone(),
            command_type: record.command_type.clone(),
            params: record.params.clone(),
            context: Value::Null,
            client_context: ClientContext {
                surface: Some("sidecar".into()),
                correlation_id: Some(record.correlation_id.clone()),
                session_id: Some(record.session_id.to_string()),
            },
            policy: CommandPolicy {
                risk: record.risk,
                approval_id: record.approval_id.as_ref().map(ToString::to_string),
            },
            created_at: rfc3339(record.requested_at),
            attempt: 0,
            run_before: None,
            approval: grant,
        }
    }

    pub async fn command(&self, tenant: &TenantId, id: &str) -> CoreResult<CommandRecord> {
        let id = CommandId::from_trusted(id.to_owned());
        self.store.command(tenant, &id).await?.ok_or_else(not_found)
    }

    pub async fn list(
        &self,
        tenant: &TenantId,
        query: CommandQuery,
    ) -> CoreResult<(Vec<CommandRecord>, Option<i64>)> {
        Ok(self.store.list_commands(tenant, &query).await?)
    }

    pub async fn approval(&self, tenant: &TenantId, id: &str) -> CoreResult<Approval> {
        let not_found = || CoreError::not_found("approval_not_found", "no such approval");
        let id = ApprovalId::parse("id", id).map_err(|_| not_found())?;
        self.store
            .approval(tenant, &id)
            .await?
            .ok_or_else(not_found)
    }

    pub async fn approvals(
        &self,
        tenant: &TenantId,
        status: Option<ApprovalStatus>,
        limit: u32,
    ) -> CoreResult<Vec<Approval>> {
        Ok(self.store.list_approvals(tenant, status, limit).await?)
    }

    /// Approve or deny. Exactly one decision wins; deciding a decided or expired approval is 409.
    pub async fn decide(
        &self,
        principal: &Principal,
        tenant: &TenantId,
        approval_id: &str,
        decision: Decision,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<(Approval, CommandRecord)> {
        let Decision { approve, reason } = decision;
        let approval = self.approval(tenant, approval_id).await?;
        Self::still_open(&approval, now)?;
        let policy = self.policy(tenant).await?;
        if approve && policy.require_distinct_approver && approval.requested_by == principal.user_id
        {
            return Err(CoreError::forbidden(
                "distinct_approver_required",
                "this tenant requires someone other than the requester to approve",
            ));
        }
        if let Some(r) = &reason
            && r.chars().count() > 1000
        {
            return Err(ValidationErrors::single("reason", "at most 1000 characters").into());
        }
        let record = self
            .store
            .command(tenant, &approval.command_id)
            .await?
            .ok_or_else(not_found)?;
        if approve
            && self
                .store
                .device(tenant, &record.device_id)
                .await?
                .is_none()
        {
            return Err(CoreError::conflict(
                "device_gone",
                "the device of this command was deleted; deny the approval instead",
            ));
        }
        let (queue, deadline) = if approve {
            let expires = now.saturating_add(secs(policy.delivery_ttl_secs));
            let grant = self.grant(&record, &approval, principal, now, expires)?;
            (
                Some(Self::device_command(&record, Some(grant))),
                Some(expires),
            )
        } else {
            (None, None)
        };
        let decision = if approve {
            ApprovalStatus::Approved
        } else {
            ApprovalStatus::Denied
        };
        let audit = Self::audit(
            meta,
            &record,
            now,
            principal.actor(),
            if approve {
                "approval.approve"
            } else {
                "approval.deny"
            },
            json!({"approval_id": approval.id, "reason": reason}),
        );
        let decided = self
            .store
            .decide_approval(
                tenant,
                &approval.id,
                decision,
                &principal.user_id,
                now,
                reason.as_deref(),
                queue.as_ref(),
                deadline,
                &[audit],
            )
            .await?;
        let Some((approval, record)) = decided else {
            // Someone else decided first, or it expired meanwhile: say which.
            let current = self.approval(tenant, approval_id).await?;
            Self::still_open(&current, now)?;
            return Err(CoreError::conflict(
                "approval_already_decided",
                "this approval was already decided",
            ));
        };
        self.publish(&record, Some(&approval), now).await;
        if record.status == CommandStatus::Queued {
            self.wake(&record.device_id);
        }
        tracing::info!(approval_id = %approval.id, command_id = %record.id,
            decision = approval.status.as_str(), "approval decided");
        Ok((approval, record))
    }

    fn still_open(approval: &Approval, now: Millis) -> CoreResult<()> {
        match approval.status {
            ApprovalStatus::Pending if now < approval.expires_at => Ok(()),
            ApprovalStatus::Pending | ApprovalStatus::Expired => Err(CoreError::conflict(
                "approval_expired",
                "this approval has expired; re-propose the command",
            )),
            _ => Err(CoreError::conflict(
                "approval_already_decided",
                "this approval was already decided",
            )),
        }
    }

    /// The server's signature over exactly what was approved (DESIGN.md §7; the agent verifies it).
    fn grant(
        &self,
        record: &CommandRecord,
        approval: &Approval,
        principal: &Principal,
        now: Millis,
        expires_at: Millis,
    ) -> CoreResult<ApprovalGrant> {
        let expires = rfc3339(expires_at);
        let input = approval_signing_input(
            &record.id,
            &record.device_id,
            &record.command_type,
            &record.params,
            &approval.id,
            &expires,
        );
        let (kid, signature) = self.auth.sign_detached(&input)?;
        Ok(ApprovalGrant {
            approval_id: approval.id.clone(),
            approved_by: principal.user_id.clone(),
            approved_at: rfc3339(now),
            expires_at: expires,
            kid,
            signature,
        })
    }

    /// Cancels a command that has not been delivered. A command waiting for approval is ended
    /// by denying its approval instead (so the approval and the command never disagree).
    pub async fn cancel(
        &self,
        principal: &Principal,
        tenant: &TenantId,
        id: &str,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<CommandRecord> {
        let record = self.command(tenant, id).await?;
        if record.status == CommandStatus::PendingApproval {
            return Err(CoreError::conflict(
                "deny_instead",
                "this command is waiting for approval: deny the approval to stop it",
            ));
        }
        let audit = Self::audit(
            meta,
            &record,
            now,
            principal.actor(),
            "command.cancel",
            json!({}),
        );
        let Some(cancelled) = self
            .store
            .transition_command(
                tenant,
                &record.id,
                &[CommandStatus::Queued],
                CommandStatus::Cancelled,
                now,
                &CommandChange {
                    deadline: Some(None),
                    ..CommandChange::default()
                },
                &[audit],
            )
            .await?
        else {
            return Err(CoreError::conflict(
                "command_not_cancellable",
                "only a command that has not been delivered can be cancelled",
            ));
        };
        self.publish(&cancelled, None, now).await;
        Ok(cancelled)
    }

    /// A fresh proposal with the same type, params and device as an ended command, linked to it.
    pub async fn repropose(
        &self,
        principal: &Principal,
        tenant: &TenantId,
        id: &str,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<Proposed> {
        let old = self.command(tenant, id).await?;
        if !matches!(
            old.status,
            CommandStatus::Expired
                | CommandStatus::Denied
                | CommandStatus::Cancelled
                | CommandStatus::DeliveryTimedOut
                | CommandStatus::ExecutionTimedOut
        ) {
            return Err(CoreError::conflict(
                "command_not_ended",
                "only an expired, denied, cancelled or timed-out command can be re-proposed",
            ));
        }
        // One re-proposal per ended command: its id is derived from the old one, so a second
        // request (a double click, a retry, a colleague) gets the first re-proposal instead of
        // putting the same command up for approval twice (approving both would run it twice).
        let new_id = reproposal_id(&old.id);
        if let Some(existing) = self.reproposal(tenant, &old.id, &new_id).await? {
            return Ok(existing);
        }
        let session = old.session_id.as_str();
        let request = ProposeRequest {
            command_id: new_id.to_string(),
            command_type: old.command_type.clone(),
            params: old.params.clone(),
            device_id: old.device_id.to_string(),
            session_id: (!session.starts_with("device:")).then(|| session.to_owned()),
            correlation_id: Some(old.correlation_id.clone()),
        };
        match self
            .propose_linked(principal, tenant, request, Some(old.id.clone()), meta, now)
            .await
        {
            // Someone else re-proposed it at the same moment.
            Err(CoreError::Conflict {
                code: "command_id_conflict",
                ..
            }) if let Some(existing) = self.reproposal(tenant, &old.id, &new_id).await? => {
                Ok(existing)
            }
            other => other,
        }
    }

    /// The re-proposal of `old`, if it was made already.
    async fn reproposal(
        &self,
        tenant: &TenantId,
        old: &CommandId,
        id: &CommandId,
    ) -> CoreResult<Option<Proposed>> {
        let Some(record) = self
            .store
            .command(tenant, id)
            .await?
            .filter(|r| r.replaces.as_ref() == Some(old))
        else {
            return Ok(None);
        };
        Ok(Some(self.with_approval(tenant, record).await?))
    }

    /// A command together with its approval, if it has one.
    async fn with_approval(
        &self,
        tenant: &TenantId,
        record: CommandRecord,
    ) -> CoreResult<Proposed> {
        let approval = match &record.approval_id {
            Some(aid) => self.store.approval(tenant, aid).await?,
            None => None,
        };
        Ok(Proposed { record, approval })
    }

    fn waiter(&self, device: &DeviceId) -> Option<Arc<Notify>> {
        let mut waiters = self.waiters.lock().ok()?;
        if waiters.len() > 100_000 {
            waiters.retain(|_, n| Arc::strong_count(n) > 1);
        }
        Some(waiters.entry(device.clone()).or_default().clone())
    }

    /// Commands were queued for `device`: answer its long-polls here and on the other replicas.
    fn wake(&self, device: &DeviceId) {
        self.wake_local(device);
        self.bus.announce_commands_queued(device);
    }

    /// Answers the long-polls of `device` waiting on this replica.
    pub(crate) fn wake_local(&self, device: &DeviceId) {
        if let Ok(waiters) = self.waiters.lock()
            && let Some(n) = waiters.get(device)
        {
            n.notify_waiters();
        }
    }

    /// The device's runnable commands after `cursor`; with `wait`, answers as soon as one is
    /// queued (long-poll), or empty after `wait`.
    pub async fn pull(
        &self,
        device: &AuthenticatedDevice,
        cursor: Option<&str>,
        wait: Duration,
        now: impl Fn() -> Millis,
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
        let wait = wait.min(MAX_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let notify = self.waiter(&device.device_id);
        // Read once per pull, not on every wake-up of the wait.
        let execution_timeout = secs(self.policy(&device.tenant).await?.execution_timeout_secs);
        loop {
            // Register interest before reading, so a command queued in between still wakes us.
            let notified = notify.as_ref().map(|n| n.notified());
            let delivered = self
                .deliver(device, after, now(), execution_timeout)
                .await?;
            if !delivered.commands.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(delivered);
            }
            let sleep_until = deadline.min(tokio::time::Instant::now() + self.recheck);
            match notified {
                Some(n) => {
                    tokio::select! {
                        _ = n => {}
                        _ = tokio::time::sleep_until(sleep_until) => {}
                    }
                }
                None => tokio::time::sleep_until(sleep_until).await,
            }
        }
    }

    async fn deliver(
        &self,
        device: &AuthenticatedDevice,
        after: i64,
        now: Millis,
        execution_timeout: Millis,
    ) -> CoreResult<Pulled> {
        let mut deliveries = Vec::new();
        let execution_deadline = now.saturating_add(execution_timeout);
        for delivery in self
            .store
            .deliver_commands(
                &device.tenant,
                &device.device_id,
                after,
                PULL_LIMIT,
                now,
                execution_deadline,
            )
            .await?
        {
            if let Err(why) =
                self.check_grant(&delivery.command, &device.device_id, &delivery.record)
            {
                self.refuse_delivery(device, &delivery.record, why, now)
                    .await?;
                continue;
            }
            self.publish(&delivery.record, None, now).await;
            let mut command = delivery.command;
            command.attempt = delivery.record.attempt;
            command.run_before = delivery.record.deadline.map(rfc3339);
            deliveries.push((delivery.seq, command));
        }
        let next = deliveries.last().map_or(after, |(seq, _)| *seq);
        Ok(Pulled {
            commands: deliveries.into_iter().map(|(_, c)| c).collect(),
            next_cursor: next.to_string(),
        })
    }

    /// Whether a queued body may go to its device: what needs an approval (by the record, which
    /// the queue row cannot change, or by the body's own claim) must carry a grant for this
    /// approval whose signature by one of our keys covers exactly the body the device would run.
    /// The agent checks the same and refuses; checking here too means a row written into the
    /// queue by anyone but this server (a database intruder, a bad restore) never even leaves it.
    fn check_grant(
        &self,
        body: &DeviceCommand,
        device: &DeviceId,
        record: &CommandRecord,
    ) -> Result<(), String> {
        if body.command_id != record.id || *device != record.device_id {
            return Err("the queued body names another command or device than its record".into());
        }
        let needs_grant = record.approval_id.is_some()
            || record.risk == Risk::Red
            || body.policy.risk == Risk::Red;
        let Some(grant) = &body.approval else {
            return if needs_grant {
                Err("the command needs an approval but carries no signed grant".into())
            } else {
                Ok(())
            };
        };
        if record.approval_id.as_ref() != Some(&grant.approval_id) {
            return Err("the grant is for another approval than the command's".into());
        }
        let input = approval_signing_input(
            &body.command_id,
            device,
            &body.command_type,
            &body.params,
            &grant.approval_id,
            &grant.expires_at,
        );
        if self
            .auth
            .verify_detached(&grant.kid, &input, &grant.signature)
        {
            Ok(())
        } else {
            Err(format!(
                "the grant's signature (key {:?}) does not verify for this command",
                grant.kid
            ))
        }
    }

    /// Fails a delivered command whose grant does not hold (see `check_grant`) without handing it
    /// to the device, loudly: this only happens if someone tampered with the store.
    async fn refuse_delivery(
        &self,
        device: &AuthenticatedDevice,
        record: &CommandRecord,
        why: String,
        now: Millis,
    ) -> CoreResult<()> {
        tracing::error!(tenant_id = %device.tenant, command_id = %record.id, device_id = %device.device_id,
            reason = %why, "refusing to deliver a command whose approval grant does not verify; was the store tampered with?");
        let mut audit = Self::audit(
            &RequestMeta::default(),
            record,
            now,
            Actor::system(),
            "command.delivery_refused",
            json!({"error": "approval_invalid", "reason": why}),
        );
        audit.result = AuditResult::Denied;
        let change = CommandChange {
            result: Some(json!({"error": "approval_invalid", "reason": why})),
            deadline: Some(None),
        };
        if let Some(failed) = self
            .store
            .transition_command(
                &device.tenant,
                &record.id,
                &[CommandStatus::Delivered],
                CommandStatus::Failed,
                now,
                &change,
                &[audit],
            )
            .await?
        {
            self.publish(&failed, None, now).await;
        }
        Ok(())
    }

    /// The device confirms it received delivery `attempt` (1 if the agent does not say).
    pub async fn ack(
        &self,
        device: &AuthenticatedDevice,
        command_id: &CommandId,
        attempt: Option<u32>,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<()> {
        let attempt = attempt.unwrap_or(1);
        let audit = meta.audit(
            AuditScope::Tenant(device.tenant.clone()),
            now,
            Actor::device(&device.device_id),
            "command.ack",
            Some(AuditTarget::new("command", command_id)),
            AuditResult::Success,
            json!({"attempt": attempt}),
        );
        match self
            .store
            .ack_delivery(
                &device.tenant,
                &device.device_id,
                command_id,
                attempt,
                now,
                &[audit],
            )
            .await?
        {
            AckOutcome::Acked(record) => {
                self.publish(&record, None, now).await;
                Ok(())
            }
            AckOutcome::AlreadyAcked(_) => Ok(()),
            AckOutcome::StaleAttempt(record) if record.attempt == attempt => {
                Err(CoreError::conflict(
                    "command_ended",
                    format!("this command has ended ({}); do not run it", record.status),
                ))
            }
            AckOutcome::StaleAttempt(record) => Err(CoreError::conflict(
                "stale_attempt",
                format!(
                    "this ack names delivery {attempt}, but the command was delivered again (attempt {})",
                    record.attempt
                ),
            )),
            AckOutcome::NotFound => Err(CoreError::not_found(
                "command_not_found",
                "no such command for this device",
            )),
        }
    }

    /// Finishes commands whose results arrived in the device's reports
    /// (`meta.causality.command_id`): `blocked` items or `causality.type` `command.failed`
    /// mean failed, anything else succeeded.
    pub async fn observe_results(
        &self,
        device: &AuthenticatedDevice,
        reports: &[ValidatedReport],
        event_ids: &[u64],
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<()> {
        for (report, event_id) in reports.iter().zip(event_ids) {
            let Some(id) = report.command_id() else {
                continue;
            };
            let Some(record) = self
                .store
                .command(&device.tenant, &CommandId::from_trusted(id.to_owned()))
                .await?
            else {
                continue;
            };
            if record.device_id != device.device_id {
                continue;
            }
            let failed = report.has_blocked() || report.causality_type() == Some("command.failed");
            let to = if failed {
                CommandStatus::Failed
            } else {
                CommandStatus::Succeeded
            };
            let audit = Self::audit(
                meta,
                &record,
                now,
                Actor::device(&device.device_id),
                if failed {
                    "command.failed"
                } else {
                    "command.succeeded"
                },
                json!({"report_id": report.report_id, "event_id": event_id}),
            );
            let change = CommandChange {
                result: Some(json!({"report_id": report.report_id, "event_id": event_id,
                                    "session_id": report.session_id})),
                deadline: Some(None),
            };
            if let Some(done) = self
                .store
                .transition_command(
                    &device.tenant,
                    &record.id,
                    &[CommandStatus::Delivered, CommandStatus::Acked],
                    to,
                    now,
                    &change,
                    &[audit],
                )
                .await?
            {
                self.publish(&done, None, now).await;
            }
        }
        Ok(())
    }

    /// Expires due approvals (auto-deny) and times out commands past their deadline. Safe to run
    /// on every replica at once: each step is a compare-and-set.
    pub async fn sweep(&self, now: Millis) -> CoreResult<usize> {
        let mut changed = 0;
        for (tenant, id) in self.store.due_approvals(now, SWEEP_BATCH).await? {
            let Some(record) = (match self.store.approval(&tenant, &id).await? {
                Some(a) => self.store.command(&tenant, &a.command_id).await?,
                None => None,
            }) else {
                continue;
            };
            let audit = Self::audit(
                &RequestMeta::default(),
                &record,
                now,
                Actor::system(),
                "approval.expire",
                json!({"approval_id": id}),
            );
            if let Some((approval, record)) = self
                .store
                .expire_approval(&tenant, &id, now, &[audit])
                .await?
            {
                changed += 1;
                self.publish(&record, Some(&approval), now).await;
            }
        }
        for (tenant, id, status) in self.store.due_commands(now, SWEEP_BATCH).await? {
            let to = match status {
                CommandStatus::Queued => CommandStatus::DeliveryTimedOut,
                CommandStatus::Delivered | CommandStatus::Acked => CommandStatus::ExecutionTimedOut,
                _ => continue,
            };
            let Some(record) = self.store.command(&tenant, &id).await? else {
                continue;
            };
            let audit = Self::audit(
                &RequestMeta::default(),
                &record,
                now,
                Actor::system(),
                &format!("command.{}", to.as_str()),
                json!({}),
            );
            if let Some(record) = self
                .store
                .transition_command(
                    &tenant,
                    &id,
                    &[status],
                    to,
                    now,
                    &CommandChange {
                        deadline: Some(None),
                        ..CommandChange::default()
                    },
                    &[audit],
                )
                .await?
            {
                changed += 1;
                self.publish(&record, None, now).await;
            }
        }
        Ok(changed)
    }

    /// Publishes the command's current state as a report on its session stream. Failures are
    /// logged, not returned: the transition itself is committed and audited already.
    async fn publish(&self, record: &CommandRecord, approval: Option<&Approval>, now: Millis) {
        let report = status_report(record, approval, now);
        let result = match ValidatedReport::parse(&report) {
            Ok(valid) => self
                .reports
                .ingest(&record.tenant, None, vec![valid], now)
                .await
                .map(|_| ()),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = result {
            tracing::warn!(command_id = %record.id, error = %e, "could not publish a command status report");
        }
    }
}

/// The id of the re-proposal of `old` (`re_` and 40 hex digits of a SHA-256 of the old id).
pub fn reproposal_id(old: &CommandId) -> CommandId {
    let digest = nexus_domain::secret::SecretHash::of(&format!("nexus-repropose-v1\n{old}"));
    CommandId::from_trusted(format!("re_{}", &digest.as_str()[..40]))
}

/// The report that tells the stream about a command's state. Its id names the command, the
/// state and the delivery attempt, so publishing the same transition twice stores it once.
pub fn status_report(record: &CommandRecord, approval: Option<&Approval>, now: Millis) -> Value {
    let status = record.status;
    let level = record.risk.lowercase();
    let subject = format!("{} on {}", record.command_type, record.device_id);
    let (title, detail) = match status {
        CommandStatus::PendingApproval => (
            format!("Approval needed: {subject}"),
            format!(
                "{} risk; expires {}",
                level.to_uppercase(),
                approval.map(|a| rfc3339(a.expires_at)).unwrap_or_default()
            ),
        ),
        CommandStatus::Queued => (
            format!("Queued: {subject}"),
            "waiting for the device".into(),
        ),
        CommandStatus::Delivered => (
            format!("Delivered: {subject}"),
            format!("delivery {}", record.attempt),
        ),
        CommandStatus::Acked => (format!("Received by the device: {subject}"), String::new()),
        CommandStatus::Succeeded => (format!("Succeeded: {subject}"), String::new()),
        CommandStatus::Failed => (format!("Failed: {subject}"), String::new()),
        CommandStatus::Denied => (
            format!("Denied: {subject}"),
            approval.and_then(|a| a.reason.clone()).unwrap_or_default(),
        ),
        CommandStatus::Expired => (
            format!("Expired without a decision: {subject}"),
            "it will not run; re-propose it to ask again".into(),
        ),
        CommandStatus::Cancelled => (format!("Cancelled: {subject}"), String::new()),
        CommandStatus::DeliveryTimedOut => (
            format!("Not delivered in time: {subject}"),
            "the device did not pull it before its deadline".into(),
        ),
        CommandStatus::ExecutionTimedOut => (
            format!("No result in time: {subject}"),
            "the device did not report a result before its deadline".into(),
        ),
    };
    let mut report = json!({
        "meta": {
            "mode": "system",
            "approval_level": level,
            "confidence": 1.0,
            "report_id": format!("{}{}_{}_{}", crate::reports::SERVER_REPORT_ID_PREFIX, record.id, status.as_str(), record.attempt),
            "created_at": rfc3339(now),
            "session_id": record.session_id.as_str(),
            "user_id": record.requested_by.as_str(),
            "causality": {
                "correlation_id": record.correlation_id,
                "command_id": record.id.as_str(),
                "ask_id": record.approval_id.as_ref().map(ApprovalId::as_str),
                "type": format!("command.{}", status.as_str()),
            }
        },
        "done": [{"title": title, "detail": detail}],
        "command": {
            "command_id": record.id.as_str(),
            "type": record.command_type,
            "device_id": record.device_id.as_str(),
            "risk": level,
            "status": status.as_str(),
            "attempt": record.attempt,
            "approval_id": record.approval_id.as_ref().map(ApprovalId::as_str),
            "replaces": record.replaces.as_ref().map(CommandId::as_str),
        }
    });
    if status == CommandStatus::PendingApproval {
        report["ask"] = json!([{
            "question": format!("Allow {subject}?"),
            "type": "confirm",
            "severity": level,
            "options": ["approve", "deny"],
            "default": null,
        }]);
    }
    if record.risk == Risk::Yellow && status == CommandStatus::Queued {
        report["risk"] = json!([{
            "level": "medium",
            "item": format!("{} changes something on the device", record.command_type),
            "mitigation": "runs without approval under this tenant's policy",
        }]);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_domain::UserId;

    fn record(status: CommandStatus, risk: Risk) -> CommandRecord {
        CommandRecord {
            id: CommandId::from_trusted("cmd_1".into()),
            tenant: TenantId::parse("o", "p").unwrap(),
            device_id: DeviceId::generate(),
            command_type: "shell.exec".into(),
            params: json!({"cmd": "ls"}),
            risk,
            status,
            session_id: SessionId::from_trusted("s1".into()),
            correlation_id: "c1".into(),
            requested_by: UserId::generate(),
            requested_at: 0,
            request_hash: String::new(),
            approval_id: Some(ApprovalId::generate()),
            replaces: None,
            attempt: 0,
            updated_at: 0,
            deadline: None,
            result: None,
        }
    }

    #[test]
    fn every_status_report_is_a_valid_agent_report() {
        for status in CommandStatus::ALL {
            for risk in [Risk::Green, Risk::Yellow, Risk::Red] {
                let report = status_report(&record(status, risk), None, 1_700_000_000_000);
                let valid = ValidatedReport::parse(&report).unwrap();
                assert_eq!(valid.command_id(), Some("cmd_1"));
            }
        }
        let red = status_report(&record(CommandStatus::PendingApproval, Risk::Red), None, 0);
        assert_eq!(red["meta"]["approval_level"], "red");
        assert_eq!(red["ask"][0]["severity"], "red");
        assert_eq!(red["ask"][0]["type"], "confirm");
        assert_eq!(red["ask"][0]["options"], json!(["approve", "deny"]));
        assert!(
            red["meta"]["causality"]["ask_id"]
                .as_str()
                .unwrap()
                .starts_with("apr_")
        );
    }
}
