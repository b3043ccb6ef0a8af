//! A tiny in-memory stand-in for the NEXUS HTTP contract the bench uses
//! (web sign-in, org/project creation, pairing, report push, SSE stream, device
//! list with and without auth, readiness). It exists only to self-test the
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
use tokio::sync::{broadcast, mpsc};

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

#[derive(Default)]
struct State {
    counter: AtomicU64,
    pairings: Mutex<HashMap<String, Pairing>>, // by code
    tokens: Mutex<HashMap<String, (String, String)>>, // token -> (device_id, tenant)
    sessions: Mutex<HashMap<String, Session>>, // "tenant|session"
    orgs: Mutex<HashSet<String>>,
    projects: Mutex<HashSet<String>>, // "org:project"
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
