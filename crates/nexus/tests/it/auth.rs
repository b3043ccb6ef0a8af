//! Web sign-in, attack-minded: the token format, forged and foreign tokens, sessions that end at
//! once, refresh rotation with reuse detection, throttling without user enumeration, password
//! changes, TOTP replay and recovery codes. Every test also checks that no secret it handled
//! reached the server's logs.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::*;

/// Everything of a problem answer but its correlation id (which differs per request).
fn without_correlation(body: &Value) -> Value {
    let mut body = body.clone();
    body.as_object_mut()
        .expect("problem object")
        .remove("correlation_id");
    body
}

async fn get_status(server: &TestServer, token: &str, path: &str) -> (u16, Value) {
    status_json(
        server
            .as_user(token, Method::GET, path)
            .send()
            .await
            .expect("send"),
    )
    .await
}

async fn refresh(server: &TestServer, refresh_token: &str) -> (u16, Value) {
    status_json(
        server
            .http
            .post(server.url("/auth/refresh"))
            .json(&json!({"refresh_token": refresh_token}))
            .send()
            .await
            .expect("refresh"),
    )
    .await
}

fn access(body: &Value) -> String {
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

fn refresh_of(body: &Value) -> String {
    body["refresh_token"]
        .as_str()
        .expect("refresh_token")
        .to_owned()
}

fn sid(token: &str) -> String {
    jwt_parts(token).1["sid"].as_str().expect("sid").to_owned()
}

#[tokio::test]
async fn login_answers_the_documented_shape_with_an_eddsa_jwt() {
    let server = TestServer::start().await;
    let (s, body) = server
        .login_response(ADMIN_EMAIL, ADMIN_PASSWORD, None)
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    assert_eq!(body["refresh_expires_in"], 604_800);
    let refresh_token = refresh_of(&body);
    assert!(
        refresh_token.starts_with("nxr_") && refresh_token.len() == 47,
        "{refresh_token}"
    );
    let user = &body["user"];
    assert_eq!(user["email"], ADMIN_EMAIL);
    assert!(user["user_id"].as_str().expect("id").starts_with("usr_"));
    assert_eq!(user["mfa_enabled"], false);
    assert!(
        user["orgs"]
            .as_array()
            .expect("orgs")
            .contains(&json!({"org_id": ORG, "role": "admin"})),
        "{user}"
    );
    assert!(body.get("password_hash").is_none() && user.get("password_hash").is_none());

    let token = access(&body);
    let (header, payload, signature) = jwt_parts(&token);
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["typ"], "JWT");
    let kid = header["kid"].as_str().expect("kid");
    assert_eq!(signature.len(), 64, "an Ed25519 signature");
    assert_eq!(payload["iss"], "nexus");
    assert_eq!(payload["aud"], "nexus-api");
    assert_eq!(payload["sub"], user["user_id"]);
    assert_eq!(payload["sid"], body["session_id"]);
    let iat = payload["iat"].as_u64().expect("iat");
    assert_eq!(payload["exp"].as_u64().expect("exp") - iat, 900);
    assert!(iat.abs_diff(unix_now()) < 60);

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
    let keys = jwks["keys"].as_array().expect("keys");
    let key = keys
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap_or_else(|| panic!("kid {kid} is not in the JWKS {jwks}"));
    assert_eq!(key["kty"], "OKP");
    assert_eq!(key["crv"], "Ed25519");
    assert_eq!(b64url_decode(key["x"].as_str().expect("x")).len(), 32);
    for key in keys {
        assert!(
            key.get("d").is_none(),
            "the JWKS leaks a private key: {key}"
        );
    }

    let (s, me) = get_status(&server, &token, "/auth/me").await;
    assert_eq!(s, 200, "{me}");
    assert_eq!(me["email"], ADMIN_EMAIL);
    // The email is the identity, whatever its case and surrounding spaces.
    let (s, _) = server
        .login_response("  Admin@NEXUS.test ", ADMIN_PASSWORD, None)
        .await;
    assert_eq!(s, 200);
    assert_no_secrets(
        &server.log_text(),
        &[ADMIN_PASSWORD, &token, &refresh_token[4..]],
        "logs",
    );
}

#[tokio::test]
async fn wrong_password_and_unknown_email_get_the_same_answer() {
    let server = TestServer::start().await;
    let (s1, wrong_password) = server
        .login_response(ADMIN_EMAIL, "Not-the-password-1!", None)
        .await;
    let (s2, unknown_email) = server
        .login_response("nobody@nexus.test", "Not-the-password-1!", None)
        .await;
    let (s3, unknown_with_real_password) = server
        .login_response("nobody@nexus.test", ADMIN_PASSWORD, None)
        .await;
    assert_problem(s1, &wrong_password, 401, "invalid_credentials");
    assert_problem(s2, &unknown_email, 401, "invalid_credentials");
    assert_problem(s3, &unknown_with_real_password, 401, "invalid_credentials");
    assert_eq!(
        without_correlation(&wrong_password),
        without_correlation(&unknown_email),
        "identical answers: nothing tells registered emails apart"
    );
    assert_eq!(
        without_correlation(&unknown_email),
        without_correlation(&unknown_with_real_password)
    );

    // Absurdly long passwords are refused before hashing (no hashing DoS), with the same answer.
    let long = "x!".repeat(20_000);
    let (s, b) = server.login_response(ADMIN_EMAIL, &long, None).await;
    assert_problem(s, &b, 401, "invalid_credentials");
    assert_eq!(
        without_correlation(&b),
        without_correlation(&wrong_password)
    );

    let (s, b) = status_json(
        server
            .http
            .post(server.url("/auth/login"))
            .json(&json!({"email": ADMIN_EMAIL}))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 422, "validation_failed");
    assert_eq!(b["errors"][0]["field"], "password");
    assert_no_secrets(
        &server.log_text(),
        &["Not-the-password-1!", ADMIN_PASSWORD],
        "logs",
    );
}

/// Sends a login and returns the status, the body and the `Retry-After` header.
async fn login_attempt(
    server: &TestServer,
    email: &str,
    password: &str,
) -> (u16, Value, Option<u64>) {
    let r = server
        .http
        .post(server.url("/auth/login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .expect("login");
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().expect("ascii").parse().expect("seconds"));
    let (s, b) = status_json(r).await;
    (s, b, retry_after)
}

#[tokio::test]
async fn repeated_failures_slow_down_real_and_unknown_accounts_alike() {
    let server = TestServer::start().await;
    let user = server.new_member(ORG, "locky@nexus.test", "viewer").await;
    let ghost = "ghost@nexus.test";
    let wrong = "Wrong-password-1!";
    // Five failures are free, the sixth is answered normally, then each attempt must wait.
    for email in [user.email.as_str(), ghost] {
        for attempt in 1..=6 {
            let (s, b, retry) = login_attempt(&server, email, wrong).await;
            assert_problem(s, &b, 401, "invalid_credentials");
            assert_eq!(retry, None, "attempt {attempt} for {email}");
        }
    }
    let (s, real, real_retry) = login_attempt(&server, &user.email, wrong).await;
    assert_problem(s, &real, 429, "too_many_attempts");
    let (s, unknown, unknown_retry) = login_attempt(&server, ghost, wrong).await;
    assert_problem(s, &unknown, 429, "too_many_attempts");
    let (real_retry, unknown_retry) = (
        real_retry.expect("Retry-After for a real account"),
        unknown_retry.expect("Retry-After for an unknown email"),
    );
    assert!((1..=2).contains(&real_retry), "{real_retry}");
    assert!((1..=2).contains(&unknown_retry), "{unknown_retry}");
    assert_eq!(
        real["title"], unknown["title"],
        "the same answer whether the account exists or not"
    );
    // While throttled even the right password is refused: guessing cannot continue.
    let (s, b, _) = login_attempt(&server, &user.email, &user.password).await;
    assert_problem(s, &b, 429, "too_many_attempts");

    tokio::time::sleep(
        Duration::from_secs(real_retry.max(unknown_retry)) + Duration::from_millis(200),
    )
    .await;
    let (s, b, _) = login_attempt(&server, &user.email, &user.password).await;
    assert_eq!(s, 200, "the right password after the wait: {b}");
    // Success resets the count: the next failure is an ordinary one.
    let (s, b, _) = login_attempt(&server, &user.email, wrong).await;
    assert_problem(s, &b, 401, "invalid_credentials");
    let (s, b, _) = login_attempt(&server, ghost, wrong).await;
    assert_problem(s, &b, 401, "invalid_credentials");
    assert_no_secrets(&server.log_text(), &[wrong, &user.password], "logs");
}

#[tokio::test]
async fn concurrent_guesses_cannot_slip_past_the_backoff_together() {
    let server = TestServer::start().await;
    let user = server.new_member(ORG, "race@nexus.test", "viewer").await;
    // 25 wrong passwords at once: only as many are checked as one after the other would be
    // (five free failures and the sixth); the rest wait their turn and meet the backoff.
    let attempts: Vec<_> = (0..25)
        .map(|_| {
            let (http, url, email) = (
                server.http.clone(),
                server.url("/auth/login"),
                user.email.clone(),
            );
            tokio::spawn(async move {
                let r = http
                    .post(url)
                    .json(&json!({"email": email, "password": "Wrong-password-1!"}))
                    .send()
                    .await
                    .expect("login");
                r.status().as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for attempt in attempts {
        statuses.push(attempt.await.expect("join"));
    }
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((checked, throttled), (6, 19), "{statuses:?}");
}

#[tokio::test]
async fn one_address_spraying_many_accounts_is_cut_off() {
    let server = TestServer::start().await;
    // Credential stuffing: few tries per account (never throttled per account), many accounts.
    for i in 0..30 {
        let (s, b, _) =
            login_attempt(&server, &format!("victim{i}@nexus.test"), "Spray-1234!").await;
        assert_problem(s, &b, 401, "invalid_credentials");
    }
    let (s, b, retry) = login_attempt(&server, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_problem(s, &b, 429, "too_many_attempts");
    assert!(retry.is_some_and(|r| r > 0), "Retry-After");
}

#[tokio::test]
async fn forged_tampered_and_foreign_tokens_are_refused() {
    let server = TestServer::start().await;
    let other = TestServer::start().await;
    let token = server.admin_token.clone();
    let victim = server.new_member(ORG, "vic@nexus.test", "viewer").await;
    let device = server.pair_device("pc").await;
    for path in ["/auth/me", "/devices"] {
        assert_eq!(get_status(&server, &token, path).await.0, 200);
    }
    let (header, payload, signature) = jwt_parts(&token);
    let kid = header["kid"].as_str().expect("kid").to_owned();

    let mut forged = Vec::new();
    // Payload edits keep the original signature: a later expiry, another user.
    let mut later = payload.clone();
    later["exp"] = json!(payload["exp"].as_u64().expect("exp") + 86_400);
    forged.push(("extended exp", jwt_from_parts(&header, &later, &signature)));
    let mut impersonating = payload.clone();
    impersonating["sub"] = json!(victim.id);
    forged.push((
        "other sub",
        jwt_from_parts(&header, &impersonating, &signature),
    ));
    let mut other_session = payload.clone();
    other_session["sid"] = json!(sid(&victim.token));
    forged.push((
        "other sid",
        jwt_from_parts(&header, &other_session, &signature),
    ));
    // Signature edits.
    let mut flipped = signature.clone();
    flipped[10] ^= 0x01;
    forged.push((
        "flipped signature bit",
        jwt_from_parts(&header, &payload, &flipped),
    ));
    forged.push(("no signature", jwt_from_parts(&header, &payload, &[])));
    forged.push((
        "zero signature",
        jwt_from_parts(&header, &payload, &[0; 64]),
    ));
    // Header games: alg none, an HMAC algorithm, an unknown kid, no kid.
    for alg in ["none", "None", "HS256", "RS256"] {
        let mut h = header.clone();
        h["alg"] = json!(alg);
        forged.push(("alg", jwt_from_parts(&h, &payload, &[])));
        forged.push(("alg", jwt_from_parts(&h, &payload, &signature)));
    }
    let mut h = header.clone();
    h["kid"] = json!("not-a-kid");
    forged.push(("unknown kid", jwt_from_parts(&h, &payload, &signature)));
    let mut h = header.clone();
    h.as_object_mut().expect("header").remove("kid");
    forged.push(("no kid", jwt_from_parts(&h, &payload, &signature)));
    // Signed by another server's key, as is and relabelled with this server's kid.
    let foreign = other.admin_token.clone();
    forged.push(("foreign key", foreign.clone()));
    let (foreign_header, foreign_payload, foreign_signature) = jwt_parts(&foreign);
    let mut relabelled = foreign_header.clone();
    relabelled["kid"] = json!(kid);
    forged.push((
        "foreign key, our kid",
        jwt_from_parts(&relabelled, &foreign_payload, &foreign_signature),
    ));
    // Not JWTs at all.
    forged.push(("device token", device.token.clone()));
    forged.push(("refresh token", victim.refresh_token.clone()));
    forged.push(("garbage", "a.b.c".to_owned()));
    forged.push((
        "two segments",
        token.rsplit_once('.').expect("jws").0.to_owned(),
    ));

    for (what, forged_token) in &forged {
        for path in ["/auth/me", "/devices", "/auth/sessions"] {
            let (s, b) = get_status(&server, forged_token, path).await;
            assert_problem(s, &b, 401, "invalid_token");
            assert!(!b.to_string().contains(&victim.email), "{what}: {b}");
        }
        let r = server
            .as_user(
                forged_token,
                Method::POST,
                "/devices/pairing/confirm_by_code",
            )
            .json(&json!({"pairing_code": "123-456"}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 401, "{what}");
    }
    // The genuine tokens still work (nothing above damaged them), also in reverse.
    assert_eq!(get_status(&server, &token, "/auth/me").await.0, 200);
    assert_eq!(get_status(&other, &token, "/auth/me").await.0, 401);
    assert_eq!(get_status(&other, &foreign, "/auth/me").await.0, 200);

    // Wrong schemes and missing credentials.
    let (s, b) = status_json(
        server
            .http
            .get(server.url("/auth/me"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 401, "authentication_required");
    for value in [
        format!("Basic {token}"),
        format!("Token {token}"),
        token.clone(),
    ] {
        let r = server
            .http
            .get(server.url("/auth/me"))
            .header("authorization", value)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
    }
    // A user's JWT is not a device token either.
    let r = server
        .http
        .post(server.url(&format!("/devices/{}/heartbeat", device.id)))
        .bearer_auth(&token)
        .json(&json!({"status": "online"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn logout_and_ended_sessions_stop_their_tokens_at_once() {
    let server = TestServer::start().await;
    let user = server.new_member(ORG, "sam@nexus.test", "viewer").await;
    let (s, second) = server
        .login_response(&user.email, &user.password, None)
        .await;
    assert_eq!(s, 200);
    let (a, b) = (user.token.clone(), access(&second));
    let (sid_a, sid_b) = (sid(&a), sid(&b));

    let (s, listed) = get_status(&server, &a, "/auth/sessions").await;
    assert_eq!(s, 200, "{listed}");
    let sessions = listed["sessions"].as_array().expect("sessions");
    assert_eq!(sessions.len(), 2, "{listed}");
    for session in sessions {
        let id = session["session_id"].as_str().expect("id");
        assert!(id == sid_a || id == sid_b, "{session}");
        assert_eq!(session["current"], id == sid_a, "{session}");
        assert_eq!(session["ip"], "127.0.0.0/24", "addresses are truncated");
        assert_eq!(session["mfa"], false);
    }
    // Another user cannot see or end these sessions.
    let (_, admin_sessions) = get_status(&server, &server.admin_token, "/auth/sessions").await;
    assert!(!admin_sessions.to_string().contains(&sid_a));
    let (s, body) = status_json(
        server
            .as_user(
                &server.admin_token,
                Method::DELETE,
                &format!("/auth/sessions/{sid_a}"),
            )
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &body, 404, "session_not_found");
    assert_eq!(get_status(&server, &a, "/auth/me").await.0, 200);

    // Ending session B from session A (a lost laptop).
    let r = server
        .as_user(&a, Method::DELETE, &format!("/auth/sessions/{sid_b}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 204);
    for path in ["/auth/me", "/devices"] {
        let (s, body) = get_status(&server, &b, path).await;
        assert_problem(s, &body, 401, "session_ended");
    }
    let (s, body) = refresh(&server, &refresh_of(&second)).await;
    assert_problem(s, &body, 401, "invalid_refresh_token");
    let (s, body) = status_json(
        server
            .as_user(&a, Method::DELETE, &format!("/auth/sessions/{sid_b}"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &body, 404, "session_not_found");
    let (s, body) = status_json(
        server
            .as_user(&a, Method::DELETE, "/auth/sessions/not-a-session")
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &body, 404, "session_not_found");
    let (_, listed) = get_status(&server, &a, "/auth/sessions").await;
    assert_eq!(listed["sessions"].as_array().expect("sessions").len(), 1);

    // Logout: the very next request with the token fails, and so does its refresh token.
    let r = server
        .as_user(&a, Method::POST, "/auth/logout")
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), 204);
    for path in ["/auth/me", "/devices", "/auth/sessions"] {
        let (s, body) = get_status(&server, &a, path).await;
        assert_problem(s, &body, 401, "session_ended");
    }
    let (s, body) = refresh(&server, &user.refresh_token).await;
    assert_problem(s, &body, 401, "invalid_refresh_token");
    let r = server
        .as_user(&a, Method::POST, "/auth/logout")
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), 401);
    // Other users are unaffected.
    assert_eq!(
        get_status(&server, &server.admin_token, "/auth/me").await.0,
        200
    );
    assert_no_secrets(
        &server.log_text(),
        &[&user.password, &a, &b, &user.refresh_token[4..]],
        "logs",
    );
}

#[tokio::test]
async fn refresh_rotates_and_a_reused_refresh_token_ends_the_whole_family() {
    let server = TestServer::start().await;
    let user = server.new_member(ORG, "rita@nexus.test", "viewer").await;
    let (s, bystander) = server
        .login_response(&user.email, &user.password, None)
        .await;
    assert_eq!(s, 200);
    let (a0, r0) = (user.token.clone(), user.refresh_token.clone());

    let (s, first) = refresh(&server, &r0).await;
    assert_eq!(s, 200, "{first}");
    let (a1, r1) = (access(&first), refresh_of(&first));
    assert_ne!(r1, r0);
    assert_ne!(a1, a0);
    assert_eq!(first["token_type"], "Bearer");
    assert_eq!(first["expires_in"], 900);
    assert_eq!(
        sid(&a1),
        sid(&a0),
        "the same session (refresh-token family)"
    );
    assert_eq!(first["user"]["email"], user.email);
    assert_eq!(get_status(&server, &a1, "/devices").await.0, 200);

    let (s, second) = refresh(&server, &r1).await;
    assert_eq!(s, 200, "{second}");
    let (a2, r2) = (access(&second), refresh_of(&second));
    assert_eq!(get_status(&server, &a2, "/auth/me").await.0, 200);

    // A thief replays the first refresh token: the whole family dies, the thief gets nothing.
    let (s, body) = refresh(&server, &r0).await;
    assert_problem(s, &body, 401, "refresh_token_reused");
    assert!(body.get("access_token").is_none());
    // The reuse is audited (on the chain of the user's organization).
    let (s, logs) = status_json(
        server
            .web(Method::GET, "/audit/logs?action=auth.refresh_reuse")
            .send()
            .await
            .expect("audit"),
    )
    .await;
    assert_eq!(s, 200, "{logs}");
    let entries = logs["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{logs}");
    assert_eq!(entries[0]["result"], "denied");
    assert_eq!(entries[0]["actor"]["id"], user.id);
    for token in [&a0, &a1, &a2] {
        let (s, body) = get_status(&server, token, "/auth/me").await;
        assert_problem(s, &body, 401, "session_ended");
    }
    for spent in [&r2, &r1, &r0] {
        let (s, _) = refresh(&server, spent).await;
        assert_eq!(s, 401, "no refresh token of the family works any more");
    }
    // The user's other session is a different family and lives on.
    assert_eq!(
        get_status(&server, &access(&bystander), "/auth/me").await.0,
        200
    );

    // Shapes that are not refresh tokens of this kind.
    let device = server.pair_device("pc").await;
    for bogus in ["", "nxr_short", "garbage", device.refresh_token.as_str()] {
        let (s, body) = refresh(&server, bogus).await;
        assert_problem(s, &body, 401, "invalid_refresh_token");
    }
    assert_no_secrets(
        &server.log_text(),
        &[&r0[4..], &r1[4..], &r2[4..], &a0, &a1, &a2],
        "logs",
    );
}

async fn change_password(
    server: &TestServer,
    token: &str,
    current: &str,
    new: &str,
) -> (u16, Value) {
    status_json(
        server
            .as_user(token, Method::POST, "/auth/password")
            .json(&json!({"current_password": current, "new_password": new}))
            .send()
            .await
            .expect("change password"),
    )
    .await
}

#[tokio::test]
async fn password_change_checks_the_policy_and_ends_the_other_sessions() {
    let server = TestServer::start().await;
    let user = server.new_member(ORG, "dora@nexus.test", "viewer").await;
    let (s, other) = server
        .login_response(&user.email, &user.password, None)
        .await;
    assert_eq!(s, 200);
    let other_token = access(&other);
    let new_password = "Blue-Horse-Battery-42!";

    let (s, body) = change_password(&server, &user.token, "Wrong-current-1!", new_password).await;
    assert_problem(s, &body, 403, "wrong_password");

    for (bad, why) in [
        ("a!b2c3", "at least 8 characters"),
        ("abcdefghijkl", "not a letter or digit"),
        ("P@ssw0rd", "too common"),
        ("my-dora-Secret-42!", "email"),
        ("x!dora@nexus.test", "email"),
    ] {
        let (s, body) = change_password(&server, &user.token, &user.password, bad).await;
        assert_problem(s, &body, 422, "validation_failed");
        let errors = body["errors"].as_array().expect("errors");
        assert!(!errors.is_empty());
        for error in errors {
            assert_eq!(error["field"], "password", "{body}");
        }
        assert!(body.to_string().contains(why), "{bad}: {body}");
        assert!(
            !body.to_string().contains(bad),
            "the answer never echoes the password"
        );
    }
    // Refused attempts changed nothing.
    assert_eq!(get_status(&server, &other_token, "/auth/me").await.0, 200);

    let (s, body) = change_password(&server, &user.token, &user.password, new_password).await;
    assert_eq!(s, 204, "{body}");
    assert_eq!(
        get_status(&server, &user.token, "/auth/me").await.0,
        200,
        "the session that changed it stays"
    );
    let (s, body) = get_status(&server, &other_token, "/auth/me").await;
    assert_problem(s, &body, 401, "session_ended");
    let (s, _) = refresh(&server, &refresh_of(&other)).await;
    assert_eq!(s, 401);
    let (s, body) = server
        .login_response(&user.email, &user.password, None)
        .await;
    assert_problem(s, &body, 401, "invalid_credentials");
    let (s, body) = server.login_response(&user.email, new_password, None).await;
    assert_eq!(s, 200, "{body}");

    // Long passphrases are welcome.
    let passphrase = "correct horse battery staple and then some more words to be long enough";
    assert!(passphrase.len() > 64);
    let (s, body) = change_password(&server, &user.token, new_password, passphrase).await;
    assert_eq!(s, 204, "{body}");
    let (s, _) = server.login_response(&user.email, passphrase, None).await;
    assert_eq!(s, 200);

    let (_, logs) = status_json(
        server
            .web(Method::GET, "/audit/logs?action=auth.password_change")
            .send()
            .await
            .expect("audit"),
    )
    .await;
    assert_eq!(
        logs["entries"].as_array().expect("entries").len(),
        2,
        "{logs}"
    );
    assert_no_secrets(
        &logs.to_string(),
        &[new_password, passphrase, &user.password],
        "audit entries",
    );
    assert_no_secrets(
        &server.log_text(),
        &[new_password, passphrase, &user.password, "Wrong-current-1!"],
        "logs",
    );
}

/// Sets up and enables TOTP for `user`; returns the secret.
async fn enable_totp(server: &TestServer, user: &TestUser) -> String {
    let (s, setup) = status_json(
        server
            .as_user(&user.token, Method::POST, "/auth/mfa/totp/setup")
            .send()
            .await
            .expect("setup"),
    )
    .await;
    assert_eq!(s, 200, "{setup}");
    let secret = setup["secret"].as_str().expect("secret").to_owned();
    let (s, enabled) = status_json(
        server
            .as_user(&user.token, Method::POST, "/auth/mfa/totp/enable")
            .json(&json!({"code": totp_code(&secret, unix_now())}))
            .send()
            .await
            .expect("enable"),
    )
    .await;
    assert_eq!(s, 200, "{enabled}");
    secret
}

/// TOTP seeds are sealed at rest (AES-256-GCM, key `data.key` beside the signing keys): the
/// database holds no usable seed, the key survives a restart, and a sealed seed copied into
/// another account's row does not open there.
#[tokio::test]
async fn totp_secrets_are_sealed_at_rest_and_bound_to_their_account() {
    let server = TestServer::start().await;
    let ann = server.new_member(ORG, "ann@nexus.test", "viewer").await;
    let ann_secret = enable_totp(&server, &ann).await;
    let bob = server.new_member(ORG, "bob@nexus.test", "viewer").await;
    enable_totp(&server, &bob).await;
    let stored = server.raw_sql(&format!(
        "SELECT totp_secret FROM users WHERE id = '{}'",
        ann.id
    ));
    let stored = stored.trim();
    assert!(stored.starts_with("nxs1."), "{stored}");
    assert!(!stored.contains(&ann_secret), "{stored}");
    assert!(server.data_dir.join("keys").join("data.key").exists());

    // Another account's row: the seal is bound to Ann's account.
    server.raw_sql(&format!(
        "UPDATE users SET totp_secret = (SELECT totp_secret FROM users WHERE id = '{}') WHERE id = '{}'",
        ann.id, bob.id
    ));
    let next_step = totp_code(&ann_secret, unix_now() + 30);
    let (s, body) = server
        .login_response(&bob.email, &bob.password, Some(&next_step))
        .await;
    assert_problem(s, &body, 401, "invalid_mfa_code");
    assert!(
        server.log_text().contains("does not open"),
        "{}",
        server.log_text()
    );

    // The key is on disk: after a restart Ann's second factor still works.
    let server = server.restart().await;
    let (s, body) = server
        .login_response(&ann.email, &ann.password, Some(&next_step))
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(jwt_parts(&access(&body)).1["mfa"], true);
    assert_no_secrets(&server.log_text(), &[&ann_secret], "logs");
}

#[tokio::test]
async fn totp_codes_work_once_and_recovery_codes_work_once() {
    let server = TestServer::start().await;
    let user = server.new_member(ORG, "tom@nexus.test", "viewer").await;
    let post = |token: &str, path: &str, body: Value| {
        server.as_user(token, Method::POST, path).json(&body).send()
    };
    let (s, body) = status_json(
        post(
            &user.token,
            "/auth/mfa/totp/enable",
            json!({"code": "123456"}),
        )
        .await
        .expect("send"),
    )
    .await;
    assert_problem(s, &body, 409, "mfa_not_set_up");

    let (s, setup) = status_json(
        server
            .as_user(&user.token, Method::POST, "/auth/mfa/totp/setup")
            .send()
            .await
            .expect("setup"),
    )
    .await;
    assert_eq!(s, 200, "{setup}");
    let secret = setup["secret"].as_str().expect("secret").to_owned();
    assert!(secret.len() >= 32, "at least 160 bits: {secret}");
    let uri = setup["otpauth_uri"].as_str().expect("uri");
    assert!(uri.starts_with("otpauth://totp/"), "{uri}");
    assert!(uri.contains(&format!("secret={secret}")), "{uri}");
    assert!(uri.contains("issuer=NEXUS"), "{uri}");
    assert!(setup["qr_svg"].as_str().expect("svg").contains("<svg"));
    // Set up but not enabled: sign-in does not ask for a code yet, and a code sent anyway
    // (checked by nobody) must not mark the session as two-factor.
    let (s, _) = server
        .login_response(&user.email, &user.password, None)
        .await;
    assert_eq!(s, 200);
    let (s, unchecked) = server
        .login_response(&user.email, &user.password, Some("123456"))
        .await;
    assert_eq!(s, 200, "{unchecked}");
    assert_eq!(
        jwt_parts(&access(&unchecked)).1["mfa"],
        false,
        "no second factor was verified"
    );
    let (_, sessions) = get_status(&server, &access(&unchecked), "/auth/sessions").await;
    assert!(
        sessions["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .all(|s| s["mfa"] == false),
        "{sessions}"
    );

    let now = unix_now();
    let wrong = if totp_code(&secret, now) == "000000" {
        "111111"
    } else {
        "000000"
    };
    let (s, body) = status_json(
        post(&user.token, "/auth/mfa/totp/enable", json!({"code": wrong}))
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &body, 401, "invalid_mfa_code");
    let enable_code = totp_code(&secret, now);
    let (s, enabled) = status_json(
        post(
            &user.token,
            "/auth/mfa/totp/enable",
            json!({"code": enable_code}),
        )
        .await
        .expect("send"),
    )
    .await;
    assert_eq!(s, 200, "{enabled}");
    let recovery: Vec<String> = enabled["recovery_codes"]
        .as_array()
        .expect("codes")
        .iter()
        .map(|c| c.as_str().expect("code").to_owned())
        .collect();
    assert_eq!(recovery.len(), 10);
    let distinct: std::collections::HashSet<_> = recovery.iter().collect();
    assert_eq!(distinct.len(), 10);
    let (_, me) = get_status(&server, &user.token, "/auth/me").await;
    assert_eq!(me["mfa_enabled"], true);
    let (s, body) = status_json(
        server
            .as_user(&user.token, Method::POST, "/auth/mfa/totp/setup")
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &body, 409, "mfa_already_enabled");

    // Password alone is no longer enough; a wrong password with a right code is still wrong.
    let (s, body) = server
        .login_response(&user.email, &user.password, None)
        .await;
    assert_problem(s, &body, 401, "mfa_required");
    assert!(body.get("access_token").is_none());
    let (s, body) = server
        .login_response(&user.email, &user.password, Some(""))
        .await;
    assert_problem(s, &body, 401, "mfa_required");
    let next = totp_code(&secret, unix_now() + 30);
    let (s, body) = server
        .login_response(&user.email, "Wrong-password-1!", Some(&next))
        .await;
    assert_problem(s, &body, 401, "invalid_credentials");
    let (s, body) = server
        .login_response(&user.email, &user.password, Some(wrong))
        .await;
    assert_problem(s, &body, 401, "invalid_mfa_code");
    // The code used to enable was spent there.
    let (s, body) = server
        .login_response(&user.email, &user.password, Some(&enable_code))
        .await;
    assert_problem(s, &body, 401, "invalid_mfa_code");
    // The next time step's code (accepted for clock drift) works, once.
    let (s, with_code) = server
        .login_response(&user.email, &user.password, Some(&next))
        .await;
    assert_eq!(s, 200, "{with_code}");
    let (_, sessions) = get_status(&server, &access(&with_code), "/auth/sessions").await;
    let current = sessions["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .find(|s| s["current"] == true)
        .expect("current session")
        .clone();
    assert_eq!(current["mfa"], true);
    assert_eq!(jwt_parts(&access(&with_code)).1["mfa"], true);
    let (s, body) = server
        .login_response(&user.email, &user.password, Some(&next))
        .await;
    assert_problem(s, &body, 401, "invalid_mfa_code");

    // Recovery codes: each works once, in any formatting the user may type.
    let (s, body) = server
        .login_response(&user.email, &user.password, Some(&recovery[0]))
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = server
        .login_response(&user.email, &user.password, Some(&recovery[0]))
        .await;
    assert_problem(s, &body, 401, "invalid_mfa_code");
    let shouted = recovery[1].to_uppercase();
    let (s, body) = server
        .login_response(&user.email, &user.password, Some(&shouted))
        .await;
    assert_eq!(s, 200, "{body}");

    // Disabling needs the password and a fresh second factor.
    let disable = |password: &str, code: &str| {
        post(
            &user.token,
            "/auth/mfa/totp/disable",
            json!({"password": password, "code": code}),
        )
    };
    let (s, body) = status_json(
        disable("Wrong-password-1!", &recovery[2])
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &body, 403, "wrong_password");
    let (s, body) = status_json(disable(&user.password, &next).await.expect("send")).await;
    assert_problem(s, &body, 401, "invalid_mfa_code");
    let (s, body) = status_json(disable(&user.password, &recovery[0]).await.expect("send")).await;
    assert_problem(s, &body, 401, "invalid_mfa_code");
    let (_, me) = get_status(&server, &user.token, "/auth/me").await;
    assert_eq!(
        me["mfa_enabled"], true,
        "refused attempts leave two-factor on"
    );
    let (s, body) = status_json(disable(&user.password, &recovery[2]).await.expect("send")).await;
    assert_eq!(s, 204, "{body}");
    let (s, _) = server
        .login_response(&user.email, &user.password, None)
        .await;
    assert_eq!(s, 200, "two-factor is off again");
    let (s, body) = status_json(disable(&user.password, &recovery[3]).await.expect("send")).await;
    assert_problem(s, &body, 409, "mfa_not_enabled");

    let (_, logs) = status_json(
        server
            .web(Method::GET, "/audit/logs?limit=500")
            .send()
            .await
            .expect("audit"),
    )
    .await;
    let actions: Vec<&str> = logs["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["action"].as_str().expect("action"))
        .collect();
    for action in ["auth.mfa_setup", "auth.mfa_enable", "auth.mfa_disable"] {
        assert!(actions.contains(&action), "{action} in {actions:?}");
    }
    let mut secrets: Vec<&str> = vec![&secret, &user.password];
    secrets.extend(recovery.iter().map(String::as_str));
    assert_no_secrets(&logs.to_string(), &secrets, "audit entries");
    assert_no_secrets(&server.log_text(), &secrets, "logs");
}

#[tokio::test]
async fn guessing_totp_codes_with_the_right_password_is_throttled() {
    let server = TestServer::start().await;
    let user = server.new_member(ORG, "gus@nexus.test", "viewer").await;
    let secret = enable_totp(&server, &user).await;
    // Codes that match no step of the current window (checked, so a lucky guess cannot pass).
    let now = unix_now();
    let window: Vec<String> = (0..4)
        .map(|i| totp_code(&secret, now - 30 + i * 30))
        .collect();
    let guesses: Vec<String> = (0..100_000u32)
        .map(|n| format!("{:06}", n * 7 + 13))
        .filter(|g| !window.contains(g))
        .take(6)
        .collect();
    for guess in &guesses {
        let (s, b) = server
            .login_response(&user.email, &user.password, Some(guess))
            .await;
        assert_problem(s, &b, 401, "invalid_mfa_code");
    }
    let (s, b, retry) = {
        let r = server
            .http
            .post(server.url("/auth/login"))
            .json(&json!({"email": user.email, "password": user.password, "totp_code": totp_code(&secret, unix_now() + 30)}))
            .send()
            .await
            .expect("login");
        let retry = r.headers().get("retry-after").cloned();
        let (s, b) = status_json(r).await;
        (s, b, retry)
    };
    assert_problem(s, &b, 429, "too_many_attempts");
    assert!(retry.is_some(), "Retry-After");
    assert_no_secrets(&server.log_text(), &[&secret, &user.password], "logs");
}

/// The only test that waits for the clock: access tokens expire (after `--access-token-ttl` plus
/// the verifier's 30 s allowance for clock skew), and a key added by `nexus admin keys rotate`
/// on a running server is picked up by its periodic reload (every 30 s) without logging anyone
/// out. Both waits overlap.
#[tokio::test]
async fn access_tokens_expire_and_rotated_keys_load_without_logging_anyone_out() {
    let short = TestServer::start_with(&["--access-token-ttl", "1s"]).await;
    let rotating = TestServer::start().await;
    let rotating_started = std::time::Instant::now();

    let (s, login) = short
        .login_response(ADMIN_EMAIL, ADMIN_PASSWORD, None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(login["expires_in"], 1);
    let token = access(&login);
    let exp = jwt_parts(&token).1["exp"].as_u64().expect("exp");
    assert_eq!(get_status(&short, &token, "/auth/me").await.0, 200);

    let before_rotation = rotating.admin_token.clone();
    let old_kid = jwt_parts(&before_rotation).0["kid"]
        .as_str()
        .expect("kid")
        .to_owned();
    let new_kid = rotating.rotate_signing_key();
    assert_ne!(new_kid, old_kid);

    // Expired = exp plus the 30 s skew allowance has passed; the reload ticks 30 s after start.
    let expired_at = std::time::UNIX_EPOCH + Duration::from_secs(exp + 30);
    let until_expired = expired_at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    let until_reload = Duration::from_secs(31).saturating_sub(rotating_started.elapsed());
    tokio::time::sleep(until_expired.max(until_reload) + Duration::from_millis(300)).await;

    let (s, body) = get_status(&short, &token, "/auth/me").await;
    assert_problem(s, &body, 401, "token_expired");
    let (s, body) = get_status(&short, &token, "/devices").await;
    assert_problem(s, &body, 401, "token_expired");
    // The refresh token outlives it.
    let (s, refreshed) = refresh(&short, &refresh_of(&login)).await;
    assert_eq!(s, 200, "{refreshed}");
    assert_eq!(
        get_status(&short, &access(&refreshed), "/auth/me").await.0,
        200
    );

    let mut kids = Vec::new();
    for _ in 0..50 {
        let (_, jwks) = status_json(
            rotating
                .http
                .get(rotating.url("/.well-known/jwks.json"))
                .send()
                .await
                .expect("jwks"),
        )
        .await;
        kids = jwks["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| k["kid"].as_str().expect("kid").to_owned())
            .collect();
        if kids.contains(&new_kid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        kids.contains(&new_kid) && kids.contains(&old_kid),
        "{kids:?}"
    );
    let fresh = rotating.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_eq!(
        jwt_parts(&fresh).0["kid"],
        new_kid.as_str(),
        "the newest key signs"
    );
    assert_eq!(get_status(&rotating, &fresh, "/auth/me").await.0, 200);
    assert_eq!(
        get_status(&rotating, &before_rotation, "/auth/me").await.0,
        200,
        "tokens of the previous key stay valid"
    );
}

/// Sends `n` copies of a request at once and returns their statuses.
async fn race(n: usize, request: impl Fn() -> reqwest::RequestBuilder) -> Vec<u16> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let request = request();
            tokio::spawn(async move { request.send().await.expect("send").status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("join"));
    }
    statuses
}

#[tokio::test]
async fn single_use_secrets_cannot_be_spent_twice_by_racing() {
    let server = TestServer::start().await;
    let user = server.new_member(ORG, "racer@nexus.test", "viewer").await;

    // One refresh token, ten simultaneous refreshes: at most one new token pair exists.
    let statuses = race(10, || {
        server
            .http
            .post(server.url("/auth/refresh"))
            .json(&json!({"refresh_token": user.refresh_token}))
    })
    .await;
    assert!(
        statuses.iter().filter(|s| **s == 200).count() <= 1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 401),
        "{statuses:?}"
    );

    // One stream ticket, ten simultaneous streams: at most one opens.
    let (s, ticket) = status_json(
        server
            .web(Method::POST, "/auth/stream-ticket")
            .json(&json!({"session_id": "s-race"}))
            .send()
            .await
            .expect("ticket"),
    )
    .await;
    assert_eq!(s, 200);
    let url = server.url(&format!(
        "/agent/reports/stream?session_id=s-race&ticket={}",
        ticket["ticket"].as_str().expect("ticket")
    ));
    let statuses = race(10, || server.http.get(&url)).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );

    // The losers presented a spent token: reuse detection ended the session, winner included.
    let (s, body) = get_status(&server, &user.token, "/auth/me").await;
    assert_problem(s, &body, 401, "session_ended");

    // One TOTP code and one recovery code, each raced: each signs in at most once.
    let token = server.login(&user.email, &user.password).await;
    let (_, setup) = status_json(
        server
            .as_user(&token, Method::POST, "/auth/mfa/totp/setup")
            .send()
            .await
            .expect("setup"),
    )
    .await;
    let secret = setup["secret"].as_str().expect("secret").to_owned();
    let (s, enabled) = status_json(
        server
            .as_user(&token, Method::POST, "/auth/mfa/totp/enable")
            .json(&json!({"code": totp_code(&secret, unix_now())}))
            .send()
            .await
            .expect("enable"),
    )
    .await;
    assert_eq!(s, 200, "{enabled}");
    let next = totp_code(&secret, unix_now() + 30);
    let recovery = enabled["recovery_codes"][0]
        .as_str()
        .expect("code")
        .to_owned();
    for code in [next, recovery] {
        let statuses = race(5, || {
            server
                .http
                .post(server.url("/auth/login"))
                .json(&json!({"email": user.email, "password": user.password, "totp_code": code}))
        })
        .await;
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            1,
            "{code}: {statuses:?}"
        );
    }
}
