//! Web sign-in for the bench (NEXUS target): log in once, make sure the bench
//! org/project exist and that the bench user may act in them, and hand back the
//! access token that goes into every web request and SSE subscription as
//! `Authorization: Bearer …`.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;

use crate::common::BaseUrl;
use crate::http::{Headers, HttpConn, Resp};

/// Credentials of the bench user.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub email: String,
    pub password: String,
}

/// The outcome of [`sign_in`].
#[derive(Clone, Debug)]
pub struct SignedIn {
    pub access_token: String,
    /// Access token lifetime in seconds as announced by the server.
    pub expires_in: Option<u64>,
    /// What happened to the org / project: "created" or "existed".
    pub org: &'static str,
    pub project: &'static str,
}

impl SignedIn {
    pub fn header(&self) -> (String, String) {
        (
            "authorization".to_string(),
            format!("Bearer {}", self.access_token),
        )
    }
}

/// POST with a few retries on transport errors and 5xx (replicas starting
/// their set-up at the same moment may race on the same org).
async fn post_retry(
    conn: &mut HttpConn,
    path: &str,
    headers: &Headers,
    body: String,
) -> Result<Resp> {
    let mut last = None;
    for attempt in 0..4u64 {
        match conn.post_json(path, headers, body.clone()).await {
            Ok(r) if !r.status.is_server_error() => return Ok(r),
            Ok(r) => last = Some(anyhow!("{}", r.describe())),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
    }
    Err(last
        .unwrap_or_else(|| anyhow!("no attempt"))
        .context(format!("POST {path}")))
}

/// Log in as `creds`, then create org `org` and project `org/project` if they
/// do not exist yet (201 and 409 are both fine) and check that the user can
/// read devices in that tenant.
pub async fn sign_in(
    base: &BaseUrl,
    timeout: Duration,
    creds: &Credentials,
    org: &str,
    project: &str,
) -> Result<SignedIn> {
    let mut conn = HttpConn::new(base.clone(), timeout);
    let body = json!({ "email": creds.email, "password": creds.password }).to_string();
    let r = post_retry(&mut conn, "/auth/login", &Vec::new(), body).await?;
    if !r.ok() {
        let hint = if r.status.as_u16() == 404 {
            " (this server has no /auth/login: use --no-login for servers without authentication)"
        } else {
            " (pass the credentials of a user of this server with --email/--password or \
             NEXUS_BENCH_EMAIL/NEXUS_BENCH_PASSWORD; a server spawned with --spawn-server gets \
             them as its bootstrap admin; a fresh server started by hand needs \
             NEXUS_BOOTSTRAP_ADMIN_EMAIL/NEXUS_BOOTSTRAP_ADMIN_PASSWORD set to them)"
        };
        bail!(
            "POST /auth/login as {}: {}{hint}",
            creds.email,
            r.describe()
        );
    }
    let v = r.json()?;
    let access_token = v
        .get("access_token")
        .and_then(|t| t.as_str())
        .ok_or_else(|| anyhow!("login response has no access_token: {v}"))?
        .to_string();
    let expires_in = v.get("expires_in").and_then(|t| t.as_u64());
    let auth: Headers = vec![(
        "authorization".to_string(),
        format!("Bearer {access_token}"),
    )];

    let r = post_retry(
        &mut conn,
        "/orgs",
        &auth,
        json!({ "org_id": org }).to_string(),
    )
    .await?;
    let org_state = match r.status.as_u16() {
        200 | 201 => "created",
        409 => "existed",
        _ => bail!("POST /orgs {{org_id: {org:?}}}: {}", r.describe()),
    };
    let path = format!("/orgs/{org}/projects");
    let r = post_retry(
        &mut conn,
        &path,
        &auth,
        json!({ "project_id": project }).to_string(),
    )
    .await?;
    let project_state = match r.status.as_u16() {
        200 | 201 => "created",
        409 => "existed",
        404 | 403 => bail!(
            "POST {path}: {} (org {org:?} exists but {} is not an admin of it; pick another --org \
             or sign in as one of its admins)",
            r.describe(),
            creds.email
        ),
        _ => bail!("POST {path} {{project_id: {project:?}}}: {}", r.describe()),
    };

    // Fail here, with a clear message, rather than in the middle of pairing.
    let mut check = auth.clone();
    check.push(("x-org-id".to_string(), org.to_string()));
    check.push(("x-project-id".to_string(), project.to_string()));
    let r = conn
        .get("/devices", &check)
        .await
        .context("GET /devices (access check)")?;
    if !r.ok() {
        bail!(
            "GET /devices in {org}/{project} as {}: {} (the bench user must be a member with a \
             role that may read and pair devices)",
            creds.email,
            r.describe()
        );
    }
    eprintln!(
        "signed in as {} (token valid {}s); org {org} {org_state}, project {project} {project_state}",
        creds.email,
        expires_in.map_or("?".into(), |s| s.to_string())
    );
    Ok(SignedIn {
        access_token,
        expires_in,
        org: org_state,
        project: project_state,
    })
}
