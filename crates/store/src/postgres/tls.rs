//! TLS for the store's PostgreSQL connections (issue 8): rustls 0.23 on the aws-lc-rs provider
//! (the project's one TLS stack), plugged into tokio-postgres through its `MakeTlsConnect` /
//! `TlsConnect` traits over tokio-rustls.
//!
//! **Modes** follow libpq's `sslmode` (PostgreSQL manual, "SSL Support", table "SSL Mode
//! Descriptions"):
//!
//! - `disable`: no TLS. For loopback and unix sockets.
//! - `require`: TLS, but the server's certificate is not checked against any CA nor its name:
//!   the traffic is encrypted against a passive eavesdropper, but an active attacker on the path
//!   can pose as the server. The handshake signature is still verified (the server holds the key
//!   of the certificate it sent), so channel binding (below) ties a SCRAM password exchange to
//!   that certificate. Unlike libpq, a CA file does not silently turn `require` into
//!   `verify-ca`: a CA file with `require` is refused, say `verify-full`.
//! - `verify-full`: TLS; the server's certificate must chain to one of the configured CA
//!   certificates (`ca_file`, not the system's roots: a database's CA is usually private) and be
//!   valid for the host name in the URL (a DNS name, or an IP address for `host=10.0.0.5`),
//!   RFC 6125 via webpki. `verify-ca` (chain checked, name not) is not offered.
//!
//! **Default** (no mode given): `verify-full` when a CA is given or any host is not local;
//! `disable` when every host is a unix socket, `localhost` or a loopback address — so a database
//! on another host is never reached in clear by default, and one that cannot be verified (no CA
//! configured) is refused at start rather than reached unverified.
//!
//! **The URL's own `sslmode`.** tokio-postgres parses `sslmode=disable|prefer|require` (and
//! refuses `verify-ca`/`verify-full` and `sslrootcert`, which it does not implement). An explicit
//! `disable` or `require` must agree with the effective mode, else the connection is refused
//! before any traffic (a URL secret written for another client must not silently weaken or
//! contradict the configuration). `prefer` — libpq's default, "TLS if the server offers it, else
//! plain" — is satisfied by every mode and is treated as unset.
//!
//! **Channel binding.** The TLS stream reports `tls-server-end-point` (RFC 5929 §4.1: the hash
//! of the server's certificate, with the certificate's signature hash, SHA-256 for MD5 and SHA-1),
//! so SCRAM-SHA-256-PLUS is used when the server offers it (`channel_binding=require` in the URL
//! makes it mandatory). For signature algorithms without a single hash (RSA-PSS, Ed25519) no
//! binding is reported and plain SCRAM-SHA-256 is used, as libpq does.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::{Client, Config, Connection, NoTls, Socket};

/// How the store's connections use TLS (libpq `sslmode` names and semantics; see the module
/// docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS.
    Disable,
    /// TLS without checking the server's certificate (encrypted, not authenticated).
    Require,
    /// TLS; the certificate must chain to a configured CA and be valid for the host name.
    VerifyFull,
}

impl TlsMode {
    /// The libpq name (`disable`, `require`, `verify-full`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Require => "require",
            Self::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why TLS settings cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostgresTlsError {
    /// The CA text is not PEM, holds no certificate, or a certificate cannot be a trust anchor.
    #[error("{0}")]
    Ca(String),
    /// CA certificates were given for a mode that does not check certificates.
    #[error(
        "CA certificates are only used with TLS mode verify-full; mode {0} does not check the server's certificate"
    )]
    CaUnused(TlsMode),
    /// `verify-full` without CA certificates.
    #[error(
        "TLS mode verify-full{default} needs the CA certificate(s) that issued the server's certificate (`ca_file` in [store.postgres]); for a database reached only over loopback or a unix socket, set tls = \"disable\""
    )]
    NoCa {
        /// Names the non-local host when verify-full is the default, not the configured mode.
        default: String,
    },
    /// The URL's `sslmode` contradicts the mode.
    #[error(
        "the PostgreSQL URL says sslmode={url} but the TLS mode is {mode}{default}: remove sslmode from the URL (the `tls` setting decides)"
    )]
    UrlConflict {
        url: &'static str,
        mode: TlsMode,
        default: String,
    },
    /// TLS asked for a host it cannot apply to.
    #[error("TLS mode {mode} cannot be used with {reason}")]
    Host { mode: TlsMode, reason: String },
    /// The client configuration could not be built.
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

/// CA certificates a `verify-full` connection trusts (parsed from PEM).
#[derive(Clone)]
pub struct CaCertificates {
    roots: Arc<RootCertStore>,
}

impl fmt::Debug for CaCertificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaCertificates")
            .field("certificates", &self.roots.len())
            .finish()
    }
}

impl CaCertificates {
    /// Every `CERTIFICATE` block of `pem` (other blocks are ignored). Refused: text that is not
    /// PEM, no certificate at all, or a certificate webpki cannot use as a trust anchor.
    pub fn from_pem(pem: &[u8]) -> Result<Self, PostgresTlsError> {
        let certificates = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| PostgresTlsError::Ca(format!("not valid PEM: {error}")))?;
        if certificates.is_empty() {
            return Err(PostgresTlsError::Ca(
                "holds no CERTIFICATE block".to_owned(),
            ));
        }
        let mut roots = RootCertStore::empty();
        for (index, certificate) in certificates.into_iter().enumerate() {
            roots.add(certificate).map_err(|error| {
                PostgresTlsError::Ca(format!(
                    "certificate {} cannot be a trust anchor: {error}",
                    index + 1
                ))
            })?;
        }
        Ok(Self {
            roots: Arc::new(roots),
        })
    }

    /// How many certificates are trusted.
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    /// Never true for a value [`CaCertificates::from_pem`] returned.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }
}

/// The TLS settings of the store's connections: a mode (or the default by host) and the CA
/// certificates for `verify-full`. Resolved against the URL's hosts when connecting.
#[derive(Debug, Clone, Default)]
pub struct PostgresTls {
    mode: Option<TlsMode>,
    ca: Option<CaCertificates>,
}

impl PostgresTls {
    /// The default: `verify-full` unless every host is local (see the module docs).
    pub fn by_host() -> Self {
        Self::default()
    }

    /// `mode` (`None`: by host) with `ca` for `verify-full`. CA certificates with `disable` or
    /// `require` are refused: they would not be used.
    pub fn new(
        mode: Option<TlsMode>,
        ca: Option<CaCertificates>,
    ) -> Result<Self, PostgresTlsError> {
        match (mode, &ca) {
            (Some(mode @ (TlsMode::Disable | TlsMode::Require)), Some(_)) => {
                Err(PostgresTlsError::CaUnused(mode))
            }
            (Some(TlsMode::VerifyFull), None) => Err(PostgresTlsError::NoCa {
                default: String::new(),
            }),
            _ => Ok(Self { mode, ca }),
        }
    }

    /// No TLS.
    pub fn disable() -> Self {
        Self {
            mode: Some(TlsMode::Disable),
            ca: None,
        }
    }

    /// TLS without certificate checks.
    pub fn require() -> Self {
        Self {
            mode: Some(TlsMode::Require),
            ca: None,
        }
    }

    /// TLS with the certificate checked against `ca` and the host name.
    pub fn verify_full(ca: CaCertificates) -> Self {
        Self {
            mode: Some(TlsMode::VerifyFull),
            ca: Some(ca),
        }
    }

    /// The configured mode (`None`: by host).
    pub fn mode(&self) -> Option<TlsMode> {
        self.mode
    }

    /// The mode for `config`'s hosts, checked against them and the URL's `sslmode`, and the
    /// connector that implements it. Sets `config`'s `sslmode` to what the mode needs (no
    /// `prefer`: never a silent fall-back to plain text).
    pub(super) fn resolve(&self, config: &mut Config) -> Result<Connector, PostgresTlsError> {
        let local = all_hosts_local(config);
        let (mode, default) = match (self.mode, &self.ca) {
            (Some(mode), _) => (mode, String::new()),
            (None, Some(_)) => (TlsMode::VerifyFull, String::new()),
            (None, None) if local => (TlsMode::Disable, String::new()),
            (None, None) => (
                TlsMode::VerifyFull,
                format!(
                    " (the default for {}, which is not loopback)",
                    first_remote_host(config)
                ),
            ),
        };
        let url_mode = match config.get_ssl_mode() {
            SslMode::Disable => Some(TlsMode::Disable),
            SslMode::Require => Some(TlsMode::Require),
            _ => None,
        };
        if let Some(url) = url_mode
            && url != mode
        {
            return Err(PostgresTlsError::UrlConflict {
                url: url.as_str(),
                mode,
                default,
            });
        }
        if mode == TlsMode::Disable {
            config.ssl_mode(SslMode::Disable);
            return Ok(Connector::Plain);
        }
        check_tls_hosts(config, mode)?;
        let client = match (mode, &self.ca) {
            (TlsMode::VerifyFull, Some(ca)) => verify_full_config(ca)?,
            (TlsMode::VerifyFull, None) => return Err(PostgresTlsError::NoCa { default }),
            _ => require_config()?,
        };
        config.ssl_mode(SslMode::Require);
        Ok(Connector::Tls(MakeRustlsConnect {
            config: Arc::new(client),
        }))
    }
}

/// A resolved mode: how [`super::connect_client`] opens connections.
#[derive(Debug, Clone)]
pub(super) enum Connector {
    Plain,
    Tls(MakeRustlsConnect),
}

impl Connector {
    /// Open one connection and drive it on its own task.
    pub(super) async fn connect(&self, config: &Config) -> Result<Client, tokio_postgres::Error> {
        match self {
            Self::Plain => {
                let (client, connection) = config.connect(NoTls).await?;
                drive(connection);
                Ok(client)
            }
            Self::Tls(tls) => {
                let (client, connection) = config.connect(tls.clone()).await?;
                drive(connection);
                Ok(client)
            }
        }
    }
}

fn drive<T>(connection: Connection<Socket, T>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(error = %error, "postgres connection ended");
        }
    });
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// TLS 1.3 and 1.2 (PostgreSQL's default `ssl_min_protocol_version` is TLSv1.2), ALPN
/// `postgresql` (required by PostgreSQL 17's direct negotiation, `sslnegotiation=direct`;
/// ignored by the classic `SSLRequest` negotiation).
fn client_config(
    builder: impl FnOnce(
        rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>,
    ) -> rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
) -> Result<ClientConfig, PostgresTlsError> {
    let versions = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|error| PostgresTlsError::Setup(error.to_string()))?;
    let mut config = builder(versions).with_no_client_auth();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

fn verify_full_config(ca: &CaCertificates) -> Result<ClientConfig, PostgresTlsError> {
    let roots = Arc::clone(&ca.roots);
    client_config(|builder| builder.with_root_certificates(roots))
}

fn require_config() -> Result<ClientConfig, PostgresTlsError> {
    let verifier = Arc::new(AnyCertificate {
        provider: provider(),
    });
    client_config(|builder| {
        builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
    })
}

/// Whether every host of `config` is a unix socket, `localhost` or a loopback address (a host
/// given only as `hostaddr` counts by that address).
fn all_hosts_local(config: &Config) -> bool {
    let hosts = config.get_hosts();
    let addresses = config.get_hostaddrs();
    (0..hosts.len().max(addresses.len())).all(|index| match hosts.get(index) {
        Some(Host::Unix(_)) => true,
        Some(Host::Tcp(name)) => is_local_name(name),
        None => addresses.get(index).is_some_and(IpAddr::is_loopback),
    })
}

fn is_local_name(name: &str) -> bool {
    name.eq_ignore_ascii_case("localhost")
        || name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

fn first_remote_host(config: &Config) -> String {
    let hosts = config.get_hosts();
    let addresses = config.get_hostaddrs();
    (0..hosts.len().max(addresses.len()))
        .find_map(|index| match hosts.get(index) {
            Some(Host::Tcp(name)) if !is_local_name(name) => Some(format!("host {name}")),
            None => addresses
                .get(index)
                .filter(|address| !address.is_loopback())
                .map(|address| format!("hostaddr {address}")),
            _ => None,
        })
        .unwrap_or_else(|| "the host".to_owned())
}

/// TLS needs every host to be a TCP host name (the name the certificate is checked against and
/// sent as SNI): PostgreSQL offers no TLS on unix sockets, and tokio-postgres has no name to
/// check for a bare `hostaddr`.
fn check_tls_hosts(config: &Config, mode: TlsMode) -> Result<(), PostgresTlsError> {
    let addresses = config.get_hostaddrs().len();
    let hosts = config.get_hosts();
    if hosts.len() < addresses {
        return Err(PostgresTlsError::Host {
            mode,
            reason: "a hostaddr without a host name: set host= to the name in the server's certificate (hostaddr= may stay, to pick the address)".to_owned(),
        });
    }
    for host in hosts {
        match host {
            Host::Unix(path) => {
                return Err(PostgresTlsError::Host {
                    mode,
                    reason: format!(
                        "the unix socket {} (PostgreSQL offers no TLS on unix sockets; use tls = \"disable\" for a local socket)",
                        path.display()
                    ),
                });
            }
            Host::Tcp(name) => {
                ServerName::try_from(name.as_str()).map_err(|_| PostgresTlsError::Host {
                    mode,
                    reason: format!("host {name:?}, which is not a DNS name or an IP address"),
                })?;
            }
        }
    }
    Ok(())
}

/// `require`: any certificate is accepted as the server's, but the handshake signatures are
/// still verified with it (so the peer holds the certificate's key and channel binding means
/// something).
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// tokio-postgres's TLS hook: one [`RustlsConnect`] per host it tries.
#[derive(Clone)]
pub(super) struct MakeRustlsConnect {
    config: Arc<ClientConfig>,
}

impl fmt::Debug for MakeRustlsConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MakeRustlsConnect").finish_non_exhaustive()
    }
}

impl<S> MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        let name = ServerName::try_from(domain.to_owned()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{domain:?} is not a DNS name or an IP address"),
            )
        })?;
        Ok(RustlsConnect {
            config: Arc::clone(&self.config),
            name,
        })
    }
}

/// The handshake with one server, verifying its certificate for `name`.
pub(super) struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl fmt::Debug for RustlsConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RustlsConnect")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let stream = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(RustlsStream(stream))
        })
    }
}

/// A TLS connection to PostgreSQL (tokio-rustls), with its channel binding.
#[derive(Debug)]
pub(super) struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|certificate| tls_server_end_point(certificate))
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// RFC 5929 §4.1 `tls-server-end-point`: the certificate's hash with the hash function of its
/// signature algorithm, SHA-256 if that is MD5 or SHA-1. `None` for algorithms without one
/// (RSA-PSS, whose hash sits in parameters; Ed25519) or a certificate that does not parse.
fn tls_server_end_point(certificate: &[u8]) -> Option<Vec<u8>> {
    use aws_lc_rs::digest;
    let algorithm = match signature_algorithm_oid(certificate)? {
        // md5WithRSAEncryption, sha1WithRSAEncryption, sha256WithRSAEncryption, ecdsa-with-SHA1,
        // ecdsa-with-SHA256.
        [
            0x2a,
            0x86,
            0x48,
            0x86,
            0xf7,
            0x0d,
            0x01,
            0x01,
            0x04 | 0x05 | 0x0b,
        ]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02] => &digest::SHA256,
        // sha384WithRSAEncryption, ecdsa-with-SHA384.
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03] => &digest::SHA384,
        // sha512WithRSAEncryption, ecdsa-with-SHA512.
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04] => &digest::SHA512,
        _ => return None,
    };
    Some(digest::digest(algorithm, certificate).as_ref().to_vec())
}

/// The OID (content bytes) of `Certificate.signatureAlgorithm` (RFC 5280 §4.1: `SEQUENCE {
/// tbsCertificate, signatureAlgorithm AlgorithmIdentifier, signatureValue }`), read with just
/// enough DER to skip `tbsCertificate`.
fn signature_algorithm_oid(certificate: &[u8]) -> Option<&[u8]> {
    let (certificate, _) = der_element(certificate, 0x30)?;
    let (_tbs, rest) = der_element(certificate, 0x30)?;
    let (algorithm, _) = der_element(rest, 0x30)?;
    let (oid, _) = der_element(algorithm, 0x06)?;
    Some(oid)
}

/// One DER element with `tag` at the start of `input`: its contents and what follows it.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, input) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&length, mut input) = input.split_first()?;
    let length = if length < 0x80 {
        usize::from(length)
    } else {
        let octets = usize::from(length & 0x7f);
        if octets == 0 || octets > 4 || input.len() < octets {
            return None;
        }
        let (bytes, rest) = input.split_at(octets);
        input = rest;
        bytes
            .iter()
            .fold(0usize, |value, &byte| (value << 8) | usize::from(byte))
    };
    (input.len() >= length).then(|| input.split_at(length))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> Config {
        url.parse().unwrap()
    }

    fn ca() -> CaCertificates {
        let ca = caregate_testkit::partner_server::TestCa::new("store tls unit test CA");
        CaCertificates::from_pem(ca.pem().as_bytes()).unwrap()
    }

    fn resolved_mode(tls: &PostgresTls, url: &str) -> Result<SslMode, PostgresTlsError> {
        let mut config = config(url);
        tls.resolve(&mut config).map(|_| config.get_ssl_mode())
    }

    #[test]
    fn default_is_disable_only_when_every_host_is_local() {
        let tls = PostgresTls::by_host();
        for url in [
            "host=127.0.0.1 user=u",
            "host=localhost user=u",
            "host=::1 user=u",
            "host=/run/postgresql user=u",
            "postgres://u@127.0.0.1:5433/db",
            "hostaddr=127.0.0.1 user=u",
            "host=/run/postgresql,localhost user=u",
        ] {
            assert_eq!(resolved_mode(&tls, url).unwrap(), SslMode::Disable, "{url}");
        }
        // Any remote host makes the default verify-full, which without a CA is refused
        // (rather than reached in clear or unverified), naming the host.
        for (url, named) in [
            ("host=db.internal user=u", "host db.internal"),
            ("postgres://u@10.0.0.5/db", "host 10.0.0.5"),
            ("host=localhost,db.internal user=u", "host db.internal"),
            // A tunnel: the name is remote though the address is loopback, and the name is
            // what a certificate can be checked against.
            (
                "host=db.internal hostaddr=127.0.0.1 user=u",
                "host db.internal",
            ),
        ] {
            let error = resolved_mode(&tls, url).unwrap_err();
            assert!(
                matches!(&error, PostgresTlsError::NoCa { default } if default.contains(named)),
                "{url}: {error}"
            );
            assert!(error.to_string().contains("ca_file"), "{error}");
        }
        // A remote bare address gets verify-full too (refused here: nothing to check a name
        // against).
        let error = resolved_mode(&tls, "hostaddr=10.1.2.3 user=u").unwrap_err();
        assert!(error.to_string().contains("verify-full"), "{error}");
        assert_eq!(
            first_remote_host(&config("hostaddr=10.1.2.3 user=u")),
            "hostaddr 10.1.2.3"
        );
        // With a CA, the default is verify-full even on loopback (the CA says what is wanted).
        let with_ca = PostgresTls::new(None, Some(ca())).unwrap();
        assert_eq!(
            resolved_mode(&with_ca, "host=localhost user=u").unwrap(),
            SslMode::Require
        );
    }

    #[test]
    fn tls_modes_never_fall_back_to_plain_text() {
        for tls in [PostgresTls::require(), PostgresTls::verify_full(ca())] {
            assert_eq!(
                resolved_mode(&tls, "host=db.internal user=u").unwrap(),
                SslMode::Require
            );
            // `prefer` in the URL (libpq's default) is satisfied by every mode.
            assert_eq!(
                resolved_mode(&tls, "host=db.internal user=u sslmode=prefer").unwrap(),
                SslMode::Require
            );
        }
        assert_eq!(
            resolved_mode(
                &PostgresTls::disable(),
                "host=db.internal user=u sslmode=prefer"
            )
            .unwrap(),
            SslMode::Disable
        );
    }

    #[test]
    fn url_sslmode_must_agree_with_the_mode() {
        let cases = [
            (
                PostgresTls::verify_full(ca()),
                "sslmode=require",
                "verify-full",
            ),
            (
                PostgresTls::verify_full(ca()),
                "sslmode=disable",
                "verify-full",
            ),
            (PostgresTls::require(), "sslmode=disable", "require"),
            (PostgresTls::disable(), "sslmode=require", "disable"),
            // The default for a remote host is verify-full: a URL secret saying `require` does
            // not weaken it.
            (
                PostgresTls::by_host(),
                "sslmode=require",
                "verify-full (the default",
            ),
        ];
        for (tls, sslmode, mode) in cases {
            let url = format!("host=db.internal user=u {sslmode}");
            let error = resolved_mode(&tls, &url).unwrap_err();
            let message = error.to_string();
            assert!(
                matches!(error, PostgresTlsError::UrlConflict { .. }),
                "{url}: {message}"
            );
            assert!(
                message.contains(sslmode) && message.contains(mode),
                "{message}"
            );
        }
        // Agreeing is fine, in both URL forms.
        assert_eq!(
            resolved_mode(&PostgresTls::require(), "host=db user=u sslmode=require").unwrap(),
            SslMode::Require
        );
        assert_eq!(
            resolved_mode(
                &PostgresTls::by_host(),
                "postgres://u@localhost/db?sslmode=disable"
            )
            .unwrap(),
            SslMode::Disable
        );
        // libpq's verify modes are not parsed by tokio-postgres: the URL is refused outright.
        assert!(
            "host=db user=u sslmode=verify-full"
                .parse::<Config>()
                .is_err()
        );
    }

    #[test]
    fn tls_needs_tcp_host_names() {
        for tls in [PostgresTls::require(), PostgresTls::verify_full(ca())] {
            let error = resolved_mode(&tls, "host=/run/postgresql user=u").unwrap_err();
            assert!(error.to_string().contains("unix socket"), "{error}");
            let error = resolved_mode(&tls, "hostaddr=10.0.0.5 user=u").unwrap_err();
            assert!(error.to_string().contains("host name"), "{error}");
            // A name with hostaddr picking the address is fine: the name is checked.
            resolved_mode(&tls, "host=db.internal hostaddr=10.0.0.5 user=u").unwrap();
        }
    }

    #[test]
    fn ca_with_a_mode_that_does_not_check_is_refused() {
        for mode in [TlsMode::Disable, TlsMode::Require] {
            assert_eq!(
                PostgresTls::new(Some(mode), Some(ca())).unwrap_err(),
                PostgresTlsError::CaUnused(mode)
            );
        }
        assert!(matches!(
            PostgresTls::new(Some(TlsMode::VerifyFull), None).unwrap_err(),
            PostgresTlsError::NoCa { .. }
        ));
    }

    #[test]
    fn ca_pem_errors_are_named() {
        let error = CaCertificates::from_pem(b"").unwrap_err();
        assert!(error.to_string().contains("no CERTIFICATE"), "{error}");
        let key_only = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let error = CaCertificates::from_pem(key_only.as_bytes()).unwrap_err();
        assert!(error.to_string().contains("no CERTIFICATE"), "{error}");
        let broken = "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";
        let error = CaCertificates::from_pem(broken.as_bytes()).unwrap_err();
        assert!(error.to_string().contains("not valid PEM"), "{error}");
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let error = CaCertificates::from_pem(garbage.as_bytes()).unwrap_err();
        assert!(error.to_string().contains("trust anchor"), "{error}");
        // Two CAs in one file are both trusted.
        let a = caregate_testkit::partner_server::TestCa::new("a");
        let b = caregate_testkit::partner_server::TestCa::new("b");
        let both = format!("{}{}", a.pem(), b.pem());
        assert_eq!(CaCertificates::from_pem(both.as_bytes()).unwrap().len(), 2);
    }

    #[test]
    fn channel_binding_hashes_with_the_certificates_signature_hash() {
        use rustls_pki_types::pem::PemObject as _;
        // rcgen's test certificates are ecdsa-with-SHA256.
        let ca = caregate_testkit::partner_server::TestCa::new("binding");
        let server = ca.issue_server();
        let der = CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).unwrap();
        assert_eq!(
            signature_algorithm_oid(&der),
            Some(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02][..])
        );
        let expected = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der);
        assert_eq!(
            tls_server_end_point(&der).as_deref(),
            Some(expected.as_ref())
        );
        // Truncated or foreign input yields no binding rather than a wrong one.
        assert_eq!(tls_server_end_point(&der[..der.len() / 2]), None);
        assert_eq!(tls_server_end_point(b"\x04\x00"), None);
    }

    /// Against a real server (`caregate_testkit::postgres`) that serves TLS with a certificate
    /// for `localhost`/127.0.0.1 from a test CA and refuses TCP without TLS (`hostssl` only).
    mod with_server {
        use std::sync::OnceLock;

        use caregate_testkit::partner_server::TestCa;
        use caregate_testkit::postgres::{
            PgServer, PgServerOptions, PgServerTls, SKIPPED_NO_POSTGRES,
        };

        use super::*;
        use crate::postgres::{Endpoint, connect_client, migrate};

        struct TlsServer {
            server: PgServer,
            /// The CA that issued the server's certificate, PEM.
            ca_pem: String,
        }

        fn tls_server() -> Option<&'static TlsServer> {
            static SERVER: OnceLock<Option<TlsServer>> = OnceLock::new();
            let server = SERVER.get_or_init(|| {
                let ca = TestCa::new("caregate test PostgreSQL CA");
                let issued = ca.issue_server();
                let options = PgServerOptions {
                    tls: Some(PgServerTls {
                        cert_pem: issued.cert_pem,
                        key_pem: issued.key_pem,
                        required: true,
                    }),
                };
                let server = PgServer::start_with(&options)?
                    .unwrap_or_else(|error| panic!("TLS PostgreSQL did not start: {error}"));
                Some(TlsServer {
                    server,
                    ca_pem: ca.pem().to_owned(),
                })
            });
            if server.is_none() {
                eprintln!("{SKIPPED_NO_POSTGRES}");
            }
            server.as_ref()
        }

        impl TlsServer {
            fn database(&self) -> String {
                self.server.create_database().unwrap()
            }

            fn verify_full(&self) -> PostgresTls {
                PostgresTls::verify_full(CaCertificates::from_pem(self.ca_pem.as_bytes()).unwrap())
            }
        }

        /// Whether this session is encrypted, asked on the connection itself.
        async fn session_ssl(client: &Client) -> (bool, String) {
            let row = client
                .query_one(
                    "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap();
            (
                row.get(0),
                row.get::<_, Option<String>>(1).unwrap_or_default(),
            )
        }

        async fn refusal(url: &str, tls: &PostgresTls) -> String {
            match migrate(url, tls).await {
                Ok(_) => panic!("connected to {url} with {tls:?}"),
                Err(error) => error.to_string(),
            }
        }

        #[tokio::test]
        async fn verify_full_with_the_servers_ca_connects_encrypted() {
            let Some(server) = tls_server() else { return };
            let url = server.database();
            let endpoint = Endpoint::new(&url, &server.verify_full()).unwrap();
            let client = connect_client(&endpoint, "tls test").await.unwrap();
            let (ssl, version) = session_ssl(&client).await;
            assert!(ssl, "the session is not encrypted");
            assert!(version.starts_with("TLSv1."), "{version}");
            // And the store's own path (migrations) works over it.
            migrate(&url, &server.verify_full()).await.unwrap();
        }

        #[tokio::test]
        async fn verify_full_refuses_a_certificate_from_another_ca() {
            let Some(server) = tls_server() else { return };
            let other = TestCa::new("some other CA");
            let tls =
                PostgresTls::verify_full(CaCertificates::from_pem(other.pem().as_bytes()).unwrap());
            let message = refusal(&server.database(), &tls).await;
            assert!(
                message.contains("TLS handshake") && message.contains("UnknownIssuer"),
                "{message}"
            );
        }

        #[tokio::test]
        async fn verify_full_refuses_a_certificate_for_another_host_name() {
            let Some(server) = tls_server() else { return };
            // The right address, but the name the certificate is checked against is not in it.
            let url = server
                .database()
                .replace("host=127.0.0.1", "host=db.example.test hostaddr=127.0.0.1");
            let message = refusal(&url, &server.verify_full()).await;
            assert!(
                message.contains("TLS handshake")
                    && message.contains("not valid for name")
                    && message.contains("db.example.test"),
                "{message}"
            );
        }

        #[tokio::test]
        async fn disable_is_refused_by_a_server_that_requires_tls() {
            let Some(server) = tls_server() else { return };
            let message = refusal(&server.database(), &PostgresTls::disable()).await;
            assert!(
                message.contains("no pg_hba.conf entry") && message.contains("no encryption"),
                "{message}"
            );
        }

        #[tokio::test]
        async fn require_encrypts_without_checking_the_certificate() {
            let Some(server) = tls_server() else { return };
            // No CA at all, and a host name the certificate does not name: `require` still
            // connects, encrypted (its documented weakness: no server authentication).
            let url = server
                .database()
                .replace("host=127.0.0.1", "host=db.example.test hostaddr=127.0.0.1");
            let endpoint = Endpoint::new(&url, &PostgresTls::require()).unwrap();
            let client = connect_client(&endpoint, "tls test").await.unwrap();
            assert!(session_ssl(&client).await.0);
        }

        #[tokio::test]
        async fn scram_channel_binding_is_accepted_by_the_server() {
            let Some(server) = tls_server() else { return };
            let url = server.database();
            let (admin, connection) = server
                .server
                .socket_url("postgres")
                .parse::<Config>()
                .unwrap()
                .connect(NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            admin
                .batch_execute(
                    "DO $$ BEGIN \
                       IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'scram_app') THEN \
                         SET password_encryption = 'scram-sha-256'; \
                         CREATE ROLE scram_app LOGIN PASSWORD 'not-a-secret'; \
                       END IF; \
                     END $$",
                )
                .await
                .unwrap();
            // `channel_binding=require`: SCRAM-SHA-256-PLUS or nothing, so the server checked
            // our tls-server-end-point hash against its own certificate.
            let url = url.replace("user=caregate", "user=scram_app password=not-a-secret")
                + " channel_binding=require";
            for tls in [server.verify_full(), PostgresTls::require()] {
                let endpoint = Endpoint::new(&url, &tls).unwrap();
                let client = connect_client(&endpoint, "tls test").await.unwrap();
                assert!(session_ssl(&client).await.0);
            }
        }
    }
}
