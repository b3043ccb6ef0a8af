//! The live fan-out hub: one broadcast channel per (tenant, session) that has subscribers.
//!
//! Ordering guarantee: the hub delivers a session's events strictly in id order and without gaps.
//! Publishers may call `publish` in any order (concurrent requests finish in any order, and a
//! request may be cancelled between its commit and its publish), so each session keeps
//! `delivered_up_to` and parks early arrivals in `pending`. If the missing id does not arrive
//! within `gap_fill_after`, the hub reads it from the store — every published event is already
//! committed, so the store always has it. The same mechanism lets events arrive from other
//! replicas in any order later on.
//!
//! A subscriber is registered and handed its position (`delivered_up_to`) under the same lock that
//! delivery takes, so "replay up to the position, then live after it" has neither gaps nor
//! duplicates. Publishing never blocks: the broadcast ring is bounded and a receiver that falls
//! behind it is told it lagged and is disconnected (it resumes with Last-Event-ID).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use nexus_domain::{EventId, SessionId, TenantId};
use nexus_store::{Store, StoredEvent};
use tokio::sync::{OnceCell, broadcast};

use crate::config::CoreConfig;
use crate::error::CoreResult;

type SessionKey = (TenantId, SessionId);

/// An event as delivered live: shared, never copied per subscriber.
pub type LiveEvent = Arc<StoredEvent>;

#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    sessions: Mutex<HashMap<SessionKey, Arc<SessionChannel>>>,
    store: Arc<dyn Store>,
    config: Arc<CoreConfig>,
}

struct SessionChannel {
    key: SessionKey,
    sender: broadcast::Sender<LiveEvent>,
    state: Mutex<SessionState>,
    initialized: OnceCell<()>,
}

#[derive(Default)]
struct SessionState {
    /// `None` until the channel has read the session's last id from the store.
    delivered_up_to: Option<EventId>,
    pending: BTreeMap<EventId, LiveEvent>,
    gap_fill_running: bool,
}

/// A registered subscriber. Dropping it unregisters; the last one out removes the channel.
pub struct Subscription {
    pub receiver: broadcast::Receiver<LiveEvent>,
    /// Every event after this id reaches `receiver`; earlier ones come from the store.
    pub position: EventId,
    _registration: Registration,
}

struct Registration {
    hub: Arc<HubInner>,
    channel: Arc<SessionChannel>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the data half-updated in a way that matters
    // more than stopping the whole hub would, so poisoning is ignored.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Hub {
    pub fn new(store: Arc<dyn Store>, config: Arc<CoreConfig>) -> Self {
        Self {
            inner: Arc::new(HubInner {
                sessions: Mutex::new(HashMap::new()),
                store,
                config,
            }),
        }
    }

    /// Number of sessions with live subscribers (for metrics and tests).
    pub fn active_sessions(&self) -> usize {
        lock(&self.inner.sessions).len()
    }

    pub async fn subscribe(
        &self,
        tenant: &TenantId,
        session: &SessionId,
    ) -> CoreResult<Subscription> {
        let key = (tenant.clone(), session.clone());
        // This first receiver only keeps the channel registered while we initialize it.
        let (channel, placeholder) = {
            let mut sessions = lock(&self.inner.sessions);
            let channel = sessions
                .entry(key.clone())
                .or_insert_with(|| {
                    // Never smaller than one request's worth of reports, or a single push could cut off
                    // every subscriber that is not scheduled while it is delivered.
                    let capacity = self
                        .inner
                        .config
                        .subscriber_queue
                        .max(crate::reports::MAX_REPORTS_PER_REQUEST);
                    let (sender, _) = broadcast::channel(capacity);
                    Arc::new(SessionChannel {
                        key,
                        sender,
                        state: Mutex::new(SessionState::default()),
                        initialized: OnceCell::new(),
                    })
                })
                .clone();
            let receiver = channel.sender.subscribe();
            (channel, receiver)
        };
        let registration = Registration {
            hub: self.inner.clone(),
            channel: channel.clone(),
        };
        let initialized = channel
            .initialized
            .get_or_try_init(|| async {
                let last = self
                    .inner
                    .store
                    .last_event_id(&channel.key.0, &channel.key.1)
                    .await?;
                self.inner.advance(&channel, Some(last), Vec::new());
                Ok::<(), crate::CoreError>(())
            })
            .await;
        initialized?;
        // Subscribing under the delivery lock pins the position: every later event reaches us.
        let (receiver, position) = {
            let state = lock(&channel.state);
            (
                channel.sender.subscribe(),
                state.delivered_up_to.unwrap_or(0),
            )
        };
        drop(placeholder);
        Ok(Subscription {
            receiver,
            position,
            _registration: registration,
        })
    }

    /// Reads every live session's newer events from the store. Called when the bus (re)connects
    /// and periodically, because a lost bus message for a session's newest event leaves no gap to
    /// notice until the next event arrives.
    pub async fn resync_all(&self) {
        let channels: Vec<Arc<SessionChannel>> =
            lock(&self.inner.sessions).values().cloned().collect();
        for channel in channels {
            let Some(from) = lock(&channel.state).delivered_up_to else {
                continue;
            };
            match self
                .inner
                .store
                .events_after(&channel.key.0, &channel.key.1, from, 1000)
                .await
            {
                Ok(events) if !events.is_empty() => {
                    tracing::debug!(count = events.len(), "hub caught up from the store");
                    self.inner
                        .advance(&channel, None, events.into_iter().map(Arc::new).collect());
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "hub could not resync a session"),
            }
        }
    }

    /// Delivers a committed event to the session's subscribers, in id order.
    pub fn publish(&self, tenant: &TenantId, event: StoredEvent) {
        let channel = {
            let sessions = lock(&self.inner.sessions);
            match sessions.get(&(tenant.clone(), event.session_id.clone())) {
                Some(c) => c.clone(),
                // Nobody is listening: the store already has the event for later readers.
                None => return,
            }
        };
        self.inner.advance(&channel, None, vec![Arc::new(event)]);
    }
}

impl HubInner {
    /// Adds events (and, once, the initial position) and delivers every event that is now next
    /// in line. Schedules a store read when a gap remains.
    fn advance(
        self: &Arc<Self>,
        channel: &Arc<SessionChannel>,
        init: Option<EventId>,
        events: Vec<LiveEvent>,
    ) {
        let mut state = lock(&channel.state);
        if let Some(last) = init
            && state.delivered_up_to.is_none()
        {
            state.delivered_up_to = Some(last);
        }
        for event in events {
            if state.delivered_up_to.is_none_or(|d| event.event_id > d) {
                state.pending.insert(event.event_id, event);
            }
        }
        let Some(mut delivered) = state.delivered_up_to else {
            return;
        };
        // Anything at or below the position is already delivered (or came from the store).
        while let Some(entry) = state.pending.first_entry() {
            if *entry.key() <= delivered {
                entry.remove();
            } else if *entry.key() == delivered + 1 {
                let event = entry.remove();
                delivered = event.event_id;
                // No receivers is fine: the channel is about to be removed.
                let _ = channel.sender.send(event);
            } else {
                break;
            }
        }
        state.delivered_up_to = Some(delivered);
        if !state.pending.is_empty() && !state.gap_fill_running {
            state.gap_fill_running = true;
            drop(state);
            let hub = self.clone();
            let channel = channel.clone();
            tokio::spawn(async move { hub.fill_gaps(channel).await });
        }
    }

    async fn fill_gaps(self: Arc<Self>, channel: Arc<SessionChannel>) {
        loop {
            tokio::time::sleep(self.config.gap_fill_after).await;
            let (from, until) = {
                let mut state = lock(&channel.state);
                let (Some(delivered), Some(first_pending)) =
                    (state.delivered_up_to, state.pending.keys().next().copied())
                else {
                    state.gap_fill_running = false;
                    return;
                };
                (delivered, first_pending)
            };
            let wanted = u32::try_from(until.saturating_sub(from + 1))
                .unwrap_or(u32::MAX)
                .min(1000);
            match self
                .store
                .events_after(&channel.key.0, &channel.key.1, from, wanted)
                .await
            {
                Ok(events) => {
                    tracing::debug!(
                        from,
                        until,
                        filled = events.len(),
                        "hub filled a gap from the store"
                    );
                    self.advance(&channel, None, events.into_iter().map(Arc::new).collect());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "hub could not read a gap from the store; retrying")
                }
            }
            let mut state = lock(&channel.state);
            // Cleared under the same lock that `advance` checks, so a later gap starts a new filler.
            if state.pending.is_empty() || channel.sender.receiver_count() == 0 {
                state.pending.clear();
                state.gap_fill_running = false;
                return;
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut sessions = lock(&self.hub.sessions);
        // The subscription's receiver is dropped before this guard (field order), so a count of
        // zero means nobody is left. New subscribers register under this same lock.
        if self.channel.sender.receiver_count() == 0
            && sessions
                .get(&self.channel.key)
                .is_some_and(|c| Arc::ptr_eq(c, &self.channel))
        {
            sessions.remove(&self.channel.key);
        }
    }
}
