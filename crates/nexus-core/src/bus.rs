//! The event bus carries committed events between replicas. It is an accelerator, not a source of
//! truth: messages may be lost (Redis pub/sub is fire-and-forget), so the hub fills any gap it sees
//! from the store and resynchronizes all live sessions whenever the bus reconnects.

use nexus_domain::TenantId;
use nexus_store::StoredEvent;

use crate::hub::Hub;

pub trait EventBus: Send + Sync + 'static {
    /// Tells the other replicas about a committed event. Never blocks; may drop under pressure.
    fn announce(&self, tenant: &TenantId, event: &StoredEvent);
    /// Starts delivering the other replicas' events into `hub`.
    fn start(&self, hub: Hub);
}

/// A single replica needs no bus: every event is published to the local hub directly.
pub struct LocalOnly;

impl EventBus for LocalOnly {
    fn announce(&self, _tenant: &TenantId, _event: &StoredEvent) {}
    fn start(&self, _hub: Hub) {}
}
