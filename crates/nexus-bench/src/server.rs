//! `--spawn-server`: start `nexus server --listen 127.0.0.1:PORT --data-dir DIR --dev`
//! on a free port with a temporary data dir, wait for /health/ready, stop it at the end.
//! The bench user is handed to it as its bootstrap admin
//! (`NEXUS_BOOTSTRAP_ADMIN_EMAIL` / `NEXUS_BOOTSTRAP_ADMIN_PASSWORD`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::common::{BaseUrl, run_id};
use crate::http::HttpConn;

pub struct SpawnedServer {
    child: Option<Child>,
    pub pid: u32,
    pub url: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    keep_data: bool,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

impl SpawnedServer {
    /// Start the server with `env` added to its environment (the bootstrap admin).
    /// The bench's (already raised) RLIMIT_NOFILE is inherited.
    pub fn start(
        bin: &Path,
        extra_args: &[String],
        env: &[(String, String)],
        keep_data: bool,
    ) -> Result<Self> {
        let port = free_port()?;
        let data_dir = std::env::temp_dir().join(format!("nexus-bench-data-{}", run_id()));
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let log_path = data_dir.with_extension("log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let log2 = log.try_clone()?;
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(bin)
            .arg("server")
            .arg("--listen")
            .arg(&listen)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--dev")
            .args(extra_args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let pid = child.id();
        eprintln!(
            "spawned {} (pid {pid}) on {listen}, data dir {}, log {}",
            bin.display(),
            data_dir.display(),
            log_path.display()
        );
        Ok(SpawnedServer {
            child: Some(child),
            pid,
            url: format!("http://{listen}"),
            data_dir,
            log_path,
            keep_data,
        })
    }

    /// Poll `GET /health/ready` until 200 (bounded by `timeout`).
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let base = BaseUrl::parse(&self.url)?;
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no attempt");
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let tail = self.log_tail();
                let hint = if tail.contains("creating the first admin") {
                    "\n(--email/--password become the spawned server's bootstrap admin and must \
                     satisfy its password policy)"
                } else {
                    ""
                };
                bail!("server exited early with {status}; log tail:\n{tail}{hint}");
            }
            let mut c = HttpConn::new(base.clone(), Duration::from_secs(2));
            match c.get("/health/ready", &[]).await {
                Ok(r) if r.ok() => return Ok(()),
                Ok(r) => last = r.describe(),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "server not ready after {timeout:?} (last: {last}); log tail:\n{}",
            self.log_tail()
        )
    }

    /// The last 20 lines of the server log; a fatal `Error: …` line (anyhow's
    /// exit report, usually followed by a long backtrace) is put first.
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        let tail = &lines[lines.len().saturating_sub(20)..];
        match lines.iter().find(|l| l.starts_with("Error: ")) {
            Some(e) if !tail.contains(e) => format!("{e}\n...\n{}", tail.join("\n")),
            _ => tail.join("\n"),
        }
    }

    /// SIGTERM, wait up to 5 s, then SIGKILL. Removes the data dir unless kept.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.pid.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
            if self.keep_data {
                eprintln!("kept server data dir {}", self.data_dir.display());
            } else {
                let _ = std::fs::remove_dir_all(&self.data_dir);
                let _ = std::fs::remove_file(&self.log_path);
            }
        }
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        self.stop();
    }
}
