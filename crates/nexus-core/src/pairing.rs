//! Pairing: start (device) → confirm by code (user of a tenant) → complete (device, once).

use std::sync::Arc;

use nexus_domain::secret::{SecretHash, random_secret};
use nexus_domain::time::Millis;
use nexus_domain::validation::check_token_chars;
use nexus_domain::{
    DeviceId, DeviceToken, FieldError, Pairing, PairingCode, PairingId, PairingState, TenantId,
    ValidationErrors,
};
use nexus_store::{NewDevice, Store, StoreError};

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
}

#[derive(Debug, Clone)]
pub struct PairingCompleted {
    pub device_id: DeviceId,
    pub device_token: DeviceToken,
    pub tenant: TenantId,
}

#[derive(Clone)]
pub struct PairingService {
    store: Arc<dyn Store>,
    ttl_millis: Millis,
}

impl PairingService {
    pub fn new(store: Arc<dyn Store>, config: &crate::CoreConfig) -> Self {
        Self {
            store,
            ttl_millis: i64::try_from(config.pairing_ttl.as_millis()).unwrap_or(i64::MAX),
        }
    }

    pub async fn start(
        &self,
        request: PairingRequest,
        tenant: Option<TenantId>,
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
            };
            match self.store.create_pairing(&pairing, now).await {
                Ok(()) => {
                    return Ok(PairingStarted {
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

    pub async fn confirm_by_code(
        &self,
        tenant: &TenantId,
        code: &PairingCode,
        now: Millis,
    ) -> CoreResult<DeviceId> {
        let not_found =
            || CoreError::not_found("pairing_not_found", "no pairing is waiting for this code");
        let pairing = self
            .store
            .pairing_by_code(code)
            .await?
            .ok_or_else(not_found)?;
        // A pairing that named its tenant at start is invisible to every other tenant.
        if pairing.tenant.as_ref().is_some_and(|t| t != tenant) {
            return Err(not_found());
        }
        if pairing.state == PairingState::Completed {
            return Err(not_found());
        }
        if pairing.is_expired(now) {
            return Err(CoreError::gone(
                "pairing_expired",
                "this pairing code has expired; start pairing again on the device",
            ));
        }
        if pairing.state != PairingState::Pending {
            return Err(CoreError::conflict(
                "pairing_already_confirmed",
                "this pairing code was already confirmed",
            ));
        }
        let device_id = DeviceId::generate();
        if !self
            .store
            .confirm_pairing(&pairing.id, tenant, &device_id)
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
        let token = DeviceToken::generate();
        let device = NewDevice {
            id: device_id.clone(),
            tenant: tenant.clone(),
            name: pairing.device_name,
            device_type: pairing.device_type,
            capabilities: pairing.capabilities,
            token_hash: token.hash(),
            paired_at: now,
        };
        if !self.store.complete_pairing(pairing_id, &device).await? {
            return Err(CoreError::conflict(
                "pairing_already_completed",
                "credentials for this pairing were already issued",
            ));
        }
        tracing::info!(device_id = %device_id, tenant_id = %tenant, "pairing completed");
        Ok(PairingCompleted {
            device_id,
            device_token: token,
            tenant,
        })
    }
}
