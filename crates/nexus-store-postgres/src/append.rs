//! Report ingest: event ids that stay gapless and commit-ordered per (tenant, session), even with
//! several server processes appending to the same session at once (DESIGN.md §5).
//!
//! How ids are assigned: each session has a counter row, `sessions(tenant, session_id,
//! last_event_id)`. Inside the transaction that inserts the events, one statement reserves `n` ids:
//!
//! ```sql
//! INSERT INTO sessions ... VALUES (tenant, session, n)
//! ON CONFLICT (tenant, session_id) DO UPDATE SET last_event_id = sessions.last_event_id + n
//! RETURNING last_event_id
//! ```
//!
//! The UPDATE takes the counter row's lock and holds it until COMMIT or ROLLBACK. A second writer of
//! the same session, on this process or any other, blocks on that lock and, once it gets it, reads
//! the value the first one committed (READ COMMITTED re-reads the locked row). So:
//! - ids never collide: each writer adds its `n` to the latest committed value;
//! - commit order equals id order: the writer holding ids k+1..k+n commits (and becomes visible)
//!   before the next writer can even reserve k+n+1, so a reader that sees id m has already been able
//!   to see every id below m, and "everything after k" never skips a committed event;
//! - no gaps: a failed transaction rolls the counter back together with its events;
//! - a replica that dies or stalls mid-transaction holds the lock only until the server aborts the
//!   transaction (`idle_in_transaction_session_timeout`, see `PostgresConfig`).
//!
//! Writers of different sessions do not wait for each other. A request spanning several sessions
//! locks their rows in one statement in session order, so two requests cannot deadlock each other
//! (and if PostgreSQL ever reports a deadlock anyway, the attempt is retried).
//!
//! Duplicates: report ids are unique per session. A report id already stored returns the stored
//! event flagged `duplicate` and reserves no id. The first attempt does not look for duplicates (the
//! common case has none): it inserts with `ON CONFLICT DO NOTHING`, and if any row was not inserted
//! it rolls back and retries with a lookup of the existing report ids first. The lookup runs before
//! the counter lock, so a concurrent writer committing the same report id in between is detected the
//! same way and retried; after a few attempts the call fails with `Unavailable`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use nexus_domain::report::ValidatedReport;
use nexus_domain::time::Millis;
use nexus_domain::{DeviceId, SessionId, TenantId};
use nexus_store::{AppendedEvent, StoreError, StoreResult, StoredEvent};
use sqlx::Row;

use crate::rows::unexpected;
use crate::{PostgresStore, tenant_key};

/// Attempts before a call that keeps losing races gives up with `Unavailable`.
const MAX_ATTEMPTS: u32 = 4;
/// `session_devices.last_seen_at` is refreshed at most this often per (session, device), as in the
/// SQLite store; it saves a row version on most pushes.
const DEVICE_SEEN_RESOLUTION: Millis = 10_000;

/// Why an attempt did not produce an answer.
enum Failure {
    /// Lost a race (duplicate committed meanwhile, deadlock, serialization): try again.
    Retry(StoreError),
    Fatal(StoreError),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        let lost_race = matches!(&e, sqlx::Error::Database(db)
            if db.code().is_some_and(|c| c == "40001" || c == "40P01"));
        if lost_race {
            Failure::Retry(unexpected(e))
        } else {
            Failure::Fatal(unexpected(e))
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Fatal(e)
    }
}

pub(crate) async fn append_reports(
    store: &PostgresStore,
    tenant: &TenantId,
    device: Option<&DeviceId>,
    reports: &[ValidatedReport],
    now: Millis,
) -> StoreResult<Vec<AppendedEvent>> {
    let sources = vec![(device.map(DeviceId::as_str), now); reports.len()];
    append_with_sources(store, tenant, reports, &sources).await
}

/// Appends reports that may come from several requests (see `batch.rs`): `sources[i]` is the
/// device and receive time of `reports[i]`. All or nothing, like a single request.
pub(crate) async fn append_with_sources(
    store: &PostgresStore,
    tenant: &TenantId,
    reports: &[ValidatedReport],
    sources: &[(Option<&str>, Millis)],
) -> StoreResult<Vec<AppendedEvent>> {
    if reports.is_empty() {
        return Ok(Vec::new());
    }
    let mut look_up_existing = false;
    let mut attempt = 1;
    loop {
        match try_append(store, tenant, reports, sources, look_up_existing).await {
            Ok(events) => return Ok(events),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(e)) if attempt >= MAX_ATTEMPTS => {
                return Err(StoreError::Unavailable(anyhow::anyhow!(
                    "appending reports kept conflicting with concurrent writers: {e}"
                )));
            }
            Err(Failure::Retry(e)) => {
                tracing::debug!(attempt, error = %e, "retrying report append");
                look_up_existing = true;
                attempt += 1;
            }
        }
    }
}

/// One report's place in the request: the first occurrence of its (session, report id) creates
/// the event; later occurrences in the same request answer with that event as a duplicate.
struct Planned<'a> {
    report: &'a ValidatedReport,
    first_index: usize,
}

async fn try_append(
    store: &PostgresStore,
    tenant: &TenantId,
    reports: &[ValidatedReport],
    sources: &[(Option<&str>, Millis)],
    look_up_existing: bool,
) -> Result<Vec<AppendedEvent>, Failure> {
    let tenant_key = tenant_key(tenant);
    let mut first_seen: HashMap<(&str, &str), usize> = HashMap::new();
    let planned: Vec<Planned<'_>> = reports
        .iter()
        .enumerate()
        .map(|(i, report)| Planned {
            report,
            first_index: *first_seen
                .entry((report.session_id.as_str(), report.report_id.as_str()))
                .or_insert(i),
        })
        .collect();

    let mut tx = store.tenant_tx(tenant).await?;

    // (session, report id) → (event id, data) of events stored before this request.
    let mut existing: HashMap<(String, String), (u64, Arc<str>)> = HashMap::new();
    if look_up_existing {
        let (sessions, report_ids): (Vec<String>, Vec<String>) = first_seen
            .keys()
            .map(|(s, r)| ((*s).to_owned(), (*r).to_owned()))
            .unzip();
        let rows = sqlx::query(
            "SELECT e.session_id, e.report_id, e.event_id, e.data
             FROM events e JOIN unnest($2::text[], $3::text[]) AS k(session_id, report_id)
               ON e.session_id = k.session_id AND e.report_id = k.report_id
             WHERE e.tenant = $1",
        )
        .bind(&tenant_key)
        .bind(sessions)
        .bind(report_ids)
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            let id: i64 = row.try_get("event_id")?;
            let data: String = row.try_get("data")?;
            existing.insert(
                (row.try_get("session_id")?, row.try_get("report_id")?),
                (u64::try_from(id).unwrap_or(0), Arc::from(data)),
            );
        }
    }
    let is_new = |p: &Planned<'_>, i: usize| {
        p.first_index == i
            && !existing.contains_key(&(
                p.report.session_id.as_str().to_owned(),
                p.report.report_id.clone(),
            ))
    };

    // How many ids each session needs; BTreeMap keeps the sessions in lock order.
    let mut needed: BTreeMap<&str, i64> = BTreeMap::new();
    for (i, p) in planned.iter().enumerate() {
        if is_new(p, i) {
            *needed.entry(p.report.session_id.as_str()).or_insert(0) += 1;
        }
    }

    // Reserve the ids (see the module docs): one statement, counter rows locked in session order.
    let mut next_id: HashMap<String, u64> = HashMap::new();
    if !needed.is_empty() {
        let (sessions, counts): (Vec<String>, Vec<i64>) =
            needed.iter().map(|(s, n)| ((*s).to_owned(), *n)).unzip();
        let rows = sqlx::query(
            "INSERT INTO sessions (tenant, session_id, last_event_id)
             SELECT $1, k.session_id, k.n FROM unnest($2::text[], $3::bigint[]) AS k(session_id, n)
             ORDER BY k.session_id
             ON CONFLICT (tenant, session_id)
             DO UPDATE SET last_event_id = sessions.last_event_id + EXCLUDED.last_event_id
             RETURNING session_id, last_event_id",
        )
        .bind(&tenant_key)
        .bind(sessions)
        .bind(counts)
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            let session: String = row.try_get("session_id")?;
            let last: i64 = row.try_get("last_event_id")?;
            let n = needed.get(session.as_str()).copied().unwrap_or(0);
            let first =
                u64::try_from(last - n + 1).map_err(|e| StoreError::Unexpected(e.into()))?;
            next_id.insert(session, first);
        }
    }

    // Render the new events with their ids, in request order.
    let mut out: Vec<Option<AppendedEvent>> = Vec::with_capacity(planned.len());
    let (mut ins_sessions, mut ins_ids, mut ins_reports, mut ins_data) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ins_devices, mut ins_times): (Vec<Option<String>>, Vec<Millis>) =
        (Vec::new(), Vec::new());
    for (i, p) in planned.iter().enumerate() {
        let session = &p.report.session_id;
        if let Some((id, data)) =
            existing.get(&(session.as_str().to_owned(), p.report.report_id.clone()))
        {
            out.push(Some(appended(session, *id, data.clone(), true)));
        } else if p.first_index != i {
            // Filled in below from the first occurrence.
            out.push(None);
        } else {
            let slot = next_id.get_mut(session.as_str()).ok_or_else(|| {
                StoreError::Unexpected(anyhow::anyhow!("no id was reserved for a session"))
            })?;
            let id = *slot;
            *slot += 1;
            let data = p.report.render(tenant, id);
            ins_sessions.push(session.as_str().to_owned());
            ins_ids.push(i64::try_from(id).map_err(|e| StoreError::Unexpected(e.into()))?);
            ins_reports.push(p.report.report_id.clone());
            ins_data.push(data.clone());
            ins_devices.push(sources[i].0.map(str::to_owned));
            ins_times.push(sources[i].1);
            out.push(Some(appended(session, id, Arc::from(data), false)));
        }
    }
    if !ins_ids.is_empty() {
        let expected = ins_ids.len() as u64;
        let inserted = sqlx::query(
            "INSERT INTO events (tenant, session_id, event_id, report_id, device_id, data, created_at)
             SELECT $1, k.session_id, k.event_id, k.report_id, k.device_id, k.data, k.created_at
             FROM unnest($2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::bigint[])
                  AS k(session_id, event_id, report_id, data, device_id, created_at)
             ON CONFLICT (tenant, session_id, report_id) DO NOTHING",
        )
        .bind(&tenant_key)
        .bind(ins_sessions)
        .bind(ins_ids)
        .bind(ins_reports)
        .bind(ins_data)
        .bind(ins_devices)
        .bind(ins_times)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() != expected {
            // Some report id was already stored: the reserved ids would leave a gap. Dropping the
            // transaction rolls the counters back; the next attempt looks the duplicates up first.
            return Err(Failure::Retry(StoreError::Conflict(
                "a report id in this request is already stored".into(),
            )));
        }
    }

    // Which devices report into which sessions, each pair once, in lock order.
    let mut seen: BTreeMap<(&str, &str), Millis> = BTreeMap::new();
    for (p, (device, at)) in planned.iter().zip(sources) {
        if let Some(device) = device {
            let entry = seen
                .entry((p.report.session_id.as_str(), device))
                .or_insert(*at);
            *entry = (*entry).max(*at);
        }
    }
    if !seen.is_empty() {
        let mut sessions = Vec::with_capacity(seen.len());
        let mut devices = Vec::with_capacity(seen.len());
        let mut times = Vec::with_capacity(seen.len());
        for ((session, device), at) in seen {
            sessions.push(session.to_owned());
            devices.push(device.to_owned());
            times.push(at);
        }
        sqlx::query(
            "INSERT INTO session_devices (tenant, session_id, device_id, last_seen_at)
             SELECT $1, k.session_id, k.device_id, k.at
             FROM unnest($2::text[], $3::text[], $4::bigint[]) AS k(session_id, device_id, at)
             ORDER BY k.session_id, k.device_id
             ON CONFLICT (tenant, session_id, device_id) DO UPDATE SET last_seen_at = EXCLUDED.last_seen_at
             WHERE session_devices.last_seen_at <= EXCLUDED.last_seen_at - $5",
        )
        .bind(&tenant_key)
        .bind(sessions)
        .bind(devices)
        .bind(times)
        .bind(DEVICE_SEEN_RESOLUTION)
        .execute(&mut *tx)
        .await?;
    }

    tx.commit().await?;

    // Repeats inside the request answer with the event their first occurrence created.
    let mut result = Vec::with_capacity(out.len());
    for (i, p) in planned.iter().enumerate() {
        let event = match &out[i] {
            Some(event) => event.clone(),
            None => match &out[p.first_index] {
                Some(first) => AppendedEvent {
                    event: first.event.clone(),
                    duplicate: true,
                },
                None => {
                    return Err(Failure::Fatal(StoreError::Unexpected(anyhow::anyhow!(
                        "a repeated report has no first occurrence"
                    ))));
                }
            },
        };
        result.push(event);
    }
    Ok(result)
}

fn appended(session: &SessionId, event_id: u64, data: Arc<str>, duplicate: bool) -> AppendedEvent {
    AppendedEvent {
        event: StoredEvent {
            session_id: session.clone(),
            event_id,
            data,
        },
        duplicate,
    }
}
