//! `GET /agent/reports/stream`: a session's reports over Server-Sent Events (DESIGN.md §5).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use nexus_core::stream::{SessionStream, StreamItem};
use nexus_domain::{EventId, SessionId};
use serde::Deserialize;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiQuery, Tenant};
use crate::state::AppState;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct StreamQuery {
    /// The session to watch.
    pub session_id: String,
    /// Resume cursor for clients that cannot send the `Last-Event-ID` header.
    pub last_event_id: Option<String>,
}

fn parse_cursor(raw: &str) -> ApiResult<EventId> {
    raw.trim().parse::<EventId>().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_last_event_id",
            "Last-Event-ID must be an event id received from this stream",
        )
    })
}

/// Streams `snapshot`, `report` and `ping` events. Resume with `Last-Event-ID`.
#[utoipa::path(get, path = "/agent/reports/stream", tag = "stream",
    params(("x-org-id" = String, Header), ("x-project-id" = String, Header),
           ("Last-Event-ID" = Option<String>, Header, description = "resume after this event id"),
           StreamQuery),
    responses((status = 200, description = "text/event-stream: `retry`, then `snapshot` or replayed `report` events, then live `report` events and `ping`s", content_type = "text/event-stream"),
              (status = 400, body = nexus_api::Problem)))]
pub async fn stream(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<StreamQuery>,
) -> ApiResult<Response> {
    let session = SessionId::parse("session_id", &query.session_id)?;
    let header_cursor = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty());
    let cursor = match header_cursor.or(query
        .last_event_id
        .as_deref()
        .filter(|v| !v.trim().is_empty()))
    {
        Some(raw) => Some(parse_cursor(raw)?),
        None => None,
    };
    if state.lifecycle.streams_closing.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "this server is shutting down; reconnect",
        ));
    }
    let opened = state
        .services
        .streams
        .open(&tenant, &session, cursor)
        .await?;
    let config = &state.config;
    let events = sse_events(
        opened,
        Timing {
            retry: config.sse_retry,
            ping: config.sse_ping_interval,
            idle: config.sse_idle_timeout,
        },
        state.lifecycle.streams_closing.clone(),
    );
    let mut response = Sse::new(events).into_response();
    // Proxies such as nginx must not buffer the stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

#[derive(Clone, Copy)]
struct Timing {
    retry: Duration,
    ping: Duration,
    idle: Duration,
}

struct StreamState {
    session: SessionStream,
    ping: Interval,
    idle_deadline: Instant,
    timing: Timing,
    closing: CancellationToken,
    sent_retry: bool,
}

fn sse_events(
    session: SessionStream,
    timing: Timing,
    closing: CancellationToken,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut ping = tokio::time::interval_at(Instant::now() + timing.ping, timing.ping);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let state = StreamState {
        session,
        ping,
        idle_deadline: Instant::now() + timing.idle,
        timing,
        closing,
        sent_retry: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        if !st.sent_retry {
            st.sent_retry = true;
            return Some((Ok(Event::default().retry(st.timing.retry)), st));
        }
        // Ending the stream ends the response cleanly; the client resumes with Last-Event-ID.
        let event = tokio::select! {
            biased;
            () = st.closing.cancelled() => return None,
            item = st.session.next() => match item {
                Ok(StreamItem::Snapshot { id, data }) => Event::default().id(id.to_string()).event("snapshot").data(&*data),
                Ok(StreamItem::Event(e)) => Event::default().id(e.event_id.to_string()).event("report").data(&*e.data),
                Err(end) => {
                    tracing::debug!(?end, "stream ended by the hub");
                    return None;
                }
            },
            _ = st.ping.tick() => {
                let ts = chrono::Utc::now().timestamp_millis();
                return Some((Ok(Event::default().event("ping").data(format!("{{\"ts\":{ts}}}"))), st));
            }
            () = tokio::time::sleep_until(st.idle_deadline) => return None,
        };
        st.idle_deadline = Instant::now() + st.timing.idle;
        Some((Ok(event), st))
    })
}
