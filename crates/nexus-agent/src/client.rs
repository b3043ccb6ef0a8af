//! The HTTP side of the agent: one `reqwest` client for the server's device API, problem+json
//! errors parsed into [`ApiError`], per-call timeouts, and [`Backoff`] for retrying network
//! failures (exponential with jitter, 1 s → 60 s, never a tight loop).
//!
//! The client holds no token: every device call takes the bearer explicitly, so the runner can
//! swap tokens after a refresh without rebuilding anything.

use std::path::Path;
use std::time::Duration;

use nexus_api::{
    AckRequest, CommandsResponse, CompletePairingRequest, CompletePairingResponse,
    DeviceTokenRefreshRequest, DeviceTokenRefreshResponse, HeartbeatRequest, HeartbeatResponse,
    Problem, PushReportsRequest, PushReportsResponse, StartPairingRequest, StartPairingResponse,
};
use rand::Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Connecting to the server may take this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Ordinary calls (everything except the long-poll) may take this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The long-poll asks the server to wait this many seconds.
pub const LONG_POLL_WAIT_SECS: u64 = 25;
/// Extra time over the long-poll wait before the call counts as failed.
const LONG_POLL_GRACE: Duration = Duration::from_secs(15);

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// No answer: connection refused, DNS, TLS, timeout, a body cut short. Retry with backoff.
    #[error("cannot reach the server: {0}")]
    Network(String),
    /// The server answered with an error (RFC 9457 problem+json, or something we could not
    /// parse as one, in which case `code` is `http_<status>`).
    #[error("the server answered {status} {code}: {detail}")]
    Problem {
        status: u16,
        code: String,
        detail: String,
    },
    /// A 2xx answer whose body is not what the API promises.
    #[error("unexpected answer from the server: {0}")]
    Decode(String),
}

impl ApiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Problem { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Problem { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Worth trying again later (with backoff): no answer, overload, server-side trouble.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Network(_) => true,
            Self::Problem { status, .. } => matches!(*status, 408 | 425 | 429 | 500..=599),
            Self::Decode(_) => false,
        }
    }

    /// The access token is not (or no longer) accepted: `token_expired` or `invalid_token`.
    pub fn is_unauthorized(&self) -> bool {
        self.status() == Some(401)
    }

    /// The refresh token was refused for good: the device was removed, its tokens revoked, or
    /// the refresh token was spent or expired. Only pairing again helps.
    pub fn is_revocation(&self) -> bool {
        self.status() == Some(401)
            && matches!(
                self.code(),
                Some("invalid_refresh_token" | "refresh_token_reused" | "invalid_token")
            )
    }
}

/// A client for one server.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    /// `base` is the server URL (`https://nexus.example.com`, a path prefix is kept);
    /// `ca_cert` an optional PEM file of an extra CA to trust.
    pub fn new(base: &str, ca_cert: Option<&Path>) -> Result<Self, ApiError> {
        let base = normalize_server_url(base).map_err(ApiError::Decode)?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("nexus-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_cert {
            let pem = std::fs::read(path).map_err(|e| {
                ApiError::Decode(format!("cannot read CA file {}: {e}", path.display()))
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                ApiError::Decode(format!("{} is not a PEM certificate: {e}", path.display()))
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| ApiError::Decode(format!("cannot set up HTTP: {e}")))?;
        Ok(Self { http, base })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn device_url(&self, device_id: &str, rest: &str) -> String {
        self.url(&format!("/devices/{}{rest}", encode_segment(device_id)))
    }

    // --- pairing ---------------------------------------------------------------------------

    pub async fn start_pairing(
        &self,
        body: &StartPairingRequest,
        tenant: Option<(&str, &str)>,
    ) -> Result<StartPairingResponse, ApiError> {
        let mut request = self
            .http
            .post(self.url("/devices/pairing/start"))
            .json(body);
        if let Some((org, project)) = tenant {
            request = request
                .header("x-org-id", org)
                .header("x-project-id", project);
        }
        json_answer(request.send().await).await
    }

    /// `Err(Problem{409, pairing_not_confirmed})` until a user confirms the code.
    pub async fn complete_pairing(
        &self,
        body: &CompletePairingRequest,
    ) -> Result<CompletePairingResponse, ApiError> {
        let request = self
            .http
            .post(self.url("/devices/pairing/complete"))
            .json(body);
        json_answer(request.send().await).await
    }

    /// The server's keys with their endorsements (public; see `ServerKeys::adopt_endorsed`).
    pub async fn server_keys(&self) -> Result<nexus_api::ServerKeysResponse, ApiError> {
        let request = self
            .http
            .get(self.url("/.well-known/nexus-server-keys.json"));
        json_answer(request.send().await).await
    }

    // --- device calls ----------------------------------------------------------------------

    pub async fn refresh(
        &self,
        device_id: &str,
        refresh_token: &str,
    ) -> Result<DeviceTokenRefreshResponse, ApiError> {
        let body = DeviceTokenRefreshRequest {
            device_id: device_id.to_owned(),
            refresh_token: refresh_token.to_owned(),
        };
        let request = self
            .http
            .post(self.url("/devices/token/refresh"))
            .json(&body);
        json_answer(request.send().await).await
    }

    pub async fn heartbeat(
        &self,
        device_id: &str,
        token: &str,
        body: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ApiError> {
        self.post_device(device_id, token, "/heartbeat", body, None)
            .await
    }

    /// Long-polls for commands: the server answers as soon as one is queued, or after `wait`
    /// seconds with none.
    pub async fn commands(
        &self,
        device_id: &str,
        token: &str,
        cursor: Option<&str>,
        wait_secs: u64,
    ) -> Result<CommandsResponse, ApiError> {
        let mut query: Vec<(&str, String)> = vec![("wait", wait_secs.to_string())];
        if let Some(cursor) = cursor.filter(|c| !c.is_empty()) {
            query.push(("cursor", cursor.to_owned()));
        }
        let request = self
            .http
            .get(self.device_url(device_id, "/commands"))
            .bearer_auth(token)
            .query(&query)
            .timeout(Duration::from_secs(wait_secs) + LONG_POLL_GRACE);
        json_answer(request.send().await).await
    }

    pub async fn ack(
        &self,
        device_id: &str,
        token: &str,
        command_id: &str,
        attempt: u32,
    ) -> Result<(), ApiError> {
        let body = AckRequest {
            received_at: None,
            attempt: Some(attempt),
        };
        let path = format!("/commands/{}/ack", encode_segment(command_id));
        let _: Value = self
            .post_device(device_id, token, &path, &body, None)
            .await?;
        Ok(())
    }

    pub async fn push_reports(
        &self,
        device_id: &str,
        token: &str,
        reports: Vec<Value>,
    ) -> Result<PushReportsResponse, ApiError> {
        let body = PushReportsRequest { reports };
        self.post_device(device_id, token, "/reports", &body, None)
            .await
    }

    /// Asks the server to delete this device (`POST /devices/{id}/unpair`).
    pub async fn unpair(&self, device_id: &str, token: &str) -> Result<(), ApiError> {
        let request = self
            .http
            .post(self.device_url(device_id, "/unpair"))
            .bearer_auth(token);
        empty_answer(request.send().await).await
    }

    async fn post_device<B: Serialize, T: DeserializeOwned>(
        &self,
        device_id: &str,
        token: &str,
        rest: &str,
        body: &B,
        timeout: Option<Duration>,
    ) -> Result<T, ApiError> {
        let mut request = self
            .http
            .post(self.device_url(device_id, rest))
            .bearer_auth(token)
            .json(body);
        if let Some(t) = timeout {
            request = request.timeout(t);
        }
        json_answer(request.send().await).await
    }
}

/// Checks and normalises a server URL: http(s) only, no query or fragment, no trailing slash.
pub fn normalize_server_url(raw: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(raw.trim())
        .map_err(|e| format!("{raw:?} is not a valid server URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{raw:?}: the server URL must start with https:// or http://"
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{raw:?}: the server URL has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{raw:?}: the server URL must not have a query or fragment"
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// Percent-encodes what is not safe in one path segment (ids are plain tokens in practice).
fn encode_segment(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn read_error(response: reqwest::Response) -> ApiError {
    let status = response.status().as_u16();
    let text = match response.text().await {
        Ok(t) => t,
        Err(e) => return ApiError::Network(describe(&e)),
    };
    match serde_json::from_str::<Problem>(&text) {
        Ok(p) => ApiError::Problem {
            status,
            code: p.code,
            detail: p.detail,
        },
        Err(_) => ApiError::Problem {
            status,
            code: format!("http_{status}"),
            detail: text.chars().take(200).collect(),
        },
    }
}

async fn json_answer<T: DeserializeOwned>(
    sent: Result<reqwest::Response, reqwest::Error>,
) -> Result<T, ApiError> {
    let response = sent.map_err(|e| ApiError::Network(describe(&e)))?;
    if !response.status().is_success() {
        return Err(read_error(response).await);
    }
    let bytes = response
        .bytes()
        .await
        .map_err(|e| ApiError::Network(describe(&e)))?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::Decode(e.to_string()))
}

async fn empty_answer(sent: Result<reqwest::Response, reqwest::Error>) -> Result<(), ApiError> {
    let response = sent.map_err(|e| ApiError::Network(describe(&e)))?;
    if !response.status().is_success() {
        return Err(read_error(response).await);
    }
    Ok(())
}

/// reqwest's own message plus its causes ("error sending request: connection refused").
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_owned()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Exponential backoff with jitter for retrying after network failures.
///
/// The n-th delay (from 0) is drawn uniformly from `[max(base, c/2), c]` where
/// `c = min(cap, base·2ⁿ)`: 1 s, then 1–2 s, 2–4 s, … up to 30–60 s, never below `base`, so a
/// failing loop never spins. [`reset`](Self::reset) after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(60))
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        let base = base.max(Duration::from_millis(1));
        Self {
            base,
            cap: cap.max(base),
            failures: 0,
        }
    }

    /// Failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay; each call counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        let floor = (ceiling / 2).max(self.base).min(ceiling);
        self.failures = self.failures.saturating_add(1);
        if floor >= ceiling {
            return ceiling;
        }
        let span = (ceiling - floor).as_millis().max(1);
        let extra = rand::thread_rng().gen_range(0..=span);
        floor + Duration::from_millis(u64::try_from(extra).unwrap_or(u64::MAX))
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_bounds_and_grows_to_the_cap() {
        let (base, cap) = (Duration::from_secs(1), Duration::from_secs(60));
        let mut b = Backoff::new(base, cap);
        let mut previous_ceiling = Duration::ZERO;
        for n in 0..40u32 {
            let ceiling = b.ceiling();
            assert!(ceiling >= previous_ceiling, "never shrinks");
            previous_ceiling = ceiling;
            let d = b.next_delay();
            assert!(d >= base, "never below 1 s: {d:?} at {n}");
            assert!(d <= cap, "never above 60 s: {d:?} at {n}");
            assert!(
                d <= ceiling && d >= (ceiling / 2).max(base),
                "{d:?} vs {ceiling:?}"
            );
        }
        assert_eq!(b.ceiling(), cap);
        assert_eq!(b.failures(), 40);
        b.reset();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.next_delay(), base, "the first retry waits the base delay");
    }

    #[test]
    fn backoff_is_jittered() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let mut b = Backoff::default();
            for _ in 0..10 {
                b.next_delay();
            }
            let d = b.next_delay();
            assert!(d >= Duration::from_secs(30) && d <= Duration::from_secs(60));
            seen.insert(d.as_millis());
        }
        assert!(seen.len() > 10, "delays at the cap differ: {seen:?}");
    }

    #[test]
    fn backoff_survives_huge_failure_counts() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..1000 {
            assert!(b.next_delay() <= Duration::from_secs(60));
        }
    }

    #[test]
    fn server_urls_are_checked_and_normalized() {
        assert_eq!(
            normalize_server_url("https://nexus.example.com/").as_deref(),
            Ok("https://nexus.example.com")
        );
        assert_eq!(
            normalize_server_url(" http://127.0.0.1:8080/api/ ").as_deref(),
            Ok("http://127.0.0.1:8080/api")
        );
        for bad in ["nexus.example.com", "ftp://x", "https://x/?a=1", "http://"] {
            assert!(normalize_server_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_classify() {
        let p = |status, code: &str| ApiError::Problem {
            status,
            code: code.into(),
            detail: String::new(),
        };
        assert!(ApiError::Network("x".into()).is_transient());
        assert!(p(503, "unavailable").is_transient());
        assert!(p(429, "rate_limited").is_transient());
        assert!(!p(422, "validation_failed").is_transient());
        assert!(p(401, "refresh_token_reused").is_revocation());
        assert!(p(401, "invalid_refresh_token").is_revocation());
        assert!(!p(401, "token_expired").is_revocation());
        assert!(p(401, "token_expired").is_unauthorized());
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("cmd_01-x"), "cmd_01-x");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }
}
