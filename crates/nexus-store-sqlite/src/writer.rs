//! The single writer task and its group commit (see the crate docs for why).
//!
//! Report appends, the hot path, are not run one by one: every append queued when a transaction
//! starts is handled together — one duplicate lookup and one multi-row INSERT per chunk of rows,
//! whatever the number of requests — because each statement costs a round trip to SQLite's
//! worker thread and the writer is the one serial part of ingest. Other writes run as closures,
//! each in its own SAVEPOINT so one failing request cannot undo another's.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use nexus_domain::report::ValidatedReport;
use nexus_domain::time::Millis;
use nexus_domain::{DeviceId, TenantId};
use nexus_store::{AppendedEvent, StoreError, StoreResult, StoredEvent};
use sqlx::{Connection, Row, SqliteConnection};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

/// Called once the batch holding a job has committed (or failed to).
type Finish = Box<dyn FnOnce(StoreResult<()>) + Send>;
/// A unit of write work. It answers its caller itself on failure and returns `None`;
/// on success it returns the finisher that answers after COMMIT.
type Job =
    Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Option<Finish>> + Send>;

/// One request's reports, appended together with every other queued request's.
pub(crate) struct AppendJob {
    pub(crate) tenant: TenantId,
    pub(crate) device: Option<DeviceId>,
    pub(crate) reports: Vec<ValidatedReport>,
    pub(crate) now: Millis,
    pub(crate) reply: oneshot::Sender<StoreResult<Vec<AppendedEvent>>>,
}

enum Op {
    Generic(Job),
    Append(AppendJob),
}

pub(crate) struct Writer {
    ops: mpsc::Sender<Op>,
    stop: Arc<Notify>,
    task: Mutex<Option<JoinHandle<()>>>,
}

fn closed() -> StoreError {
    StoreError::Unavailable(anyhow::anyhow!("the store is closed"))
}

impl Writer {
    pub(crate) fn spawn(conn: SqliteConnection, max_batch: usize) -> Self {
        // The queue bounds memory under overload: callers wait for room (back-pressure).
        let (ops, rx) = mpsc::channel(max_batch.max(1) * 4);
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(run(conn, rx, max_batch.max(1), stop.clone()));
        Self {
            ops,
            stop,
            task: Mutex::new(Some(task)),
        }
    }

    pub(crate) fn ensure_running(&self) -> StoreResult<()> {
        if self.ops.is_closed() {
            Err(StoreError::Unavailable(anyhow::anyhow!(
                "the SQLite writer has stopped"
            )))
        } else {
            Ok(())
        }
    }

    /// Runs `work` inside the next group-commit transaction and returns once it is durable.
    pub(crate) async fn write<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<T>>
            + Send
            + 'static,
    {
        let (reply, answer) = oneshot::channel::<StoreResult<T>>();
        let job: Job = Box::new(move |conn| {
            Box::pin(async move {
                match work(conn).await {
                    Ok(value) => Some(Box::new(move |committed: StoreResult<()>| {
                        let _ = reply.send(committed.map(|()| value));
                    }) as Finish),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        None
                    }
                }
            })
        });
        self.ops
            .send(Op::Generic(job))
            .await
            .map_err(|_| closed())?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable(anyhow::anyhow!("the write was abandoned")))?
    }

    /// Appends reports in the next group commit; returns once they are durable.
    pub(crate) async fn append(
        &self,
        tenant: TenantId,
        device: Option<DeviceId>,
        reports: Vec<ValidatedReport>,
        now: Millis,
    ) -> StoreResult<Vec<AppendedEvent>> {
        let (reply, answer) = oneshot::channel();
        let job = AppendJob {
            tenant,
            device,
            reports,
            now,
            reply,
        };
        self.ops.send(Op::Append(job)).await.map_err(|_| closed())?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable(anyhow::anyhow!("the write was abandoned")))?
    }

    /// Stops taking jobs, commits what is queued, checkpoints the WAL and closes the connection.
    pub(crate) async fn shutdown(&self) {
        self.stop.notify_one();
        let task = self.task.lock().await.take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

async fn run(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<Op>,
    max_batch: usize,
    stop: Arc<Notify>,
) {
    let mut cache = WriterCache::default();
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        tokio::select! {
            biased;
            received = rx.recv_many(&mut batch, max_batch) => {
                if received == 0 {
                    break;
                }
            }
            () = stop.notified() => {
                // Refuse new work but commit everything already queued.
                rx.close();
                continue;
            }
        }
        let ops = std::mem::take(&mut batch);
        if let Err(e) = commit_batch(&mut conn, &mut cache, ops).await {
            // The cache may describe rows that were just rolled back.
            cache = WriterCache::default();
            tracing::error!(error = %e, "SQLite group commit failed");
        }
    }
    checkpoint_and_close(conn).await;
}

async fn commit_batch(
    conn: &mut SqliteConnection,
    cache: &mut WriterCache,
    ops: Vec<Op>,
) -> Result<(), sqlx::Error> {
    let mut finishers: Vec<Finish> = Vec::with_capacity(ops.len());
    let mut appends: Vec<AppendJob> = Vec::new();
    let mut appended: Vec<Vec<AppendedEvent>> = Vec::new();
    let result = async {
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
        for op in ops {
            let job = match op {
                Op::Append(append) => {
                    appends.push(append);
                    continue;
                }
                Op::Generic(job) => job,
            };
            sqlx::query("SAVEPOINT job").execute(&mut *conn).await?;
            match job(conn).await {
                Some(finish) => {
                    sqlx::query("RELEASE job").execute(&mut *conn).await?;
                    finishers.push(finish);
                }
                None => {
                    sqlx::query("ROLLBACK TO job").execute(&mut *conn).await?;
                    sqlx::query("RELEASE job").execute(&mut *conn).await?;
                }
            }
        }
        if !appends.is_empty() {
            appended = append_all(conn, cache, &appends).await?;
        }
        sqlx::query("COMMIT").execute(&mut *conn).await?;
        Ok::<(), sqlx::Error>(())
    }
    .await;
    match result {
        Ok(()) => {
            for finish in finishers {
                finish(Ok(()));
            }
            for (job, events) in appends.into_iter().zip(appended) {
                let _ = job.reply.send(Ok(events));
            }
            Ok(())
        }
        Err(e) => {
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            let failed = || {
                StoreError::Unavailable(anyhow::anyhow!("the transaction could not be committed"))
            };
            for finish in finishers {
                finish(Err(failed()));
            }
            for job in appends {
                let _ = job.reply.send(Err(failed()));
            }
            // Generic jobs not yet run are dropped here, which answers their callers.
            Err(e)
        }
    }
}

async fn checkpoint_and_close(mut conn: SqliteConnection) {
    if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
    {
        tracing::warn!(error = %e, "WAL checkpoint at shutdown failed");
    }
    if let Err(e) = conn.close().await {
        tracing::warn!(error = %e, "closing the SQLite writer failed");
    }
}

/// What the writer remembers between transactions to save statements on the hot path. Owned by
/// the writer task alone; reset whenever a transaction fails.
#[derive(Default)]
struct WriterCache {
    /// (tenant, session) → the last event id written.
    last_event_ids: HashMap<(String, String), u64>,
    /// (tenant, session, device) → when `session_devices.last_seen_at` was last written.
    device_seen: HashMap<(String, String, String), Millis>,
}

/// Bounds the cache; past this it starts over (entries are re-read on demand).
const CACHE_ENTRIES: usize = 100_000;
/// `session_devices.last_seen_at` is refreshed at most this often per (session, device).
const DEVICE_SEEN_RESOLUTION: Millis = 10_000;
/// Rows per statement: well under SQLite's limit of 32,766 bound parameters.
const ROWS_PER_STATEMENT: usize = 500;

type ReportKey = (String, String, String);
/// An events row to insert: key, event id, device, rendered JSON, time.
type NewRow = (ReportKey, u64, Option<String>, Arc<str>, Millis);

/// Appends every queued request's reports. Ids are gapless per (tenant, session): next = last + 1,
/// which is safe because this task is the only writer. Runs inside the batch transaction: if any
/// statement fails, the whole batch is rolled back and every caller is told so.
async fn append_all(
    conn: &mut SqliteConnection,
    cache: &mut WriterCache,
    jobs: &[AppendJob],
) -> Result<Vec<Vec<AppendedEvent>>, sqlx::Error> {
    // 1. Which report ids are already stored (one lookup per chunk, not per report).
    let mut keys: Vec<ReportKey> = Vec::new();
    for job in jobs {
        let tenant = job.tenant.to_string();
        for r in &job.reports {
            keys.push((
                tenant.clone(),
                r.session_id.as_str().to_owned(),
                r.report_id.clone(),
            ));
        }
    }
    let mut known: HashMap<ReportKey, (u64, Arc<str>)> = existing_events(conn, &keys).await?;

    // 2. Assign ids in queue order and render the stored JSON.
    let mut rows: Vec<NewRow> = Vec::new();
    let mut sightings: Vec<(String, String, String, Millis)> = Vec::new();
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        let tenant_key = job.tenant.to_string();
        let mut events = Vec::with_capacity(job.reports.len());
        for report in &job.reports {
            let session = report.session_id.as_str().to_owned();
            let key = (
                tenant_key.clone(),
                session.clone(),
                report.report_id.clone(),
            );
            if let Some((id, data)) = known.get(&key) {
                events.push(AppendedEvent {
                    event: StoredEvent {
                        session_id: report.session_id.clone(),
                        event_id: *id,
                        data: data.clone(),
                    },
                    duplicate: true,
                });
                continue;
            }
            let id = next_event_id(conn, cache, &tenant_key, &session).await?;
            let data: Arc<str> = Arc::from(report.render(&job.tenant, id));
            known.insert(key.clone(), (id, data.clone()));
            rows.push((
                key,
                id,
                job.device.as_ref().map(|d| d.as_str().to_owned()),
                data.clone(),
                job.now,
            ));
            events.push(AppendedEvent {
                event: StoredEvent {
                    session_id: report.session_id.clone(),
                    event_id: id,
                    data,
                },
                duplicate: false,
            });
            if let Some(device) = &job.device {
                sightings.push((
                    tenant_key.clone(),
                    session,
                    device.as_str().to_owned(),
                    job.now,
                ));
            }
        }
        results.push(events);
    }

    // 3. Multi-row inserts.
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from(
            "INSERT INTO events (tenant, session_id, event_id, report_id, device_id, data, created_at) VALUES ",
        );
        sql.push_str(&vec!["(?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", "));
        let mut query = sqlx::query(&sql);
        for ((tenant, session, report_id), id, device, data, now) in chunk {
            query = query
                .bind(tenant)
                .bind(session)
                .bind(i64::try_from(*id).unwrap_or(i64::MAX))
                .bind(report_id)
                .bind(device)
                .bind(&**data)
                .bind(*now);
        }
        query.execute(&mut *conn).await?;
    }

    // 4. Which devices report into which sessions (refreshed at a coarse resolution).
    for (tenant, session, device, now) in sightings {
        let key = (tenant, session, device);
        if cache
            .device_seen
            .get(&key)
            .is_some_and(|at| now - at < DEVICE_SEEN_RESOLUTION)
        {
            continue;
        }
        sqlx::query(
            "INSERT INTO session_devices (tenant, session_id, device_id, last_seen_at) VALUES (?, ?, ?, ?)
             ON CONFLICT (tenant, session_id, device_id) DO UPDATE SET last_seen_at = MAX(last_seen_at, excluded.last_seen_at)",
        )
        .bind(&key.0)
        .bind(&key.1)
        .bind(&key.2)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        if cache.device_seen.len() >= CACHE_ENTRIES {
            cache.device_seen.clear();
        }
        cache.device_seen.insert(key, now);
    }
    Ok(results)
}

async fn next_event_id(
    conn: &mut SqliteConnection,
    cache: &mut WriterCache,
    tenant: &str,
    session: &str,
) -> Result<u64, sqlx::Error> {
    let key = (tenant.to_owned(), session.to_owned());
    let last = match cache.last_event_ids.get(&key) {
        Some(last) => *last,
        None => {
            let row = sqlx::query(
                "SELECT COALESCE(MAX(event_id), 0) AS last FROM events WHERE tenant = ? AND session_id = ?",
            )
            .bind(tenant)
            .bind(session)
            .fetch_one(&mut *conn)
            .await?;
            u64::try_from(row.try_get::<i64, _>("last")?).unwrap_or(0)
        }
    };
    if cache.last_event_ids.len() >= CACHE_ENTRIES {
        cache.last_event_ids.clear();
    }
    cache.last_event_ids.insert(key, last + 1);
    Ok(last + 1)
}

async fn existing_events(
    conn: &mut SqliteConnection,
    keys: &[ReportKey],
) -> Result<HashMap<ReportKey, (u64, Arc<str>)>, sqlx::Error> {
    let mut found = HashMap::new();
    for chunk in keys.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from(
            "SELECT tenant, session_id, report_id, event_id, data FROM events WHERE (tenant, session_id, report_id) IN (VALUES ",
        );
        sql.push_str(&vec!["(?, ?, ?)"; chunk.len()].join(", "));
        sql.push(')');
        let mut query = sqlx::query(&sql);
        for (tenant, session, report_id) in chunk {
            query = query.bind(tenant).bind(session).bind(report_id);
        }
        for row in query.fetch_all(&mut *conn).await? {
            let id: i64 = row.try_get("event_id")?;
            let data: String = row.try_get("data")?;
            found.insert(
                (
                    row.try_get("tenant")?,
                    row.try_get("session_id")?,
                    row.try_get("report_id")?,
                ),
                (u64::try_from(id).unwrap_or(0), Arc::from(data)),
            );
        }
    }
    Ok(found)
}
