//! The edge's limits against hostile or careless clients, and mutual TLS bound to a partner:
//! oversized headers, slow-loris headers, idle connections, the connection limit, TLS versions,
//! and client certificates (RFC 8705 certificate-bound tokens).

use std::sync::Arc;
use std::time::Duration;

use caregate_e2e::{Gateway, Options, TestPartner, default_partners, patient};
use reqwest::StatusCode;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A raw TLS connection to the gateway speaking HTTP/1.1, for tests below HTTP clients.
async fn raw_tls(
    gw: &Gateway,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::io::Result<TlsStream<TcpStream>> {
    let pem = std::fs::read(gw.data_dir().join("dev-certificate.pem")).expect("dev cert");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&pem).expect("pem"))
        .expect("root");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let port = gw.base_url.rsplit(':').next().expect("port");
    let tcp = TcpStream::connect(format!("127.0.0.1:{port}")).await?;
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
}

/// Read until the server closes the connection (bounded, so a broken server fails the test
/// instead of hanging it). Returns what was read.
async fn read_to_close(stream: &mut TlsStream<TcpStream>) -> Vec<u8> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server did not close the connection");
    out
}

#[tokio::test]
async fn b2_oversized_header_is_refused_with_431() {
    let gw = Gateway::start();
    let mut tls = raw_tls(&gw, &[&rustls::version::TLS13]).await.unwrap();
    let request = format!(
        "GET /fhir/metadata HTTP/1.1\r\nHost: localhost\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    let _ = tls.write_all(request.as_bytes()).await;
    let reply = String::from_utf8_lossy(&read_to_close(&mut tls).await).to_string();
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
}

#[tokio::test]
async fn f7_slowloris_headers_are_cut_off_and_idle_connections_closed() {
    let gw = Gateway::start_with(
        default_partners(),
        "header_read_timeout_secs = 1\nidle_timeout_secs = 2",
    );
    // Trickled, never-finished request head.
    let mut slow = raw_tls(&gw, &[&rustls::version::TLS13]).await.unwrap();
    slow.write_all(b"POST /fhir/Patient HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let reply = read_to_close(&mut slow).await;
    assert!(
        reply.is_empty() || reply.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    // A keep-alive connection left idle after a request is closed too.
    let mut idle = raw_tls(&gw, &[&rustls::version::TLS12]).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let reply = read_to_close(&mut idle).await;
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200"));
    // Meanwhile the gateway still serves ordinary clients.
    let token = gw.token("gp-a81001").await;
    assert_eq!(
        gw.post("/fhir/Patient", &token, &patient("9434765919"))
            .await
            .status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn f7_connection_limit_is_enforced_and_recovers() {
    let gw = Gateway::start_with(default_partners(), "max_connections = 3");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            raw_tls(&gw, &[&rustls::version::TLS13])
                .await
                .expect("within the limit"),
        );
    }
    // The fourth is closed before the handshake completes.
    let over = raw_tls(&gw, &[&rustls::version::TLS13]).await;
    assert!(over.is_err(), "a connection over the limit must be refused");
    // Close the held ones; a new connection is accepted once the server notices.
    for mut conn in held.drain(..) {
        let _ = conn.shutdown().await;
    }
    let mut accepted = false;
    for _ in 0..100 {
        if let Ok(mut conn) = raw_tls(&gw, &[&rustls::version::TLS13]).await {
            conn.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let reply = read_to_close(&mut conn).await;
            if reply.starts_with(b"HTTP/1.1 200") {
                accepted = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        accepted,
        "the gateway accepts connections again once others closed"
    );
}

#[tokio::test]
async fn f10_tls_1_2_and_1_3_only() {
    let gw = Gateway::start();
    assert!(raw_tls(&gw, &[&rustls::version::TLS12]).await.is_ok());
    assert!(raw_tls(&gw, &[&rustls::version::TLS13]).await.is_ok());
    // Plain HTTP on the TLS port gets no HTTP answer.
    let port = gw.base_url.rsplit(':').next().unwrap();
    let mut tcp = TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    tcp.write_all(b"GET /fhir/metadata HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut buf)).await;
    assert!(!buf.starts_with(b"HTTP/1.1 200"), "no plaintext fallback");
}

struct Pki {
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
    client_identity_pem: String,
    client_thumbprint: String,
}

#[allow(
    clippy::unwrap_used,
    reason = "test fixture: a failure here is a broken test set-up"
)]
fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test ICS CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();

    let client_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut client_params = CertificateParams::new(vec!["gp-a81001.example".to_owned()]).unwrap();
    client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &issuer).unwrap();
    Pki {
        ca_pem: ca.pem(),
        server_cert_pem: server.pem(),
        server_key_pem: server_key.serialize_pem(),
        client_identity_pem: format!("{}{}", client.pem(), client_key.serialize_pem()),
        client_thumbprint: caregate_auth_thumbprint(client.der()),
    }
}

/// RFC 8705 `x5t#S256`: base64url SHA-256 of the certificate DER (computed here, independently of
/// the gateway's own code).
fn caregate_auth_thumbprint(der: &[u8]) -> String {
    use base64::Engine as _;
    let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hash.as_ref())
}

#[tokio::test]
async fn mtls_client_certificate_is_bound_to_its_partner() {
    let pki = pki();
    let gw = Gateway::start_configured(Options {
        partners: default_partners(),
        extra_toml: "[tls]\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\nclient_auth = \"optional\"\n".into(),
        partner_extra: vec![("gp-a81001".into(), format!("client_cert_sha256 = \"{}\"", pki.client_thumbprint))],
        files: vec![
            ("server.pem".into(), pki.server_cert_pem.clone()),
            ("server.key".into(), pki.server_key_pem.clone()),
            ("ca.pem".into(), pki.ca_pem.clone()),
        ],
        trust_pem: Some(pki.ca_pem.clone().into_bytes()),
        ..Options::default()
    });
    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    let with_cert = reqwest::Client::builder()
        .tls_certs_only([ca])
        .identity(reqwest::Identity::from_pem(pki.client_identity_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let gp: &TestPartner = gw.partner("gp-a81001");
    let form = |assertion: String| {
        vec![
            ("grant_type".to_owned(), "client_credentials".to_owned()),
            (
                "client_assertion_type".to_owned(),
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_owned(),
            ),
            ("client_assertion".to_owned(), assertion),
            ("scope".to_owned(), "system/Patient.cr".to_owned()),
        ]
    };
    // With its certificate: a certificate-bound token that works on that connection.
    let response = with_cert
        .post(gw.token_url())
        .form(&form(gp.key.sign_assertion("gp-a81001", &gw.token_url())))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let token: serde_json::Value = response.json().await.unwrap();
    let token = token["access_token"].as_str().unwrap().to_owned();
    let created = with_cert
        .post(format!("{}/fhir/Patient", gw.base_url))
        .bearer_auth(&token)
        .header("content-type", "application/fhir+json")
        .body(patient("9434765919").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    // The same token on a connection without the certificate is refused.
    let stolen = gw
        .post("/fhir/Patient", &token, &patient("9434765919"))
        .await;
    assert_eq!(stolen.status, StatusCode::UNAUTHORIZED);
    // Without its certificate the bound partner cannot get a token at all.
    let (status, _) = gw
        .exchange(
            &gp.key.sign_assertion("gp-a81001", &gw.token_url()),
            "system/Patient.cr",
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Unbound partners are unaffected by client_auth = optional.
    let token = gw.token("trust-rx1").await;
    assert_eq!(
        gw.post("/fhir/Patient", &token, &patient("9434765919"))
            .await
            .status,
        StatusCode::CREATED
    );
}
