//! TLS for the edge: rustls 0.23 with the aws-lc-rs provider, TLS 1.2 and 1.3 only, ALPN `h2` and
//! `http/1.1`, optional client certificates (mTLS) verified against a configured CA.
//!
//! Dev mode: with no certificate configured, a self-signed ECDSA P-256 certificate is generated
//! for `localhost` at start-up, and the gateway says so loudly. Never use dev mode in production.

use std::io;
use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::digest;
use base64::Engine as _;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ClientAuth, TlsSection};

/// Why TLS could not be set up. Names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA bundle unusable: {0}")]
    ClientCa(String),
    #[error("cannot generate the dev certificate: {0}")]
    DevCert(String),
}

/// The built server TLS configuration and whether it is the dev-mode self-signed one.
#[derive(Debug)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    /// PEM of the generated dev certificate, when in dev mode (so tools and tests can trust it).
    pub dev_certificate_pem: Option<String>,
}

fn file_error(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Build the listener's TLS configuration from the `[tls]` section.
pub fn server_config(section: &TlsSection) -> Result<ServerTls, TlsError> {
    let (chain, key, dev_certificate_pem) = match (&section.cert, &section.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| file_error(cert, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_error(cert, e))?;
            if chain.is_empty() {
                return Err(file_error(cert, "no CERTIFICATE blocks found"));
            }
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
            (chain, key, None)
        }
        _ => {
            let dev = dev_certificate(&["localhost", "127.0.0.1", "::1"])?;
            (vec![dev.cert_der], dev.key_der, Some(dev.cert_pem))
        }
    };

    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match section.client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        mode => {
            let ca_path = section
                .client_ca
                .as_deref()
                .ok_or_else(|| TlsError::ClientCa("client_auth needs client_ca".into()))?;
            let mut roots = RootCertStore::empty();
            for cert in
                CertificateDer::pem_file_iter(ca_path).map_err(|e| file_error(ca_path, e))?
            {
                let cert = cert.map_err(|e| file_error(ca_path, e))?;
                roots
                    .add(cert)
                    .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = if mode == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        dev_certificate_pem,
    })
}

/// A generated self-signed certificate.
#[derive(Debug)]
pub struct DevCertificate {
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_der: PrivateKeyDer<'static>,
    pub key_pem: String,
}

/// Generate a self-signed ECDSA P-256 certificate for the given names (rcgen).
pub fn dev_certificate(names: &[&str]) -> Result<DevCertificate, TlsError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| TlsError::DevCert(e.to_string()))?;
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params =
        rcgen::CertificateParams::new(names).map_err(|e| TlsError::DevCert(e.to_string()))?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "caregate dev certificate (NOT FOR PRODUCTION)",
    );
    let cert = params
        .self_signed(&key)
        .map_err(|e| TlsError::DevCert(e.to_string()))?;
    let key_pem = key.serialize_pem();
    let key_der = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| TlsError::DevCert(e.to_string()))?;
    Ok(DevCertificate {
        cert_pem: cert.pem(),
        cert_der: cert.der().clone(),
        key_der,
        key_pem,
    })
}

/// The RFC 8705 `x5t#S256` thumbprint of a certificate: base64url (no padding) SHA-256 of its DER.
pub fn certificate_thumbprint(cert: &CertificateDer<'_>) -> String {
    let hash = digest::digest(&digest::SHA256, cert.as_ref());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hash.as_ref())
}

/// Error kinds during accept that are the peer's doing (logged at debug, not as failures).
pub fn is_peer_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidData
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_mode_builds_a_config_with_alpn() {
        let tls = server_config(&TlsSection::default()).unwrap();
        assert!(tls.dev_certificate_pem.is_some());
        assert_eq!(
            tls.config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn missing_cert_file_names_the_file() {
        let section = TlsSection {
            cert: Some("/nonexistent/cert.pem".into()),
            key: Some("/nonexistent/key.pem".into()),
            ..TlsSection::default()
        };
        let err = server_config(&section).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/cert.pem"), "{err}");
    }

    #[test]
    fn thumbprint_is_base64url_sha256() {
        let dev = dev_certificate(&["localhost"]).unwrap();
        let thumb = certificate_thumbprint(&dev.cert_der);
        assert_eq!(thumb.len(), 43);
        assert!(!thumb.contains('=') && !thumb.contains('+') && !thumb.contains('/'));
    }
}
