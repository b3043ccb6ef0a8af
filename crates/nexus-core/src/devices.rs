//! Device authentication and sync: bearer tokens, heartbeats, online status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nexus_domain::audit::{Actor, AuditResult, AuditScope, AuditTarget};
use nexus_domain::secret::SecretHash;
use nexus_domain::time::Millis;
use nexus_domain::{
    Device, DeviceId, DeviceStatus, DeviceToken, FieldError, TenantId, ValidationErrors,
};
use nexus_store::{DeviceCredential, DeviceTokenHashes, Heartbeat, RefreshOutcome, Store};
use serde_json::json;

use crate::context::RequestMeta;

use crate::bus::EventBus;
use crate::config::CoreConfig;
use crate::error::{CoreError, CoreResult};

/// Bounds the credential cache; when full it is simply emptied (cheap, and refills on demand).
const CACHE_CAPACITY: usize = 100_000;

/// A device's new token pair, handed out once (at pairing and on each refresh).
#[derive(Debug, Clone)]
pub struct IssuedDeviceTokens {
    pub access_token: DeviceToken,
    pub access_expires_at: Millis,
    pub refresh_token: DeviceToken,
    pub refresh_expires_at: Millis,
}

/// Lifetimes of device tokens.
#[derive(Debug, Clone, Copy)]
pub struct DeviceTokenTtls {
    access: Millis,
    refresh: Millis,
}

impl From<&CoreConfig> for DeviceTokenTtls {
    fn from(config: &CoreConfig) -> Self {
        let ms = nexus_domain::time::duration_millis;
        Self {
            access: ms(config.device_token_ttl),
            refresh: ms(config.device_refresh_ttl),
        }
    }
}

impl DeviceTokenTtls {
    /// A fresh pair and what the store keeps of it (hashes only).
    pub fn issue(&self, now: Millis) -> (IssuedDeviceTokens, DeviceTokenHashes) {
        let access = DeviceToken::generate();
        let refresh = DeviceToken::generate_refresh();
        let hashes = DeviceTokenHashes {
            access_hash: access.hash(),
            access_expires_at: now.saturating_add(self.access),
            refresh_hash: refresh.hash(),
            refresh_expires_at: now.saturating_add(self.refresh),
        };
        let issued = IssuedDeviceTokens {
            access_token: access,
            access_expires_at: hashes.access_expires_at,
            refresh_token: refresh,
            refresh_expires_at: hashes.refresh_expires_at,
        };
        (issued, hashes)
    }
}

/// An authenticated device: what every device endpoint acts as.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthenticatedDevice {
    pub device_id: DeviceId,
    pub tenant: TenantId,
}

#[derive(Clone)]
pub struct DeviceService {
    store: Arc<dyn Store>,
    config: Arc<CoreConfig>,
    bus: Arc<dyn EventBus>,
    // Keyed by token hash; saves a store round trip on every device request (ingest hot path).
    cache: Arc<Mutex<HashMap<String, (DeviceCredential, Instant)>>>,
}

/// What a device reports in a heartbeat, before validation.
#[derive(Debug, Clone)]
pub struct HeartbeatRequest {
    pub status: String,
    pub metrics: serde_json::Value,
    pub agent_version: Option<String>,
}

impl DeviceService {
    pub fn new(store: Arc<dyn Store>, config: Arc<CoreConfig>, bus: Arc<dyn EventBus>) -> Self {
        Self {
            store,
            config,
            bus,
            cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Resolves a presented bearer token for the device named in the path. A token of another
    /// device answers like an unknown device (404), so ids cannot be probed with a valid token.
    pub async fn authenticate(
        &self,
        presented: Option<&str>,
        path_device: &str,
        now: Millis,
    ) -> CoreResult<AuthenticatedDevice> {
        let invalid =
            || CoreError::unauthorized("invalid_token", "a valid device token is required");
        let token = presented
            .and_then(DeviceToken::from_presented)
            .ok_or_else(invalid)?;
        let hash = token.hash();
        let credential = match self.cached(&hash) {
            Some(c) => c,
            None => {
                let c = self
                    .store
                    .device_credential(&hash)
                    .await?
                    .ok_or_else(invalid)?;
                self.remember(&hash, &c);
                c
            }
        };
        // Stored hashes are looked up by equality; confirm in constant time before trusting.
        if !credential.token_hash.matches(&hash) {
            return Err(invalid());
        }
        if now >= credential.expires_at {
            return Err(CoreError::unauthorized(
                "token_expired",
                "the device token has expired; refresh it with the refresh token",
            ));
        }
        if credential.device_id.as_str() != path_device {
            return Err(CoreError::not_found("device_not_found", "no such device"));
        }
        Ok(AuthenticatedDevice {
            device_id: credential.device_id,
            tenant: credential.tenant,
        })
    }

    fn cached(&self, hash: &SecretHash) -> Option<DeviceCredential> {
        let cache = self.cache.lock().ok()?;
        let (credential, at) = cache.get(hash.as_str())?;
        (at.elapsed() < self.config.credential_cache_ttl).then(|| credential.clone())
    }

    fn remember(&self, hash: &SecretHash, credential: &DeviceCredential) {
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(
                hash.as_str().to_owned(),
                (credential.clone(), Instant::now()),
            );
        }
    }

    /// Deletes a device: its token stops working at once here, and on the other replicas as soon
    /// as they hear of it over the bus (at the latest after the credential cache TTL).
    pub async fn delete(
        &self,
        actor: Actor,
        tenant: &TenantId,
        id: &DeviceId,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<()> {
        let audit = meta.audit(
            AuditScope::Tenant(tenant.clone()),
            now,
            actor,
            "device.delete",
            Some(AuditTarget::new("device", id)),
            AuditResult::Success,
            json!({}),
        );
        if !self.store.delete_device(tenant, id, &[audit]).await? {
            return Err(CoreError::not_found("device_not_found", "no such device"));
        }
        self.revoked(id);
        tracing::info!(device_id = %id, tenant_id = %tenant, "device deleted");
        Ok(())
    }

    fn revoked(&self, id: &DeviceId) {
        self.forget(Some(id));
        self.bus.announce_revocation(id);
    }

    pub async fn get(&self, tenant: &TenantId, id: &DeviceId) -> CoreResult<Device> {
        self.store
            .device(tenant, id)
            .await?
            .ok_or_else(|| CoreError::not_found("device_not_found", "no such device"))
    }

    pub async fn rename(
        &self,
        actor: Actor,
        tenant: &TenantId,
        id: &DeviceId,
        name: &str,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<Device> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
            return Err(
                ValidationErrors::single("name", "must be 1 to 128 printable characters").into(),
            );
        }
        let audit = meta.audit(
            AuditScope::Tenant(tenant.clone()),
            now,
            actor,
            "device.rename",
            Some(AuditTarget::new("device", id)),
            AuditResult::Success,
            json!({"name": name}),
        );
        if !self.store.rename_device(tenant, id, name, &[audit]).await? {
            return Err(CoreError::not_found("device_not_found", "no such device"));
        }
        self.get(tenant, id).await
    }

    /// Trades a device's refresh token for a new pair. Presenting a spent refresh token means
    /// a copy exists somewhere: every token of the device is revoked (it must pair again) —
    /// unless it is a retry of a trade whose answer was lost (`device_refresh_retry_grace`).
    pub async fn refresh_tokens(
        &self,
        device_id: &str,
        presented_refresh: &str,
        meta: &RequestMeta,
        now: Millis,
    ) -> CoreResult<IssuedDeviceTokens> {
        let invalid = || {
            CoreError::unauthorized(
                "invalid_refresh_token",
                "the refresh token is invalid, expired or was revoked; pair the device again",
            )
        };
        let device_id = DeviceId::parse("device_id", device_id)?;
        let presented =
            DeviceToken::from_presented_refresh(presented_refresh).ok_or_else(invalid)?;
        let (issued, hashes) = DeviceTokenTtls::from(self.config.as_ref()).issue(now);
        let outcome = self
            .store
            .rotate_device_tokens(
                &device_id,
                &presented.hash(),
                &hashes,
                now,
                nexus_domain::time::duration_millis(self.config.device_refresh_retry_grace),
            )
            .await?;
        let (credential, retried) = match outcome {
            RefreshOutcome::Rotated(credential) => (credential, false),
            RefreshOutcome::Retried(credential) => (credential, true),
            RefreshOutcome::Reused(credential) => {
                let audit = meta.audit(
                    AuditScope::Tenant(credential.tenant.clone()),
                    now,
                    Actor::device(&device_id),
                    "device.refresh_reuse",
                    Some(AuditTarget::new("device", &device_id)),
                    AuditResult::Denied,
                    json!({"revoked": true}),
                );
                self.store
                    .revoke_device_tokens(&credential.tenant, &device_id, &[audit])
                    .await?;
                self.revoked(&device_id);
                tracing::warn!(device_id = %device_id, tenant_id = %credential.tenant,
                    "device refresh token reused; device tokens revoked");
                return Err(CoreError::unauthorized(
                    "refresh_token_reused",
                    "this refresh token was already used; the device's tokens are revoked, pair it again",
                ));
            }
            RefreshOutcome::Invalid => return Err(invalid()),
        };
        let audit = meta.audit(
            AuditScope::Tenant(credential.tenant.clone()),
            now,
            Actor::device(&device_id),
            "device.token_refresh",
            Some(AuditTarget::new("device", &device_id)),
            AuditResult::Success,
            // A retry means the device never got the previous answer; worth seeing if it happens
            // often (a flaky network, or somebody probing with a copy of a spent token).
            if retried {
                json!({"retry_of_lost_answer": true})
            } else {
                json!({})
            },
        );
        self.store.append_audit(&[audit]).await?;
        // The old access token is gone from the store; drop it from caches too.
        self.revoked(&device_id);
        Ok(issued)
    }

    /// Drops cached credentials of `device` (or of every device).
    pub fn forget(&self, device: Option<&DeviceId>) {
        if let Ok(mut cache) = self.cache.lock() {
            match device {
                Some(id) => cache.retain(|_, (credential, _)| &credential.device_id != id),
                None => cache.clear(),
            }
        }
    }

    pub async fn heartbeat(
        &self,
        device: &AuthenticatedDevice,
        request: HeartbeatRequest,
        now: Millis,
    ) -> CoreResult<()> {
        let mut errors = Vec::new();
        if !matches!(request.status.as_str(), "online" | "offline") {
            errors.push(FieldError::new(
                "status",
                "must be \"online\" or \"offline\"",
            ));
        }
        if !request.metrics.is_object() {
            errors.push(FieldError::new("metrics", "must be an object"));
        }
        if request
            .agent_version
            .as_ref()
            .is_some_and(|v| v.is_empty() || v.len() > 64)
        {
            errors.push(FieldError::new(
                "agent_version",
                "must be 1 to 64 characters",
            ));
        }
        if !errors.is_empty() {
            return Err(ValidationErrors(errors).into());
        }
        let heartbeat = Heartbeat {
            status: request.status,
            metrics: request.metrics,
            agent_version: request.agent_version,
            at: now,
        };
        if !self
            .store
            .record_heartbeat(&device.tenant, &device.device_id, &heartbeat)
            .await?
        {
            return Err(CoreError::not_found("device_not_found", "no such device"));
        }
        Ok(())
    }

    pub async fn list(&self, tenant: &TenantId) -> CoreResult<Vec<Device>> {
        Ok(self.store.list_devices(tenant).await?)
    }

    pub fn status(&self, device: &Device, now: Millis) -> DeviceStatus {
        device.status(now, self.config.offline_after_millis())
    }
}
