//! A tiny in-memory stand-in for the NEXUS HTTP contract the bench uses
//! (web sign-in, org/project creation, pairing, report push, SSE stream, device
//! list with and without auth, readiness, and commands: propose, approve, the
//! device's long-poll pull and ack, the command list). It exists only to self-test the
//! harness when no real server is at hand; it is not a performance reference
//! (nothing is durable; any email/password signs in, and an access token is
//! any `mockjwt_…` string, accepted by every mock instance the way JWTs signed
//! with a shared key are accepted by every replica).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskCx, Poll};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, broadcast, mpsc};

type Body = BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct Session {
    next_id: u64,
    report_ids: HashSet<String>,
    tx: Option<broadcast::Sender<Bytes>>,
}

struct Pairing {
    id: String,
    nonce: String,
    device: Option<(String, String)>, // (device_id, tenant)
}

/// A proposed command (the mock's policy: `fs.read`, `fs.list`, `system.say` and
/// `system.info` are GREEN and queued at once, everything else waits for approval).
struct MockCommand {
    device: String,
    /// Queue position, assigned when the command is queued (at approval for RED).
    seq: Option<u64>,
    status: &'static str,
    attempt: u64,
    /// What the device receives (without `attempt`).
    body: Value,
    /// The propose answer, repeated for an idempotent retry.
    answer: Value,
}

#[derive(Default)]
struct Commands {
    next_seq: u64,
    by_id: HashMap<String, MockCommand>, // "tenant|command_id"
    approvals: HashMap<String, (String, bool)>, // approval_id -> (command key, decided)
}

const MOCK_GREEN: &[&str] = &["fs.read", "fs.list", "system.say", "system.info"];

#[derive(Default)]
struct State {
    counter: AtomicU64,
    pairings: Mutex<HashMap<String, Pairing>>, // by code
    tokens: Mutex<HashMap<String, (String, String)>>, // token -> (device_id, tenant)
    sessions: Mutex<HashMap<String, Session>>, // "tenant|session"
    orgs: Mutex<HashSet<String>>,
    projects: Mutex<HashSet<String>>, // "org:project"
    commands: Mutex<Commands>,
    waiters: Mutex<HashMap<String, Arc<Notify>>>, // device_id -> long-polls
}

/// Serve the mock on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener) -> Result<()> {
    let state = Arc::new(State::default());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(v) => v,
            Err(_) => {
                // e.g. EMFILE: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let st = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(handle(st, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn full(status: StatusCode, v: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn err(status: StatusCode, msg: &str) -> Response<Body> {
    full(status, json!({ "error": msg }))
}

fn tenant(req: &Request<Incoming>) -> Option<String> {
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    Some(format!("{}:{}", h("x-org-id")?, h("x-project-id")?))
}

/// Whether the request carries a (mock) access token.
fn signed_in(req: &Request<Incoming>) -> bool {
    req.headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t.starts_with("mockjwt_"))
}

fn unauthorized() -> Response<Body> {
    err(StatusCode::UNAUTHORIZED, "authentication_required")
}

/// Insert into a set: 201 when new, 409 when it was there.
fn create(set: &Mutex<HashSet<String>>, key: String) -> Response<Body> {
    let Ok(mut m) = set.lock() else {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "lock");
    };
    if m.insert(key.clone()) {
        full(StatusCode::CREATED, json!({ "id": key }))
    } else {
        err(StatusCode::CONFLICT, "exists")
    }
}

fn device_list(st: &State, tenant: &str) -> Response<Body> {
    let Ok(tk) = st.tokens.lock() else {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "lock");
    };
    let mut devices: Vec<Value> = tk
        .values()
        .filter(|(_, t)| t == tenant)
        .map(|(d, _)| json!({ "device_id": d, "status": "offline" }))
        .collect();
    devices.sort_by(|a, b| a["device_id"].as_str().cmp(&b["device_id"].as_str()));
    full(
        StatusCode::OK,
        json!({ "tenant": tenant, "devices": devices }),
    )
}

async fn body_json(req: Request<Incoming>) -> Option<Value> {
    let b = req.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&b).ok()
}

fn s(v: &Value, k: &str) -> Option<String> {
    v.get(k)?.as_str().map(str::to_string)
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// (device_id, tenant) of the request's device token.
fn device_auth(st: &State, req: &Request<Incoming>) -> Option<(String, String)> {
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))?;
    st.tokens.lock().ok()?.get(token).cloned()
}

fn waiter(st: &State, device: &str) -> Option<Arc<Notify>> {
    Some(
        st.waiters
            .lock()
            .ok()?
            .entry(device.to_string())
            .or_default()
            .clone(),
    )
}

fn wake(st: &State, device: &str) {
    if let Some(n) = st.waiters.lock().ok().and_then(|w| w.get(device).cloned()) {
        n.notify_waiters();
    }
}

async fn propose(st: Arc<State>, req: Request<Incoming>, n: u64) -> Response<Body> {
    if !signed_in(&req) {
        return unauthorized();
    }
    let Some(t) = tenant(&req) else {
        return err(StatusCode::BAD_REQUEST, "tenant headers");
    };
    let Some(v) = body_json(req).await else {
        return err(StatusCode::BAD_REQUEST, "bad json");
    };
    let (Some(cid), Some(kind), Some(device)) =
        (s(&v, "command_id"), s(&v, "type"), s(&v, "device_id"))
    else {
        return err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "command_id, type, device_id",
        );
    };
    let known = st
        .tokens
        .lock()
        .is_ok_and(|tk| tk.values().any(|(d, dt)| *d == device && *dt == t));
    if !known {
        return err(StatusCode::NOT_FOUND, "device_not_found");
    }
    let correlation = v
        .get("client_context")
        .and_then(|c| s(c, "correlation_id"))
        .unwrap_or_else(|| format!("corr_{n}"));
    let Ok(mut cmds) = st.commands.lock() else {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "lock");
    };
    let key = format!("{t}|{cid}");
    if let Some(c) = cmds.by_id.get(&key) {
        let mut answer = c.answer.clone();
        answer["status"] = json!(c.status);
        return full(StatusCode::ACCEPTED, answer);
    }
    let green = MOCK_GREEN.contains(&kind.as_str());
    let approval_id = (!green).then(|| format!("apr_{n}"));
    let seq = green.then(|| {
        cmds.next_seq += 1;
        cmds.next_seq
    });
    let status = if green { "queued" } else { "pending_approval" };
    let answer = json!({
        "accepted": true, "command_id": cid, "correlation_id": correlation,
        "risk": if green { "green" } else { "red" }, "status": status, "approval_id": approval_id,
    });
    let body = json!({
        "command_id": cid, "type": kind, "params": v.get("params").cloned().unwrap_or(json!({})),
        "context": null, "client_context": {"correlation_id": correlation},
        "created_at": "2026-01-01T00:00:00Z",
    });
    if let Some(aid) = &approval_id {
        cmds.approvals.insert(aid.clone(), (key.clone(), false));
    }
    cmds.by_id.insert(
        key,
        MockCommand {
            device: device.clone(),
            seq,
            status,
            attempt: 0,
            body,
            answer: answer.clone(),
        },
    );
    drop(cmds);
    if green {
        wake(&st, &device);
    }
    full(StatusCode::ACCEPTED, answer)
}

async fn decide(st: Arc<State>, req: Request<Incoming>, approval_id: String) -> Response<Body> {
    if !signed_in(&req) {
        return unauthorized();
    }
    let Some(t) = tenant(&req) else {
        return err(StatusCode::BAD_REQUEST, "tenant headers");
    };
    let Some(v) = body_json(req).await else {
        return err(StatusCode::BAD_REQUEST, "bad json");
    };
    let approve = match s(&v, "decision").as_deref() {
        Some("approve") => true,
        Some("deny") => false,
        _ => return err(StatusCode::UNPROCESSABLE_ENTITY, "decision"),
    };
    let Ok(mut guard) = st.commands.lock() else {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "lock");
    };
    let cmds = &mut *guard;
    let Some((key, decided)) = cmds.approvals.get_mut(&approval_id) else {
        return err(StatusCode::NOT_FOUND, "approval_not_found");
    };
    if !key.starts_with(&format!("{t}|")) {
        return err(StatusCode::NOT_FOUND, "approval_not_found");
    }
    if *decided {
        return err(StatusCode::CONFLICT, "approval_already_decided");
    }
    *decided = true;
    let Some(c) = cmds.by_id.get_mut(key.as_str()) else {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "no command");
    };
    if approve {
        cmds.next_seq += 1;
        c.seq = Some(cmds.next_seq);
        c.status = "queued";
        c.body["approval"] = json!({
            "approval_id": approval_id, "approved_by": "mock-user",
            "approved_at": "2026-01-01T00:00:00Z", "expires_at": "2099-01-01T00:00:00Z",
            "kid": "mock", "signature": "mock-signature",
        });
    } else {
        c.status = "denied";
    }
    let (device, command_id, status) = (c.device.clone(), c.body["command_id"].clone(), c.status);
    drop(guard);
    if approve {
        wake(&st, &device);
    }
    full(
        StatusCode::ACCEPTED,
        json!({"accepted": true, "approval_id": approval_id,
               "status": if approve { "approved" } else { "denied" },
               "command_id": command_id, "command_status": status}),
    )
}

/// The device's queued and delivered-but-unacknowledged commands after `after`,
/// marked delivered with the next attempt.
fn take_commands(st: &State, tenant: &str, device: &str, after: u64) -> (Vec<Value>, u64) {
    let Ok(mut cmds) = st.commands.lock() else {
        return (Vec::new(), after);
    };
    let prefix = format!("{tenant}|");
    let mut due: Vec<(u64, &mut MockCommand)> = cmds
        .by_id
        .iter_mut()
        .filter(|(k, c)| {
            k.starts_with(&prefix)
                && c.device == device
                && matches!(c.status, "queued" | "delivered")
        })
        .filter_map(|(_, c)| Some((c.seq?, c)))
        .filter(|(seq, _)| *seq > after)
        .collect();
    due.sort_by_key(|(seq, _)| *seq);
    let mut next = after;
    let mut out = Vec::with_capacity(due.len());
    for (seq, c) in due.into_iter().take(100) {
        c.status = "delivered";
        c.attempt += 1;
        let mut b = c.body.clone();
        b["attempt"] = json!(c.attempt);
        out.push(b);
        next = seq;
    }
    (out, next)
}

async fn pull(st: Arc<State>, req: Request<Incoming>, device: &str) -> Response<Body> {
    let Some((dev, t)) = device_auth(&st, &req) else {
        return err(StatusCode::UNAUTHORIZED, "token");
    };
    if dev != device {
        return err(StatusCode::FORBIDDEN, "device");
    }
    let q = query(&req);
    let after = match q.get("cursor").map(String::as_str) {
        None | Some("") => 0,
        Some(c) => match c.parse::<u64>() {
            Ok(c) => c,
            Err(_) => return err(StatusCode::BAD_REQUEST, "invalid_cursor"),
        },
    };
    let wait = q
        .get("wait")
        .and_then(|w| w.parse::<u64>().ok())
        .unwrap_or(0)
        .min(30);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait);
    let notify = waiter(&st, &dev);
    loop {
        // Created before the read: a command queued in between still wakes us.
        let notified = notify.as_ref().map(|n| n.notified());
        let (commands, next) = take_commands(&st, &t, &dev, after);
        if !commands.is_empty() || tokio::time::Instant::now() >= deadline {
            return full(
                StatusCode::OK,
                json!({"commands": commands, "next_cursor": next.to_string()}),
            );
        }
        match notified {
            Some(n) => {
                tokio::select! {
                    _ = n => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                }
            }
            None => tokio::time::sleep_until(deadline).await,
        }
    }
}

async fn ack(st: Arc<State>, req: Request<Incoming>, device: &str, cid: &str) -> Response<Body> {
    let Some((dev, t)) = device_auth(&st, &req) else {
        return err(StatusCode::UNAUTHORIZED, "token");
    };
    if dev != device {
        return err(StatusCode::FORBIDDEN, "device");
    }
    let attempt = body_json(req)
        .await
        .and_then(|v| v.get("attempt").and_then(Value::as_u64))
        .unwrap_or(1);
    let Ok(mut cmds) = st.commands.lock() else {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "lock");
    };
    let Some(c) = cmds
        .by_id
        .get_mut(&format!("{t}|{cid}"))
        .filter(|c| c.device == dev)
    else {
        return err(StatusCode::NOT_FOUND, "command_not_found");
    };
    match c.status {
        "acked" => full(StatusCode::OK, json!({"ok": true})),
        "delivered" if attempt == c.attempt => {
            c.status = "acked";
            full(StatusCode::OK, json!({"ok": true}))
        }
        "delivered" => err(StatusCode::CONFLICT, "stale_attempt"),
        _ => err(StatusCode::CONFLICT, "not_delivered"),
    }
}

fn list_commands(st: &State, req: &Request<Incoming>) -> Response<Body> {
    if !signed_in(req) {
        return unauthorized();
    }
    let Some(t) = tenant(req) else {
        return err(StatusCode::BAD_REQUEST, "tenant headers");
    };
    let q = query(req);
    let prefix = format!("{t}|");
    let Ok(cmds) = st.commands.lock() else {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "lock");
    };
    let list: Vec<Value> = cmds
        .by_id
        .iter()
        .filter(|(k, c)| {
            k.starts_with(&prefix) && q.get("status").is_none_or(|s| s.as_str() == c.status)
        })
        .map(|(_, c)| json!({"command_id": c.body["command_id"], "status": c.status, "attempt": c.attempt}))
        .collect();
    full(
        StatusCode::OK,
        json!({"commands": list, "next_cursor": null}),
    )
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let n = st.counter.fetch_add(1, Ordering::Relaxed);
    match (method, path.as_str()) {
        (Method::GET, "/health/ready") => full(StatusCode::OK, json!({"status": "ready"})),
        (Method::POST, "/auth/login") => {
            let Some(v) = body_json(req).await else {
                return err(StatusCode::BAD_REQUEST, "bad json");
            };
            if s(&v, "email").unwrap_or_default().is_empty()
                || s(&v, "password").unwrap_or_default().is_empty()
            {
                return err(StatusCode::UNAUTHORIZED, "invalid_credentials");
            }
            let token = format!("mockjwt_{:x}{:x}", rand::random::<u64>(), n);
            full(
                StatusCode::OK,
                json!({"access_token": token, "token_type": "Bearer", "expires_in": 900}),
            )
        }
        (Method::POST, "/orgs") => {
            if !signed_in(&req) {
                return unauthorized();
            }
            let Some(org) = body_json(req).await.and_then(|v| s(&v, "org_id")) else {
                return err(StatusCode::UNPROCESSABLE_ENTITY, "org_id");
            };
            create(&st.orgs, org)
        }
        (Method::POST, p) if p.starts_with("/orgs/") && p.ends_with("/projects") => {
            if !signed_in(&req) {
                return unauthorized();
            }
            let org = p
                .trim_start_matches("/orgs/")
                .trim_end_matches("/projects")
                .to_string();
            if !st.orgs.lock().is_ok_and(|o| o.contains(&org)) {
                return err(StatusCode::NOT_FOUND, "org_not_found");
            }
            let Some(project) = body_json(req).await.and_then(|v| s(&v, "project_id")) else {
                return err(StatusCode::UNPROCESSABLE_ENTITY, "project_id");
            };
            create(&st.projects, format!("{org}:{project}"))
        }
        (Method::GET, "/devices") => {
            if !signed_in(&req) {
                return unauthorized();
            }
            let Some(t) = tenant(&req) else {
                return err(StatusCode::BAD_REQUEST, "tenant headers");
            };
            device_list(&st, &t)
        }
        (Method::GET, "/devtools/devices") => {
            let Some(t) = tenant(&req) else {
                return err(StatusCode::BAD_REQUEST, "tenant headers");
            };
            device_list(&st, &t)
        }
        (Method::POST, "/devices/pairing/start") => {
            let Some(v) = body_json(req).await else {
                return err(StatusCode::BAD_REQUEST, "bad json");
            };
            if s(&v, "device_name").is_none() {
                return err(StatusCode::UNPROCESSABLE_ENTITY, "device_name");
            }
            let code = format!("{:03}-{:03}", (n / 1000) % 1000, n % 1000);
            let p = Pairing {
                id: format!("pair_{n}"),
                nonce: format!("nonce_{:x}", rand::random::<u64>()),
                device: None,
            };
            let out = json!({"pairing_id": p.id, "pairing_code": code, "device_nonce": p.nonce, "expires_at": "2099-01-01T00:00:00Z"});
            if let Ok(mut m) = st.pairings.lock() {
                m.insert(code, p);
            }
            full(StatusCode::OK, out)
        }
        (Method::POST, "/devices/pairing/confirm_by_code") => {
            if !signed_in(&req) {
                return unauthorized();
            }
            let Some(t) = tenant(&req) else {
                return err(StatusCode::UNAUTHORIZED, "tenant headers");
            };
            let Some(v) = body_json(req).await else {
                return err(StatusCode::BAD_REQUEST, "bad json");
            };
            let code = s(&v, "pairing_code").unwrap_or_default();
            let Ok(mut m) = st.pairings.lock() else {
                return err(StatusCode::INTERNAL_SERVER_ERROR, "lock");
            };
            match m.get_mut(&code) {
                Some(p) => {
                    let id = format!("dev_{n}");
                    p.device = Some((id.clone(), t));
                    full(StatusCode::OK, json!({ "device_id": id }))
                }
                None => err(StatusCode::NOT_FOUND, "code"),
            }
        }
        (Method::POST, "/devices/pairing/complete") => {
            let Some(v) = body_json(req).await else {
                return err(StatusCode::BAD_REQUEST, "bad json");
            };
            let (pid, nonce) = (s(&v, "pairing_id"), s(&v, "device_nonce"));
            let Ok(mut m) = st.pairings.lock() else {
                return err(StatusCode::INTERNAL_SERVER_ERROR, "lock");
            };
            let code = m
                .iter()
                .find(|(_, p)| Some(&p.id) == pid.as_ref() && Some(&p.nonce) == nonce.as_ref())
                .map(|(c, _)| c.clone());
            let Some(p) = code.and_then(|c| m.remove(&c)) else {
                return err(StatusCode::NOT_FOUND, "pairing");
            };
            let Some((dev, t)) = p.device else {
                return err(StatusCode::CONFLICT, "not confirmed");
            };
            let token = format!("tok_{:x}{:x}", rand::random::<u64>(), n);
            if let Ok(mut tk) = st.tokens.lock() {
                tk.insert(token.clone(), (dev.clone(), t));
            }
            full(
                StatusCode::OK,
                json!({"device_id": dev, "device_token": token}),
            )
        }
        (Method::GET, "/agent/reports/stream") => {
            if !signed_in(&req) {
                return unauthorized();
            }
            let Some(t) = tenant(&req) else {
                return err(StatusCode::UNAUTHORIZED, "tenant headers");
            };
            let session = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("session_id="))
                .unwrap_or("")
                .to_string();
            if session.is_empty() {
                return err(StatusCode::BAD_REQUEST, "session_id");
            }
            let (rx, last) = {
                let Ok(mut m) = st.sessions.lock() else {
                    return err(StatusCode::INTERNAL_SERVER_ERROR, "lock");
                };
                let e = m.entry(format!("{t}|{session}")).or_default();
                let tx = e.tx.get_or_insert_with(|| broadcast::channel(4096).0);
                (tx.subscribe(), e.next_id)
            };
            sse_response(rx, last)
        }
        (Method::POST, p) if p.starts_with("/devices/") && p.ends_with("/reports") => {
            let dev_in_path = p
                .trim_start_matches("/devices/")
                .trim_end_matches("/reports")
                .to_string();
            let token = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string);
            let auth = token.and_then(|t| st.tokens.lock().ok()?.get(&t).cloned());
            let Some((dev, t)) = auth else {
                return err(StatusCode::UNAUTHORIZED, "token");
            };
            if dev != dev_in_path {
                return err(StatusCode::FORBIDDEN, "device");
            }
            let Some(v) = body_json(req).await else {
                return err(StatusCode::BAD_REQUEST, "bad json");
            };
            let Some(reports) = v.get("reports").and_then(Value::as_array) else {
                return err(StatusCode::UNPROCESSABLE_ENTITY, "reports");
            };
            if reports.len() > 100 {
                return err(StatusCode::PAYLOAD_TOO_LARGE, "max 100");
            }
            let mut ids = Vec::new();
            let Ok(mut m) = st.sessions.lock() else {
                return err(StatusCode::INTERNAL_SERVER_ERROR, "lock");
            };
            for r in reports {
                let meta = r.get("meta");
                let sid = meta.and_then(|m| s(m, "session_id")).unwrap_or_default();
                let rid = meta.and_then(|m| s(m, "report_id")).unwrap_or_default();
                let e = m.entry(format!("{t}|{sid}")).or_default();
                if !e.report_ids.insert(rid) {
                    continue;
                }
                e.next_id += 1;
                let id = e.next_id;
                ids.push(id);
                let mut r = r.clone();
                if let Some(meta) = r.get_mut("meta").and_then(Value::as_object_mut) {
                    meta.insert("event_id".into(), json!(id));
                }
                if let Some(tx) = &e.tx {
                    let _ = tx.send(Bytes::from(format!(
                        "event: report\nid: {id}\ndata: {r}\n\n"
                    )));
                }
            }
            full(
                StatusCode::OK,
                json!({"accepted": true, "count": ids.len(), "event_ids": ids}),
            )
        }
        (Method::POST, "/sidecar/command") => propose(st, req, n).await,
        (Method::POST, p) if p.starts_with("/approvals/") && p.ends_with("/decide") => {
            let id = p
                .trim_start_matches("/approvals/")
                .trim_end_matches("/decide")
                .to_string();
            decide(st, req, id).await
        }
        (Method::GET, "/commands") => list_commands(&st, &req),
        (Method::GET, p) if p.starts_with("/devices/") && p.ends_with("/commands") => {
            let dev = p
                .trim_start_matches("/devices/")
                .trim_end_matches("/commands")
                .to_string();
            pull(st, req, &dev).await
        }
        (Method::POST, p) if p.starts_with("/devices/") && p.ends_with("/ack") => {
            let Some((dev, cid)) = p
                .trim_start_matches("/devices/")
                .trim_end_matches("/ack")
                .split_once("/commands/")
                .map(|(d, c)| (d.to_string(), c.to_string()))
            else {
                return err(StatusCode::NOT_FOUND, "no route");
            };
            ack(st, req, &dev, &cid).await
        }
        _ => err(StatusCode::NOT_FOUND, "no route"),
    }
}

struct SseBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn sse_response(mut brx: broadcast::Receiver<Bytes>, last: u64) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let first =
            format!("retry: 1000\n\nevent: snapshot\nid: {last}\ndata: {{\"reports\":[]}}\n\n");
        if tx.send(Bytes::from(first)).await.is_err() {
            return;
        }
        loop {
            match brx.recv().await {
                Ok(b) => {
                    if tx.send(b).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let mut r = Response::new(SseBody { rx }.boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    r
}
