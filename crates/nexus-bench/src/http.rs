//! Minimal keep-alive HTTP/1.1 client built directly on hyper's connection API:
//! one TCP connection, one request in flight, transparent reconnect.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::common::BaseUrl;

/// Extra headers attached to a request (name, value).
pub type Headers = Vec<(String, String)>;

pub struct HttpConn {
    base: BaseUrl,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// Number of TCP connections opened (1 + reconnects).
    pub connects: u64,
    timeout: Duration,
}

pub struct Resp {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Resp {
    pub fn ok(&self) -> bool {
        self.status.is_success()
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "response ({}) is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
            )
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "HTTP {}: {}",
            self.status,
            String::from_utf8_lossy(&self.body[..self.body.len().min(500)])
        )
    }
}

impl HttpConn {
    pub fn new(base: BaseUrl, timeout: Duration) -> Self {
        HttpConn {
            base,
            sender: None,
            connects: 0,
            timeout,
        }
    }

    async fn connect(&mut self) -> Result<()> {
        let stream = TcpStream::connect(self.base.addr)
            .await
            .with_context(|| format!("connecting to {}", self.base.addr))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")?;
        tokio::spawn(async move {
            // Ends when the peer closes or the sender is dropped; errors are
            // surfaced to the caller through the next send_request.
            let _ = conn.await;
        });
        self.sender = Some(sender);
        self.connects += 1;
        Ok(())
    }

    /// Send one request; reconnects first if the previous connection closed.
    /// A transport error drops the connection (the next call reconnects).
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(String, String)],
        body: Option<Bytes>,
    ) -> Result<Resp> {
        let ready = match self.sender.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !ready {
            self.sender = None;
            self.connect().await?;
        }
        let sender = self
            .sender
            .as_mut()
            .ok_or_else(|| anyhow!("no connection"))?;
        let mut b = Request::builder()
            .method(method)
            .uri(self.base.path(path))
            .header(hyper::header::HOST, self.base.host_header.as_str());
        if body.is_some() {
            b = b.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        for (k, v) in headers {
            b = b.header(k.as_str(), v.as_str());
        }
        let req = b
            .body(Full::new(body.unwrap_or_default()))
            .context("building request")?;
        let fut = async {
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>(Resp { status, body })
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.sender = None;
                Err(anyhow!("{e}"))
            }
            Err(_) => {
                self.sender = None;
                Err(anyhow!("request timed out after {:?}", self.timeout))
            }
        }
    }

    pub async fn get(&mut self, path: &str, headers: &[(String, String)]) -> Result<Resp> {
        self.request(Method::GET, path, headers, None).await
    }

    pub async fn post_json(
        &mut self,
        path: &str,
        headers: &[(String, String)],
        body: impl Into<Bytes>,
    ) -> Result<Resp> {
        self.request(Method::POST, path, headers, Some(body.into()))
            .await
    }
}
