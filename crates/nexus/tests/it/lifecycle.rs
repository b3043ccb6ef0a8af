//! Process lifecycle: restart durability, graceful shutdown, the data-directory lock, TLS.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn everything_survives_a_restart_and_is_replayable() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let ids = server
        .push(
            &device,
            (0..5)
                .map(|i| report("s-durable", &format!("r{i}")))
                .collect(),
        )
        .await;
    let (s, cmd) = server
        .post_json(
            "/sidecar/command",
            &json!({"command_id": "durable-1", "device_id": device.id, "type": "fs.read"}),
        )
        .await;
    assert_eq!(s, 202, "{cmd}");
    assert_eq!(cmd["status"], "queued");
    // A RED command waiting for approval: still there after the restart, and the grant made after
    // it verifies with the keys the device got at pairing (the signing key survives restarts).
    let (s, red) = server
        .post_json(
            "/sidecar/command",
            &json!({"command_id": "durable-red", "device_id": device.id, "type": "shell.exec",
                    "params": {"cmd": "backup"}}),
        )
        .await;
    assert_eq!(s, 202, "{red}");
    assert_eq!(red["status"], "pending_approval");

    let server = server.restart().await;
    let hb = server
        .device(reqwest::Method::POST, &device, "/heartbeat")
        .json(&json!({"status": "online"}))
        .send()
        .await
        .expect("hb");
    assert_eq!(hb.status(), 200, "the device token still works");
    let mut stream = server.subscribe("s-durable", Some(0)).await;
    let replay = stream.reports(5, WAIT).await;
    assert_eq!(replay.iter().map(SseEvent::id_u64).collect::<Vec<_>>(), ids);
    assert_eq!(replay[4].json()["meta"]["report_id"], "r4");
    assert_eq!(
        server
            .push(
                &device,
                vec![report("s-durable", "r0"), report("s-durable", "new")]
            )
            .await,
        vec![1, 6]
    );
    let (_, pulled) = status_json(
        server
            .device(reqwest::Method::GET, &device, "/commands")
            .send()
            .await
            .expect("pull"),
    )
    .await;
    assert_eq!(pulled["commands"][0]["command_id"], cmd["command_id"]);
    assert_eq!(
        pulled["commands"].as_array().expect("list").len(),
        1,
        "{pulled}"
    );
    let (s, decided) = server
        .post_json(
            &format!(
                "/approvals/{}/decide",
                red["approval_id"].as_str().expect("id")
            ),
            &json!({"decision": "approve"}),
        )
        .await;
    assert_eq!(s, 202, "{decided}");
    let (_, pulled) = status_json(
        server
            .device(
                reqwest::Method::GET,
                &device,
                &format!(
                    "/commands?cursor={}",
                    pulled["next_cursor"].as_str().expect("cursor")
                ),
            )
            .send()
            .await
            .expect("pull"),
    )
    .await;
    let approved = &pulled["commands"][0];
    assert_eq!(approved["command_id"], "durable-red", "{pulled}");
    assert!(
        grant_verifies(&device.server_keys, &device.id, approved),
        "{approved}"
    );
}

#[tokio::test]
async fn graceful_shutdown_drains_and_ends_streams_cleanly() {
    let mut server = TestServer::start_with(&["--shutdown-delay", "1s"]).await;
    let device = server.pair_device("pc").await;
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        let mut sub = server.subscribe("s-shutdown", None).await;
        sub.next_data(WAIT).await.expect("snapshot");
        subscribers.push(sub);
    }
    server
        .push(&device, vec![report("s-shutdown", "last-words")])
        .await;
    for sub in &mut subscribers {
        assert_eq!(sub.reports(1, WAIT).await[0].id_u64(), 1);
    }
    server.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Draining: still accepting, but no longer ready, so load balancers move traffic away.
    let ready = server
        .http
        .get(server.url("/health/ready"))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), 503);
    let live = server
        .http
        .get(server.url("/health/live"))
        .send()
        .await
        .expect("live");
    assert_eq!(live.status(), 200);

    for sub in &mut subscribers {
        // The stream ends (no error, no further events): the client will resume elsewhere.
        assert!(sub.next_data(Duration::from_secs(10)).await.is_none());
    }
    let status = server.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");
    assert!(
        reqwest::Client::new()
            .get(server.url("/health/live"))
            .send()
            .await
            .is_err(),
        "new connections are refused"
    );
    assert!(server.log_text().contains("NEXUS stopped"));
}

#[tokio::test]
async fn a_second_server_cannot_open_the_same_data_directory() {
    if backend_is_postgres() {
        return; // the data directory lock guards the embedded store only
    }
    let server = TestServer::start().await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&server.data_dir)
        .output()
        .expect("run");
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("another NEXUS server is using the data directory"),
        "{text}"
    );
}

fn test_certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key_pair.serialize_pem()).expect("write key");
    (cert_path, key_path, cert.pem())
}

async fn tls_server() -> (TestServer, String, tempfile::TempDir) {
    let certs = tempfile::tempdir().expect("tempdir");
    let (cert, key, pem) = test_certificate(certs.path());
    let temp = tempfile::tempdir().expect("tempdir");
    let args = vec![
        "--tls-cert".to_owned(),
        cert.display().to_string(),
        "--tls-key".to_owned(),
        key.display().to_string(),
    ];
    let server = TestServer::spawn(temp.path().join("data"), Some(temp), args, "https").await;
    (server, pem, certs)
}

fn port_of(base: &str) -> u16 {
    base.rsplit(':')
        .next()
        .expect("port")
        .parse()
        .expect("port")
}

#[tokio::test]
async fn tls_serves_h2_and_http1_with_hsts() {
    let (server, pem, _certs) = tls_server().await;
    let port = port_of(&server.base);
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).expect("pem"))
        .resolve("localhost", ([127, 0, 0, 1], port).into())
        .build()
        .expect("client");
    let url = format!("https://localhost:{port}/health/ready");
    let response = client.get(&url).send().await.expect("https");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.version(),
        reqwest::Version::HTTP_2,
        "ALPN negotiates h2"
    );
    assert!(
        response
            .headers()
            .get("strict-transport-security")
            .is_some()
    );

    let http1 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).expect("pem"))
        .resolve("localhost", ([127, 0, 0, 1], port).into())
        .http1_only()
        .build()
        .expect("client");
    let response = http1.get(&url).send().await.expect("https http/1.1");
    assert_eq!(response.version(), reqwest::Version::HTTP_11);

    // TLS 1.2 is still accepted.
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile_certs(&pem) {
        roots.add(cert).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("tcp");
    let tls = connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").expect("name"),
            tcp,
        )
        .await
        .expect("TLS 1.2 handshake");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.expect("cert"))
        .collect()
}

/// A TLS 1.1 ClientHello (legacy version 0x0302, no supported_versions extension).
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend([7u8; 32]); // random
    body.push(0); // session id
    body.extend([0x00, 0x04, 0x00, 0x2f, 0xc0, 0x13]); // cipher suites (RSA/ECDHE AES-128-CBC-SHA)
    body.extend([0x01, 0x00]); // null compression
    let mut handshake = vec![0x01, 0x00, 0x00, u8::try_from(body.len()).expect("small")];
    handshake.extend(body);
    let mut record = vec![
        0x16,
        0x03,
        0x01,
        0x00,
        u8::try_from(handshake.len()).expect("small"),
    ];
    record.extend(handshake);
    record
}

#[tokio::test]
async fn tls_1_1_is_refused() {
    let (server, _pem, _certs) = tls_server().await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port_of(&server.base)))
        .await
        .expect("tcp");
    tcp.write_all(&tls11_client_hello()).await.expect("hello");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    assert!(!answer.is_empty(), "the server answers with an alert");
    assert_eq!(
        answer[0], 0x15,
        "an alert record, never a ServerHello: {answer:?}"
    );
    // rustls answers protocol_version (70) or handshake_failure (40) depending on the offered suites.
    assert!(
        matches!(answer.get(6), Some(&70) | Some(&40)),
        "a fatal alert: {answer:?}"
    );
}
