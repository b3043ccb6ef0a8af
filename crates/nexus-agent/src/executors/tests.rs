#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use nexus_domain::command::{ClientContext, CommandPolicy};
use nexus_domain::{CommandId, DeviceCommand, Risk};
use serde_json::{Value, json};

use super::*;

fn command(kind: &str, params: Value) -> DeviceCommand {
    DeviceCommand {
        command_id: CommandId::generate(),
        command_type: kind.to_owned(),
        params,
        context: Value::Null,
        client_context: ClientContext::default(),
        policy: CommandPolicy {
            risk: Risk::Green,
            approval_id: None,
        },
        created_at: "2026-01-01T00:00:00Z".to_owned(),
        attempt: 1,
        run_before: None,
        approval: None,
    }
}

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    config: AgentConfig,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let root = base.join("root");
    let outside = base.join("outside");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(root.join("hello.txt"), "hello world").unwrap();
    std::fs::write(outside.join("secret.txt"), "secret").unwrap();
    let config = AgentConfig {
        roots: vec![root.clone()],
        ..AgentConfig::default()
    };
    Env {
        _dir: dir,
        root,
        outside,
        config,
    }
}

async fn run(config: &AgentConfig, kind: &str, params: Value) -> ExecOutcome {
    execute(&command(kind, params), config).await
}

#[track_caller]
fn refused(outcome: ExecOutcome) -> &'static str {
    match outcome {
        ExecOutcome::Refused(r) => r.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[track_caller]
fn done(outcome: ExecOutcome) -> (String, String, Option<String>) {
    match outcome {
        ExecOutcome::Done {
            title,
            detail,
            output,
        } => (title, detail, output),
        other => panic!("expected done, got {other:?}"),
    }
}

#[track_caller]
fn failed(outcome: ExecOutcome) -> String {
    match outcome {
        ExecOutcome::Failed { reason } => reason,
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn p(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn unknown_and_disabled_types_are_refused() {
    let e = env();
    assert_eq!(
        refused(run(&e.config, "email.send", json!({})).await),
        "not_allowlisted"
    );
    assert_eq!(
        refused(run(&e.config, "system.settings.wifi", json!({})).await),
        "not_allowlisted"
    );
    let config = AgentConfig {
        disabled: vec!["fs.*".into(), "system.info".into()],
        ..e.config.clone()
    };
    assert_eq!(
        refused(run(&config, "fs.read", json!({"path": "hello.txt"})).await),
        "disabled"
    );
    assert_eq!(
        refused(run(&config, "system.info", json!({})).await),
        "disabled"
    );
    done(run(&config, "system.say", json!({"text": "still here"})).await);
}

#[tokio::test]
async fn params_are_strict() {
    let e = env();
    for (kind, params) in [
        ("fs.read", json!({})),
        ("fs.read", json!({"path": 5})),
        ("fs.read", json!({"path": "hello.txt", "follow": true})),
        (
            "fs.write",
            json!({"path": "x", "content": "y", "mode": "truncate"}),
        ),
        ("system.say", json!("hello")),
        ("system.info", json!({"verbose": true})),
        ("shell.exec", json!({"argv": "echo hi"})),
        ("os.open_url", json!({})),
    ] {
        assert_eq!(
            refused(run(&e.config, kind, params.clone()).await),
            "bad_params",
            "{kind} {params}"
        );
    }
}

#[tokio::test]
async fn system_say_and_info() {
    let e = env();
    let (title, detail, _) = done(run(&e.config, "system.say", json!({"text": "Hi there"})).await);
    assert_eq!((title.as_str(), detail.as_str()), ("Message", "Hi there"));
    assert_eq!(
        refused(run(&e.config, "system.say", json!({"text": "  "})).await),
        "bad_params"
    );
    assert_eq!(
        refused(run(&e.config, "system.say", json!({"text": "x".repeat(5000)})).await),
        "too_large"
    );

    let (_, detail, output) = done(run(&e.config, "system.info", Value::Null).await);
    assert!(detail.contains(std::env::consts::OS), "{detail}");
    let info: Value = serde_json::from_str(&output.unwrap()).unwrap();
    assert_eq!(info["agent_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["os"], std::env::consts::OS);
    assert!(info.get("hostname").is_some() && info.get("uptime_secs").is_some());
}

#[cfg(unix)]
#[tokio::test]
async fn system_say_runs_the_configured_command_without_a_shell() {
    let e = env();
    let out = e.root.join("said.txt");
    // `sh -c '…' say <text>`: the text arrives as "$1", one argument, never parsed as shell.
    let config = AgentConfig {
        say_command: Some(vec![
            "sh".into(),
            "-c".into(),
            format!("printf '%s' \"$1\" > '{}'", p(&out)),
            "say".into(),
        ]),
        ..e.config.clone()
    };
    let (title, _, _) = done(run(&config, "system.say", json!({"text": "a; rm -rf $HOME"})).await);
    assert_eq!(title, "Said");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "a; rm -rf $HOME");

    let broken = AgentConfig {
        say_command: Some(vec!["false".into()]),
        ..e.config.clone()
    };
    failed(run(&broken, "system.say", json!({"text": "x"})).await);
}

#[tokio::test]
async fn open_url_checks_the_scheme_and_dry_runs() {
    let e = env();
    for url in ["file:///etc/passwd", "javascript:alert(1)", "https://"] {
        assert_eq!(
            refused(run(&e.config, "os.open_url", json!({"url": url})).await),
            "bad_params",
            "{url}"
        );
    }
    let (title, detail, _) = done(
        open::open_url(
            serde_json::from_value(json!({"url": "https://example.com/?a=1&b=2"})).unwrap(),
            true,
        )
        .await,
    );
    assert_eq!(title, "Would open URL");
    assert!(detail.contains("https://example.com/?a=1&b=2"), "{detail}");
}

#[tokio::test]
async fn open_app_only_from_the_map() {
    let e = env();
    assert_eq!(
        refused(run(&e.config, "os.open_app", json!({"app_id": "editor"})).await),
        "not_allowlisted"
    );
    let mut config = e.config.clone();
    config.apps.insert("ok".into(), vec!["true".into()]);
    config.apps.insert("broken".into(), vec!["false".into()]);
    config
        .apps
        .insert("missing".into(), vec!["/nonexistent/nexus-test-app".into()]);
    let params = |id: &str| serde_json::from_value(json!({ "app_id": id })).unwrap();
    let (title, detail, _) = done(open::open_app(params("ok"), &config, true).await);
    assert_eq!(title, "Would open app");
    assert!(detail.contains("\"true\""), "{detail}");
    #[cfg(unix)]
    {
        let (title, _, _) = done(open::open_app(params("ok"), &config, false).await);
        assert_eq!(title, "Opened app");
        failed(open::open_app(params("broken"), &config, false).await);
    }
    failed(open::open_app(params("missing"), &config, false).await);
}

#[tokio::test]
async fn file_executors_refuse_without_roots() {
    let config = AgentConfig::default();
    for (kind, params) in [
        ("fs.list", json!({"path": "/tmp"})),
        ("fs.read", json!({"path": "/etc/hostname"})),
        ("fs.write", json!({"path": "/tmp/x", "content": "y"})),
        ("fs.delete", json!({"path": "/tmp/x"})),
    ] {
        assert_eq!(
            refused(run(&config, kind, params).await),
            "disabled",
            "{kind}"
        );
    }
}

#[tokio::test]
async fn fs_list() {
    let e = env();
    std::fs::write(e.root.join("sub/b.txt"), "bb").unwrap();
    let (title, detail, output) =
        done(run(&e.config, "fs.list", json!({"path": p(&e.root)})).await);
    assert!(title.starts_with("Listed "));
    assert_eq!(detail, "2 entries");
    let entries: Value = serde_json::from_str(&output.unwrap()).unwrap();
    assert_eq!(
        entries,
        json!([
            {"name": "hello.txt", "kind": "file", "size": 11},
            {"name": "sub", "kind": "dir", "size": null},
        ])
    );
    assert_eq!(
        refused(run(&e.config, "fs.list", json!({"path": "hello.txt"})).await),
        "bad_params"
    );
    assert_eq!(
        refused(run(&e.config, "fs.list", json!({"path": p(&e.outside)})).await),
        "path_escape"
    );
    assert_eq!(
        refused(run(&e.config, "fs.list", json!({"path": "sub/.."})).await),
        "path_escape"
    );

    // Many entries: capped by max_output_bytes, still valid JSON.
    for i in 0..200 {
        std::fs::write(e.root.join(format!("sub/file-{i:03}.txt")), "").unwrap();
    }
    let small = AgentConfig {
        max_output_bytes: 1024,
        ..e.config.clone()
    };
    let (_, detail, output) = done(run(&small, "fs.list", json!({"path": "sub"})).await);
    let output = output.unwrap();
    assert!(output.len() <= 1024, "{}", output.len());
    let shown = serde_json::from_str::<Value>(&output).unwrap();
    let shown = shown.as_array().unwrap().len();
    assert!(shown > 0 && shown < 201);
    assert_eq!(
        detail,
        format!("{shown} of 201 entries (output capped at 1024 bytes)")
    );
}

#[tokio::test]
async fn fs_read() {
    let e = env();
    let (title, detail, output) =
        done(run(&e.config, "fs.read", json!({"path": "hello.txt"})).await);
    assert!(title.ends_with("hello.txt"));
    assert_eq!(detail, "11 bytes");
    assert_eq!(output.as_deref(), Some("hello world"));

    let (_, detail, output) = done(
        run(
            &e.config,
            "fs.read",
            json!({"path": "hello.txt", "max_bytes": 5}),
        )
        .await,
    );
    assert_eq!(
        (detail.as_str(), output.as_deref()),
        ("first 5 of 11 bytes", Some("hello"))
    );

    // The config cap wins over a bigger request.
    let capped = AgentConfig {
        max_read_bytes: 3,
        ..e.config.clone()
    };
    let (_, _, output) = done(
        run(
            &capped,
            "fs.read",
            json!({"path": "hello.txt", "max_bytes": 1000}),
        )
        .await,
    );
    assert_eq!(output.as_deref(), Some("hel"));

    // A cap in the middle of a multi-byte character still gives text.
    std::fs::write(e.root.join("utf8.txt"), "aé").unwrap();
    let (_, _, output) = done(
        run(
            &e.config,
            "fs.read",
            json!({"path": "utf8.txt", "max_bytes": 2}),
        )
        .await,
    );
    assert_eq!(output.as_deref(), Some("a"));

    // Binary content comes back as base64.
    std::fs::write(e.root.join("bin"), [0xff, 0x00, 0xfe]).unwrap();
    let (_, detail, output) = done(run(&e.config, "fs.read", json!({"path": "bin"})).await);
    assert!(detail.ends_with("binary (base64)"), "{detail}");
    assert_eq!(output.as_deref(), Some("/wD+"));

    for (path, code) in [
        (p(&e.outside.join("secret.txt")), "path_escape"),
        ("../outside/secret.txt".to_owned(), "path_escape"),
        ("missing.txt".to_owned(), "not_found"),
        ("sub".to_owned(), "bad_params"),
    ] {
        assert_eq!(
            refused(run(&e.config, "fs.read", json!({"path": path})).await),
            code,
            "{path}"
        );
    }
}

#[cfg(unix)]
#[tokio::test]
async fn fs_read_refuses_symlinks_out_and_special_files() {
    let e = env();
    std::os::unix::fs::symlink(e.outside.join("secret.txt"), e.root.join("link")).unwrap();
    assert_eq!(
        refused(run(&e.config, "fs.read", json!({"path": "link"})).await),
        "path_escape"
    );
    let dev = AgentConfig {
        roots: vec![PathBuf::from("/dev")],
        ..AgentConfig::default()
    };
    assert_eq!(
        refused(run(&dev, "fs.read", json!({"path": "/dev/zero"})).await),
        "special_file"
    );
    if std::process::Command::new("mkfifo")
        .arg(e.root.join("fifo"))
        .status()
        .is_ok_and(|s| s.success())
    {
        assert_eq!(
            refused(run(&e.config, "fs.read", json!({"path": "fifo"})).await),
            "special_file"
        );
    }
}

#[tokio::test]
async fn fs_write_modes_and_caps() {
    let e = env();
    let write = |path: &str, content: &str, mode: Option<&str>| {
        let mut params = json!({"path": path, "content": content});
        if let Some(mode) = mode {
            params["mode"] = json!(mode);
        }
        params
    };
    let (_, detail, _) = done(run(&e.config, "fs.write", write("sub/new.txt", "one", None)).await);
    assert!(detail.starts_with("created "), "{detail}");
    assert_eq!(
        refused(run(&e.config, "fs.write", write("sub/new.txt", "x", None)).await),
        "exists"
    );
    assert_eq!(
        refused(
            run(
                &e.config,
                "fs.write",
                write("sub/new.txt", "x", Some("create"))
            )
            .await
        ),
        "exists"
    );
    done(
        run(
            &e.config,
            "fs.write",
            write("sub/new.txt", "+two", Some("append")),
        )
        .await,
    );
    assert_eq!(
        std::fs::read_to_string(e.root.join("sub/new.txt")).unwrap(),
        "one+two"
    );
    done(
        run(
            &e.config,
            "fs.write",
            write("sub/new.txt", "3", Some("overwrite")),
        )
        .await,
    );
    assert_eq!(
        std::fs::read_to_string(e.root.join("sub/new.txt")).unwrap(),
        "3"
    );

    let small = AgentConfig {
        max_write_bytes: 4,
        ..e.config.clone()
    };
    done(run(&small, "fs.write", write("four.txt", "1234", None)).await);
    assert_eq!(
        refused(run(&small, "fs.write", write("five.txt", "12345", None)).await),
        "too_large"
    );
    assert!(!e.root.join("five.txt").exists());

    for (path, code) in [
        (p(&e.outside.join("new.txt")), "path_escape"),
        (p(&e.outside.join("secret.txt")), "path_escape"),
        ("../outside/new.txt".to_owned(), "path_escape"),
        ("sub/../x.txt".to_owned(), "path_escape"),
        ("nodir/x.txt".to_owned(), "not_found"),
        ("sub".to_owned(), "bad_params"),
    ] {
        assert_eq!(
            refused(run(&e.config, "fs.write", write(&path, "x", Some("overwrite"))).await),
            code,
            "{path}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(e.outside.join("secret.txt")).unwrap(),
        "secret"
    );
    assert!(!e.outside.join("new.txt").exists());
}

#[cfg(unix)]
#[tokio::test]
async fn fs_write_never_goes_through_a_symlink() {
    let e = env();
    std::os::unix::fs::symlink(e.outside.join("secret.txt"), e.root.join("link")).unwrap();
    std::os::unix::fs::symlink(&e.outside, e.root.join("outdir")).unwrap();
    std::os::unix::fs::symlink(e.root.join("hello.txt"), e.root.join("inner")).unwrap();
    for path in ["link", "outdir/new.txt", "outdir/secret.txt", "inner"] {
        assert_eq!(
            refused(
                run(
                    &e.config,
                    "fs.write",
                    json!({"path": path, "content": "pwned", "mode": "overwrite"})
                )
                .await
            ),
            "path_escape",
            "{path}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(e.outside.join("secret.txt")).unwrap(),
        "secret"
    );
    assert_eq!(
        std::fs::read_to_string(e.root.join("hello.txt")).unwrap(),
        "hello world"
    );
}

#[tokio::test]
async fn fs_delete_files_only() {
    let e = env();
    let (title, _, _) = done(run(&e.config, "fs.delete", json!({"path": "hello.txt"})).await);
    assert!(title.starts_with("Deleted "));
    assert!(!e.root.join("hello.txt").exists());
    for (path, code) in [
        ("hello.txt".to_owned(), "not_found"),
        ("sub".to_owned(), "bad_params"),
        (p(&e.root), "path_escape"),
        (p(&e.outside.join("secret.txt")), "path_escape"),
        ("../outside/secret.txt".to_owned(), "path_escape"),
    ] {
        assert_eq!(
            refused(run(&e.config, "fs.delete", json!({"path": path})).await),
            code,
            "{path}"
        );
    }
    assert!(e.root.join("sub").is_dir());
    assert!(e.outside.join("secret.txt").exists());
}

#[cfg(unix)]
#[tokio::test]
async fn fs_delete_refuses_links_and_devices() {
    let e = env();
    std::os::unix::fs::symlink(e.outside.join("secret.txt"), e.root.join("link")).unwrap();
    assert_eq!(
        refused(run(&e.config, "fs.delete", json!({"path": "link"})).await),
        "path_escape"
    );
    assert!(e.root.join("link").symlink_metadata().is_ok());
    let dev = AgentConfig {
        roots: vec![PathBuf::from("/dev")],
        ..AgentConfig::default()
    };
    assert_eq!(
        refused(run(&dev, "fs.delete", json!({"path": "/dev/null"})).await),
        "special_file"
    );
}

#[cfg(unix)]
mod shell {
    use super::*;

    fn config(allow: &[&str]) -> AgentConfig {
        AgentConfig {
            shell_allowlist: allow.iter().map(|s| (*s).to_owned()).collect(),
            ..AgentConfig::default()
        }
    }

    async fn exec(config: &AgentConfig, argv: &[&str]) -> ExecOutcome {
        run(config, "shell.exec", json!({ "argv": argv })).await
    }

    #[tokio::test]
    async fn allowlist_is_exact() {
        let c = config(&["echo"]);
        assert_eq!(
            refused(exec(&config(&[]), &["echo", "hi"]).await),
            "not_allowlisted"
        );
        assert_eq!(
            refused(exec(&c, &["sh", "-c", "echo hi"]).await),
            "not_allowlisted"
        );
        assert_eq!(
            refused(exec(&c, &["/bin/echo", "hi"]).await),
            "not_allowlisted"
        );
        assert_eq!(refused(exec(&c, &["./echo"]).await), "not_allowlisted");
        assert_eq!(refused(exec(&c, &[]).await), "bad_params");
        let (title, detail, output) = done(exec(&c, &["echo", "hi"]).await);
        assert_eq!(title, "Ran echo");
        assert!(detail.starts_with("exit code 0"), "{detail}");
        assert_eq!(output.as_deref(), Some("hi\n"));
        // An absolute path in the allowlist allows exactly that path.
        let echo = ["/bin/echo", "/usr/bin/echo"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap();
        let (_, _, output) = done(exec(&config(&[echo]), &[echo, "abs"]).await);
        assert_eq!(output.as_deref(), Some("abs\n"));
    }

    #[tokio::test]
    async fn no_shell_is_involved() {
        let c = config(&["echo"]);
        let (_, _, output) = done(exec(&c, &["echo", "$HOME", ";", "ls", "|", "*", "`id`"]).await);
        assert_eq!(output.as_deref(), Some("$HOME ; ls | * `id`\n"));
    }

    #[tokio::test]
    async fn non_zero_exit_fails_with_stderr() {
        let c = config(&["ls", "false"]);
        let reason = failed(exec(&c, &["ls", "/nonexistent-nexus-path"]).await);
        assert!(
            reason.contains("exit code 2") || reason.contains("exit code 1"),
            "{reason}"
        );
        assert!(reason.contains("nonexistent-nexus-path"), "{reason}");
        let reason = failed(exec(&c, &["false"]).await);
        assert!(reason.contains("exit code 1"), "{reason}");
        let missing = config(&["nexus-no-such-binary"]);
        let reason = failed(exec(&missing, &["nexus-no-such-binary"]).await);
        assert!(reason.contains("cannot start"), "{reason}");
    }

    #[tokio::test]
    async fn timeout_kills_it() {
        let c = AgentConfig {
            shell_timeout_secs: 1,
            ..config(&["sleep"])
        };
        let started = std::time::Instant::now();
        let reason = failed(exec(&c, &["sleep", "5"]).await);
        assert!(reason.contains("timed out after 1 s"), "{reason}");
        assert!(started.elapsed() < std::time::Duration::from_secs(4));
    }

    #[tokio::test]
    async fn timeout_kills_grandchildren_holding_the_pipe() {
        // `sh` is allowlisted here only to start a grandchild that keeps stdout open.
        let c = AgentConfig {
            shell_timeout_secs: 1,
            ..config(&["sh"])
        };
        let started = std::time::Instant::now();
        let reason = failed(exec(&c, &["sh", "-c", "sleep 30 & sleep 30"]).await);
        assert!(reason.contains("timed out"), "{reason}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[tokio::test]
    async fn output_is_capped() {
        let c = AgentConfig {
            max_output_bytes: 100,
            ..config(&["head", "sh"])
        };
        let (_, detail, output) = done(exec(&c, &["head", "-c", "100000", "/dev/zero"]).await);
        assert_eq!(output.unwrap().len(), 100);
        assert!(detail.contains("stdout 100000 bytes"), "{detail}");
        assert!(detail.contains("output capped at 100 bytes"), "{detail}");
        let (_, _, output) = done(exec(&c, &["sh", "-c", "echo out; echo err >&2"]).await);
        assert_eq!(output.as_deref(), Some("out\n[stderr]\nerr\n"));
    }

    #[tokio::test]
    async fn nexus_variables_are_not_passed_on() {
        // The agent's own NEXUS_* settings never reach a command; everything else does.
        let c = config(&["env"]);
        let (_, _, output) = done(exec(&c, &["env"]).await);
        let output = output.unwrap_or_default();
        assert!(output.lines().all(|l| !l.starts_with("NEXUS_")), "{output}");
        if std::env::var_os("PATH").is_some() {
            assert!(output.lines().any(|l| l.starts_with("PATH=")));
        }
    }
}
