//! `GET /agent/reports/stream`: a session's reports over Server-Sent Events (DESIGN.md §5).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use nexus_core::stream::{SessionStream, StreamItem};
use nexus_domain::time::now_millis;
use nexus_domain::{EventId, Permission, SessionId};
use serde::Deserialize;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiQuery, OptionalTenant, authorize_bearer};
use crate::state::AppState;
use nexus_core::auth::AccessService;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// The session to watch.
    pub session_id: String,
    /// Resume cursor for clients that cannot send the `Last-Event-ID` header.
    pub last_event_id: Option<String>,
    /// One-time ticket from `POST /auth/stream-ticket`, for clients that cannot send headers
    /// (a browser's EventSource); it names the tenant, so no tenant headers are needed then.
    pub ticket: Option<String>,
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
    params(("x-org-id" = Option<String>, Header, description = "required unless `ticket` is given"),
           ("x-project-id" = Option<String>, Header, description = "required unless `ticket` is given"),
           ("Last-Event-ID" = Option<String>, Header, description = "resume after this event id"),
           StreamQuery),
    security(("bearer" = []), ()),
    responses((status = 200, description = "text/event-stream: `retry`, then `snapshot` or replayed `report` events, then live `report` events and `ping`s", content_type = "text/event-stream"),
              (status = 400, body = nexus_api::Problem),
              (status = 401, body = nexus_api::Problem),
              (status = 404, description = "not a member of the tenant", body = nexus_api::Problem)))]
pub async fn stream(
    State(state): State<AppState>,
    OptionalTenant(header_tenant): OptionalTenant,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<StreamQuery>,
) -> ApiResult<Response> {
    let session = SessionId::parse("session_id", &query.session_id)?;
    let now = now_millis();
    // One store round trip for session, membership and role either way (plus the ticket).
    let (principal, tenant) = match query.ticket.as_deref() {
        Some(ticket) => {
            let (principal, tenant, role) = state
                .services
                .auth
                .redeem_stream_ticket(ticket, &session, now)
                .await?;
            tracing::Span::current().record("tenant_id", tracing::field::display(&tenant));
            AccessService::permit(role, Permission::ReadStreams)?;
            (principal, tenant)
        }
        None => {
            let (principal, tenant, _) = authorize_bearer(
                &state,
                &headers,
                || Ok(header_tenant),
                Permission::ReadStreams,
            )
            .await?;
            (principal, tenant)
        }
    };
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
    let recheck = Recheck {
        state: state.clone(),
        principal,
        tenant: tenant.clone(),
    };
    let events = sse_events(
        opened,
        Timing {
            retry: config.sse_retry,
            ping: config.sse_ping_interval,
            idle: config.sse_idle_timeout,
            reauthorize: config.sse_reauthorize_interval,
        },
        recheck,
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
    reauthorize: Duration,
}

/// What an open stream re-checks now and then: the viewer may have logged out, been removed
/// from the organization or lost the role since the stream opened.
struct Recheck {
    state: AppState,
    principal: nexus_core::auth::Principal,
    tenant: nexus_domain::TenantId,
}

impl Recheck {
    async fn still_allowed(&self) -> bool {
        let access = self
            .state
            .services
            .auth
            .access_now(&self.principal, &self.tenant, now_millis())
            .await;
        match access {
            Ok((active, role)) => {
                active && AccessService::permit(role, Permission::ReadStreams).is_ok()
            }
            // A store that is briefly unavailable does not cut viewers off; the next check decides.
            Err(nexus_core::CoreError::Unavailable(_)) => true,
            Err(_) => false,
        }
    }
}

struct StreamState {
    session: SessionStream,
    ping: Interval,
    reauthorize: Interval,
    recheck: Recheck,
    idle_deadline: Instant,
    timing: Timing,
    closing: CancellationToken,
    sent_retry: bool,
}

fn sse_events(
    session: SessionStream,
    timing: Timing,
    recheck: Recheck,
    closing: CancellationToken,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut ping = tokio::time::interval_at(Instant::now() + timing.ping, timing.ping);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut reauthorize =
        tokio::time::interval_at(Instant::now() + timing.reauthorize, timing.reauthorize);
    reauthorize.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let state = StreamState {
        session,
        ping,
        reauthorize,
        recheck,
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
        let event = loop {
            tokio::select! {
                biased;
                () = st.closing.cancelled() => return None,
                _ = st.reauthorize.tick() => {
                    if st.recheck.still_allowed().await {
                        continue;
                    }
                    tracing::info!("stream closed: its viewer is no longer signed in or allowed");
                    return None;
                }
                item = st.session.next() => break match item {
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
            }
        };
        st.idle_deadline = Instant::now() + st.timing.idle;
        Some((Ok(event), st))
    })
}
