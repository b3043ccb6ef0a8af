//! Pairing: start (device) → confirm by code (user of a tenant) → complete (device, once).

use std::sync::Arc;

use nexus_domain::audit::{Actor, AuditResult, AuditScope, AuditTarget};
use nexus_domain::secret::{SecretHash, random_secret};
use nexus_domain::time::Millis;
use nexus_domain::validation::check_token_chars;
use nexus_domain::{
    DeviceId, FieldError, Pairing, PairingCode, PairingId, PairingState, TenantId, ValidationErrors,
};
use nexus_store::{NewDevice, Store, StoreError};
use serde_json::json;

use crate::attempts::Slot;
use crate::auth::Principal;
use crate::context::RequestMeta;
use crate::error::{CoreError, CoreResult};

const MAX_CAPABILITIES: usize = 64;
/// Live codes are one in a million; a clash is rare, so a few retries always suffice in practice.
const CODE_ATTEMPTS: usize = 20;

/// What a device says about itself when it starts pairing.
#[derive(Debug, Clone)]
pub struct PairingRequest {
    pub device_name: String,
    pub device_type: String,
    pub capabilities: Vec<String>,
    pub agent_version: Option<String>,
}

impl PairingRequest {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        let name = self.device_name.trim();
        if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
            errors.push(FieldError::new(
                "device_name",
                "must be 1 to 128 printable characters",
            ));
        }
        let token = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':');
        if let Err(e) = check_token_chars("device_type", &self.device_type, 64, token) {
            errors.extend(e.0);
        }
        if let Some(version) = &self.agent_version
            && let Err(e) = check_token_chars("agent_version", version, 64, token)
        {
            errors.extend(e.0);
        }
        if self.capabilities.len() > MAX_CAPABILITIES {
            errors.push(FieldError::new(
                "capabilities",
                format!("at most {MAX_CAPABILITIES} entries"),
            ));
        }
        for (i, cap) in self.capabilities.iter().enumerate() {
            if let Err(e) = check_token_chars(&format!("capabilities[{i}]"), cap, 64, token) {
                errors.extend(e.0);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(errors))
        }
    }
}

#[derive(Debug, Clone)]
pub struct PairingStarted {
    pub pairing_id: PairingId,
    pub code: PairingCode,
    /// Handed to the device only; proves at completion that it is the same device.
    pub device_nonce: String,
    pub expires_at: Millis,
    /// Shown by the device and by the preview, so the user can match them.
    pub fingerprint: String,
}

/// What the confirming user sees before confirming (RFC 8628 §5.4).
#[derive(Debug, Clone)]
pub struct PairingPreview {
    pub pairing: Pairing,
    pub fingerprint: String,
}

#[derive(Debug, Clone)]
pub struct PairingCompleted {
    pub device_id: DeviceId,
    pub tenant: TenantId,
    pub tokens: crate::devices::IssuedDeviceTokens,
}

#[derive(Clone)]
pub struct PairingService {
    store: Arc<dyn Store>,
    ttl_millis: Millis,
    token_ttls: crate::devices::DeviceTokenTtls,
    /// Wrong codes per user and per client address (RFC 8628 §5.2: codes are guessable).
    wrong_codes: Arc<dyn crate::attempts::AttemptCounter>,
}

/// Wrong pairing codes one user or one address may try per window.
pub const WRONG_CODES_PER_WINDOW: u32 = 5;
const WRONG_CODE_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

impl PairingService {
    pub fn new(
        store: Arc<dyn Store>,
        config: &crate::CoreConfig,
        attempts: &dyn crate::attempts::AttemptCounters,
    ) -> Self {
        Self {
            store,
            ttl_millis: nexus_domain::time::duration_millis(config.pairing_ttl),
            token_ttls: crate::devices::DeviceTokenTtls::from(config),
            wrong_codes: attempts.counter("pairing-code", WRONG_CODE_WINDOW),
        }
    }

    pub async fn start(
        &self,
        request: PairingRequest,
        tenant: Option<TenantId>,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<PairingStarted> {
        request.validate()?;
        let device_nonce = random_secret("");
        for _ in 0..CODE_ATTEMPTS {
            let pairing = Pairing {
                id: PairingId::generate(),
                code: Some(PairingCode::generate()),
                tenant: tenant.clone(),
                device_name: request.device_name.trim().to_owned(),
                device_type: request.device_type.clone(),
                capabilities: request.capabilities.clone(),
                nonce_hash: SecretHash::of(&device_nonce),
                state: PairingState::Pending,
                device_id: None,
                created_at: now,
                expires_at: now.saturating_add(self.ttl_millis),
                client_ip: meta.ip.map(|ip| ip.to_string()),
                agent_version: request.agent_version.clone(),
            };
            // A pairing that named no tenant belongs to none yet: its start goes to the system chain.
            let scope = tenant
                .clone()
                .map(AuditScope::Tenant)
                .unwrap_or(AuditScope::System);
            let audit = meta.audit(
                scope,
                now,
                Actor::system(),
                "pairing.start",
                Some(AuditTarget::new("pairing", &pairing.id)),
                AuditResult::Success,
                json!({"device_name": pairing.device_name, "device_type": pairing.device_type}),
            );
            match self.store.create_pairing(&pairing, now, &[audit]).await {
                Ok(()) => {
                    return Ok(PairingStarted {
                        fingerprint: pairing.fingerprint(),
                        code: pairing
                            .code
                            .clone()
                            .ok_or_else(|| CoreError::Unexpected(anyhow::anyhow!("no code")))?,
                        pairing_id: pairing.id,
                        device_nonce,
                        expires_at: pairing.expires_at,
                    });
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CoreError::Unavailable(anyhow::anyhow!(
            "no free pairing code found"
        )))
    }

    /// Takes a guess from the user's and the client address's budgets (atomically, so
    /// concurrent guesses on any replica cannot get past the limit); refuses once either is used
    /// up. The slots go back when the code turns out to be right.
    async fn take_guess(
        &self,
        principal: &Principal,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<Vec<(String, Slot)>> {
        let too_many = || CoreError::TooManyRequests {
            code: "too_many_wrong_codes",
            detail: format!(
                "at most {WRONG_CODES_PER_WINDOW} wrong pairing codes per 10 minutes; wait and try again"
            ),
            retry_after_secs: WRONG_CODE_WINDOW.as_secs(),
        };
        let mut keys = vec![format!("user:{}", principal.user_id)];
        keys.extend(meta.ip.map(|ip| format!("ip:{ip}")));
        let mut taken = Vec::with_capacity(keys.len());
        for key in keys {
            match self
                .wrong_codes
                .reserve(&key, WRONG_CODES_PER_WINDOW, now)
                .await
            {
                Some(slot) => taken.push((key, slot)),
                None => {
                    self.give_back(taken).await;
                    return Err(too_many());
                }
            }
        }
        Ok(taken)
    }

    async fn give_back(&self, slots: Vec<(String, Slot)>) {
        for (key, slot) in slots {
            self.wrong_codes.release(&key, slot).await;
        }
    }

    /// The live pairing behind `code` as `tenant` may see it; every miss counts as a wrong code.
    async fn find_for(
        &self,
        principal: &Principal,
        tenant: &TenantId,
        code: &PairingCode,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<Pairing> {
        let guess = self.take_guess(principal, meta, now).await?;
        let not_found =
            || CoreError::not_found("pairing_not_found", "no pairing is waiting for this code");
        let found = match self.store.pairing_by_code(code).await {
            Ok(found) => found.filter(|p| {
                // A pairing that named its tenant at start is invisible to every other tenant.
                p.tenant.as_ref().is_none_or(|t| t == tenant) && p.state != PairingState::Completed
            }),
            Err(e) => {
                // Not the user's fault: the guess does not count.
                self.give_back(guess).await;
                return Err(e.into());
            }
        };
        let Some(pairing) = found else {
            return Err(not_found());
        };
        self.give_back(guess).await;
        if pairing.is_expired(now) {
            return Err(CoreError::gone(
                "pairing_expired",
                "this pairing code has expired; start pairing again on the device",
            ));
        }
        Ok(pairing)
    }

    /// What the device said about itself, for the user to check before confirming.
    pub async fn preview(
        &self,
        principal: &Principal,
        tenant: &TenantId,
        code: &PairingCode,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<PairingPreview> {
        let pairing = self.find_for(principal, tenant, code, meta, now).await?;
        Ok(PairingPreview {
            fingerprint: pairing.fingerprint(),
            pairing,
        })
    }

    pub async fn confirm_by_code(
        &self,
        principal: &Principal,
        tenant: &TenantId,
        code: &PairingCode,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<DeviceId> {
        let pairing = self.find_for(principal, tenant, code, meta, now).await?;
        if pairing.state != PairingState::Pending {
            return Err(CoreError::conflict(
                "pairing_already_confirmed",
                "this pairing code was already confirmed",
            ));
        }
        let device_id = DeviceId::generate();
        let audit = meta.audit(
            AuditScope::Tenant(tenant.clone()),
            now,
            principal.actor(),
            "pairing.confirm",
            Some(AuditTarget::new("pairing", &pairing.id)),
            AuditResult::Success,
            json!({"device_id": device_id, "device_name": pairing.device_name}),
        );
        if !self
            .store
            .confirm_pairing(&pairing.id, tenant, &device_id, &[audit])
            .await?
        {
            return Err(CoreError::conflict(
                "pairing_already_confirmed",
                "this pairing code was already confirmed",
            ));
        }
        tracing::info!(device_id = %device_id, tenant_id = %tenant, "pairing confirmed");
        Ok(device_id)
    }

    pub async fn complete(
        &self,
        pairing_id: &PairingId,
        device_nonce: &str,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<PairingCompleted> {
        let pairing = self
            .store
            .pairing(pairing_id)
            .await?
            .ok_or_else(|| CoreError::not_found("pairing_not_found", "unknown pairing"))?;
        // The nonce is checked first, so without it nothing about the pairing's state leaks.
        if !pairing.nonce_hash.matches(&SecretHash::of(device_nonce)) {
            return Err(CoreError::forbidden(
                "pairing_nonce_mismatch",
                "the device nonce does not match this pairing",
            ));
        }
        match pairing.state {
            PairingState::Completed => {
                return Err(CoreError::conflict(
                    "pairing_already_completed",
                    "credentials for this pairing were already issued",
                ));
            }
            _ if pairing.is_expired(now) => {
                return Err(CoreError::gone(
                    "pairing_expired",
                    "this pairing has expired; start pairing again",
                ));
            }
            PairingState::Pending => {
                return Err(CoreError::conflict(
                    "pairing_not_confirmed",
                    "the pairing code has not been confirmed yet",
                ));
            }
            PairingState::Confirmed => {}
        }
        let (Some(tenant), Some(device_id)) = (pairing.tenant.clone(), pairing.device_id.clone())
        else {
            return Err(CoreError::Unexpected(anyhow::anyhow!(
                "confirmed pairing without tenant or device"
            )));
        };
        let (tokens, hashes) = self.token_ttls.issue(now);
        let device = NewDevice {
            id: device_id.clone(),
            tenant: tenant.clone(),
            name: pairing.device_name,
            device_type: pairing.device_type,
            capabilities: pairing.capabilities,
            tokens: hashes,
            paired_at: now,
        };
        let audit = meta.audit(
            AuditScope::Tenant(tenant.clone()),
            now,
            Actor::device(&device_id),
            "pairing.complete",
            Some(AuditTarget::new("device", &device_id)),
            AuditResult::Success,
            json!({"pairing_id": pairing_id}),
        );
        if !self
            .store
            .complete_pairing(pairing_id, &device, &[audit])
            .await?
        {
            return Err(CoreError::conflict(
                "pairing_already_completed",
                "credentials for this pairing were already issued",
            ));
        }
        tracing::info!(device_id = %device_id, tenant_id = %tenant, "pairing completed");
        Ok(PairingCompleted {
            device_id,
            tenant,
            tokens,
        })
    }
}
