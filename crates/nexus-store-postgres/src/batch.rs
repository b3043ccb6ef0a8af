//! Group commit for report appends. Every report push used to be its own transaction with its own
//! WAL flush and half a dozen round trips; under load that made PostgreSQL, not the servers, the
//! bottleneck. Pushes that arrive while a transaction is running now queue up and go together into
//! the next one (per tenant, since row-level security scopes a transaction to one tenant), with
//! the same id, duplicate and all-or-nothing rules as a single push (`append.rs`). A few workers
//! run batches side by side so one slow transaction does not hold everyone up. If a combined
//! transaction fails, its pushes are retried one by one, so one bad push cannot fail the others.

use std::sync::Arc;

use nexus_domain::report::ValidatedReport;
use nexus_domain::time::Millis;
use nexus_domain::{DeviceId, TenantId};
use nexus_store::{AppendedEvent, StoreError, StoreResult};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::PostgresStore;
use crate::append::{append_reports, append_with_sources};

/// Batches in flight at once per server process.
const WORKERS: usize = 4;
/// Most pushes one transaction carries.
const MAX_BATCH: usize = 128;

struct Push {
    tenant: TenantId,
    device: Option<DeviceId>,
    reports: Vec<ValidatedReport>,
    now: Millis,
    reply: oneshot::Sender<StoreResult<Vec<AppendedEvent>>>,
}

#[derive(Clone)]
pub(crate) struct AppendBatcher {
    queue: mpsc::Sender<Push>,
}

impl AppendBatcher {
    /// `store` must be a handle without a batcher of its own.
    pub(crate) fn start(store: PostgresStore) -> Self {
        let (queue, receiver) = mpsc::channel(MAX_BATCH * WORKERS * 2);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..WORKERS {
            tokio::spawn(worker(store.clone(), receiver.clone()));
        }
        Self { queue }
    }

    pub(crate) async fn append(
        &self,
        tenant: &TenantId,
        device: Option<&DeviceId>,
        reports: &[ValidatedReport],
        now: Millis,
    ) -> StoreResult<Vec<AppendedEvent>> {
        let (reply, answer) = oneshot::channel();
        let push = Push {
            tenant: tenant.clone(),
            device: device.cloned(),
            reports: reports.to_vec(),
            now,
            reply,
        };
        let gone = || StoreError::Unavailable(anyhow::anyhow!("the store is closed"));
        self.queue.send(push).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn worker(store: PostgresStore, receiver: Arc<Mutex<mpsc::Receiver<Push>>>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            let mut receiver = receiver.lock().await;
            if receiver.recv_many(&mut batch, MAX_BATCH).await == 0 {
                return;
            }
        }
        commit(&store, std::mem::take(&mut batch)).await;
    }
}

async fn commit(store: &PostgresStore, batch: Vec<Push>) {
    let mut by_tenant: Vec<(TenantId, Vec<Push>)> = Vec::new();
    for push in batch {
        match by_tenant.iter_mut().find(|(t, _)| *t == push.tenant) {
            Some((_, pushes)) => pushes.push(push),
            None => by_tenant.push((push.tenant.clone(), vec![push])),
        }
    }
    for (tenant, pushes) in by_tenant {
        let pushes = if pushes.len() > 1 {
            match commit_together(store, &tenant, pushes).await {
                Ok(()) => continue,
                Err(pushes) => pushes,
            }
        } else {
            pushes
        };
        for push in pushes {
            let result = store
                .bounded(append_reports(
                    store,
                    &push.tenant,
                    push.device.as_ref(),
                    &push.reports,
                    push.now,
                ))
                .await;
            let _ = push.reply.send(result);
        }
    }
}

/// One transaction for all `pushes`, answering each with its own events; on failure the pushes
/// come back unanswered, to be retried one by one.
async fn commit_together(
    store: &PostgresStore,
    tenant: &TenantId,
    pushes: Vec<Push>,
) -> Result<(), Vec<Push>> {
    let reports: Vec<ValidatedReport> = pushes
        .iter()
        .flat_map(|p| p.reports.iter().cloned())
        .collect();
    let sources: Vec<(Option<&str>, Millis)> = pushes
        .iter()
        .flat_map(|p| {
            std::iter::repeat_n(
                (p.device.as_ref().map(DeviceId::as_str), p.now),
                p.reports.len(),
            )
        })
        .collect();
    let result = store
        .bounded(append_with_sources(store, tenant, &reports, &sources))
        .await;
    drop(sources);
    match result {
        Ok(events) => {
            let mut events = events.into_iter();
            for push in pushes {
                let mine: Vec<AppendedEvent> = events.by_ref().take(push.reports.len()).collect();
                let _ = push.reply.send(Ok(mine));
            }
            Ok(())
        }
        Err(e) => {
            tracing::debug!(error = %e, pushes = pushes.len(), "batched append failed; retrying one by one");
            Err(pushes)
        }
    }
}
