//! First start and `nexus admin …` on the configured store: the generated first admin, accounts,
//! organizations, projects, roles, password resets and signing-key rotation, each checked
//! through the HTTP API of a server on the same store.

use reqwest::Method;
use serde_json::json;

use crate::support::*;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs an admin command on the server's store and expects success; returns stdout.
fn admin_ok(server: &TestServer, args: &[&str], stdin: Option<&str>) -> String {
    let out = server.cli(args, stdin);
    assert!(
        out.status.success(),
        "nexus {args:?} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs an admin command that must fail; returns stdout and stderr together.
fn admin_fails(server: &TestServer, args: &[&str], stdin: Option<&str>) -> String {
    let out = server.cli(args, stdin);
    assert!(
        !out.status.success(),
        "nexus {args:?} should fail: {}",
        text(&out.stdout)
    );
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

#[tokio::test]
async fn first_start_without_variables_creates_an_admin_with_a_private_generated_password() {
    let server = TestServer::start_unbootstrapped().await;
    let file = server.data_dir.join("initial-admin-password");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&file)
            .expect("initial-admin-password")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "only the owner may read it");
    let password = std::fs::read_to_string(&file)
        .expect("read")
        .trim()
        .to_owned();
    assert!(password.len() >= 16, "{password}");

    let (s, login) = server
        .login_response("admin@localhost", &password, None)
        .await;
    assert_eq!(s, 200, "{login}");
    assert_eq!(
        login["user"]["orgs"],
        json!([{"org_id": "default", "role": "admin"}])
    );
    let token = login["access_token"].as_str().expect("token").to_owned();
    let r = server
        .as_user_in(&token, Method::GET, "/devices", "default", "default")
        .send()
        .await
        .expect("devices");
    assert_eq!(r.status(), 200, "the default tenant exists");

    // Printed once for the operator (on stderr), never in the structured logs.
    let logs = server.log_text();
    assert_eq!(logs.matches(password.as_str()).count(), 1, "{logs}");
    for line in logs.lines().filter(|l| l.contains(password.as_str())) {
        assert!(line.starts_with("stderr: "), "{line}");
        assert!(
            serde_json::from_str::<serde_json::Value>(&line[8..]).is_err(),
            "{line}"
        );
    }

    // A restart neither creates another admin nor rewrites or prints the password.
    let server = server.restart().await;
    assert_eq!(
        std::fs::read_to_string(&file).expect("read").trim(),
        password
    );
    assert!(!server.log_text().contains(password.as_str()));
    let (s, _) = server
        .login_response("admin@localhost", &password, None)
        .await;
    assert_eq!(s, 200);

    // With the variables set, nothing is generated and no file is written.
    let configured = TestServer::start().await;
    assert!(!configured.data_dir.join("initial-admin-password").exists());
    assert!(!configured.log_text().contains(ADMIN_PASSWORD));
}

fn kid_of(token: &str) -> String {
    jwt_parts(token).0["kid"].as_str().expect("kid").to_owned()
}

async fn jwks_kids(server: &TestServer) -> Vec<String> {
    let (_, jwks) = status_json(
        server
            .http
            .get(server.url("/.well-known/jwks.json"))
            .send()
            .await
            .expect("jwks"),
    )
    .await;
    jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["kid"].as_str().expect("kid").to_owned())
        .collect()
}

#[tokio::test]
async fn admin_commands_manage_accounts_organizations_roles_and_keys() {
    let mut server = TestServer::start().await;
    if server.database_url().is_none() {
        let busy = admin_fails(&server, &["admin", "user", "list"], None);
        assert!(
            busy.contains("the server is running on this data directory"),
            "{busy}"
        );
    }
    let before_rotation = server.admin_token.clone();
    let old_kid = kid_of(&before_rotation);
    assert!(server.stop().await.success());

    let out = admin_ok(
        &server,
        &["admin", "org", "create", "beta", "--name", "Beta Inc"],
        None,
    );
    assert!(out.contains("created organization beta"), "{out}");
    let out = admin_fails(&server, &["admin", "org", "create", "beta"], None);
    assert!(out.contains("taken") || out.contains("exists"), "{out}");
    let out = admin_ok(&server, &["admin", "project", "create", "beta", "p1"], None);
    assert!(out.contains("beta:p1"), "{out}");
    admin_fails(&server, &["admin", "project", "create", "nope", "p1"], None);

    let carol_password = "Blue-Lantern-77!";
    let out = admin_ok(
        &server,
        &[
            "admin",
            "user",
            "create",
            "--email",
            "carol@nexus.test",
            "--org",
            "beta",
            "--role",
            "operator",
            "--password-stdin",
        ],
        Some(&format!("{carol_password}\n")),
    );
    assert!(
        out.contains("carol@nexus.test") && out.contains("operator"),
        "{out}"
    );
    assert!(
        !out.contains(carol_password),
        "a given password is never echoed"
    );
    let out = admin_fails(
        &server,
        &[
            "admin",
            "user",
            "create",
            "--email",
            "weak@nexus.test",
            "--org",
            "beta",
            "--password-stdin",
        ],
        Some("short\n"),
    );
    assert!(out.contains("password"), "{out}");
    admin_fails(
        &server,
        &[
            "admin",
            "user",
            "create",
            "--email",
            "x@nexus.test",
            "--org",
            "nope",
        ],
        None,
    );
    admin_fails(
        &server,
        &[
            "admin",
            "user",
            "create",
            "--email",
            "carol@nexus.test",
            "--org",
            "beta",
        ],
        None,
    );
    let out = admin_ok(
        &server,
        &[
            "admin",
            "user",
            "create",
            "--email",
            "gen@nexus.test",
            "--org",
            "beta",
        ],
        None,
    );
    let generated = out
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .unwrap_or_else(|| panic!("a generated password is printed once: {out}"))
        .to_owned();

    let listed = admin_ok(&server, &["admin", "user", "list"], None);
    for expected in [
        "carol@nexus.test",
        "beta:operator",
        "gen@nexus.test",
        "beta:viewer",
        ADMIN_EMAIL,
        "acme:admin",
    ] {
        assert!(listed.contains(expected), "{expected} in {listed}");
    }
    assert!(!listed.contains(carol_password) && !listed.contains("$argon2"));

    let out = nexus_cli(
        &[
            "admin".into(),
            "keys".into(),
            "rotate".into(),
            "--data-dir".into(),
            server.data_dir.display().to_string(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let new_kid = text(&out.stdout)
        .split_whitespace()
        .nth(3)
        .expect("new signing key <kid> in <dir>")
        .to_owned();

    let mut server = server.restart().await;
    let (s, carol) = server
        .login_response("carol@nexus.test", carol_password, None)
        .await;
    assert_eq!(s, 200, "{carol}");
    let carol_token = carol["access_token"].as_str().expect("token").to_owned();
    let carol_get = |path: &str, org: &str, project: &str| {
        server
            .as_user_in(&carol_token, Method::GET, path, org, project)
            .send()
    };
    assert_eq!(
        carol_get("/devices", "beta", "p1")
            .await
            .expect("send")
            .status(),
        200
    );
    assert_eq!(
        carol_get("/audit/logs", "beta", "p1")
            .await
            .expect("send")
            .status(),
        403
    );
    assert_eq!(
        carol_get("/devices", ORG, PROJECT)
            .await
            .expect("send")
            .status(),
        404
    );
    let (s, _) = server
        .login_response("gen@nexus.test", &generated, None)
        .await;
    assert_eq!(s, 200);

    // The rotated key signs new tokens; tokens of the old key keep working.
    let kids = jwks_kids(&server).await;
    assert!(
        kids.contains(&old_kid) && kids.contains(&new_kid),
        "{kids:?}"
    );
    assert_eq!(kid_of(&server.admin_token), new_kid);
    assert_eq!(kid_of(&carol_token), new_kid);
    let r = server
        .http
        .get(server.url("/auth/me"))
        .bearer_auth(&before_rotation)
        .send()
        .await
        .expect("me");
    assert_eq!(r.status(), 200, "signed before the rotation, still valid");

    assert!(server.stop().await.success());
    let out = admin_ok(
        &server,
        &[
            "admin",
            "user",
            "set-role",
            "--email",
            "carol@nexus.test",
            "--org",
            "beta",
            "--role",
            "admin",
        ],
        None,
    );
    assert!(out.contains("admin"), "{out}");
    admin_fails(
        &server,
        &[
            "admin",
            "user",
            "set-role",
            "--email",
            "nobody@nexus.test",
            "--org",
            "beta",
            "--role",
            "admin",
        ],
        None,
    );
    admin_fails(
        &server,
        &[
            "admin",
            "user",
            "set-role",
            "--email",
            "carol@nexus.test",
            "--org",
            "beta",
            "--role",
            "root",
        ],
        None,
    );
    let new_password = "Green-Lantern-88!";
    admin_ok(
        &server,
        &[
            "admin",
            "user",
            "reset-password",
            "--email",
            "carol@nexus.test",
            "--password-stdin",
        ],
        Some(&format!("{new_password}\n")),
    );
    let listed = admin_ok(&server, &["admin", "user", "list"], None);
    assert!(listed.contains("beta:admin"), "{listed}");

    let server = server.restart().await;
    let r = server
        .as_user_in(&carol_token, Method::GET, "/devices", "beta", "p1")
        .send()
        .await
        .expect("send");
    let (s, b) = status_json(r).await;
    assert_problem(s, &b, 401, "session_ended");
    let (s, b) = server
        .login_response("carol@nexus.test", carol_password, None)
        .await;
    assert_problem(s, &b, 401, "invalid_credentials");
    let (s, carol) = server
        .login_response("carol@nexus.test", new_password, None)
        .await;
    assert_eq!(s, 200, "{carol}");
    let token = carol["access_token"].as_str().expect("token");
    let (s, logs) = status_json(
        server
            .as_user_in(token, Method::GET, "/audit/logs?limit=500", "beta", "p1")
            .send()
            .await
            .expect("audit"),
    )
    .await;
    assert_eq!(s, 200, "an admin of beta now: {logs}");
    let actions: Vec<&str> = logs["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["action"].as_str().expect("action"))
        .collect();
    for expected in [
        "org.create",
        "project.create",
        "member.add",
        "member.role_change",
    ] {
        assert!(actions.contains(&expected), "{expected} in {actions:?}");
    }
    assert_no_secrets(
        &logs.to_string(),
        &[carol_password, new_password, &generated],
        "audit entries",
    );
    assert_no_secrets(
        &server.log_text(),
        &[carol_password, new_password, &generated],
        "logs",
    );
}
