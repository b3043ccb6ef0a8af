//! A tiny in-memory stand-in for the NEXUS HTTP contract the bench uses
//! (pairing, report push, SSE stream, readiness). It exists only to self-test
//! the harness when no real server is at hand; it is not a performance
//! reference (nothing is durable, there is no auth beyond device tokens).

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
