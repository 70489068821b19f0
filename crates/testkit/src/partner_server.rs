//! A partner's FHIR endpoint for delivery tests: a real HTTPS server (rustls, its own test CA,
//! optionally requiring a client certificate) whose behaviour is switched at run time — accept,
//! fail with 5xx, hang, reject with 4xx, or be down — and which records every request with its
//! idempotency key (`X-Request-Id`), so a test can check what the partner saw.
//!
//! Test support: set-up failures panic with a message.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// How the partner answers, switchable while running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 201 Created.
    Accept,
    /// This 5xx status (or any status given).
    Fail(u16),
    /// Read the request, then never answer.
    Hang,
    /// This 4xx status, with an OperationOutcome body.
    Reject(u16),
    /// Close every connection as soon as it is accepted (the partner is down).
    Down,
    /// Read the request, wait this long, then answer 201 (a slow partner).
    Delay(Duration),
}

/// One request the partner received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// The `X-Request-Id` header (the idempotency key).
    pub key: Option<String>,
    pub body: Vec<u8>,
    /// The status answered; `None` when the request was left hanging.
    pub status: Option<u16>,
}

impl Received {
    /// Whether the partner answered 2xx (it has the record).
    pub fn accepted(&self) -> bool {
        self.status
            .is_some_and(|status| (200..300).contains(&status))
    }
}

#[derive(Debug)]
struct Shared {
    mode: Mutex<Mode>,
    received: Mutex<Vec<Received>>,
    /// TLS handshakes that failed (e.g. no client certificate when one is required).
    handshake_failures: AtomicUsize,
    changed: Notify,
}

/// A test certificate authority issuing server and client certificates.
#[derive(Debug)]
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate and its key, in PEM.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA certificate");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate (trust it).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn issue_server(&self) -> IssuedCert {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("server key");
        let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("server params");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A client certificate (for mTLS) with this common name.
    pub fn issue_client(&self, name: &str) -> IssuedCert {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("client key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("client certificate");
        IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A running partner endpoint. Dropping it stops the server and every connection.
#[derive(Debug)]
pub struct PartnerServer {
    addr: SocketAddr,
    ca: TestCa,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl PartnerServer {
    /// Start a partner endpoint that accepts, over TLS without client certificates.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Start one that requires a client certificate issued by `client_ca` (PEM), if given.
    pub async fn start_with(client_ca: Option<&str>) -> Self {
        let ca = TestCa::new("partner test CA");
        let server = ca.issue_server();
        let certs = CertificateDer::pem_slice_iter(server.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("server certificate PEM");
        let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).expect("server key PEM");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("TLS versions");
        let builder = match client_ca {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    roots.add(cert.expect("client CA PEM")).expect("client CA");
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .expect("server TLS config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Accept),
            received: Mutex::new(Vec::new()),
            handshake_failures: AtomicUsize::new(0),
            changed: Notify::new(),
        });
        let task = tokio::spawn(serve(listener, acceptor, Arc::clone(&shared)));
        Self {
            addr,
            ca,
            shared,
            task,
        }
    }

    /// The FHIR base URL to configure as the partner's endpoint.
    pub fn base_url(&self) -> String {
        format!("https://localhost:{}/fhir", self.addr.port())
    }

    /// The CA that issued the server's certificate (configure it as the partner's `ca_cert`).
    pub fn ca_pem(&self) -> &str {
        self.ca.pem()
    }

    pub fn set_mode(&self, mode: Mode) {
        *self
            .shared
            .mode
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = mode;
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared
            .received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// TLS handshakes the server refused or that failed (a client without the required
    /// certificate, an untrusted one, or a client that gave up).
    pub fn handshake_failures(&self) -> usize {
        self.shared.handshake_failures.load(Ordering::SeqCst)
    }

    /// Wait until at least `count` handshakes failed, or `timeout` passes; true if they did.
    pub async fn wait_for_handshake_failures(&self, timeout: Duration, count: usize) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            if self.handshake_failures() >= count {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.handshake_failures() >= count;
            }
        }
    }

    /// Idempotency keys of accepted requests in arrival order, repeats included.
    pub fn accepted_keys(&self) -> Vec<String> {
        self.received()
            .into_iter()
            .filter(Received::accepted)
            .filter_map(|request| request.key)
            .collect()
    }

    /// Wait until `condition` holds over the requests received, or `timeout` passes; true if it
    /// held. Woken by each request, so no polling interval is involved.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        condition: impl Fn(&[Received]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            if condition(&self.received()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return condition(&self.received());
            }
        }
    }
}

impl Drop for PartnerServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    // Connections live in this set, so aborting the server task drops them all (hung ones too).
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let mode = *shared.mode.lock().unwrap_or_else(PoisonError::into_inner);
                if mode == Mode::Down {
                    drop(tcp);
                    continue;
                }
                let acceptor = acceptor.clone();
                let shared = Arc::clone(&shared);
                connections.spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(_) => {
                            shared.handshake_failures.fetch_add(1, Ordering::SeqCst);
                            shared.changed.notify_waiters();
                            return;
                        }
                    };
                    let service = hyper::service::service_fn(move |request| {
                        handle(request, Arc::clone(&shared))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(
    request: Request<hyper::body::Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let key = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let body = request
        .into_body()
        .collect()
        .await
        .map(|collected| collected.to_bytes().to_vec())
        .unwrap_or_default();
    let mode = *shared.mode.lock().unwrap_or_else(PoisonError::into_inner);
    let (status, reply): (Option<u16>, &str) = match mode {
        Mode::Accept | Mode::Down | Mode::Delay(_) => (
            Some(201),
            "{\"resourceType\":\"OperationOutcome\",\"issue\":[{\"severity\":\"information\",\"code\":\"informational\"}]}",
        ),
        Mode::Fail(status) => (
            Some(status),
            "{\"resourceType\":\"OperationOutcome\",\"issue\":[{\"severity\":\"error\",\"code\":\"transient\"}]}",
        ),
        Mode::Reject(status) => (
            Some(status),
            "{\"resourceType\":\"OperationOutcome\",\"issue\":[{\"severity\":\"error\",\"code\":\"invalid\",\"diagnostics\":\"rejected by the test partner\"}]}",
        ),
        Mode::Hang => (None, ""),
    };
    shared
        .received
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Received {
            method,
            path,
            key,
            body,
            status,
        });
    shared.changed.notify_waiters();
    let Some(status) = status else {
        std::future::pending::<()>().await;
        unreachable!("a pending future never completes");
    };
    if let Mode::Delay(delay) = mode {
        tokio::time::sleep(delay).await;
    }
    let mut response = Response::new(Full::new(Bytes::from(reply.to_owned())));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/fhir+json"),
    );
    Ok(response)
}
