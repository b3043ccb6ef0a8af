//! Live fan-out between replicas over Redis pub/sub.
//!
//! Every replica publishes the events it commits on `nexus:ev:{tenant}` (one channel per tenant,
//! so operators can watch or limit a tenant's traffic) and pattern-subscribes to all of them.
//! Pub/sub is fire-and-forget, so nothing here is needed for correctness: the hub fills gaps from
//! the store, and after every (re)connection this replica resynchronizes all live sessions from
//! the store before it trusts the bus again. Publishing never blocks a request: events go through
//! a bounded queue to one publisher task, and are dropped (and later recovered from the store) if
//! Redis cannot keep up.

mod attempts;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use nexus_core::bus::{BusSinks, EventBus};
use nexus_core::hub::Hub;
use nexus_domain::{DeviceId, SessionId, TenantId};
use nexus_store::StoredEvent;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;

pub use attempts::RedisAttempts;

const CHANNEL_PREFIX: &str = "nexus:ev:";
/// Device revocations: `origin\ndevice_id`.
const REVOKE_CHANNEL: &str = "nexus:revoke";
/// Commands queued for a device (wakes its long-poll on any replica): `origin\ndevice_id`.
const COMMANDS_CHANNEL: &str = "nexus:commands";
const QUEUE: usize = 16_384;
const BATCH: usize = 256;
const TIMEOUT: Duration = Duration::from_secs(2);

pub struct RedisBus {
    client: redis::Client,
    origin: Arc<str>,
    outgoing: mpsc::Sender<(String, Vec<u8>)>,
}

impl RedisBus {
    /// Validates the URL and starts the publisher. Connection problems are retried in the
    /// background; the server works (more slowly across replicas) while Redis is away.
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let client =
            redis::Client::open(url).map_err(|e| anyhow::anyhow!("invalid Redis URL: {e}"))?;
        let origin: Arc<str> = Arc::from(ulid::Ulid::new().to_string());
        let (outgoing, queue) = mpsc::channel(QUEUE);
        tokio::spawn(publish_loop(client.clone(), queue));
        Ok(Self {
            client,
            origin,
            outgoing,
        })
    }
}

fn encode(origin: &str, event: &StoredEvent) -> Vec<u8> {
    let mut payload = Vec::with_capacity(origin.len() + event.data.len() + 64);
    payload.extend_from_slice(origin.as_bytes());
    payload.push(b'\n');
    payload.extend_from_slice(event.session_id.as_str().as_bytes());
    payload.push(b'\n');
    payload.extend_from_slice(event.event_id.to_string().as_bytes());
    payload.push(b'\n');
    payload.extend_from_slice(event.data.as_bytes());
    payload
}

/// Parses a message; `None` for our own messages and for anything malformed.
fn decode(own_origin: &str, channel: &str, payload: &[u8]) -> Option<(TenantId, StoredEvent)> {
    let tenant = TenantId::parse_joined(channel.strip_prefix(CHANNEL_PREFIX)?).ok()?;
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.splitn(4, '\n');
    let (origin, session, id, data) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if origin == own_origin {
        return None;
    }
    Some((
        tenant,
        StoredEvent {
            session_id: SessionId::parse("session_id", session).ok()?,
            event_id: id.parse().ok()?,
            data: Arc::from(data),
        },
    ))
}

impl EventBus for RedisBus {
    fn announce(&self, tenant: &TenantId, event: &StoredEvent) {
        let message = (
            format!("{CHANNEL_PREFIX}{tenant}"),
            encode(&self.origin, event),
        );
        if self.outgoing.try_send(message).is_err() {
            tracing::debug!("Redis publish queue full; peers will catch up from the store");
        }
    }

    fn announce_revocation(&self, device: &DeviceId) {
        let message = (
            REVOKE_CHANNEL.to_owned(),
            format!("{}\n{device}", self.origin).into_bytes(),
        );
        if self.outgoing.try_send(message).is_err() {
            tracing::warn!(
                "Redis publish queue full; a revocation reaches peers only after their cache TTL"
            );
        }
    }

    fn announce_commands_queued(&self, device: &DeviceId) {
        let message = (
            COMMANDS_CHANNEL.to_owned(),
            format!("{}\n{device}", self.origin).into_bytes(),
        );
        if self.outgoing.try_send(message).is_err() {
            tracing::debug!(
                "Redis publish queue full; a long-poll elsewhere finds the command on its next check"
            );
        }
    }

    fn start(&self, hub: Hub, sinks: BusSinks) {
        tokio::spawn(subscribe_loop(
            self.client.clone(),
            self.origin.clone(),
            hub,
            sinks,
        ));
    }
}

async fn publish_loop(client: redis::Client, mut queue: mpsc::Receiver<(String, Vec<u8>)>) {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(1));
    let mut connection: Option<ConnectionManager> = None;
    let mut batch = Vec::with_capacity(BATCH);
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        if connection.is_none() {
            connection = ConnectionManager::new_with_config(client.clone(), config.clone())
                .await
                .ok();
        }
        let Some(conn) = connection.as_mut() else {
            tracing::debug!(
                dropped = batch.len(),
                "Redis unavailable; dropping live announcements"
            );
            batch.clear();
            continue;
        };
        let mut pipe = redis::pipe();
        for (channel, payload) in batch.drain(..) {
            pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
        }
        if let Err(e) = pipe.query_async::<()>(conn).await {
            tracing::warn!(error = %e, "Redis publish failed; peers will catch up from the store");
        }
    }
}

/// Parses a device message (revocation, commands queued); `None` for our own and for malformed
/// ones.
fn decode_device_message(own_origin: &str, payload: &[u8]) -> Option<DeviceId> {
    let (origin, device) = std::str::from_utf8(payload).ok()?.split_once('\n')?;
    if origin == own_origin {
        return None;
    }
    DeviceId::parse("device_id", device).ok()
}

async fn subscribe_all(pubsub: &mut redis::aio::PubSub) -> redis::RedisResult<()> {
    pubsub.psubscribe(format!("{CHANNEL_PREFIX}*")).await?;
    pubsub.subscribe(REVOKE_CHANNEL).await?;
    pubsub.subscribe(COMMANDS_CHANNEL).await
}

async fn subscribe_loop(client: redis::Client, origin: Arc<str>, hub: Hub, sinks: BusSinks) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match tokio::time::timeout(TIMEOUT, client.get_async_pubsub()).await {
            Ok(Ok(mut pubsub)) => match subscribe_all(&mut pubsub).await {
                Ok(()) => {
                    tracing::info!("subscribed to Redis; resynchronizing live sessions");
                    backoff = Duration::from_millis(100);
                    // Revocations sent while we were away are lost: forget every cached credential.
                    (sinks.revoked)(None);
                    // Anything published while we were away is in the store.
                    hub.resync_all().await;
                    let mut messages = pubsub.into_on_message();
                    while let Some(message) = messages.next().await {
                        let (channel, payload) =
                            (message.get_channel_name(), message.get_payload_bytes());
                        if channel == REVOKE_CHANNEL {
                            if let Some(device) = decode_device_message(&origin, payload) {
                                (sinks.revoked)(Some(&device));
                            }
                        } else if channel == COMMANDS_CHANNEL {
                            if let Some(device) = decode_device_message(&origin, payload) {
                                (sinks.commands_queued)(&device);
                            }
                        } else if let Some((tenant, event)) = decode(&origin, channel, payload) {
                            hub.publish(&tenant, event);
                        }
                    }
                    tracing::warn!("Redis subscription lost; reconnecting");
                }
                Err(e) => tracing::warn!(error = %e, "Redis subscribe failed"),
            },
            Ok(Err(e)) => tracing::warn!(error = %e, "Redis connection failed"),
            Err(_) => tracing::warn!("Redis connection timed out"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_own_messages_are_ignored() {
        let event = StoredEvent {
            session_id: SessionId::parse("s", "sess-1").unwrap(),
            event_id: 42,
            data: Arc::from("{\"a\":\"line1\\nline2\"}"),
        };
        let payload = encode("replica-a", &event);
        let (tenant, decoded) = decode("replica-b", "nexus:ev:acme:web", &payload).unwrap();
        assert_eq!(tenant.to_string(), "acme:web");
        assert_eq!(decoded, event);
        assert!(decode("replica-a", "nexus:ev:acme:web", &payload).is_none());
        assert!(decode("replica-b", "other:acme:web", &payload).is_none());
        assert!(decode("replica-b", "nexus:ev:acme:web", b"garbage").is_none());
        let device = DeviceId::generate();
        let revocation = format!("replica-a\n{device}");
        assert_eq!(
            decode_device_message("replica-b", revocation.as_bytes()),
            Some(device)
        );
        assert_eq!(
            decode_device_message("replica-a", revocation.as_bytes()),
            None
        );
    }
}
