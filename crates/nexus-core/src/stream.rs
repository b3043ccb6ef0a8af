//! Opening a session's live stream (DESIGN.md §5): snapshot or replay first, then live events,
//! with no gap and no duplicate between the two.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nexus_domain::report::ValidatedReport;
use nexus_domain::time::{now_millis, rfc3339};
use nexus_domain::{EventId, SessionId, TenantId};
use nexus_store::Store;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::config::CoreConfig;
use crate::error::CoreResult;
use crate::hub::{Hub, LiveEvent, Subscription};

#[derive(Debug, Clone)]
pub enum StreamItem {
    /// The session's current state as of `id`; the stream continues after it.
    Snapshot {
        id: EventId,
        data: Arc<str>,
    },
    Event(LiveEvent),
}

/// Why a stream ended on the server's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The subscriber fell further behind than its queue allows; it should resume.
    Lagged,
    /// The hub went away (shutdown).
    Closed,
}

pub struct SessionStream {
    backlog: VecDeque<StreamItem>,
    subscription: Subscription,
    last_sent: EventId,
}

impl SessionStream {
    pub async fn next(&mut self) -> Result<StreamItem, StreamEnd> {
        if let Some(item) = self.backlog.pop_front() {
            return Ok(item);
        }
        loop {
            match self.subscription.receiver.recv().await {
                Ok(event) if event.event_id <= self.last_sent => continue,
                Ok(event) => {
                    self.last_sent = event.event_id;
                    return Ok(StreamItem::Event(event));
                }
                Err(RecvError::Lagged(_)) => return Err(StreamEnd::Lagged),
                Err(RecvError::Closed) => return Err(StreamEnd::Closed),
            }
        }
    }
}

#[derive(Clone)]
pub struct StreamService {
    store: Arc<dyn Store>,
    hub: Hub,
    config: Arc<CoreConfig>,
    snapshots: Arc<Mutex<HashMap<(TenantId, SessionId), CachedSnapshot>>>,
}

/// Many viewers of one session open their streams at about the same time (a page load, a
/// reconnect wave after a restart): they share one snapshot per position instead of each running
/// the snapshot's queries. Short-lived, because the device list in it changes without events.
struct CachedSnapshot {
    at: EventId,
    made: Instant,
    data: Arc<str>,
}

const SNAPSHOT_TTL: Duration = Duration::from_secs(1);
const SNAPSHOT_CACHE_ENTRIES: usize = 10_000;

impl StreamService {
    pub fn new(store: Arc<dyn Store>, hub: Hub, config: Arc<CoreConfig>) -> Self {
        Self {
            store,
            hub,
            config,
            snapshots: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Opens a stream. With `cursor`, the events after it are replayed when they are still within
    /// the replay buffer; otherwise (no cursor, too old, or unknown) a snapshot comes first.
    pub async fn open(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        cursor: Option<EventId>,
    ) -> CoreResult<SessionStream> {
        let subscription = self.hub.subscribe(tenant, session).await?;
        let position = subscription.position;
        let mut backlog = VecDeque::new();
        let mut last_sent = position;
        match cursor {
            Some(c) if c <= position && position - c <= self.config.replay_buffer => {
                let wanted = u32::try_from(position - c).unwrap_or(u32::MAX);
                let events = self.store.events_after(tenant, session, c, wanted).await?;
                backlog.extend(
                    events
                        .into_iter()
                        .filter(|e| e.event_id <= position)
                        .map(|e| StreamItem::Event(Arc::new(e))),
                );
            }
            // A cursor ahead of the hub can be legitimate (the store committed events the hub has
            // not delivered yet); it is honoured if the store knows it, so nothing is sent twice.
            Some(c) if c > position && c <= self.store.last_event_id(tenant, session).await? => {
                last_sent = c;
            }
            _ => backlog.push_back(self.snapshot(tenant, session, position).await?),
        }
        Ok(SessionStream {
            backlog,
            subscription,
            last_sent,
        })
    }

    /// The session's state as of `at`: the latest report (its sections are the state) plus a
    /// `snapshot` object with the position and the devices that report into the session.
    pub async fn snapshot(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        at: EventId,
    ) -> CoreResult<StreamItem> {
        let key = (tenant.clone(), session.clone());
        if let Ok(cache) = self.snapshots.lock()
            && let Some(cached) = cache.get(&key)
            && cached.at == at
            && cached.made.elapsed() < SNAPSHOT_TTL
        {
            return Ok(StreamItem::Snapshot {
                id: at,
                data: cached.data.clone(),
            });
        }
        let data: Arc<str> = Arc::from(self.build_snapshot(tenant, session, at).await?);
        if let Ok(mut cache) = self.snapshots.lock() {
            if cache.len() >= SNAPSHOT_CACHE_ENTRIES {
                cache.retain(|_, c| c.made.elapsed() < SNAPSHOT_TTL);
            }
            cache.insert(
                key,
                CachedSnapshot {
                    at,
                    made: Instant::now(),
                    data: data.clone(),
                },
            );
        }
        Ok(StreamItem::Snapshot { id: at, data })
    }

    async fn build_snapshot(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        at: EventId,
    ) -> CoreResult<String> {
        let mut data: Value = match self.store.latest_event(tenant, session, at).await? {
            Some(event) => serde_json::from_str(&event.data)
                .map_err(|e| crate::CoreError::Unexpected(e.into()))?,
            None => empty_report(tenant, session),
        };
        let now = now_millis();
        let devices: Vec<Value> = self
            .store
            .session_devices(tenant, session)
            .await?
            .into_iter()
            .map(|d| {
                json!({
                    "device_id": d.id,
                    "device_name": d.name,
                    "device_type": d.device_type,
                    "status": d.status(now, self.config.offline_after_millis()),
                    "last_heartbeat_at": d.last_heartbeat_at.map(rfc3339),
                    "agent_version": d.agent_version,
                })
            })
            .collect();
        if let Value::Object(map) = &mut data {
            map.insert(
                "snapshot".to_owned(),
                json!({
                    "session_id": session,
                    "tenant": tenant,
                    "last_event_id": at,
                    "devices": devices,
                    "generated_at": rfc3339(now),
                }),
            );
        }
        Ok(data.to_string())
    }
}

fn empty_report(tenant: &TenantId, session: &SessionId) -> Value {
    let raw = json!({"meta": {"report_id": "snapshot", "created_at": rfc3339(now_millis()), "session_id": session}});
    ValidatedReport::parse(&raw)
        .ok()
        .and_then(|r| serde_json::from_str(&r.render(tenant, 0)).ok())
        .unwrap_or_else(|| json!({"meta": {"event_id": 0, "session_id": session}}))
}
