//! Authorization: every role × endpoint pair of the permission table, members and roles taking
//! effect at once, tenant isolation (another tenant's objects do not exist: 404), the tenant
//! headers (400) and one-time stream tickets for browsers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nexus_domain::{Permission, Role};
use reqwest::Method;
use serde_json::json;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(20);

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", UNIQUE.fetch_add(1, Ordering::Relaxed))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Endpoint {
    ListDevices,
    GetDevice,
    RenameDevice,
    DeleteDevice,
    PairingPreview,
    ConfirmByCode,
    Stream,
    StreamTicket,
    AuditLogs,
    AuditVerify,
    ListMembers,
    AddMember,
    UpdateMember,
    RemoveMember,
    CreateProject,
    ListProjects,
    ProposeCommand,
    ListCommands,
    DecideApproval,
    GetPolicy,
    PutPolicy,
    EmitReport,
}

use Endpoint::*;

/// The table under test: the permission each endpoint needs and its success status, plus the
/// expected answer per role written out (viewer, operator, admin), which must agree with
/// `Role::allows` — so a change to either the handlers or the table shows up here.
const TABLE: &[(Endpoint, Permission, u16, [u16; 3])] = &[
    (ListDevices, Permission::ReadDevices, 200, [200, 200, 200]),
    (GetDevice, Permission::ReadDevices, 200, [200, 200, 200]),
    (
        RenameDevice,
        Permission::ManageDevices,
        200,
        [403, 403, 200],
    ),
    (
        DeleteDevice,
        Permission::ManageDevices,
        204,
        [403, 403, 204],
    ),
    (
        PairingPreview,
        Permission::PairDevices,
        200,
        [403, 200, 200],
    ),
    (ConfirmByCode, Permission::PairDevices, 200, [403, 200, 200]),
    (Stream, Permission::ReadStreams, 200, [200, 200, 200]),
    (StreamTicket, Permission::ReadStreams, 200, [200, 200, 200]),
    (AuditLogs, Permission::ReadAudit, 200, [403, 403, 200]),
    (AuditVerify, Permission::ReadAudit, 200, [403, 403, 200]),
    (ListMembers, Permission::ReadMembers, 200, [200, 200, 200]),
    (AddMember, Permission::ManageMembers, 201, [403, 403, 201]),
    (
        UpdateMember,
        Permission::ManageMembers,
        200,
        [403, 403, 200],
    ),
    (
        RemoveMember,
        Permission::ManageMembers,
        204,
        [403, 403, 204],
    ),
    (
        CreateProject,
        Permission::ManageMembers,
        201,
        [403, 403, 201],
    ),
    (ListProjects, Permission::ReadMembers, 200, [200, 200, 200]),
    (
        ProposeCommand,
        Permission::SendCommands,
        202,
        [403, 202, 202],
    ),
    (ListCommands, Permission::ReadCommands, 200, [200, 200, 200]),
    (
        DecideApproval,
        Permission::DecideApprovals,
        202,
        [403, 202, 202],
    ),
    (GetPolicy, Permission::ReadCommands, 200, [200, 200, 200]),
    (PutPolicy, Permission::ManagePolicies, 200, [403, 403, 200]),
    (EmitReport, Permission::SendCommands, 200, [403, 200, 200]),
];

const ROLES: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

/// A request for `endpoint`, with fresh objects made by the bootstrap admin where the call
/// consumes or changes one. Returns the request and the object it acts on.
async fn prepare(
    server: &TestServer,
    endpoint: Endpoint,
    token: &str,
) -> (reqwest::RequestBuilder, Option<String>) {
    let req = |method: Method, path: &str| server.as_user(token, method, path);
    match endpoint {
        ListDevices => (req(Method::GET, "/devices"), None),
        GetDevice | RenameDevice | DeleteDevice => {
            let device = server.pair_device(&unique("dev-")).await;
            let path = format!("/devices/{}", device.id);
            let request = match endpoint {
                GetDevice => req(Method::GET, &path),
                RenameDevice => req(Method::PATCH, &path).json(&json!({"name": "renamed"})),
                _ => req(Method::DELETE, &path),
            };
            (request, Some(device.id))
        }
        ProposeCommand => {
            let device = server.pair_device(&unique("dev-")).await;
            let command_id = unique("cmd-");
            (
                req(Method::POST, "/sidecar/command").json(
                    &json!({"command_id": command_id, "device_id": device.id, "type": "fs.read"}),
                ),
                Some(command_id),
            )
        }
        ListCommands => (req(Method::GET, "/commands"), None),
        DecideApproval => {
            let device = server.pair_device(&unique("dev-")).await;
            let (s, proposed) = server
                .post_json(
                    "/sidecar/command",
                    &json!({"command_id": unique("red-"), "device_id": device.id, "type": "shell.exec"}),
                )
                .await;
            assert_eq!(s, 202, "{proposed}");
            let approval_id = proposed["approval_id"]
                .as_str()
                .expect("approval")
                .to_owned();
            (
                req(Method::POST, &format!("/approvals/{approval_id}/decide"))
                    .json(&json!({"decision": "approve"})),
                Some(approval_id),
            )
        }
        GetPolicy => (req(Method::GET, "/policy"), None),
        PutPolicy => (
            req(Method::PUT, "/policy").json(
                &json!({"rules": [{"pattern": "fs.*", "risk": "GREEN"}], "approval_ttl_secs": 60}),
            ),
            Some("policy".to_owned()),
        ),
        PairingPreview | ConfirmByCode => {
            let (s, started) = status_json(
                server
                    .http
                    .post(server.url("/devices/pairing/start"))
                    .json(&json!({"device_name": unique("pairing-")}))
                    .send()
                    .await
                    .expect("start"),
            )
            .await;
            assert_eq!(s, 200);
            let path = if endpoint == PairingPreview {
                "/devices/pairing/preview"
            } else {
                "/devices/pairing/confirm_by_code"
            };
            let code = started["pairing_code"].as_str().expect("code").to_owned();
            (
                req(Method::POST, path).json(&json!({"pairing_code": code})),
                Some(code),
            )
        }
        Stream => (
            req(Method::GET, "/agent/reports/stream?session_id=s-roles"),
            None,
        ),
        StreamTicket => (
            req(Method::POST, "/auth/stream-ticket").json(&json!({"session_id": "s-roles"})),
            None,
        ),
        AuditLogs => (req(Method::GET, "/audit/logs"), None),
        AuditVerify => (req(Method::GET, "/audit/verify"), None),
        ListMembers => (req(Method::GET, &format!("/orgs/{ORG}/members")), None),
        AddMember => (
            req(Method::POST, &format!("/orgs/{ORG}/members")).json(
                &json!({"email": format!("{}@nexus.test", unique("added")), "role": "viewer"}),
            ),
            None,
        ),
        UpdateMember | RemoveMember => {
            let id = add_member(
                server,
                &format!("{}@nexus.test", unique("target")),
                "viewer",
            )
            .await;
            let path = format!("/orgs/{ORG}/members/{id}");
            let request = if endpoint == UpdateMember {
                req(Method::PATCH, &path).json(&json!({"role": "operator"}))
            } else {
                req(Method::DELETE, &path)
            };
            (request, Some(id))
        }
        CreateProject => (
            req(Method::POST, &format!("/orgs/{ORG}/projects"))
                .json(&json!({"project_id": unique("proj-")})),
            None,
        ),
        ListProjects => (req(Method::GET, &format!("/orgs/{ORG}/projects")), None),
        EmitReport => (
            req(Method::POST, "/devtools/emit_report")
                .json(&json!({"session_id": "s-roles", "text": "hello"})),
            None,
        ),
    }
}

/// After a refused call: the object it targeted is exactly as before.
async fn assert_untouched(server: &TestServer, endpoint: Endpoint, object: Option<&str>) {
    let Some(object) = object else { return };
    match endpoint {
        RenameDevice | DeleteDevice => {
            let (s, device) = status_json(
                server
                    .web(Method::GET, &format!("/devices/{object}"))
                    .send()
                    .await
                    .expect("get"),
            )
            .await;
            assert_eq!(s, 200, "{endpoint:?} refused yet the device is gone");
            assert_ne!(device["device_name"], "renamed");
        }
        ProposeCommand => {
            let (s, b) = status_json(
                server
                    .web(Method::GET, &format!("/commands/{object}"))
                    .send()
                    .await
                    .expect("get"),
            )
            .await;
            assert_eq!(s, 404, "{endpoint:?} refused yet the command exists: {b}");
        }
        DecideApproval => {
            let (_, approval) = status_json(
                server
                    .web(Method::GET, &format!("/approvals/{object}"))
                    .send()
                    .await
                    .expect("get"),
            )
            .await;
            assert_eq!(
                approval["status"], "pending",
                "{endpoint:?} refused yet decided"
            );
        }
        PutPolicy => {
            let (_, policy) = status_json(
                server
                    .web(Method::GET, "/policy")
                    .send()
                    .await
                    .expect("get"),
            )
            .await;
            assert_ne!(
                policy["approval_ttl_secs"], 60,
                "{endpoint:?} refused yet saved"
            );
        }
        PairingPreview | ConfirmByCode => {
            // Still pending: the admin can confirm it.
            let (s, b) = server
                .post_json(
                    "/devices/pairing/confirm_by_code",
                    &json!({"pairing_code": object}),
                )
                .await;
            assert_eq!(s, 200, "{endpoint:?} refused yet the pairing changed: {b}");
        }
        UpdateMember | RemoveMember => {
            let (_, members) = status_json(
                server
                    .web(Method::GET, &format!("/orgs/{ORG}/members"))
                    .send()
                    .await
                    .expect("members"),
            )
            .await;
            let member = members["members"]
                .as_array()
                .expect("members")
                .iter()
                .find(|m| m["user_id"] == object)
                .unwrap_or_else(|| panic!("{endpoint:?} refused yet the member is gone"))
                .clone();
            assert_eq!(member["role"], "viewer");
        }
        _ => {}
    }
}

/// Adds an account to the default org as the bootstrap admin; returns its user id.
async fn add_member(server: &TestServer, email: &str, role: &str) -> String {
    let (s, b) = status_json(
        server
            .web(Method::POST, &format!("/orgs/{ORG}/members"))
            .json(&json!({"email": email, "role": role}))
            .send()
            .await
            .expect("add member"),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    b["member"]["user_id"].as_str().expect("id").to_owned()
}

#[tokio::test]
async fn every_role_gets_exactly_what_the_permission_table_allows() {
    let server = TestServer::start().await;
    let mut members = Vec::new();
    for role in ROLES {
        let user = server
            .new_member(ORG, &format!("{role}-member@nexus.test"), role.as_str())
            .await;
        members.push((role, user));
    }
    for &(endpoint, permission, success, expected) in TABLE {
        for (i, (role, user)) in members.iter().enumerate() {
            let derived = if role.allows(permission) {
                success
            } else {
                403
            };
            assert_eq!(
                expected[i], derived,
                "the written table disagrees with Role::allows for {role} on {endpoint:?}"
            );
            let (request, object) = prepare(&server, endpoint, &user.token).await;
            let response = request.send().await.expect("send");
            let status = response.status().as_u16();
            if (200..300).contains(&status) {
                drop(response); // a stream stays open otherwise
                assert_eq!(status, expected[i], "{role} on {endpoint:?}");
            } else {
                let (s, body) = status_json(response).await;
                assert_eq!(s, expected[i], "{role} on {endpoint:?}: {body}");
                assert_problem(s, &body, 403, "permission_denied");
                assert_untouched(&server, endpoint, object.as_deref()).await;
            }
        }
    }
    // Every permission an endpoint needs appears, and every endpoint was exercised.
    for permission in [
        Permission::ReadStreams,
        Permission::ReadDevices,
        Permission::ReadMembers,
        Permission::PairDevices,
        Permission::ManageDevices,
        Permission::SendCommands,
        Permission::ManageMembers,
        Permission::ReadAudit,
        Permission::ReadCommands,
        Permission::DecideApprovals,
        Permission::ManagePolicies,
    ] {
        assert!(TABLE.iter().any(|(_, p, _, _)| *p == permission));
    }
}

#[tokio::test]
async fn role_changes_and_removal_take_effect_on_the_next_request() {
    let server = TestServer::start().await;
    let op = server.new_member(ORG, "olga@nexus.test", "operator").await;
    let pairing_code = || async {
        let (_, started) = status_json(
            server
                .http
                .post(server.url("/devices/pairing/start"))
                .json(&json!({"device_name": "x"}))
                .send()
                .await
                .expect("start"),
        )
        .await;
        started["pairing_code"].as_str().expect("code").to_owned()
    };
    let preview = |code: String| {
        server
            .as_user(&op.token, Method::POST, "/devices/pairing/preview")
            .json(&json!({"pairing_code": code}))
            .send()
    };
    assert_eq!(
        preview(pairing_code().await)
            .await
            .expect("preview")
            .status(),
        200
    );

    let (s, member) = status_json(
        server
            .web(Method::PATCH, &format!("/orgs/{ORG}/members/{}", op.id))
            .json(&json!({"role": "viewer"}))
            .send()
            .await
            .expect("demote"),
    )
    .await;
    assert_eq!(s, 200, "{member}");
    assert_eq!(member["role"], "viewer");
    let (s, b) = status_json(preview(pairing_code().await).await.expect("preview")).await;
    assert_problem(s, &b, 403, "permission_denied");
    let (_, me) = status_json(
        server
            .as_user(&op.token, Method::GET, "/auth/me")
            .send()
            .await
            .expect("me"),
    )
    .await;
    assert_eq!(me["orgs"], json!([{"org_id": ORG, "role": "viewer"}]));

    let r = server
        .web(Method::DELETE, &format!("/orgs/{ORG}/members/{}", op.id))
        .send()
        .await
        .expect("remove");
    assert_eq!(r.status(), 204);
    let (s, b) = status_json(
        server
            .as_user(&op.token, Method::GET, "/devices")
            .send()
            .await
            .expect("devices"),
    )
    .await;
    assert_problem(s, &b, 404, "tenant_not_found");
    let (s, b) = status_json(
        server
            .as_user(&op.token, Method::GET, &format!("/orgs/{ORG}/members"))
            .send()
            .await
            .expect("members"),
    )
    .await;
    assert_problem(s, &b, 404, "org_not_found");
    let (s, b) = status_json(
        server
            .web(Method::DELETE, &format!("/orgs/{ORG}/members/{}", op.id))
            .send()
            .await
            .expect("remove"),
    )
    .await;
    assert_problem(s, &b, 404, "member_not_found");

    // Re-adding an existing account never hands out (or resets) its password.
    let (s, added) = status_json(
        server
            .web(Method::POST, &format!("/orgs/{ORG}/members"))
            .json(&json!({"email": "OLGA@nexus.test", "role": "viewer"}))
            .send()
            .await
            .expect("add"),
    )
    .await;
    assert_eq!(s, 201, "{added}");
    assert_eq!(added["member"]["user_id"], op.id.as_str());
    assert!(added["initial_password"].is_null(), "{added}");
    let (s, _) = server.login_response(&op.email, &op.password, None).await;
    assert_eq!(s, 200, "the account's password is unchanged");
    let (s, b) = status_json(
        server
            .web(Method::POST, &format!("/orgs/{ORG}/members"))
            .json(&json!({"email": op.email, "role": "admin"}))
            .send()
            .await
            .expect("add"),
    )
    .await;
    assert_problem(s, &b, 409, "already_member");
    for body in [
        json!({"email": "not-an-email", "role": "viewer"}),
        json!({"email": "x@nexus.test", "role": "owner"}),
    ] {
        let (s, b) = status_json(
            server
                .web(Method::POST, &format!("/orgs/{ORG}/members"))
                .json(&body)
                .send()
                .await
                .expect("add"),
        )
        .await;
        assert_problem(s, &b, 422, "validation_failed");
    }

    // An organization keeps an admin: its only admin can neither step down nor leave.
    let eve = server.new_member(ORG, "eve@nexus.test", "viewer").await;
    let r = server
        .as_user(&eve.token, Method::POST, "/orgs")
        .json(&json!({"org_id": "solo"}))
        .send()
        .await
        .expect("create org");
    assert_eq!(r.status(), 201);
    let (s, b) = status_json(
        server
            .as_user(
                &eve.token,
                Method::PATCH,
                &format!("/orgs/solo/members/{}", eve.id),
            )
            .json(&json!({"role": "viewer"}))
            .send()
            .await
            .expect("demote"),
    )
    .await;
    assert_problem(s, &b, 409, "last_admin");
    let (s, b) = status_json(
        server
            .as_user(
                &eve.token,
                Method::DELETE,
                &format!("/orgs/solo/members/{}", eve.id),
            )
            .send()
            .await
            .expect("leave"),
    )
    .await;
    assert_problem(s, &b, 409, "last_admin");
    let (s, b) = status_json(
        server
            .as_user(&eve.token, Method::POST, "/orgs")
            .json(&json!({"org_id": "solo"}))
            .send()
            .await
            .expect("create org"),
    )
    .await;
    assert_problem(s, &b, 409, "org_exists");
    // Creating an org made eve admin of it, not of anything else.
    let (s, b) = status_json(
        server
            .as_user(&eve.token, Method::GET, "/audit/logs")
            .send()
            .await
            .expect("audit"),
    )
    .await;
    assert_problem(s, &b, 403, "permission_denied");
}

#[tokio::test]
async fn another_tenant_cannot_see_or_touch_anything_of_this_one() {
    let server = TestServer::start().await;
    let device = server.pair_device("acme-pc").await;
    server
        .push(&device, vec![report("s-iso", "acme-secret")])
        .await;
    let (s, named) = status_json(
        server
            .http
            .post(server.url("/devices/pairing/start"))
            .header("x-org-id", ORG)
            .header("x-project-id", PROJECT)
            .json(&json!({"device_name": "for-acme"}))
            .send()
            .await
            .expect("start"),
    )
    .await;
    assert_eq!(s, 200);
    let acme_code = named["pairing_code"].as_str().expect("code").to_owned();
    let admin_id = status_json(
        server
            .web(Method::GET, "/auth/me")
            .send()
            .await
            .expect("me"),
    )
    .await
    .1["user_id"]
        .as_str()
        .expect("id")
        .to_owned();

    // Eve is the admin of another organization and nothing in acme.
    let r = server
        .http
        .post(server.url("/orgs"))
        .bearer_auth(&server.admin_token)
        .json(&json!({"org_id": "other"}))
        .send()
        .await
        .expect("org");
    assert_eq!(r.status(), 201);
    server.ensure_tenant("other", "proj").await;
    let eve = server.new_member("other", "eve@other.test", "admin").await;
    let device_path = format!("/devices/{}", device.id);
    let as_eve = |method: Method, path: &str, org: &str, project: &str| {
        server.as_user_in(&eve.token, method, path, org, project)
    };

    let in_acme: Vec<(&str, reqwest::RequestBuilder, &str)> = vec![
        (
            "list devices",
            as_eve(Method::GET, "/devices", ORG, PROJECT),
            "tenant_not_found",
        ),
        (
            "get device",
            as_eve(Method::GET, &device_path, ORG, PROJECT),
            "tenant_not_found",
        ),
        (
            "rename device",
            as_eve(Method::PATCH, &device_path, ORG, PROJECT).json(&json!({"name": "pwned"})),
            "tenant_not_found",
        ),
        (
            "delete device",
            as_eve(Method::DELETE, &device_path, ORG, PROJECT),
            "tenant_not_found",
        ),
        (
            "preview",
            as_eve(Method::POST, "/devices/pairing/preview", ORG, PROJECT)
                .json(&json!({"pairing_code": acme_code})),
            "tenant_not_found",
        ),
        (
            "confirm",
            as_eve(
                Method::POST,
                "/devices/pairing/confirm_by_code",
                ORG,
                PROJECT,
            )
            .json(&json!({"pairing_code": acme_code})),
            "tenant_not_found",
        ),
        (
            "stream",
            as_eve(
                Method::GET,
                "/agent/reports/stream?session_id=s-iso",
                ORG,
                PROJECT,
            ),
            "tenant_not_found",
        ),
        (
            "stream ticket",
            as_eve(Method::POST, "/auth/stream-ticket", ORG, PROJECT)
                .json(&json!({"session_id": "s-iso"})),
            "tenant_not_found",
        ),
        (
            "audit logs",
            as_eve(Method::GET, "/audit/logs", ORG, PROJECT),
            "tenant_not_found",
        ),
        (
            "audit verify",
            as_eve(Method::GET, "/audit/verify", ORG, PROJECT),
            "tenant_not_found",
        ),
        (
            "command",
            as_eve(Method::POST, "/sidecar/command", ORG, PROJECT)
                .json(&json!({"command_id": "eve-1", "device_id": device.id, "type": "fs.read"})),
            "tenant_not_found",
        ),
        (
            "emit report",
            as_eve(Method::POST, "/devtools/emit_report", ORG, PROJECT)
                .json(&json!({"session_id": "s-iso", "text": "spoofed"})),
            "tenant_not_found",
        ),
        (
            "list members",
            as_eve(Method::GET, &format!("/orgs/{ORG}/members"), ORG, PROJECT),
            "org_not_found",
        ),
        (
            "add member",
            as_eve(Method::POST, &format!("/orgs/{ORG}/members"), ORG, PROJECT)
                .json(&json!({"email": "eve@other.test", "role": "admin"})),
            "org_not_found",
        ),
        (
            "change role",
            as_eve(
                Method::PATCH,
                &format!("/orgs/{ORG}/members/{admin_id}"),
                ORG,
                PROJECT,
            )
            .json(&json!({"role": "viewer"})),
            "org_not_found",
        ),
        (
            "remove member",
            as_eve(
                Method::DELETE,
                &format!("/orgs/{ORG}/members/{admin_id}"),
                ORG,
                PROJECT,
            ),
            "org_not_found",
        ),
        (
            "create project",
            as_eve(Method::POST, &format!("/orgs/{ORG}/projects"), ORG, PROJECT)
                .json(&json!({"project_id": "mine"})),
            "org_not_found",
        ),
        (
            "list projects",
            as_eve(Method::GET, &format!("/orgs/{ORG}/projects"), ORG, PROJECT),
            "org_not_found",
        ),
    ];
    for (what, request, code) in in_acme {
        let (s, b) = status_json(request.send().await.expect("send")).await;
        assert_eq!(s, 404, "{what}: {b}");
        assert_problem(s, &b, 404, code);
        assert!(!b.to_string().contains("acme-pc"), "{what} leaks: {b}");
    }

    // With her own tenant in the headers, acme's objects still do not exist.
    let in_own: Vec<(&str, reqwest::RequestBuilder, &str)> = vec![
        (
            "get device",
            as_eve(Method::GET, &device_path, "other", "proj"),
            "device_not_found",
        ),
        (
            "rename device",
            as_eve(Method::PATCH, &device_path, "other", "proj").json(&json!({"name": "pwned"})),
            "device_not_found",
        ),
        (
            "delete device",
            as_eve(Method::DELETE, &device_path, "other", "proj"),
            "device_not_found",
        ),
        (
            "command",
            as_eve(Method::POST, "/sidecar/command", "other", "proj")
                .json(&json!({"command_id": "eve-2", "device_id": device.id, "type": "fs.read"})),
            "device_not_found",
        ),
        (
            "preview a code that named acme",
            as_eve(Method::POST, "/devices/pairing/preview", "other", "proj")
                .json(&json!({"pairing_code": acme_code})),
            "pairing_not_found",
        ),
        (
            "confirm a code that named acme",
            as_eve(
                Method::POST,
                "/devices/pairing/confirm_by_code",
                "other",
                "proj",
            )
            .json(&json!({"pairing_code": acme_code})),
            "pairing_not_found",
        ),
    ];
    for (what, request, code) in in_own {
        let (s, b) = status_json(request.send().await.expect("send")).await;
        assert_problem(s, &b, 404, code);
        assert!(!b.to_string().contains("acme-pc"), "{what} leaks: {b}");
    }
    let (s, listed) = status_json(
        as_eve(Method::GET, "/devices", "other", "proj")
            .send()
            .await
            .expect("list"),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(listed["devices"], json!([]));
    let (s, logs) = status_json(
        as_eve(Method::GET, "/audit/logs?limit=500", "other", "proj")
            .send()
            .await
            .expect("audit"),
    )
    .await;
    assert_eq!(s, 200, "{logs}");
    for entry in logs["entries"].as_array().expect("entries") {
        let tenant = entry["tenant_id"].as_str().expect("tenant");
        assert!(tenant == "other:proj" || tenant == "other:*", "{entry}");
    }
    assert!(!logs.to_string().contains(&device.id));
    let mut stream = SseClient::open(as_eve(
        Method::GET,
        "/agent/reports/stream?session_id=s-iso",
        "other",
        "proj",
    ))
    .await;
    assert_eq!(stream.status, 200);
    let snapshot = stream.next_data(WAIT).await.expect("snapshot");
    assert_eq!(
        snapshot.id_u64(),
        0,
        "acme's session of the same name is not visible"
    );
    assert!(!snapshot.data.contains("acme-secret"));

    // Nothing of acme changed, and acme's own pairing code is still there for acme.
    let (s, mine) = status_json(
        server
            .web(Method::GET, &device_path)
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(mine["device_name"], "acme-pc");
    let hb = server
        .device(Method::POST, &device, "/heartbeat")
        .json(&json!({"status": "online"}))
        .send()
        .await
        .expect("hb");
    assert_eq!(hb.status(), 200);
    let (s, b) = server
        .post_json(
            "/devices/pairing/preview",
            &json!({"pairing_code": acme_code}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (_, members) = status_json(
        server
            .web(Method::GET, &format!("/orgs/{ORG}/members"))
            .send()
            .await
            .expect("members"),
    )
    .await;
    assert!(!members.to_string().contains("eve@other.test"));

    // A tenant that does not exist looks exactly like one you are not in.
    let (_, not_member) = status_json(
        as_eve(Method::GET, "/devices", ORG, PROJECT)
            .send()
            .await
            .expect("send"),
    )
    .await;
    for (org, project) in [("ghost-org", "p"), ("other", "nope")] {
        let (s, missing) = status_json(
            as_eve(Method::GET, "/devices", org, project)
                .send()
                .await
                .expect("send"),
        )
        .await;
        assert_problem(s, &missing, 404, "tenant_not_found");
        assert_eq!(missing["detail"], not_member["detail"]);
    }
}

#[tokio::test]
async fn tenant_headers_and_a_token_are_required() {
    let server = TestServer::start().await;
    let token = server.admin_token.clone();
    let paths = [
        (Method::GET, "/devices"),
        (Method::GET, "/audit/logs"),
        (Method::GET, "/audit/verify"),
        (Method::GET, "/agent/reports/stream?session_id=s"),
        (Method::POST, "/auth/stream-ticket"),
        (Method::POST, "/devices/pairing/preview"),
        (Method::POST, "/devices/pairing/confirm_by_code"),
    ];
    let body = json!({"session_id": "s", "pairing_code": "123-456"});
    for (method, path) in paths {
        let send = |request: reqwest::RequestBuilder| async {
            status_json(request.json(&body).send().await.expect("send")).await
        };
        let plain = || server.http.request(method.clone(), server.url(path));
        let (s, b) = send(plain().bearer_auth(&token)).await;
        assert_problem(s, &b, 400, "tenant_required");
        let (s, b) = send(plain().bearer_auth(&token).header("x-org-id", ORG)).await;
        assert_problem(s, &b, 400, "tenant_required");
        let (s, b) = send(plain().bearer_auth(&token).header("x-project-id", PROJECT)).await;
        assert_problem(s, &b, 400, "tenant_required");
        let (s, b) = send(
            plain()
                .bearer_auth(&token)
                .header("x-org-id", "a:b")
                .header("x-project-id", PROJECT),
        )
        .await;
        assert_problem(s, &b, 400, "invalid_tenant");
        // No token: 401 whatever the headers say.
        let (s, b) = send(
            plain()
                .header("x-org-id", ORG)
                .header("x-project-id", PROJECT),
        )
        .await;
        assert_problem(s, &b, 401, "authentication_required");
        let (s, b) = send(plain()).await;
        assert_eq!(s, 401, "{method} {path}: {b}");
    }
    for (method, path) in [
        (Method::GET, format!("/orgs/{ORG}/members")),
        (Method::POST, format!("/orgs/{ORG}/members")),
        (Method::POST, format!("/orgs/{ORG}/projects")),
        (Method::POST, "/orgs".to_owned()),
        (Method::GET, "/auth/me".to_owned()),
        (Method::GET, "/auth/sessions".to_owned()),
        (Method::POST, "/auth/logout".to_owned()),
        (Method::POST, "/auth/password".to_owned()),
        (Method::POST, "/auth/mfa/totp/setup".to_owned()),
    ] {
        let (s, b) = status_json(
            server
                .http
                .request(method.clone(), server.url(&path))
                .json(&json!({}))
                .send()
                .await
                .expect("send"),
        )
        .await;
        assert_problem(s, &b, 401, "authentication_required");
    }
}

async fn ticket(
    server: &TestServer,
    token: &str,
    org: &str,
    project: &str,
    session: &str,
) -> String {
    let (s, body) = status_json(
        server
            .as_user_in(token, Method::POST, "/auth/stream-ticket", org, project)
            .json(&json!({"session_id": session}))
            .send()
            .await
            .expect("ticket"),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let expires = chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().expect("exp"))
        .expect("rfc3339");
    let ttl = expires
        .signed_duration_since(chrono::Utc::now())
        .num_seconds();
    assert!((50..=60).contains(&ttl), "valid for a minute, got {ttl}s");
    body["ticket"].as_str().expect("ticket").to_owned()
}

/// Opens a stream the way a browser's EventSource does: no headers at all.
async fn open_with_ticket(server: &TestServer, session: &str, ticket: &str) -> SseClient {
    SseClient::open(server.http.get(server.url(&format!(
        "/agent/reports/stream?session_id={session}&ticket={ticket}"
    ))))
    .await
}

#[tokio::test]
async fn a_stream_ticket_opens_one_stream_once_for_its_session_only() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let viewer = server.new_member(ORG, "vera@nexus.test", "viewer").await;

    let t = ticket(&server, &viewer.token, ORG, PROJECT, "s-tk").await;
    assert!(t.starts_with("nxt_"), "{t}");
    let mut stream = open_with_ticket(&server, "s-tk", &t).await;
    assert_eq!(stream.status, 200);
    assert_eq!(
        stream.next_data(WAIT).await.expect("snapshot").event,
        "snapshot"
    );
    server.push(&device, vec![report("s-tk", "live")]).await;
    assert_eq!(
        stream.reports(1, WAIT).await[0].json()["meta"]["report_id"],
        "live"
    );
    let again = open_with_ticket(&server, "s-tk", &t).await;
    assert_eq!(again.status, 401, "a ticket is single-use");

    // Bound to its session: presenting it for another one fails (and spends it).
    let t = ticket(&server, &viewer.token, ORG, PROJECT, "s-tk").await;
    assert_eq!(open_with_ticket(&server, "s-other", &t).await.status, 401);
    assert_eq!(open_with_ticket(&server, "s-tk", &t).await.status, 401);
    for bogus in [
        "nxt_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "garbage",
        "",
    ] {
        assert_eq!(open_with_ticket(&server, "s-tk", bogus).await.status, 401);
    }

    // Bound to its tenant: a ticket of another tenant shows that tenant's session, not acme's.
    server.ensure_tenant("other", "proj").await;
    let t = ticket(&server, &server.admin_token, "other", "proj", "s-tk").await;
    let mut theirs = SseClient::open(
        server
            .http
            .get(server.url(&format!("/agent/reports/stream?session_id=s-tk&ticket={t}")))
            .header("x-org-id", ORG)
            .header("x-project-id", PROJECT),
    )
    .await;
    assert_eq!(theirs.status, 200);
    let snapshot = theirs.next_data(WAIT).await.expect("snapshot");
    assert_eq!(
        snapshot.id_u64(),
        0,
        "the ticket's tenant, whatever the headers say"
    );

    // Bound to the login session and to membership, both re-checked when it is redeemed.
    let t = ticket(&server, &viewer.token, ORG, PROJECT, "s-tk").await;
    let r = server
        .as_user(&viewer.token, Method::POST, "/auth/logout")
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), 204);
    assert_eq!(open_with_ticket(&server, "s-tk", &t).await.status, 401);
    let member = server.new_member(ORG, "mo@nexus.test", "viewer").await;
    let t = ticket(&server, &member.token, ORG, PROJECT, "s-tk").await;
    let r = server
        .web(
            Method::DELETE,
            &format!("/orgs/{ORG}/members/{}", member.id),
        )
        .send()
        .await
        .expect("remove");
    assert_eq!(r.status(), 204);
    assert_eq!(open_with_ticket(&server, "s-tk", &t).await.status, 404);

    let (s, b) = status_json(
        server
            .web(Method::POST, "/auth/stream-ticket")
            .json(&json!({"session_id": "bad session id"}))
            .send()
            .await
            .expect("ticket"),
    )
    .await;
    assert_problem(s, &b, 422, "validation_failed");
    assert!(
        !server.log_text().contains("nxt_"),
        "tickets never reach the logs"
    );
}

/// Authorization is checked when a stream opens and again every `--sse-reauthorize-interval`:
/// a viewer removed from the organization, or signed out, stops receiving within that time.
#[tokio::test]
async fn an_open_stream_stops_when_its_user_is_removed() {
    let server = TestServer::start_with(&["--sse-reauthorize-interval", "500ms"]).await;
    let device = server.pair_device("pc").await;
    let viewer = server.new_member(ORG, "leaver@nexus.test", "viewer").await;
    let mut stream = SseClient::open(server.as_user(
        &viewer.token,
        Method::GET,
        "/agent/reports/stream?session_id=s-open",
    ))
    .await;
    stream.next_data(WAIT).await.expect("snapshot");
    server
        .push(&device, vec![report("s-open", "before-removal")])
        .await;
    let before = stream
        .next_data(WAIT)
        .await
        .expect("delivered while a member");
    assert_eq!(before.json()["meta"]["report_id"], "before-removal");
    let r = server
        .web(
            Method::DELETE,
            &format!("/orgs/{ORG}/members/{}", viewer.id),
        )
        .send()
        .await
        .expect("remove");
    assert_eq!(r.status(), 204);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server
        .push(&device, vec![report("s-open", "after-removal")])
        .await;
    let next = stream.next_data(Duration::from_secs(5)).await;
    assert!(
        next.is_none(),
        "a removed user still receives: {:?}",
        next.map(|e| e.data)
    );
}

#[tokio::test]
async fn an_open_stream_stops_when_its_user_signs_out() {
    let server = TestServer::start_with(&["--sse-reauthorize-interval", "500ms"]).await;
    let device = server.pair_device("pc").await;
    let viewer = server.new_member(ORG, "quitter@nexus.test", "viewer").await;
    let mut stream = SseClient::open(server.as_user(
        &viewer.token,
        Method::GET,
        "/agent/reports/stream?session_id=s-out",
    ))
    .await;
    stream.next_data(WAIT).await.expect("snapshot");
    let r = server
        .as_user(&viewer.token, Method::POST, "/auth/logout")
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), 204);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server
        .push(&device, vec![report("s-out", "after-logout")])
        .await;
    let next = stream.next_data(Duration::from_secs(5)).await;
    assert!(
        next.is_none(),
        "a signed-out user still receives: {:?}",
        next.map(|e| e.data)
    );
}
