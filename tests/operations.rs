//! What an operator sees: metrics, health, the served page, limits, ICE
//! servers, origin checks, TLS, and graceful shutdown.

mod common;

use std::sync::Arc;

use common::*;
use serde_json::json;
use switchboard::config::ServeOptions;

#[tokio::test]
async fn serves_the_browser_client_health_and_metrics() {
    let server = default_server().await;
    let (status, body) = http_get(&server, "/").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("<html") && body.contains(r#"<script type="module" src="/app.js">"#),
        "index.html is served and loads the entry module"
    );
    // Every module the entry imports, transitively, is served as JavaScript
    // (browsers refuse modules of another type), and so is every module in
    // src/web: one added there but not served would fail here.
    let mut served = std::collections::BTreeSet::new();
    let mut todo = vec!["app.js".to_owned()];
    let mut all_text = String::new();
    while let Some(name) = todo.pop() {
        if !served.insert(name.clone()) {
            continue;
        }
        let (status, content_type, body) =
            http_get_header(&server, &format!("/{name}"), "content-type").await;
        assert_eq!(status, 200, "/{name}");
        assert_eq!(
            content_type.as_deref(),
            Some("text/javascript; charset=utf-8"),
            "/{name}"
        );
        for part in body.split("from './").skip(1) {
            let import = part.split('\'').next().unwrap_or_default();
            assert!(import.ends_with(".js"), "{name} imports {import}");
            todo.push(import.to_owned());
        }
        all_text.push_str(&body);
    }
    let on_disk: std::collections::BTreeSet<String> =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src/web"))
            .expect("src/web")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".js"))
            .collect();
    assert_eq!(
        served, on_disk,
        "the modules reached from /app.js are src/web/*.js"
    );
    assert!(
        all_text.contains("new WebSocket("),
        "the client scripts are served"
    );
    assert_eq!(http_get(&server, "/style.css").await.0, 200);
    assert_eq!(
        http_get(&server, "/healthz").await,
        (200, "ok\n".to_owned())
    );
    assert_eq!(http_get(&server, "/nope").await.0, 404);
}

#[tokio::test]
async fn metrics_move_with_the_flows() {
    // A short resume window, so a dropped connection's participant is
    // parked first and gone soon after.
    let server = server(switchboard::config::ServeOptions {
        resume_window_ms: Some(500),
        ..Default::default()
    })
    .await;
    let before = metrics(&server).await;
    assert_eq!(metric(&before, "switchboard_rooms"), 0.0);
    assert_eq!(metric(&before, "switchboard_participants"), 0.0);
    assert_eq!(metric(&before, "switchboard_signaling_connections"), 0.0);

    let mut a = Client::connect(&server, "alice").await;
    let mut b = Client::connect(&server, "bob").await;
    let mut c = Client::connect(&server, "carol").await;
    let ida = id_of(&a.join("m", json!({})).await);
    b.join("m", json!({})).await;
    a.expect("otherjoin").await;
    a.send(json!({"type":"message","room":"m","data":{"x":1}}))
        .await;
    b.expect("message").await;
    c.send_text("not json").await;
    c.expect_error("bad-request").await;
    c.join("m", json!({})).await; // third: mode switch
    c.expect("mode").await;
    for x in [&mut a, &mut b] {
        x.expect("mode").await;
        x.expect("otherjoin").await;
    }

    let m = metrics(&server).await;
    assert_eq!(metric(&m, "switchboard_signaling_connections"), 3.0);
    assert_eq!(
        metric(&m, "switchboard_signaling_connections_opened_total"),
        3.0
    );
    assert_eq!(metric(&m, "switchboard_rooms"), 1.0);
    assert_eq!(metric(&m, "switchboard_participants"), 3.0);
    assert_eq!(
        metric(
            &m,
            "switchboard_signaling_messages_received_total{type=\"join\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            "switchboard_signaling_messages_received_total{type=\"message\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "switchboard_signaling_messages_received_total{type=\"invalid\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "switchboard_signaling_messages_sent_total{type=\"joined\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            "switchboard_signaling_messages_sent_total{type=\"message\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "switchboard_signaling_messages_sent_total{type=\"mode\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            "switchboard_signaling_errors_total{code=\"bad-request\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "switchboard_room_mode_switches_total{reason=\"third-participant\"}"
        ),
        1.0
    );

    // Everyone leaves: the room is freed and the gauges return to zero.
    a.send(json!({"type":"leave","room":"m"})).await;
    a.expect("leaved").await;
    assert_eq!(b.expect("bye").await["id"], ida.as_str());
    b.send(json!({"type":"leave","room":"m"})).await;
    b.expect("leaved").await;
    c.drop_abruptly();
    a.expect_nothing_pending().await;
    // Carol's connection is gone; wait until the server has noticed.
    for _ in 0..100 {
        if metric(&metrics(&server).await, "switchboard_signaling_connections") == 2.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Carol is parked (her media would still flow) until the window passes.
    let m = metrics(&server).await;
    assert_eq!(metric(&m, "switchboard_signaling_connections"), 2.0);
    assert_eq!(metric(&m, "switchboard_parked_participants"), 1.0);
    assert_eq!(metric(&m, "switchboard_participants"), 1.0);
    for _ in 0..100 {
        if metric(&metrics(&server).await, "switchboard_rooms") == 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let m = metrics(&server).await;
    assert_eq!(metric(&m, "switchboard_rooms"), 0.0);
    assert_eq!(metric(&m, "switchboard_participants"), 0.0);
    assert_eq!(metric(&m, "switchboard_parked_participants"), 0.0);
    assert_eq!(
        metric(&m, "switchboard_resumes_total{result=\"expired\"}"),
        1.0
    );
    assert_eq!(server.hub().room_count(), 0);
}

#[tokio::test]
async fn participant_and_room_limits_answer_full() {
    let server = server(ServeOptions {
        max_participants: Some(2),
        max_rooms: Some(1),
        ..Default::default()
    })
    .await;
    let mut a = Client::connect(&server, "alice").await;
    let mut b = Client::connect(&server, "bob").await;
    let mut c = Client::connect(&server, "carol").await;
    a.join("one", json!({"mode":"sfu"})).await;
    b.join("one", json!({})).await;
    c.send(json!({"type":"join","room":"one"})).await;
    assert_eq!(c.recv().await, json!({"type":"full","room":"one"}));
    c.send(json!({"type":"join","room":"two"})).await;
    assert_eq!(
        c.recv().await,
        json!({"type":"full","room":"two"}),
        "no room for a second room"
    );
    let m = metrics(&server).await;
    assert_eq!(
        metric(
            &m,
            "switchboard_room_joins_refused_total{reason=\"room-full\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "switchboard_room_joins_refused_total{reason=\"too-many-rooms\"}"
        ),
        1.0
    );
    // Freeing the room frees the slot.
    a.send(json!({"type":"leave","room":"one"})).await;
    a.expect("otherjoin").await;
    a.expect("leaved").await;
    b.send(json!({"type":"leave","room":"one"})).await;
    b.expect("bye").await;
    b.expect("leaved").await;
    c.join("two", json!({})).await;
}

#[tokio::test]
async fn joined_carries_stun_and_short_lived_turn_credentials() {
    let server = server(ServeOptions {
        stun_urls: Some(vec!["stun:127.0.0.1:3478".into()]),
        turn_urls: Some(vec!["turn:127.0.0.1:3478?transport=udp".into()]),
        turn_secret: Some("north".into()),
        turn_ttl_secs: Some(600),
        p2p_timeout_ms: Some(4000),
        ..Default::default()
    })
    .await;
    let mut a = Client::connect(&server, "alice").await;
    let j = a.join("ice", json!({})).await;
    assert_eq!(j["p2pTimeoutMs"], 4000);
    let servers = j["iceServers"].as_array().expect("list");
    assert_eq!(servers[0], json!({"urls":["stun:127.0.0.1:3478"]}));
    let turn = &servers[1];
    assert_eq!(turn["urls"], json!(["turn:127.0.0.1:3478?transport=udp"]));
    let user = turn["username"].as_str().expect("username");
    let (expiry, who) = user.split_once(':').expect("<expiry>:<participant>");
    assert_eq!(who, id_of(&j));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let expiry: u64 = expiry.parse().expect("unix time");
    assert!(
        expiry > now && expiry <= now + 601,
        "valid for the TTL: {expiry} vs {now}"
    );
    let id = switchboard_proto::ParticipantId::parse(who).expect("id");
    let (_, password) = switchboard::ice::turn_credentials("north", &id, expiry);
    assert_eq!(turn["credential"], password.as_str());
}

#[tokio::test]
async fn websocket_from_a_foreign_origin_is_refused() {
    let server = server(ServeOptions {
        allowed_origins: Some(vec!["https://meet.example.org".into()]),
        ..Default::default()
    })
    .await;
    let req = |origin: &str| {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut r = server.ws_url().into_client_request().expect("request");
        r.headers_mut()
            .insert("Origin", origin.parse().expect("header"));
        r
    };
    let refused = tokio_tungstenite::connect_async(req("https://evil.example")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req("https://meet.example.org"))
        .await
        .expect("allowed origin connects");
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        r#"{"type":"ping","id":1}"#,
    ))
    .await
    .expect("send");
    let pong = ws.next().await.expect("frame").expect("ok");
    assert_eq!(pong.to_text().expect("text"), r#"{"type":"pong","id":1}"#);
}

#[tokio::test]
async fn graceful_shutdown_tells_everyone_room_closed_then_closes() {
    let server = default_server().await;
    let mut a = Client::connect(&server, "alice").await;
    let mut b = Client::connect(&server, "bob").await;
    a.join("s", json!({})).await;
    b.join("s", json!({})).await;
    a.expect("otherjoin").await;
    server.shutdown();
    for x in [&mut a, &mut b] {
        let e = x.expect_error("room-closed").await;
        assert!(e["message"]
            .as_str()
            .unwrap_or("")
            .contains("shutting down"));
        // Then the close frame; no `bye` noise while the room closes.
        match x.next_event().await {
            Event::Closed(code) => assert_eq!(code, Some(1001), "going away"),
            other => panic!("expected close, got {other:?}"),
        }
    }
    tokio::time::timeout(WAIT, server.wait())
        .await
        .expect("server stops within the grace period")
        .expect("clean exit");
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

#[tokio::test]
async fn tls_with_certificate_files_serves_wss_to_a_verifying_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
    let server = server(ServeOptions {
        tls_cert: Some(cert_path),
        tls_key: Some(key_path),
        ..Default::default()
    })
    .await;
    assert!(server.ws_url().starts_with("wss://"));

    // A client that trusts exactly this certificate, as a browser would
    // after installing it: real verification, hostname included.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .expect("tcp");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").expect("name"),
            tcp,
        )
        .await
        .expect("TLS handshake verifies");
    let url = format!("wss://localhost:{}/ws", server.local_addr().port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("ws over TLS");
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        r#"{"type":"join","room":"secure","name":"alice"}"#,
    ))
    .await
    .expect("send");
    let joined: serde_json::Value = serde_json::from_str(
        ws.next()
            .await
            .expect("frame")
            .expect("ok")
            .to_text()
            .expect("text"),
    )
    .expect("json");
    assert_eq!(joined["type"], "joined");
    assert_eq!(joined["room"], "secure");
}

#[tokio::test]
async fn tls_self_signed_generates_a_certificate_for_localhost_and_extra_names() {
    let server = server(ServeOptions {
        tls_self_signed: Some(true),
        tls_self_signed_names: Some(vec!["phone-test.lan".into()]),
        ..Default::default()
    })
    .await;
    // Capture the certificate the server presents.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(Capture(seen.clone())))
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .expect("tcp");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").expect("name"),
            tcp,
        )
        .await
        .expect("handshake");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("ok\n"));
    let der = seen.lock().expect("lock").clone();
    assert!(!der.is_empty(), "a certificate was presented");
    // The SAN DNS names are stored as plain IA5 strings inside the DER.
    let has = |name: &str| der.windows(name.len()).any(|w| w == name.as_bytes());
    assert!(has("localhost") && has("phone-test.lan"));
}

#[derive(Debug)]
struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl rustls::client::danger::ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.0.lock().expect("lock") = end_entity.to_vec();
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
