//! Deleting what has ended: expired pairings, device tokens and stream tickets, and ended sign-in
//! sessions (`Store::prune_ended`). Without it those tables only ever grow. Every replica may run
//! it; the deletes are idempotent.

use std::sync::Arc;
use std::time::Duration;

use nexus_domain::time::{Millis, duration_millis};
use nexus_store::Store;

use crate::error::CoreResult;

#[derive(Clone)]
pub struct Housekeeping {
    store: Arc<dyn Store>,
    retention: Duration,
}

impl Housekeeping {
    pub fn new(store: Arc<dyn Store>, retention: Duration) -> Self {
        Self { store, retention }
    }

    /// Deletes what ended more than the retention period before `now`; returns the row count.
    pub async fn prune(&self, now: Millis) -> CoreResult<u64> {
        let before = now.saturating_sub(duration_millis(self.retention));
        let pruned = self.store.prune_ended(before).await?;
        if pruned > 0 {
            tracing::info!(
                pruned,
                "housekeeping: deleted ended pairings, tokens and sessions"
            );
        }
        Ok(pruned)
    }
}
