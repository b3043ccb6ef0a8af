//! `nexus agent` end to end (issue 6): the real server and the real agent binary as separate
//! processes. Pairing is confirmed through the API; commands are proposed, approved and followed
//! through the API; what the device did is read from its reports on the session stream and from
//! the files it touched.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::*;

/// Bound on every wait for the agent or the server.
const WAIT: Duration = Duration::from_secs(60);

/// One agent: its own config directory (credentials `agent.json`, policy `agent-config.json`,
/// state `agent.state/`), a file root, and at most one running `nexus agent run`.
struct TestAgent {
    dir: tempfile::TempDir,
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    device_id: String,
}

impl TestAgent {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("root")).expect("root");
        Self {
            dir,
            child: None,
            logs: Arc::new(Mutex::new(Vec::new())),
            device_id: String::new(),
        }
    }

    fn credentials(&self) -> PathBuf {
        self.dir.path().join("cfg").join("agent.json")
    }

    fn policy(&self) -> PathBuf {
        self.dir.path().join("cfg").join("agent-config.json")
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn session(&self) -> String {
        format!("device:{}", self.device_id)
    }

    /// Writes the local policy: the test root, `echo` allowed, fast heartbeats, plus `extra`.
    fn write_policy(&self, extra: Value) {
        let mut policy = json!({
            "roots": [self.root()],
            "shell_allowlist": ["echo"],
            "heartbeat_interval_secs": 1,
        });
        for (k, v) in extra.as_object().expect("object") {
            policy[k] = v.clone();
        }
        std::fs::create_dir_all(self.policy().parent().expect("dir")).expect("cfg dir");
        std::fs::write(self.policy(), policy.to_string()).expect("write policy");
    }

    /// `nexus agent <args> --config … --policy …` with a clean environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_nexus"));
        command
            .arg("agent")
            .args(args)
            .arg("--config")
            .arg(self.credentials())
            .arg("--policy")
            .arg(self.policy())
            .env("HOME", self.dir.path())
            .env("NEXUS_AGENT_DRY_RUN_OPEN", "1")
            .env_remove("NEXUS_AGENT_CONFIG")
            .env_remove("NEXUS_AGENT_POLICY")
            .env_remove("NEXUS_SERVER_URL")
            .env_remove("NEXUS_AGENT_LOG")
            .env_remove("NEXUS_AGENT_LOG_FORMAT")
            .stdin(Stdio::null());
        command
    }

    /// Runs a short agent command to its end (bounded).
    async fn oneshot(&self, args: &[&str]) -> std::process::Output {
        let mut command = self.command(args);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = command.spawn().expect("spawn nexus agent");
        let pid = child.id();
        let out = tokio::time::timeout(
            WAIT,
            tokio::task::spawn_blocking(move || child.wait_with_output()),
        )
        .await;
        match out {
            Ok(joined) => joined.expect("join").expect("output"),
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                panic!("nexus agent {args:?} did not finish within {WAIT:?}");
            }
        }
    }

    /// `nexus agent pair`, confirmed through the API after the preview shows the fingerprint
    /// the agent printed. Returns the agent's stdout.
    async fn pair(&mut self, server: &TestServer, name: &str) -> String {
        let base = server.base.clone();
        self.pair_via(server, &base, name).await
    }

    /// Pairs with `server` reached at `base` (say, through a proxy).
    async fn pair_via(&mut self, server: &TestServer, base: &str, name: &str) -> String {
        let mut command = self.command(&["pair", "--server", base, "--name", name]);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn nexus agent pair");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let out_lines = Arc::new(Mutex::new(Vec::new()));
        {
            let out_lines = out_lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    out_lines.lock().expect("lines").push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let err_lines = Arc::new(Mutex::new(Vec::new()));
        {
            let err_lines = err_lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    err_lines.lock().expect("lines").push(line);
                }
            });
        }
        let guard = KillOnDrop(Some(child));
        let (code, fingerprint) = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + WAIT;
            let (mut code, mut fingerprint) = (None, None);
            while code.is_none() || fingerprint.is_none() {
                let left = deadline.saturating_duration_since(Instant::now());
                let Ok(line) = rx.recv_timeout(left) else {
                    break;
                };
                if let Some(c) = line.trim().strip_prefix("pairing code:") {
                    code = Some(c.trim().to_owned());
                }
                if let Some(f) = line.trim().strip_prefix("fingerprint:") {
                    let f = f.split('(').next().unwrap_or_default().trim();
                    fingerprint = Some(f.to_owned());
                }
            }
            (code, fingerprint)
        })
        .await
        .expect("join");
        let (Some(code), Some(fingerprint)) = (code, fingerprint) else {
            panic!(
                "the agent printed no pairing code and fingerprint; stdout:\n{}\nstderr:\n{}",
                out_lines.lock().expect("lines").join("\n"),
                err_lines.lock().expect("lines").join("\n")
            );
        };
        assert!(!fingerprint.is_empty(), "{fingerprint:?}");

        let (s, preview) = server
            .post_json("/devices/pairing/preview", &json!({"pairing_code": code}))
            .await;
        assert_eq!(s, 200, "{preview}");
        assert_eq!(
            preview["fingerprint"], fingerprint,
            "the web shows what the agent printed"
        );
        assert_eq!(preview["device_name"], name);
        assert!(
            preview["capabilities"]
                .as_array()
                .is_some_and(|c| c.iter().any(|t| t == "shell.exec")),
            "{preview}"
        );
        let (s, confirm) = server
            .post_json(
                "/devices/pairing/confirm_by_code",
                &json!({"pairing_code": code}),
            )
            .await;
        assert_eq!(s, 200, "{confirm}");

        let status = wait_child(guard, WAIT).await;
        let stdout = out_lines.lock().expect("lines").join("\n");
        assert!(
            status.success(),
            "pair exited with {status}; stdout:\n{stdout}\nstderr:\n{}",
            err_lines.lock().expect("lines").join("\n")
        );
        let creds: Value = serde_json::from_slice(
            &std::fs::read(self.credentials()).expect("credentials written"),
        )
        .expect("credentials are JSON");
        self.device_id = creds["device_id"].as_str().expect("device_id").to_owned();
        assert!(stdout.contains(&self.device_id), "{stdout}");
        stdout
    }

    /// A server with an agent paired to it and the standard policy (plus `policy`).
    async fn paired(server: &TestServer, policy: Value) -> Self {
        let mut agent = Self::new();
        agent.write_policy(policy);
        agent.pair(server, "test-pc").await;
        agent
    }

    /// Starts `nexus agent run` (JSON logs on stderr, collected).
    fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut command = self.command(&[
            "run",
            "--log-format",
            "json",
            "--log",
            "info,nexus_agent=debug",
        ]);
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn nexus agent run");
        let stderr = child.stderr.take().expect("stderr");
        let logs = self.logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                logs.lock().expect("logs").push(line);
            }
        });
        self.child = Some(child);
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits (bounded) for the running agent to exit.
    async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = self.child.take().expect("running");
        wait_child(KillOnDrop(Some(child)), limit).await
    }

    /// Whether the running agent has exited by now.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
    }

    fn log_text(&self) -> String {
        self.logs.lock().expect("logs").join("\n")
    }

    fn log_count(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .expect("logs")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// `nexus agent status --json`.
    async fn status(&self) -> Value {
        let out = self.oneshot(&["status", "--json"]).await;
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn wait_child(mut guard: KillOnDrop, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        let child = guard.0.as_mut().expect("child");
        if let Some(status) = child.try_wait().expect("try_wait") {
            guard.0 = None;
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not exit within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Proposes a command for the agent's device; returns the answer (202 expected).
async fn propose(
    server: &TestServer,
    agent: &TestAgent,
    id: &str,
    kind: &str,
    params: Value,
) -> Value {
    let (s, body) = server
        .post_json(
            "/sidecar/command",
            &json!({"command_id": id, "type": kind, "params": params,
                    "device_id": agent.device_id,
                    "client_context": {"correlation_id": format!("corr-{id}")}}),
        )
        .await;
    assert_eq!(s, 202, "propose {kind}: {body}");
    body
}

async fn approve(server: &TestServer, proposed: &Value) {
    assert_eq!(proposed["status"], "pending_approval", "{proposed}");
    let approval = proposed["approval_id"].as_str().expect("approval_id");
    let (s, body) = server
        .post_json(
            &format!("/approvals/{approval}/decide"),
            &json!({"decision": "approve"}),
        )
        .await;
    assert_eq!(s, 202, "approve: {body}");
}

async fn command(server: &TestServer, id: &str) -> Value {
    let (s, body) = status_json(
        server
            .web(Method::GET, &format!("/commands/{id}"))
            .send()
            .await
            .expect("get command"),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    body
}

/// Polls `GET /commands/{id}` until its status is one of `statuses`.
async fn wait_status(server: &TestServer, id: &str, statuses: &[&str]) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let view = command(server, id).await;
        if statuses.iter().any(|s| view["status"] == *s) {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "command {id} never became {statuses:?}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The device's report about a finished command, read back from the session stream by the
/// event id the command's result names.
async fn device_report(server: &TestServer, view: &Value) -> Value {
    let result = &view["result"];
    let event_id = result["event_id"].as_u64().expect("result.event_id");
    let session = result["session_id"].as_str().expect("result.session_id");
    let mut sub = server.subscribe(session, Some(event_id - 1)).await;
    assert_eq!(sub.status, 200);
    loop {
        let event = sub
            .next_data(Duration::from_secs(20))
            .await
            .expect("stream open");
        if event.event == "report" && event.id_u64() == event_id {
            let report = event.json();
            assert_eq!(report["meta"]["report_id"], result["report_id"]);
            return report;
        }
        assert!(
            event.event != "snapshot",
            "expected to resume at {event_id}"
        );
    }
}

/// Proposes (and approves, if the server asks) a command, waits for it to end, returns its
/// view and the device's report.
async fn run_command(
    server: &TestServer,
    agent: &TestAgent,
    id: &str,
    kind: &str,
    params: Value,
) -> (Value, Value) {
    let proposed = propose(server, agent, id, kind, params).await;
    if proposed["status"] == "pending_approval" {
        approve(server, &proposed).await;
    }
    let view = wait_status(server, id, &["succeeded", "failed"]).await;
    let report = device_report(server, &view).await;
    let causality = &report["meta"]["causality"];
    assert_eq!(causality["command_id"], id, "{report}");
    assert_eq!(causality["type"], "device.exec", "{report}");
    assert_eq!(
        causality["correlation_id"],
        format!("corr-{id}"),
        "{report}"
    );
    assert_eq!(report["meta"]["report_id"], format!("r_{id}"), "{report}");
    (view, report)
}

/// Asserts a command succeeded; returns its report's output card (or "").
async fn expect_done(
    server: &TestServer,
    agent: &TestAgent,
    id: &str,
    kind: &str,
    params: Value,
) -> String {
    let (view, report) = run_command(server, agent, id, kind, params).await;
    assert_eq!(
        view["status"],
        "succeeded",
        "{kind}: {view}\nreport: {report}\nagent logs:\n{}",
        agent.log_text()
    );
    assert!(report["done"][0]["title"].is_string(), "{report}");
    assert_eq!(report["blocked"], json!([]), "{report}");
    report["ui_hint"]["cards"][0]["body"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Asserts a command was refused with `code`; returns the `why`.
async fn expect_refused(
    server: &TestServer,
    agent: &TestAgent,
    id: &str,
    kind: &str,
    params: Value,
    code: &str,
) -> String {
    let (view, report) = run_command(server, agent, id, kind, params).await;
    refused(&view, &report, code)
}

fn refused(view: &Value, report: &Value, code: &str) -> String {
    assert_eq!(view["status"], "failed", "{view}\nreport: {report}");
    assert_eq!(report["done"], json!([]), "{report}");
    let why = report["blocked"][0]["why"]
        .as_str()
        .unwrap_or_else(|| panic!("a blocked reason: {report}"))
        .to_owned();
    assert!(why.starts_with(&format!("{code}: ")), "{code}: {report}");
    assert_eq!(report["exec"]["code"], code, "{report}");
    why
}

/// Replaces the tenant's risk rule for `kind` (adds it if missing).
async fn set_server_risk(server: &TestServer, kind: &str, risk: &str) {
    let (s, mut policy) = status_json(
        server
            .web(Method::GET, "/policy")
            .send()
            .await
            .expect("policy"),
    )
    .await;
    assert_eq!(s, 200, "{policy}");
    let rules = policy["rules"].as_array_mut().expect("rules");
    rules.retain(|r| r["pattern"] != kind);
    rules.push(json!({"pattern": kind, "risk": risk}));
    let (s, body) = status_json(
        server
            .web(Method::PUT, "/policy")
            .json(&policy)
            .send()
            .await
            .expect("put policy"),
    )
    .await;
    assert_eq!(s, 200, "{body}");
}

fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

// --- pairing -------------------------------------------------------------------------------

#[tokio::test]
async fn pair_confirmed_through_the_api_then_status_and_unpair() {
    let server = TestServer::start().await;
    let mut agent = TestAgent::new();
    let stdout = agent.pair(&server, "test-pc").await;
    assert!(stdout.contains("Paired"), "{stdout}");

    let creds_text = std::fs::read_to_string(agent.credentials()).expect("credentials");
    assert_eq!(
        file_mode(&agent.credentials()),
        0o600,
        "credentials file mode"
    );
    assert_no_secrets(&creds_text, &[ADMIN_PASSWORD], "the credentials file");
    let creds: Value = serde_json::from_str(&creds_text).expect("json");
    assert_eq!(creds["server_url"], server.base);
    assert_eq!(creds["tenant"], format!("{ORG}:{PROJECT}"));
    assert!(
        creds["access_token"]
            .as_str()
            .is_some_and(|t| t.starts_with("nxd_"))
    );
    // The pinned server keys are the server's published ones.
    let (s, jwks) = status_json(
        server
            .http
            .get(server.url("/.well-known/jwks.json"))
            .send()
            .await
            .expect("jwks"),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(creds["server_keys"]["keys"][0]["x"], jwks["keys"][0]["x"]);
    // A default policy was written next to the credentials when none existed.
    assert!(agent.policy().exists());
    // The token is never printed.
    let token = creds["access_token"].as_str().expect("token");
    assert_no_secrets(&stdout, &[token], "pair's output");

    // The server lists the device under its name.
    let (s, device) = status_json(
        server
            .web(Method::GET, &format!("/devices/{}", agent.device_id))
            .send()
            .await
            .expect("device"),
    )
    .await;
    assert_eq!(s, 200, "{device}");
    assert_eq!(device["device_name"], "test-pc", "{device}");

    let status = agent.status().await;
    assert_eq!(status["device_id"], agent.device_id.as_str());
    assert_eq!(status["tenant"], format!("{ORG}:{PROJECT}"));
    assert_eq!(status["server"], server.base);
    assert_eq!(status["queued_reports"], 0);
    assert_eq!(status["running"], false);
    let text = agent.oneshot(&["status"]).await;
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains(&agent.device_id) && text.contains("acme:web"),
        "{text}"
    );
    assert_no_secrets(&text, &[token], "status output");

    // Pairing again without --force is refused: the existing credentials stay.
    let again = agent
        .oneshot(&["pair", "--server", &server.base, "--name", "other"])
        .await;
    assert!(!again.status.success());
    assert!(agent.credentials().exists());

    // Unpair removes the device on the server and the local credentials.
    let out = agent.oneshot(&["unpair"]).await;
    assert!(
        out.status.success(),
        "unpair: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!agent.credentials().exists());
    let (s, _) = status_json(
        server
            .web(Method::GET, &format!("/devices/{}", agent.device_id))
            .send()
            .await
            .expect("device"),
    )
    .await;
    assert_eq!(s, 404, "the device is gone on the server");
}

// --- executors -----------------------------------------------------------------------------

#[tokio::test]
async fn every_executor_runs_and_reports() {
    let server = TestServer::start().await;
    let mut agent = TestAgent::paired(&server, json!({})).await;
    std::fs::write(agent.root().join("hello.txt"), "hello, agent").expect("seed");
    agent.start();

    let info = expect_done(&server, &agent, "c-info", "system.info", json!({})).await;
    assert!(info.contains(env!("CARGO_PKG_VERSION")), "{info}");

    expect_done(
        &server,
        &agent,
        "c-say",
        "system.say",
        json!({"text": "hello from the test"}),
    )
    .await;

    let listing = expect_done(&server, &agent, "c-list", "fs.list", json!({"path": "."})).await;
    assert!(listing.contains("hello.txt"), "{listing}");

    let content = expect_done(
        &server,
        &agent,
        "c-read",
        "fs.read",
        json!({"path": "hello.txt"}),
    )
    .await;
    assert!(content.contains("hello, agent"), "{content}");

    // fs.write is YELLOW on the server: queued at once (with a warning), no approval.
    expect_done(
        &server,
        &agent,
        "c-write",
        "fs.write",
        json!({"path": "new.txt", "content": "written by NEXUS", "mode": "create"}),
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(agent.root().join("new.txt")).expect("written"),
        "written by NEXUS"
    );

    // RED on the server and locally: runs once approved (the agent checks the signature).
    let proposed = propose(
        &server,
        &agent,
        "c-delete",
        "fs.delete",
        json!({"path": "new.txt"}),
    )
    .await;
    assert_eq!(proposed["risk"], "red");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        agent.root().join("new.txt").exists(),
        "nothing happens before the approval"
    );
    approve(&server, &proposed).await;
    let view = wait_status(&server, "c-delete", &["succeeded", "failed"]).await;
    assert_eq!(view["status"], "succeeded", "{view}");
    assert!(!agent.root().join("new.txt").exists(), "deleted");

    let out = expect_done(
        &server,
        &agent,
        "c-echo",
        "shell.exec",
        json!({"argv": ["echo", "hi"]}),
    )
    .await;
    assert!(out.contains("hi"), "{out}");

    let opened = expect_done(
        &server,
        &agent,
        "c-url",
        "os.open_url",
        json!({"url": "https://example.com/nexus"}),
    )
    .await;
    let (_, report) = run_command_view(&server, "c-url").await;
    let text = format!("{opened} {report}");
    assert!(
        text.contains("dry run: would open https://example.com/nexus"),
        "{text}"
    );
    // Only http(s) URLs are opened.
    expect_refused(
        &server,
        &agent,
        "c-file-url",
        "os.open_url",
        json!({"url": "file:///etc/passwd"}),
        "bad_params",
    )
    .await;

    // The commands were acked once each and nothing is left in the outbox.
    let status = agent.status().await;
    assert_eq!(status["running"], true);
    let deadline = Instant::now() + WAIT;
    while agent.status().await["queued_reports"] != 0 {
        assert!(Instant::now() < deadline, "outbox never drained");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // SIGTERM stops it cleanly.
    agent.signal("TERM");
    let status = agent.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "agent exited with {status}");
}

/// The view and device report of a command that has ended.
async fn run_command_view(server: &TestServer, id: &str) -> (Value, Value) {
    let view = wait_status(server, id, &["succeeded", "failed"]).await;
    let report = device_report(server, &view).await;
    (view, report)
}

// --- refusals ------------------------------------------------------------------------------

/// A man in the middle on the agent's connection (plain HTTP): forwards bytes both ways and, on
/// the way from the server to the agent, replaces `from` with `to` (same length, so the HTTP
/// framing stays valid).
struct TamperingProxy {
    base: String,
    task: tokio::task::JoinHandle<()>,
}

impl TamperingProxy {
    async fn start(server: &TestServer, from: &'static [u8], to: &'static [u8]) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        assert_eq!(from.len(), to.len());
        let upstream = server
            .base
            .strip_prefix("http://")
            .expect("a plain HTTP server")
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let up = async {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                        let _ = server_write.shutdown().await;
                    };
                    let down = async {
                        let mut held: Vec<u8> = Vec::new();
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match server_read.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            held.extend_from_slice(&buf[..n]);
                            let mut at = 0;
                            while let Some(i) =
                                held[at..].windows(from.len()).position(|w| w == from)
                            {
                                held[at + i..at + i + from.len()].copy_from_slice(to);
                                at += i + from.len();
                            }
                            // Hold back only a tail that could be the start of `from`.
                            let keep = (1..from.len())
                                .rev()
                                .find(|k| held.ends_with(&from[..*k]))
                                .unwrap_or(0);
                            let send = held.len() - keep;
                            if client_write.write_all(&held[..send]).await.is_err() {
                                return;
                            }
                            held.drain(..send);
                        }
                        let _ = client_write.write_all(&held).await;
                        let _ = client_write.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Self { base, task }
    }
}

impl Drop for TamperingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn refusals_are_reported_as_blocked() {
    let server = TestServer::start().await;
    let proxy = TamperingProxy::start(&server, b"approved-words", b"tampered-words").await;
    let mut agent = TestAgent::new();
    agent.write_policy(json!({}));
    agent.pair_via(&server, &proxy.base, "test-pc").await;
    let outside = tempfile::tempdir().expect("outside");
    std::fs::write(outside.path().join("secret.txt"), "top secret").expect("secret");
    std::os::unix::fs::symlink(
        outside.path().join("secret.txt"),
        agent.root().join("link.txt"),
    )
    .expect("symlink");
    std::fs::write(agent.root().join("keep.txt"), "keep me").expect("keep");

    // Tampered signature: the command is approved, then edited on its way to the device by a
    // man in the middle without the server's signing key. (A body edited in the database never
    // leaves the server: see `commands_written_into_the_store_are_refused_at_delivery`.)
    let proposed = propose(
        &server,
        &agent,
        "c-tamper",
        "shell.exec",
        json!({"argv": ["echo", "approved-words"]}),
    )
    .await;
    approve(&server, &proposed).await;
    agent.start();
    let (view, report) = run_command_view(&server, "c-tamper").await;
    let why = refused(&view, &report, "bad_signature");
    assert!(
        !report.to_string().contains("tampered-words\\n"),
        "{why}: {report}"
    );
    assert!(
        report["ui_hint"]["cards"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );

    // A command type the agent has no executor for (RED on the server: approved and signed,
    // still refused by the allowlist).
    expect_refused(
        &server,
        &agent,
        "c-unknown",
        "system.reboot",
        json!({}),
        "not_allowlisted",
    )
    .await;
    // Path escapes.
    expect_refused(
        &server,
        &agent,
        "c-dotdot",
        "fs.read",
        json!({"path": "../../etc/passwd"}),
        "path_escape",
    )
    .await;
    let (view, report) = run_command(
        &server,
        &agent,
        "c-symlink",
        "fs.read",
        json!({"path": "link.txt"}),
    )
    .await;
    refused(&view, &report, "path_escape");
    assert!(!report.to_string().contains("top secret"), "{report}");
    expect_refused(
        &server,
        &agent,
        "c-abs",
        "fs.read",
        json!({"path": "/etc/hostname"}),
        "path_escape",
    )
    .await;
    // A binary not in the shell allowlist (approved on the server all the same).
    expect_refused(
        &server,
        &agent,
        "c-cat",
        "shell.exec",
        json!({"argv": ["cat", "/etc/hostname"]}),
        "not_allowlisted",
    )
    .await;

    // Unsigned RED: the server calls fs.delete GREEN now, the device's local policy does not.
    set_server_risk(&server, "fs.delete", "GREEN").await;
    let (view, report) = run_command(
        &server,
        &agent,
        "c-unsigned",
        "fs.delete",
        json!({"path": "keep.txt"}),
    )
    .await;
    assert_eq!(view["risk"], "green");
    let why = refused(&view, &report, "unsigned_red");
    assert!(why.contains("local policy"), "{why}");
    assert!(agent.root().join("keep.txt").exists(), "not deleted");

    // An approval nobody gave in time expires on the server: the device never sees it.
    let (s, mut policy) = status_json(
        server
            .web(Method::GET, "/policy")
            .send()
            .await
            .expect("policy"),
    )
    .await;
    assert_eq!(s, 200);
    policy["approval_ttl_secs"] = json!(1);
    let (s, body) = status_json(
        server
            .web(Method::PUT, "/policy")
            .json(&policy)
            .send()
            .await
            .expect("put policy"),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let proposed = propose(
        &server,
        &agent,
        "c-expired",
        "shell.exec",
        json!({"argv": ["echo", "too-late"]}),
    )
    .await;
    assert_eq!(proposed["status"], "pending_approval");
    wait_status(&server, "c-expired", &["expired"]).await;
    let approval = proposed["approval_id"].as_str().expect("approval");
    let (s, body) = server
        .post_json(
            &format!("/approvals/{approval}/decide"),
            &json!({"decision": "approve"}),
        )
        .await;
    assert_problem(s, &body, 409, "approval_expired");
    assert_eq!(agent.log_count("c-expired"), 0, "{}", agent.log_text());

    // The agent is still healthy after all that.
    expect_done(&server, &agent, "c-after", "system.info", json!({})).await;
    assert!(agent.exited().is_none());
}

/// Config switches: `disabled` types are refused even when the server queues them.
#[tokio::test]
async fn disabled_executors_are_refused() {
    let server = TestServer::start().await;
    let mut agent = TestAgent::paired(&server, json!({"disabled": ["fs.*"]})).await;
    std::fs::write(agent.root().join("a.txt"), "a").expect("seed");
    agent.start();
    expect_refused(
        &server,
        &agent,
        "c-off",
        "fs.read",
        json!({"path": "a.txt"}),
        "disabled",
    )
    .await;
    expect_done(&server, &agent, "c-on", "system.info", json!({})).await;
}

// --- resilience ----------------------------------------------------------------------------

#[tokio::test]
async fn reports_queued_while_the_server_is_down_arrive_once_and_in_order() {
    let server = TestServer::start().await;
    // shell.exec without approvals on both sides, so the first command can keep the agent busy
    // while the server goes away.
    let mut agent = TestAgent::paired(
        &server,
        json!({"local_red": [], "shell_allowlist": ["sleep", "echo"]}),
    )
    .await;
    set_server_risk(&server, "shell.exec", "GREEN").await;
    set_server_risk(&server, "fs.write", "GREEN").await;
    // Queued before the agent runs, so its first pull takes all of them.
    let ids = ["q1", "q2", "q3", "q4"];
    propose(
        &server,
        &agent,
        "q1",
        "shell.exec",
        json!({"argv": ["sleep", "5"]}),
    )
    .await;
    propose(
        &server,
        &agent,
        "q2",
        "fs.write",
        json!({"path": "a.txt", "content": "a"}),
    )
    .await;
    propose(
        &server,
        &agent,
        "q3",
        "fs.write",
        json!({"path": "b.txt", "content": "b"}),
    )
    .await;
    propose(
        &server,
        &agent,
        "q4",
        "shell.exec",
        json!({"argv": ["echo", "q4"]}),
    )
    .await;
    agent.start();
    for id in ids {
        wait_status(&server, id, &["delivered", "acked"]).await;
    }
    let mut server = server;
    let status = server.stop().await;
    assert!(status.success(), "server exit {status}");

    // The agent finishes all four while the server is down: the files appear, the reports
    // wait in the outbox.
    let deadline = Instant::now() + WAIT;
    while !(agent.root().join("a.txt").exists() && agent.root().join("b.txt").exists()) {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let queued = agent.status().await["queued_reports"].clone();
        if queued == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "queued reports: {queued}; logs:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(agent.exited().is_none(), "the agent keeps running");

    let server = server.restart_same_port().await;
    let mut event_ids = Vec::new();
    for id in ids {
        let view = wait_status(&server, id, &["succeeded", "failed"]).await;
        assert_eq!(view["status"], "succeeded", "{view}");
        event_ids.push(view["result"]["event_id"].as_u64().expect("event id"));
    }
    assert!(
        event_ids.windows(2).all(|w| w[0] < w[1]),
        "delivered in order: {event_ids:?}"
    );
    // Each device report is in the session exactly once.
    let mut sub = server.subscribe(&agent.session(), Some(0)).await;
    let last = *event_ids.last().expect("ids");
    let mut seen = Vec::new();
    loop {
        let event = sub
            .next_data(Duration::from_secs(20))
            .await
            .expect("stream");
        assert_eq!(event.event, "report", "replay from 0");
        let report = event.json();
        if report["meta"]["causality"]["type"] == "device.exec" {
            seen.push(report["meta"]["report_id"].as_str().expect("id").to_owned());
        }
        if event.id_u64() >= last {
            break;
        }
    }
    assert_eq!(seen, vec!["r_q1", "r_q2", "r_q3", "r_q4"]);
    let deadline = Instant::now() + WAIT;
    while agent.status().await["queued_reports"] != 0 {
        assert!(Instant::now() < deadline, "outbox never drained");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And the agent still takes new work.
    expect_done(&server, &agent, "q5", "system.info", json!({})).await;
}

#[tokio::test]
async fn a_command_interrupted_by_a_crash_is_not_run_again() {
    let server = TestServer::start().await;
    let mut agent =
        TestAgent::paired(&server, json!({"local_red": [], "shell_allowlist": ["sh"]})).await;
    set_server_risk(&server, "shell.exec", "GREEN").await;
    agent.start();
    let marker = agent.root().join("ran.txt");
    let script = format!("echo ran >> '{}'; sleep 4", marker.display());
    propose(
        &server,
        &agent,
        "c-crash",
        "shell.exec",
        json!({"argv": ["sh", "-c", script]}),
    )
    .await;
    let deadline = Instant::now() + WAIT;
    while !marker.exists() {
        assert!(Instant::now() < deadline, "never ran: {}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Killed between execution and ack.
    agent.signal("KILL");
    let status = agent.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success());
    assert_ne!(command(&server, "c-crash").await["status"], "acked");

    agent.start();
    let (view, report) = run_command_view(&server, "c-crash").await;
    assert_eq!(view["status"], "failed", "{view}");
    let why = report["blocked"][0]["why"].as_str().expect("why");
    assert!(why.contains("interrupted"), "{report}");
    assert_eq!(report["exec"]["result"], "interrupted", "{report}");
    // Long enough for a second run to have written its line.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let lines = std::fs::read_to_string(&marker).expect("marker");
    assert_eq!(lines.lines().count(), 1, "ran once: {lines:?}");
    // The agent carries on.
    expect_done(&server, &agent, "c-next", "system.info", json!({})).await;
}

#[tokio::test]
async fn short_lived_device_tokens_are_refreshed() {
    let server = TestServer::start_with(&["--device-token-ttl", "3s"]).await;
    let mut agent = TestAgent::paired(&server, json!({})).await;
    let first: Value =
        serde_json::from_slice(&std::fs::read(agent.credentials()).expect("creds")).expect("json");
    agent.start();
    expect_done(&server, &agent, "t1", "system.info", json!({})).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(agent.exited().is_none(), "{}", agent.log_text());
    expect_done(&server, &agent, "t2", "system.info", json!({})).await;
    let refreshed = agent.log_count("device tokens refreshed");
    assert!(
        refreshed >= 2,
        "refreshed {refreshed} times:\n{}",
        agent.log_text()
    );
    // Refreshed ahead of expiry, not in a loop: a few per token lifetime at most.
    assert!(refreshed <= 12, "refreshed {refreshed} times in ~10 s");
    let refused = agent.log_count("device token refused");
    assert!(refused <= 3, "{refused} refusals:\n{}", agent.log_text());
    let now: Value =
        serde_json::from_slice(&std::fs::read(agent.credentials()).expect("creds")).expect("json");
    assert_ne!(now["access_token"], first["access_token"]);
    assert_ne!(now["refresh_token"], first["refresh_token"]);
}

/// After `nexus admin keys rotate` the server signs approvals with a key the device was never
/// given; the agent adopts it because a pinned key endorses it, and runs the approved command.
#[tokio::test]
async fn the_agent_follows_a_server_key_rotation_through_endorsements() {
    let server = TestServer::start_with(&["--keys-reload-interval", "200ms"]).await;
    let mut agent = TestAgent::paired(&server, json!({})).await;
    let kids_in = |creds: &Value| -> Vec<String> {
        creds["server_keys"]["keys"]
            .as_array()
            .expect("server_keys")
            .iter()
            .map(|k| k["kid"].as_str().expect("kid").to_owned())
            .collect()
    };
    let credentials = agent.credentials();
    let read_creds = move || -> Value {
        serde_json::from_slice(&std::fs::read(&credentials).expect("creds")).expect("json")
    };
    let pinned = kids_in(&read_creds());
    assert_eq!(pinned.len(), 1, "{pinned:?}");
    agent.start();
    expect_done(
        &server,
        &agent,
        "k0",
        "shell.exec",
        json!({"argv": ["echo", "before"]}),
    )
    .await;

    let new_kid = server.rotate_signing_key();
    assert!(!pinned.contains(&new_kid));
    // Wait until the server signs with the new key (the newest is listed first).
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, keys) = status_json(
            server
                .http
                .get(server.url("/.well-known/nexus-server-keys.json"))
                .send()
                .await
                .expect("server keys"),
        )
        .await;
        if keys["keys"][0]["kid"] == new_kid.as_str() {
            assert_eq!(
                keys["endorsements"],
                json!([{"kid": new_kid, "signed_by": pinned[0], "signature": keys["endorsements"][0]["signature"]}]),
                "{keys}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server never loaded {new_kid}: {keys}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A RED command approved now carries a grant by the new key, and still runs.
    let proposed = propose(
        &server,
        &agent,
        "k1",
        "shell.exec",
        json!({"argv": ["echo", "after"]}),
    )
    .await;
    approve(&server, &proposed).await;
    let view = wait_status(&server, "k1", &["succeeded", "failed"]).await;
    assert_eq!(view["status"], "succeeded", "{view}\n{}", agent.log_text());
    assert!(
        agent.log_count("adopted server keys endorsed by a pinned key") >= 1,
        "{}",
        agent.log_text()
    );
    // Remembered with the credentials, next to the key pinned at pairing.
    let now = kids_in(&read_creds());
    assert!(
        now.contains(&new_kid) && now.contains(&pinned[0]),
        "{now:?}"
    );
}

#[tokio::test]
async fn a_removed_device_stops_its_agent() {
    let server = TestServer::start().await;
    let mut agent = TestAgent::paired(&server, json!({})).await;
    agent.start();
    expect_done(&server, &agent, "r1", "system.info", json!({})).await;
    let r = server
        .web(Method::DELETE, &format!("/devices/{}", agent.device_id))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status().as_u16(), 204);
    let status = agent.wait_exit(Duration::from_secs(20)).await;
    assert!(!status.success(), "exit status {status}");
    let logs = agent.log_text();
    assert!(
        logs.contains("removed") && logs.contains("pair again"),
        "{logs}"
    );
    let status = agent.status().await;
    assert!(status["revoked_at"].is_string(), "{status}");
    // It does not start again on dead credentials.
    let out = agent.oneshot(&["run"]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pair again"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
