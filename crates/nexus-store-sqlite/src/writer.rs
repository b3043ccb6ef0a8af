//! The single writer task and its group commit (see the crate docs for why).

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use nexus_domain::report::ValidatedReport;
use nexus_domain::time::Millis;
use nexus_domain::{DeviceId, SessionId, TenantId};
use nexus_store::{AppendedEvent, StoreError, StoreResult, StoredEvent};
use sqlx::{Connection, Row, SqliteConnection};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::rows::unexpected;

/// Called once the batch holding a job has committed (or failed to).
type Finish = Box<dyn FnOnce(StoreResult<()>) + Send>;
/// A unit of write work. It answers its caller itself on failure and returns `None`;
/// on success it returns the finisher that answers after COMMIT.
type Job =
    Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Option<Finish>> + Send>;

pub(crate) struct Writer {
    pub(crate) cache: SharedCache,
    jobs: mpsc::Sender<Job>,
    stop: Arc<Notify>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    pub(crate) fn spawn(conn: SqliteConnection, max_batch: usize) -> Self {
        // The queue bounds memory under overload: callers wait for room (back-pressure).
        let (jobs, rx) = mpsc::channel(max_batch.max(1) * 4);
        let stop = Arc::new(Notify::new());
        let cache = SharedCache::default();
        let task = tokio::spawn(run(conn, rx, max_batch.max(1), stop.clone(), cache.clone()));
        Self {
            cache,
            jobs,
            stop,
            task: Mutex::new(Some(task)),
        }
    }

    pub(crate) fn ensure_running(&self) -> StoreResult<()> {
        if self.jobs.is_closed() {
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
        self.jobs
            .send(job)
            .await
            .map_err(|_| StoreError::Unavailable(anyhow::anyhow!("the store is closed")))?;
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
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
    stop: Arc<Notify>,
    cache: SharedCache,
) {
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
        let jobs = std::mem::take(&mut batch);
        if let Err(e) = commit_batch(&mut conn, jobs).await {
            clear_cache(&cache);
            tracing::error!(error = %e, "SQLite group commit failed");
        }
    }
    checkpoint_and_close(conn).await;
}

async fn commit_batch(conn: &mut SqliteConnection, jobs: Vec<Job>) -> Result<(), sqlx::Error> {
    let mut finishers: Vec<Finish> = Vec::with_capacity(jobs.len());
    let result = async {
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
        for job in jobs {
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
        sqlx::query("COMMIT").execute(&mut *conn).await?;
        Ok::<(), sqlx::Error>(())
    }
    .await;
    match result {
        Ok(()) => {
            for finish in finishers {
                finish(Ok(()));
            }
            Ok(())
        }
        Err(e) => {
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            for finish in finishers {
                finish(Err(StoreError::Unavailable(anyhow::anyhow!(
                    "the transaction could not be committed"
                ))));
            }
            // Jobs not yet run are dropped here, which answers their callers with Unavailable.
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

/// What the writer remembers between transactions to save statements on the hot path. Only the
/// writer task touches it (the mutex just makes that visible to the type system); it is cleared
/// whenever a transaction fails, because it may then describe rows that were rolled back.
#[derive(Default)]
pub(crate) struct WriterCache {
    /// (tenant, session) → the last event id committed or about to be committed.
    last_event_ids: HashMap<(String, String), u64>,
    /// (tenant, session, device) → when `session_devices.last_seen_at` was last written.
    device_seen: HashMap<(String, String, String), Millis>,
}

/// Bounds the cache; past this it starts over (entries are re-read on demand).
const CACHE_ENTRIES: usize = 100_000;
/// `session_devices.last_seen_at` is refreshed at most this often per (session, device).
const DEVICE_SEEN_RESOLUTION: Millis = 10_000;

pub(crate) type SharedCache = Arc<std::sync::Mutex<WriterCache>>;

fn cache_lock(cache: &SharedCache) -> std::sync::MutexGuard<'_, WriterCache> {
    cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn clear_cache(cache: &SharedCache) {
    let mut c = cache_lock(cache);
    c.last_event_ids.clear();
    c.device_seen.clear();
}

/// Appends a request's reports. Runs inside the writer's transaction, in a savepoint.
pub(crate) async fn append_reports(
    conn: &mut SqliteConnection,
    cache: SharedCache,
    tenant: TenantId,
    device: Option<DeviceId>,
    reports: Vec<ValidatedReport>,
    now: Millis,
) -> StoreResult<Vec<AppendedEvent>> {
    let tenant_key = tenant.to_string();
    // Ids are gapless per session: the next id is last+1, safe because this task is the only
    // writer. `next_ids` is this request's view; it reaches the shared cache only on success.
    let mut next_ids: HashMap<SessionId, u64> = HashMap::new();
    let mut out = Vec::with_capacity(reports.len());
    for report in &reports {
        let session = report.session_id.clone();
        let next = match next_ids.get(&session) {
            Some(n) => *n,
            None => {
                let cached = cache_lock(&cache)
                    .last_event_ids
                    .get(&(tenant_key.clone(), session.as_str().to_owned()))
                    .copied();
                match cached {
                    Some(last) => last + 1,
                    None => {
                        let row = sqlx::query("SELECT COALESCE(MAX(event_id), 0) AS last FROM events WHERE tenant = ? AND session_id = ?")
                            .bind(&tenant_key)
                            .bind(session.as_str())
                            .fetch_one(&mut *conn)
                            .await
                            .map_err(unexpected)?;
                        let last: i64 = row.try_get("last").map_err(unexpected)?;
                        u64::try_from(last).unwrap_or(0) + 1
                    }
                }
            }
        };
        let data = report.render(&tenant, next);
        let inserted = sqlx::query(
            "INSERT INTO events (tenant, session_id, event_id, report_id, device_id, data, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, session_id, report_id) DO NOTHING",
        )
        .bind(&tenant_key)
        .bind(session.as_str())
        .bind(i64::try_from(next).map_err(|e| StoreError::Unexpected(e.into()))?)
        .bind(&report.report_id)
        .bind(device.as_ref().map(DeviceId::as_str))
        .bind(&data)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(unexpected)?;
        if inserted.rows_affected() == 1 {
            next_ids.insert(session.clone(), next + 1);
            out.push(AppendedEvent {
                event: StoredEvent {
                    session_id: session,
                    event_id: next,
                    data: Arc::from(data),
                },
                duplicate: false,
            });
        } else {
            next_ids.insert(session.clone(), next);
            let row = sqlx::query("SELECT event_id, data FROM events WHERE tenant = ? AND session_id = ? AND report_id = ?")
                .bind(&tenant_key)
                .bind(session.as_str())
                .bind(&report.report_id)
                .fetch_one(&mut *conn)
                .await
                .map_err(unexpected)?;
            let id: i64 = row.try_get("event_id").map_err(unexpected)?;
            let data: String = row.try_get("data").map_err(unexpected)?;
            out.push(AppendedEvent {
                event: StoredEvent {
                    session_id: session,
                    event_id: u64::try_from(id).unwrap_or(0),
                    data: Arc::from(data),
                },
                duplicate: true,
            });
        }
    }
    if let Some(device) = &device {
        for session in next_ids.keys() {
            let key = (
                tenant_key.clone(),
                session.as_str().to_owned(),
                device.as_str().to_owned(),
            );
            let fresh = cache_lock(&cache)
                .device_seen
                .get(&key)
                .is_some_and(|at| now - at < DEVICE_SEEN_RESOLUTION);
            if fresh {
                continue;
            }
            sqlx::query(
                "INSERT INTO session_devices (tenant, session_id, device_id, last_seen_at) VALUES (?, ?, ?, ?)
                 ON CONFLICT (tenant, session_id, device_id) DO UPDATE SET last_seen_at = excluded.last_seen_at",
            )
            .bind(&tenant_key)
            .bind(session.as_str())
            .bind(device.as_str())
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(unexpected)?;
            let mut c = cache_lock(&cache);
            if c.device_seen.len() >= CACHE_ENTRIES {
                c.device_seen.clear();
            }
            c.device_seen.insert(key, now);
        }
    }
    let mut c = cache_lock(&cache);
    if c.last_event_ids.len() >= CACHE_ENTRIES {
        c.last_event_ids.clear();
    }
    for (session, next) in next_ids {
        c.last_event_ids
            .insert((tenant_key.clone(), session.as_str().to_owned()), next - 1);
    }
    Ok(out)
}
