//! Device authentication and sync: bearer tokens, heartbeats, online status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nexus_domain::secret::SecretHash;
use nexus_domain::time::Millis;
use nexus_domain::{
    Device, DeviceId, DeviceStatus, DeviceToken, FieldError, TenantId, ValidationErrors,
};
use nexus_store::{DeviceCredential, Heartbeat, Store};

use crate::bus::EventBus;
use crate::config::CoreConfig;
use crate::error::{CoreError, CoreResult};

/// Bounds the credential cache; when full it is simply emptied (cheap, and refills on demand).
const CACHE_CAPACITY: usize = 100_000;

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
    pub async fn delete(&self, tenant: &TenantId, id: &DeviceId) -> CoreResult<()> {
        if !self.store.delete_device(tenant, id).await? {
            return Err(CoreError::not_found("device_not_found", "no such device"));
        }
        self.forget(Some(id));
        self.bus.announce_revocation(id);
        tracing::info!(device_id = %id, tenant_id = %tenant, "device deleted");
        Ok(())
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
