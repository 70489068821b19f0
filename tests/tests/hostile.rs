//! Hostile clients at the edge, beyond `edge.rs` (DOMAIN.md B2 rows B2, B9 and F7; OWASP API4):
//! request smuggling with ambiguous framing, thousands of idle connections, a trickled body, header
//! names with underscores, and oversized bearer tokens. Each attack is refused and an ordinary
//! partner is still served afterwards (or meanwhile).

use std::sync::Arc;
use std::time::Duration;

use caregate_e2e::{Gateway, default_partners, patient};
use reqwest::{Method, StatusCode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Bound on every wait in this file, so a misbehaving server fails a test instead of hanging it.
const WAIT: Duration = Duration::from_secs(30);

/// A raw HTTP/1.1-over-TLS connection to the gateway, trusting its dev certificate.
async fn connect_raw(gw: &Gateway) -> TlsStream<TcpStream> {
    let pem = std::fs::read(gw.data_dir().join("dev-certificate.pem")).expect("dev certificate");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&pem).expect("PEM"))
        .expect("root");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(gw_addr(gw)).await.expect("TCP connect");
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake")
}

fn gw_addr(gw: &Gateway) -> String {
    let port = gw.base_url.rsplit(':').next().expect("port");
    format!("127.0.0.1:{port}")
}

/// Everything the server sends until it closes the connection (or resets it), bounded by WAIT.
async fn read_until_closed(stream: &mut TlsStream<TcpStream>) -> String {
    let mut out = Vec::new();
    let finished = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(finished.is_ok(), "the server kept the connection open");
    String::from_utf8_lossy(&out).into_owned()
}

/// A partner still gets a token, creates a record and reads it back.
async fn ordinary_partner_is_served(gw: &Gateway) {
    let token = gw.token("gp-a81001").await;
    let created = gw
        .post("/fhir/Patient", &token, &patient("9434765919"))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["id"].as_str().expect("id").to_owned();
    let read = gw
        .send(
            Method::GET,
            &format!("/fhir/Patient/{id}"),
            Some(&token),
            None,
            &[],
        )
        .await;
    assert_eq!(read.status, StatusCode::OK);
}

/// Send `POST /fhir/Patient` with this head and body on a fresh connection; the raw reply.
async fn send_raw_post(gw: &Gateway, head: &str, body: &str) -> String {
    let mut tls = connect_raw(gw).await;
    let request = format!("POST /fhir/Patient HTTP/1.1\r\nHost: localhost\r\n{head}\r\n{body}");
    // The server may refuse and close before reading everything; that is fine.
    let _ = tls.write_all(request.as_bytes()).await;
    let _ = tls.flush().await;
    read_until_closed(&mut tls).await
}

/// A request whose framing two parsers could read two ways (RFC 9112 §6.3, §11.2), with a second
/// request hidden where one reading puts the body. The gateway must answer one 400, close the
/// connection, and never act on the hidden request.
async fn assert_ambiguous_framing_refused(gw: &Gateway, name: &str, head: &str, body: &str) {
    let reply = send_raw_post(gw, head, body).await;
    assert!(
        reply.starts_with("HTTP/1.1 400"),
        "{name}: expected 400, got {reply:?}"
    );
    assert_eq!(
        reply.matches("HTTP/1.1 ").count(),
        1,
        "{name}: the hidden request was answered too: {reply:?}"
    );
}

const HIDDEN: &str = "GET /fhir/metadata HTTP/1.1\r\nHost: localhost\r\n\r\n";

#[tokio::test]
async fn b9_request_smuggling_framing_is_refused_with_400() {
    let gw = Gateway::start();
    let chunked_then_hidden = format!("0\r\n\r\n{HIDDEN}");
    // TE.CL with the header order swapped and an obfuscated second coding.
    assert_ambiguous_framing_refused(
        &gw,
        "Transfer-Encoding: chunked twice, second obfuscated",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: xchunked\r\nContent-Length: 4\r\n",
        &chunked_then_hidden,
    )
    .await;
    // Two different Content-Length values.
    assert_ambiguous_framing_refused(
        &gw,
        "two Content-Length headers",
        &format!(
            "Content-Length: 2\r\nContent-Length: {}\r\n",
            HIDDEN.len() + 2
        ),
        &format!("{{}}{HIDDEN}"),
    )
    .await;
    // A Content-Length list with different values in one field.
    assert_ambiguous_framing_refused(
        &gw,
        "Content-Length: 2, 50",
        "Content-Length: 2, 50\r\n",
        &format!("{{}}{HIDDEN}"),
    )
    .await;
    // A final transfer coding other than chunked on a request (RFC 9112 §6.3 item 4).
    assert_ambiguous_framing_refused(
        &gw,
        "Transfer-Encoding: gzip",
        "Transfer-Encoding: gzip\r\n",
        &format!("{{}}{HIDDEN}"),
    )
    .await;
    // Obsolete line folding (RFC 9112 §5.2): a folded Transfer-Encoding.
    assert_ambiguous_framing_refused(
        &gw,
        "obs-fold",
        "Content-Length: 2\r\nX-Folded: a\r\n Transfer-Encoding: chunked\r\n",
        &format!("{{}}{HIDDEN}"),
    )
    .await;
    // A negative or signed Content-Length.
    assert_ambiguous_framing_refused(
        &gw,
        "Content-Length: +2",
        "Content-Length: +2\r\n",
        &format!("{{}}{HIDDEN}"),
    )
    .await;
    // None of that affected anyone else.
    ordinary_partner_is_served(&gw).await;
}

/// A create over a raw connection: the request line and headers, with `head` spliced in
/// before the blank line, and `body` as given (framing is the caller's).
fn raw_create(head: &str, body: &str) -> String {
    format!("POST /fhir/Patient HTTP/1.1\r\nHost: localhost\r\n{head}\r\n{body}")
}

/// A complete, authenticated create of a Patient, framed by Content-Length alone.
fn framed_create(token: &str, request_id: &str, nhs_number: &str) -> String {
    let body = patient(nhs_number).to_string();
    raw_create(
        &format!(
            "Authorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\nX-Request-Id: {request_id}\r\nContent-Length: {}\r\n",
            body.len()
        ),
        &body,
    )
}

/// One response framed by Content-Length, read exactly, leaving the connection usable.
async fn read_one_response(stream: &mut TlsStream<TcpStream>) -> String {
    let mut reply = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&reply).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .expect("a Content-Length on the response");
            if reply.len() >= end + 4 + length {
                assert_eq!(
                    reply.len(),
                    end + 4 + length,
                    "more than one response: {text:?}"
                );
                return text;
            }
        }
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "the connection was closed: {text:?}");
        reply.extend_from_slice(&buf[..n]);
    }
}

/// POST the Patient with this `X-Request-Id` the ordinary way; whether the gateway had already
/// committed a request under that key (`x-idempotent-replay: true`).
async fn was_committed_before(
    gw: &Gateway,
    token: &str,
    request_id: &str,
    nhs_number: &str,
) -> bool {
    let reply = gw
        .send(
            Method::POST,
            "/fhir/Patient",
            Some(token),
            Some(patient(nhs_number).to_string().into_bytes()),
            &[("x-request-id", request_id)],
        )
        .await;
    assert!(
        reply.status.is_success(),
        "{}: {}",
        reply.status,
        reply.body
    );
    reply.header("x-idempotent-replay") == "true"
}

#[tokio::test]
async fn b9_content_length_with_chunked_is_read_by_transfer_encoding_alone_then_closed() {
    // CL.TE: Content-Length covers a hidden second request; the chunked framing ends before it.
    // RFC 9112 §6.1: "A server MAY reject a request that contains both Content-Length and
    // Transfer-Encoding or process such a request in accordance with the Transfer-Encoding
    // alone. Regardless, the server MUST close the connection after responding to such a
    // request to avoid the potential attacks." caregate's HTTP/1.1 parser (hyper 1.x,
    // `proto/h1/role.rs`) takes the second branch: it drops Content-Length, reads the body as
    // chunked, answers once with `connection: close`, and closes. This test pins exactly that
    // (RELIABILITY.md, B9): the outer request is acted on as its chunked body says, one response,
    // the connection closed by the server, and the hidden request — itself a complete,
    // authenticated create with its own X-Request-Id — never answered and never committed.
    //
    // Keep-alive timeouts far above WAIT, so an end of stream within WAIT is the server closing
    // because of the framing, not an idle connection timing out.
    let gw = Gateway::start_with(
        default_partners(),
        "header_read_timeout_secs = 300\nidle_timeout_secs = 300",
    );
    let token = gw.token("gp-a81001").await;

    // Control: the same kind of raw connection, framed by Content-Length alone, stays open and
    // answers a second request — so the closing below is the CL+TE rule, not the harness.
    let mut tls = connect_raw(&gw).await;
    for n in 0..2 {
        tls.write_all(framed_create(&token, &format!("b9-control-{n}"), "9434765919").as_bytes())
            .await
            .expect("write");
        tls.flush().await.expect("flush");
        let reply = read_one_response(&mut tls).await;
        let reply = reply.to_ascii_lowercase();
        assert!(reply.starts_with("http/1.1 201"), "{reply:?}");
        assert!(!reply.contains("\r\nconnection: close\r\n"), "{reply:?}");
    }
    drop(tls);

    let outer_patient = patient("9434765919").to_string();
    let chunked_patient = format!("{:x}\r\n{outer_patient}\r\n0\r\n\r\n", outer_patient.len());
    let cases = [
        // (name, outer head before the framing headers, chunked body, CL before TE?)
        (
            "unauthenticated, empty chunked body",
            String::new(),
            "0\r\n\r\n".to_owned(),
            true,
        ),
        (
            "authenticated create, Content-Length first",
            format!(
                "Authorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\nX-Request-Id: b9-clte-outer-1\r\n"
            ),
            chunked_patient.clone(),
            true,
        ),
        (
            "authenticated create, Transfer-Encoding first",
            format!(
                "Authorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\nX-Request-Id: b9-clte-outer-2\r\n"
            ),
            chunked_patient,
            false,
        ),
    ];
    for (case, (name, outer_head, chunked, cl_first)) in cases.into_iter().enumerate() {
        let hidden_id = format!("b9-clte-hidden-{case}");
        let hidden = framed_create(&token, &hidden_id, "9434765870");
        let body = format!("{chunked}{hidden}");
        let length = format!("Content-Length: {}\r\n", body.len());
        let framing = if cl_first {
            format!("{length}Transfer-Encoding: chunked\r\n")
        } else {
            format!("Transfer-Encoding: chunked\r\n{length}")
        };
        let reply = send_raw_post(&gw, &format!("{outer_head}{framing}"), &body).await;

        // Exactly one response, announcing the close; `send_raw_post` read to the end of the
        // stream, which came well before any keep-alive timeout.
        assert_eq!(
            reply.matches("HTTP/1.1 ").count(),
            1,
            "{name}: the hidden request was answered: {reply:?}"
        );
        assert!(
            reply
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{name}: no `connection: close`: {reply:?}"
        );
        // The body was read by Transfer-Encoding alone: the unauthenticated request is refused
        // for its missing token, and the chunked Patient is created (read by Content-Length it
        // would be chunk sizes around JSON: 400).
        let expected = if outer_head.is_empty() {
            "HTTP/1.1 401"
        } else {
            "HTTP/1.1 201"
        };
        assert!(
            reply.starts_with(expected),
            "{name}: expected {expected}, got {reply:?}"
        );
        assert!(
            !was_committed_before(&gw, &token, &hidden_id, "9434765870").await,
            "{name}: the hidden create was committed"
        );
    }
    // The chunked creates were committed once, under their own keys.
    for outer in ["b9-clte-outer-1", "b9-clte-outer-2"] {
        assert!(
            was_committed_before(&gw, &token, outer, "9434765919").await,
            "{outer}"
        );
    }
    ordinary_partner_is_served(&gw).await;
}

#[tokio::test]
async fn b2_header_names_with_underscores_never_alias_the_hyphenated_ones() {
    // Decision (RELIABILITY.md, "Headers with underscores"): caregate terminates HTTP and never
    // maps `_` to `-` (no CGI-style translation anywhere), so a header such as `X_Request_Id` is
    // an unknown header and is ignored; it cannot stand in for `X-Request-Id` or `Authorization`.
    let gw = Gateway::start();
    let token = gw.token("gp-a81001").await;
    // Not an authorization header.
    let bearer = format!("Bearer {token}");
    let reply = gw
        .send(
            Method::GET,
            "/fhir/Patient/any",
            None,
            None,
            &[("Authorization_", bearer.as_str())],
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // Not a request id (idempotency key) either: the gateway generates its own.
    let body = patient("9434765919").to_string().into_bytes();
    let reply = gw
        .send(
            Method::POST,
            "/fhir/Patient",
            Some(&token),
            Some(body),
            &[("X_Request_Id", "underscored-id-1")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_ne!(reply.header("x-request-id"), "underscored-id-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b2_oversized_bearer_tokens_are_refused_without_harm() {
    let gw = Gateway::start();
    // 1 MB: far over the header limit (16 KiB) → 431 before any token parsing.
    let mut tls = connect_raw(&gw).await;
    let huge = "A".repeat(1024 * 1024);
    let request = format!(
        "GET /fhir/Patient/x HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {huge}\r\n\r\n"
    );
    let (mut reader, mut writer) = tokio::io::split(&mut tls);
    // Write and read at once: the server answers and closes before it has read the whole head.
    let (_, reply) = tokio::join!(
        async { writer.write_all(request.as_bytes()).await },
        async {
            let mut out = Vec::new();
            let _ = tokio::time::timeout(WAIT, reader.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    );
    // A reset can discard the answer in flight; what must never happen is another status.
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 431"),
        "expected 431, got {:?}",
        reply.chars().take(200).collect::<String>()
    );
    // 12 KiB: under the header limit but over the token limit (8 KiB) → 401 invalid_token.
    let long = "A".repeat(12 * 1024);
    let reply = gw
        .send(Method::GET, "/fhir/Patient/x", Some(&long), None, &[])
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(
        reply.header("www-authenticate").contains("invalid_token"),
        "{:?}",
        reply.headers
    );
    ordinary_partner_is_served(&gw).await;
}
