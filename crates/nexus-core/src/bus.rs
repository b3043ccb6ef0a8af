//! The event bus carries committed events between replicas. It is an accelerator, not a source of
//! truth: messages may be lost (Redis pub/sub is fire-and-forget), so the hub fills any gap it sees
//! from the store and resynchronizes all live sessions whenever the bus reconnects.

use std::sync::Arc;

use nexus_domain::{DeviceId, TenantId};
use nexus_store::StoredEvent;

use crate::hub::Hub;

pub trait EventBus: Send + Sync + 'static {
    /// Tells the other replicas about a committed event. Never blocks; may drop under pressure.
    fn announce(&self, tenant: &TenantId, event: &StoredEvent);
    /// Tells the other replicas that a device was deleted, so they drop what they cached about it.
    fn announce_revocation(&self, device: &DeviceId);
    /// Tells the other replicas that commands were queued for a device, so a long-poll waiting
    /// there answers at once. Lossy like everything here: long-polls also re-read the store now
    /// and then (`CoreConfig::long_poll_recheck`).
    fn announce_commands_queued(&self, device: &DeviceId);
    /// Starts delivering the other replicas' events into `hub` and their other messages to
    /// `sinks`.
    fn start(&self, hub: Hub, sinks: BusSinks);
}

/// Receives revocations from other replicas (`None`: forget every cached credential, e.g.
/// after missing messages).
pub type RevocationSink = Arc<dyn Fn(Option<&DeviceId>) + Send + Sync>;
/// Receives "commands were queued for this device" from other replicas.
pub type CommandsQueuedSink = Arc<dyn Fn(&DeviceId) + Send + Sync>;

/// Where a bus delivers what other replicas announce (besides events, which go to the hub).
#[derive(Clone)]
pub struct BusSinks {
    pub revoked: RevocationSink,
    pub commands_queued: CommandsQueuedSink,
}

/// A single replica needs no bus: every event is published to the local hub directly.
pub struct LocalOnly;

impl EventBus for LocalOnly {
    fn announce(&self, _tenant: &TenantId, _event: &StoredEvent) {}
    fn announce_revocation(&self, _device: &DeviceId) {}
    fn announce_commands_queued(&self, _device: &DeviceId) {}
    fn start(&self, _hub: Hub, _sinks: BusSinks) {}
}
