//! The test harness: `TestServer::start()` launches the real server process, and typed helpers
//! speak the device and web protocols to it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

pub const ORG: &str = "acme";
pub const PROJECT: &str = "web";
/// The first admin every test server is bootstrapped with.
pub const ADMIN_EMAIL: &str = "admin@nexus.test";
pub const ADMIN_PASSWORD: &str = "correct-horse-battery-staple!";

pub struct TestServer {
    child: Option<Child>,
    pub base: String,
    pub data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub http: reqwest::Client,
    args: Vec<String>,
    /// The bootstrap admin's access token on this server (admin of `acme`, which has `web`).
    pub admin_token: String,
}

impl TestServer {
    /// A dev-mode server with default settings.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A server on the backend under test: SQLite by default; with `NEXUS_TEST_BACKEND=postgres`
    /// a fresh PostgreSQL database (and Redis when `NEXUS_TEST_REDIS_URL` is set).
    pub async fn start_with(extra: &[&str]) -> Self {
        let temp = tempfile::tempdir().expect("tempdir");
        let data_dir = temp.path().join("data");
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if backend_is_postgres() {
            args.extend([
                "--database-url".to_owned(),
                TestDatabase::create().await.app_url,
            ]);
            if let Ok(redis) = std::env::var("NEXUS_TEST_REDIS_URL") {
                args.extend(["--redis-url".to_owned(), redis]);
            }
        }
        Self::spawn(data_dir, Some(temp), args, "http").await
    }

    /// A server started WITHOUT the bootstrap variables, on a fresh store: it creates
    /// `admin@localhost` with a generated password. No one is signed in (`admin_token` is empty).
    pub async fn start_unbootstrapped() -> Self {
        let temp = tempfile::tempdir().expect("tempdir");
        let data_dir = temp.path().join("data");
        let mut args = Vec::new();
        if backend_is_postgres() {
            args.extend([
                "--database-url".to_owned(),
                TestDatabase::create().await.app_url,
            ]);
        }
        Self::spawn_with(data_dir, Some(temp), args, "http", false).await
    }

    /// Starts the server again on the same data directory (new port); stops it first unless
    /// it is already stopped.
    pub async fn restart(mut self) -> Self {
        if self.child.is_some() {
            let status = self.stop().await;
            assert!(status.success(), "server exited with {status}");
        }
        let temp = self._temp.take();
        let (data_dir, args) = (self.data_dir.clone(), self.args.clone());
        let bootstrap = !self.admin_token.is_empty();
        Self::spawn_with(data_dir, temp, args, "http", bootstrap).await
    }

    /// Stops the server (unless stopped) and starts it again on the same data directory AND the
    /// same address, so clients that remember the URL (the device agent) find it again.
    pub async fn restart_same_port(mut self) -> Self {
        if self.child.is_some() {
            let status = self.stop().await;
            assert!(status.success(), "server exited with {status}");
        }
        let listen = self
            .base
            .split_once("://")
            .map_or(self.base.as_str(), |(_, a)| a)
            .to_owned();
        let temp = self._temp.take();
        let (data_dir, args) = (self.data_dir.clone(), self.args.clone());
        let bootstrap = !self.admin_token.is_empty();
        let scheme = self
            .base
            .split_once("://")
            .map_or("http", |(s, _)| s)
            .to_owned();
        Self::spawn_listening(data_dir, temp, args, &scheme, bootstrap, &listen).await
    }

    pub async fn spawn(
        data_dir: PathBuf,
        temp: Option<tempfile::TempDir>,
        args: Vec<String>,
        scheme: &str,
    ) -> Self {
        Self::spawn_with(data_dir, temp, args, scheme, true).await
    }

    /// `bootstrap`: set `NEXUS_BOOTSTRAP_ADMIN_*`, sign in as that admin and create `acme:web`.
    pub async fn spawn_with(
        data_dir: PathBuf,
        temp: Option<tempfile::TempDir>,
        args: Vec<String>,
        scheme: &str,
        bootstrap: bool,
    ) -> Self {
        Self::spawn_listening(data_dir, temp, args, scheme, bootstrap, "127.0.0.1:0").await
    }

    /// Like [`TestServer::spawn_with`], listening on `listen` (`127.0.0.1:0`: a free port).
    pub async fn spawn_listening(
        data_dir: PathBuf,
        temp: Option<tempfile::TempDir>,
        args: Vec<String>,
        scheme: &str,
        bootstrap: bool,
        listen: &str,
    ) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_nexus"));
        command
            .arg("server")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(if args.iter().any(|a| a == "--no-dev") {
                None
            } else {
                Some("--dev")
            })
            .arg("--log")
            .arg("debug,sqlx=warn,hyper=info,h2=info,rustls=info")
            .args(args.iter().filter(|a| *a != "--no-dev"))
            .env_remove("NEXUS_LISTEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if bootstrap {
            command
                .env("NEXUS_BOOTSTRAP_ADMIN_EMAIL", ADMIN_EMAIL)
                .env("NEXUS_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD);
        } else {
            command
                .env_remove("NEXUS_BOOTSTRAP_ADMIN_EMAIL")
                .env_remove("NEXUS_BOOTSTRAP_ADMIN_PASSWORD");
        }
        let mut child = command.spawn().expect("spawn nexus");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel::<String>();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line)
                        && v["message"] == "NEXUS is listening"
                        && let Some(a) = v["address"].as_str()
                    {
                        let _ = addr_tx.send(a.to_owned());
                    }
                    logs.lock().expect("logs").push(line);
                }
            });
        }
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    logs.lock().expect("logs").push(format!("stderr: {line}"));
                }
            });
        }
        let address =
            tokio::task::spawn_blocking(move || addr_rx.recv_timeout(Duration::from_secs(30)))
                .await
                .expect("join")
                .unwrap_or_else(|_| {
                    panic!(
                        "server did not start; logs:\n{}",
                        logs.lock().expect("logs").join("\n")
                    )
                });
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if scheme == "https" {
            builder = builder.danger_accept_invalid_certs(true);
        }
        let http = builder.build().expect("client");
        let mut server = Self {
            child: Some(child),
            base: format!("{scheme}://{address}"),
            data_dir,
            _temp: temp,
            logs,
            http,
            args,
            admin_token: String::new(),
        };
        if bootstrap {
            server.admin_token = server.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
            server.ensure_tenant(ORG, PROJECT).await;
        }
        server
    }

    /// `POST /auth/login` as is: status and body.
    pub async fn login_response(
        &self,
        email: &str,
        password: &str,
        totp_code: Option<&str>,
    ) -> (u16, Value) {
        let mut body = json!({"email": email, "password": password});
        if let Some(code) = totp_code {
            body["totp_code"] = json!(code);
        }
        status_json(
            self.http
                .post(self.url("/auth/login"))
                .json(&body)
                .send()
                .await
                .expect("login"),
        )
        .await
    }

    /// A request with `token` as the bearer in `org:project`.
    pub fn as_user_in(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        org: &str,
        project: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(token)
            .header("x-org-id", org)
            .header("x-project-id", project)
    }

    /// A request with `token` as the bearer in the default test tenant.
    pub fn as_user(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        self.as_user_in(token, method, path, ORG, PROJECT)
    }

    /// Adds a new account to `org` with `role` (as the bootstrap admin) and signs it in.
    pub async fn new_member(&self, org: &str, email: &str, role: &str) -> TestUser {
        let (s, added) = status_json(
            self.http
                .post(self.url(&format!("/orgs/{org}/members")))
                .bearer_auth(&self.admin_token)
                .json(&json!({"email": email, "role": role}))
                .send()
                .await
                .expect("add member"),
        )
        .await;
        assert_eq!(s, 201, "add {email} as {role} of {org}: {added}");
        let password = added["initial_password"]
            .as_str()
            .expect("a new account gets an initial password")
            .to_owned();
        let (s, login) = self.login_response(email, &password, None).await;
        assert_eq!(s, 200, "login as {email}: {login}");
        TestUser {
            id: added["member"]["user_id"]
                .as_str()
                .expect("user_id")
                .to_owned(),
            email: email.to_owned(),
            password,
            token: login["access_token"].as_str().expect("token").to_owned(),
            refresh_token: login["refresh_token"].as_str().expect("refresh").to_owned(),
        }
    }

    /// The `--database-url` this server runs on (PostgreSQL backend), if any.
    pub fn database_url(&self) -> Option<&str> {
        self.args
            .iter()
            .position(|a| a == "--database-url")
            .and_then(|i| self.args.get(i + 1))
            .map(String::as_str)
    }

    /// The arguments that point `nexus admin …` / `nexus audit …` at this server's store.
    pub fn store_args(&self) -> Vec<String> {
        match self.database_url() {
            Some(url) => vec!["--database-url".to_owned(), url.to_owned()],
            None => vec!["--data-dir".to_owned(), self.data_dir.display().to_string()],
        }
    }

    /// Runs `nexus <args> <store args>`, feeding `stdin`.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.extend(self.store_args());
        nexus_cli(&all, stdin)
    }

    /// Runs SQL against this server's store with full rights (an attacker with database
    /// access): `sqlite3` on the SQLite file, `psql` as the superuser on PostgreSQL. Returns what
    /// the query printed (unaligned, one row per line).
    pub fn raw_sql(&self, sql: &str) -> String {
        match self.database_url() {
            Some(app_url) => {
                let name = app_url.rsplit('/').next().expect("database name");
                let superuser = postgres_superuser_url().expect("PostgreSQL");
                psql(&replace_database(&superuser, name), sql)
            }
            None => {
                let out = Command::new("sqlite3")
                    .arg(self.data_dir.join("nexus.db"))
                    .arg(sql)
                    .output()
                    .expect("sqlite3 (apt-get install sqlite3)");
                assert!(
                    out.status.success(),
                    "sqlite3 {sql}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
        }
    }

    /// The tenant's audit entries (newest first, up to 500), read as the admin.
    pub async fn audit_entries(&self) -> Vec<Value> {
        let (s, page) = status_json(
            self.web(reqwest::Method::GET, "/audit/logs?limit=500")
                .send()
                .await
                .expect("audit"),
        )
        .await;
        assert_eq!(s, 200, "{page}");
        page["entries"].as_array().expect("entries").clone()
    }

    /// `nexus admin keys rotate` on this server's key directory; returns the new key's kid.
    pub fn rotate_signing_key(&self) -> String {
        let out = nexus_cli(
            &[
                "admin".into(),
                "keys".into(),
                "rotate".into(),
                "--data-dir".into(),
                self.data_dir.display().to_string(),
            ],
            None,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8_lossy(&out.stdout).to_string();
        printed
            .split_whitespace()
            .nth(3)
            .expect("new signing key <kid> in <dir>")
            .to_owned()
    }

    /// Signs in and returns the access token (panics on failure).
    pub async fn login(&self, email: &str, password: &str) -> String {
        let (s, body) = status_json(
            self.http
                .post(self.url("/auth/login"))
                .json(&json!({"email": email, "password": password}))
                .send()
                .await
                .expect("login"),
        )
        .await;
        assert_eq!(s, 200, "login as {email}: {body}");
        body["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    /// Creates `org` (the admin becomes its admin) and `org:project`, unless they exist.
    pub async fn ensure_tenant(&self, org: &str, project: &str) {
        let r = self
            .http
            .post(self.url("/orgs"))
            .bearer_auth(&self.admin_token)
            .json(&json!({"org_id": org}))
            .send()
            .await
            .expect("create org");
        assert!(
            matches!(r.status().as_u16(), 201 | 409),
            "create org: {}",
            r.status()
        );
        let r = self
            .http
            .post(self.url(&format!("/orgs/{org}/projects")))
            .bearer_auth(&self.admin_token)
            .json(&json!({"project_id": project}))
            .send()
            .await
            .expect("create project");
        assert!(
            matches!(r.status().as_u16(), 201 | 409),
            "create project: {}",
            r.status()
        );
    }

    /// A request as the bootstrap admin in `org:project`.
    pub fn web_in(
        &self,
        method: reqwest::Method,
        path: &str,
        org: &str,
        project: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.admin_token)
            .header("x-org-id", org)
            .header("x-project-id", project)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(30)).await
    }

    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let waited = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + limit;
            loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    return Ok(status);
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    return Err(child.wait());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .expect("join");
        waited.unwrap_or_else(|_| panic!("server did not exit within {limit:?}"))
    }

    pub fn log_text(&self) -> String {
        self.logs.lock().expect("logs").join("\n")
    }

    /// A request as the bootstrap admin in the default test tenant.
    pub fn web(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.web_in(method, path, ORG, PROJECT)
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .web(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .expect("send");
        status_json(r).await
    }

    /// Pairs a device into the default tenant and returns it.
    pub async fn pair_device(&self, name: &str) -> PairedDevice {
        self.pair_device_in(name, ORG, PROJECT).await
    }

    pub async fn pair_device_in(&self, name: &str, org: &str, project: &str) -> PairedDevice {
        let (s, start) = status_json(
            self.http
                .post(self.url("/devices/pairing/start"))
                .json(&json!({"device_name": name, "capabilities": ["fs.read"]}))
                .send()
                .await
                .expect("start"),
        )
        .await;
        assert_eq!(s, 200, "{start}");
        self.ensure_tenant(org, project).await;
        let (s, confirm) = status_json(
            self.web_in(
                reqwest::Method::POST,
                "/devices/pairing/confirm_by_code",
                org,
                project,
            )
            .json(&json!({"pairing_code": start["pairing_code"]}))
            .send()
            .await
            .expect("confirm"),
        )
        .await;
        assert_eq!(s, 200, "{confirm}");
        let (s, done) = status_json(
            self.http
                .post(self.url("/devices/pairing/complete"))
                .json(&json!({"pairing_id": start["pairing_id"], "device_nonce": start["device_nonce"]}))
                .send()
                .await
                .expect("complete"),
        )
        .await;
        assert_eq!(s, 200, "{done}");
        PairedDevice {
            id: done["device_id"].as_str().expect("id").to_owned(),
            token: done["device_token"].as_str().expect("token").to_owned(),
            refresh_token: done["refresh_token"].as_str().expect("refresh").to_owned(),
            server_keys: done["server_keys"].clone(),
        }
    }

    pub fn device(
        &self,
        method: reqwest::Method,
        device: &PairedDevice,
        path: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(&format!("/devices/{}{path}", device.id)))
            .bearer_auth(&device.token)
    }

    /// Pushes reports and returns their event ids.
    pub async fn push(&self, device: &PairedDevice, reports: Vec<Value>) -> Vec<u64> {
        let r = self
            .device(reqwest::Method::POST, device, "/reports")
            .json(&json!({ "reports": reports }))
            .send()
            .await
            .expect("push");
        let (s, body) = status_json(r).await;
        assert_eq!(s, 200, "{body}");
        body["event_ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id"))
            .collect()
    }

    /// Opens the SSE stream of a session, optionally resuming after `last_event_id`.
    pub async fn subscribe(&self, session: &str, last_event_id: Option<u64>) -> SseClient {
        let mut request = self.web(
            reqwest::Method::GET,
            &format!("/agent/reports/stream?session_id={session}"),
        );
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        SseClient::open(request).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(Debug, Clone)]
pub struct PairedDevice {
    pub id: String,
    pub token: String,
    pub refresh_token: String,
    /// The JWK Set pairing completion returned: the keys approval signatures verify with.
    pub server_keys: Value,
}

pub async fn status_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A minimal report for `session`.
pub fn report(session: &str, report_id: &str) -> Value {
    json!({"meta": {"report_id": report_id, "created_at": "2026-02-03T10:00:00+0900", "session_id": session}})
}

#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
    pub retry: Option<u64>,
}

impl SseEvent {
    pub fn id_u64(&self) -> u64 {
        self.id
            .as_deref()
            .expect("event id")
            .parse()
            .expect("numeric id")
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("json data")
    }
}

/// Reads `text/event-stream` per the WHATWG parsing rules we rely on (id, event, data, retry).
pub struct SseClient {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
    pub ended: bool,
}

impl SseClient {
    pub async fn open(request: reqwest::RequestBuilder) -> Self {
        let response = request
            .timeout(Duration::from_secs(600))
            .send()
            .await
            .expect("open stream");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        Self {
            status,
            headers,
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
            ended: false,
        }
    }

    /// The next event (including the retry-only block), or None when the server ended the stream.
    pub async fn next_event(&mut self, limit: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(pos) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..pos + 2).collect();
                let mut event = SseEvent {
                    id: None,
                    event: "message".into(),
                    data: String::new(),
                    retry: None,
                };
                let mut data_lines = Vec::new();
                for line in block.lines() {
                    let (field, value) = line
                        .split_once(':')
                        .map_or((line, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
                    match field {
                        "id" => event.id = Some(value.to_owned()),
                        "event" => event.event = value.to_owned(),
                        "data" => data_lines.push(value.to_owned()),
                        "retry" => event.retry = value.parse().ok(),
                        _ => {}
                    }
                }
                event.data = data_lines.join("\n");
                return Some(event);
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Err(_) => panic!("no SSE event within {limit:?}; buffered: {:?}", self.buffer),
                Ok(None) => self.ended = true,
                Ok(Some(Err(e))) => panic!("stream error: {e}"),
                Ok(Some(Ok(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
            }
        }
    }

    /// Skips `retry` blocks and pings; returns the next snapshot or report.
    pub async fn next_data(&mut self, limit: Duration) -> Option<SseEvent> {
        loop {
            let event = self.next_event(limit).await?;
            if event.event == "snapshot" || event.event == "report" {
                return Some(event);
            }
        }
    }

    /// Collects `n` report events.
    pub async fn reports(&mut self, n: usize, limit: Duration) -> Vec<SseEvent> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next_data(limit).await {
                Some(e) if e.event == "report" => out.push(e),
                Some(_) => {}
                None => panic!("stream ended after {} of {n} reports", out.len()),
            }
        }
        out
    }
}

pub fn assert_problem(status: u16, body: &Value, expected_status: u16, code: &str) {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], expected_status, "{body}");
    assert!(
        body["type"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    assert!(body["correlation_id"].is_string(), "{body}");
}

pub fn backend_is_postgres() -> bool {
    std::env::var("NEXUS_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

/// The superuser URL of the test PostgreSQL (`scripts/postgres.sh start` prints it). Tests that
/// need PostgreSQL fail without it, unless `NEXUS_SKIP_POSTGRES=1` says to skip them.
pub fn postgres_superuser_url() -> Option<String> {
    match std::env::var("NEXUS_TEST_DATABASE_URL") {
        Ok(url) => Some(url),
        Err(_) if std::env::var("NEXUS_SKIP_POSTGRES").is_ok_and(|v| v == "1") => None,
        Err(_) => panic!(
            "set NEXUS_TEST_DATABASE_URL (scripts/postgres.sh start) or NEXUS_SKIP_POSTGRES=1"
        ),
    }
}

/// A fresh database, migrated by `nexus migrate` as its owner, served through the app role.
pub struct TestDatabase {
    pub app_url: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let superuser = postgres_superuser_url().expect("PostgreSQL is required for this test");
        Self::create_on(&superuser).await
    }

    pub async fn create_on(superuser: &str) -> Self {
        let superuser = superuser.to_owned();
        let name = format!("nexus_it_{}", ulid_like());
        psql(&superuser, &format!("CREATE DATABASE {name}"));
        psql(
            &superuser,
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'nexus_app') THEN \
             CREATE ROLE nexus_app LOGIN NOSUPERUSER NOBYPASSRLS; END IF; END $$",
        );
        let owner_url = replace_database(&superuser, &name);
        let out = Command::new(env!("CARGO_BIN_EXE_nexus"))
            .args(["migrate", "--database-url", &owner_url])
            .output()
            .expect("nexus migrate");
        assert!(
            out.status.success(),
            "nexus migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let app_url = replace_user(&owner_url, "nexus_app");
        Self { app_url }
    }
}

fn ulid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{:x}{:x}", nanos, std::process::id())
}

pub fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn replace_database(url: &str, database: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("url with a database");
    format!("{base}/{database}")
}

fn replace_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("url");
    let host = rest.split_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{user}@{host}")
}

/// A signed-in account made for a test.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: String,
    pub email: String,
    pub password: String,
    pub token: String,
    pub refresh_token: String,
}

/// Runs the `nexus` binary with `args`, feeding `stdin` (closed when `None`).
pub fn nexus_cli(args: &[String], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(args)
        .env_remove("NEXUS_DATABASE_URL")
        .env_remove("NEXUS_DATA_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nexus");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("nexus output")
}

/// base64url without padding (RFC 4648 §5), as JWTs use it.
pub fn b64url_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

pub fn b64url_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'-' => 62,
            b'_' => 63,
            _ => panic!("not base64url: {text}"),
        }
    };
    let mut out = Vec::new();
    for chunk in text.as_bytes().chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, c)| n | (value(*c) << (18 - 6 * i)));
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// A JWT's decoded header and payload, and its raw signature bytes.
pub fn jwt_parts(token: &str) -> (Value, Value, Vec<u8>) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a compact JWS: {token}");
    let json = |p: &str| serde_json::from_slice(&b64url_decode(p)).expect("JSON segment");
    (json(parts[0]), json(parts[1]), b64url_decode(parts[2]))
}

/// Builds a compact JWS from a header, a payload and signature bytes (no signing).
pub fn jwt_from_parts(header: &Value, payload: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64url_encode(header.to_string().as_bytes()),
        b64url_encode(payload.to_string().as_bytes()),
        b64url_encode(signature)
    )
}

/// The current TOTP code of a base32 secret for a time (`unix` seconds).
pub fn totp_code(secret: &str, unix: u64) -> String {
    nexus_auth::totp::TotpSecret::from_base32(secret)
        .expect("base32 secret")
        .code_at(unix)
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Fails if `text` (logs, an API answer) contains any of `secrets`.
pub fn assert_no_secrets(text: &str, secrets: &[&str], what: &str) {
    for secret in secrets {
        assert!(!secret.is_empty());
        assert!(!text.contains(secret), "{what} contain a secret: {secret}");
    }
}

/// What the agent (next issue) does before running an approved command: recompute the signed
/// bytes from the command as received and its own device id, find the key by `kid` among the
/// `server_keys` it got at pairing, check the Ed25519 signature.
pub fn grant_verifies(keys: &Value, device_id: &str, command: &Value) -> bool {
    let grant = &command["approval"];
    let (Some(kid), Some(signature), Some(approval_id), Some(expires_at)) = (
        grant["kid"].as_str(),
        grant["signature"].as_str(),
        grant["approval_id"].as_str(),
        grant["expires_at"].as_str(),
    ) else {
        return false;
    };
    let Some(jwk) = keys["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["kid"] == kid))
    else {
        return false;
    };
    let Some(key) = jwk["x"]
        .as_str()
        .and_then(nexus_auth::jwt::verifying_key_from_jwk_x)
    else {
        return false;
    };
    let (Some(command_id), Some(kind)) = (command["command_id"].as_str(), command["type"].as_str())
    else {
        return false;
    };
    let input = nexus_domain::approval::approval_signing_input(
        &nexus_domain::CommandId::from_trusted(command_id.to_owned()),
        &nexus_domain::DeviceId::from_trusted(device_id.to_owned()),
        kind,
        &command["params"],
        &nexus_domain::approval::ApprovalId::from_trusted(approval_id.to_owned()),
        expires_at,
    );
    nexus_auth::jwt::verify_detached_with(&key, &input, signature)
}
