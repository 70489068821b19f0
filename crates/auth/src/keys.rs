//! Keys: the gateway's own ES256 signing key, and partners' registered verification keys.
//!
//! Partner keys come only from the registration's JWKS, looked up by the assertion's `kid`
//! within the asserting client's own set. Header parameters that point at other keys (`jku`,
//! `x5u`, `jwk`, `x5c`) are never consulted and never fetched (RFC 8725 §3.10, DOMAIN.md B2
//! row B5). Each registered key is tied to its key type and curve, and only the algorithms of
//! that family may use it (RFC 8725 §2.1, §3.1): an RSA key never verifies an HMAC or ECDSA
//! signature, a P-384 key never verifies ES256.

use aws_lc_rs::digest;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED,
    EcdsaKeyPair, KeyPair as _, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA384,
    RsaPublicKeyComponents,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};

use crate::error::AuthSetupError;

/// The client-assertion `alg` allow-list (SMART Backend Services: RS384 and ES384 required;
/// RS512 for NHS API Platform clients; ES256 as a compact EC option).
pub(crate) fn assertion_algorithm(alg: &str) -> Option<Algorithm> {
    match alg {
        "RS384" => Some(Algorithm::RS384),
        "RS512" => Some(Algorithm::RS512),
        "ES384" => Some(Algorithm::ES384),
        "ES256" => Some(Algorithm::ES256),
        _ => None,
    }
}

/// The key type and curve of a registered key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
}

impl KeyKind {
    fn permits(self, alg: Algorithm) -> bool {
        matches!(
            (self, alg),
            (Self::Rsa, Algorithm::RS384 | Algorithm::RS512)
                | (Self::P384, Algorithm::ES384)
                | (Self::P256, Algorithm::ES256)
        )
    }
}

/// A partner's registered public key, checked at start-up.
#[derive(Debug, Clone)]
pub(crate) struct VerifyingKey {
    kind: KeyKind,
    /// The JWK's own `alg`, when it names one: then only that algorithm may use the key.
    declared: Option<Algorithm>,
    decoding: DecodingKey,
}

impl VerifyingKey {
    /// The decoding key, if this key may verify `alg` signatures.
    pub(crate) fn for_algorithm(&self, alg: Algorithm) -> Option<&DecodingKey> {
        let declared_ok = self.declared.is_none_or(|declared| declared == alg);
        (declared_ok && self.kind.permits(alg)).then_some(&self.decoding)
    }

    /// Validates one JWK of `client_id`'s registration. `index` names keys without a `kid`.
    pub(crate) fn from_jwk(
        client_id: &str,
        index: usize,
        jwk: &Jwk,
    ) -> Result<(String, VerifyingKey), AuthSetupError> {
        let kid = jwk.common.key_id.clone().filter(|kid| !kid.is_empty());
        let fail = |reason: &'static str| AuthSetupError::Key {
            client_id: client_id.to_owned(),
            kid: kid.clone().unwrap_or_else(|| format!("#{index}")),
            reason,
        };
        let Some(kid) = kid.clone() else {
            return Err(fail("every key needs a kid"));
        };
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != PublicKeyUse::Signature)
        {
            return Err(fail("use must be sig"));
        }
        if jwk
            .common
            .key_operations
            .as_ref()
            .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
        {
            return Err(fail("key_ops must include verify"));
        }
        let declared = match jwk.common.key_algorithm {
            None => None,
            Some(KeyAlgorithm::RS384) => Some(Algorithm::RS384),
            Some(KeyAlgorithm::RS512) => Some(Algorithm::RS512),
            Some(KeyAlgorithm::ES384) => Some(Algorithm::ES384),
            Some(KeyAlgorithm::ES256) => Some(Algorithm::ES256),
            Some(_) => return Err(fail("alg must be RS384, RS512, ES384 or ES256")),
        };
        let (kind, decoding) = match &jwk.algorithm {
            AlgorithmParameters::RSA(rsa) => {
                let n = decode_b64url(&rsa.n).ok_or_else(|| fail("n is not base64url"))?;
                let e = decode_b64url(&rsa.e).ok_or_else(|| fail("e is not base64url"))?;
                if !(2048..=8192).contains(&bit_length(&n)) || n.first() == Some(&0) {
                    return Err(fail(
                        "RSA modulus must be 2048 to 8192 bits, minimally encoded",
                    ));
                }
                RsaPublicKeyComponents {
                    n: n.as_slice(),
                    e: e.as_slice(),
                }
                .to_parsed_public_key(&RSA_PKCS1_2048_8192_SHA384)
                .map_err(|_| fail("not a usable RSA public key"))?;
                (KeyKind::Rsa, DecodingKey::from_rsa_raw_components(&n, &e))
            }
            AlgorithmParameters::EllipticCurve(ec) => {
                let (kind, size, verification) = match ec.curve {
                    EllipticCurve::P256 => (KeyKind::P256, 32, &ECDSA_P256_SHA256_FIXED),
                    EllipticCurve::P384 => (KeyKind::P384, 48, &ECDSA_P384_SHA384_FIXED),
                    _ => return Err(fail("EC keys must be on P-256 or P-384")),
                };
                let x = decode_b64url(&ec.x).filter(|x| x.len() == size);
                let y = decode_b64url(&ec.y).filter(|y| y.len() == size);
                let (Some(x), Some(y)) = (x, y) else {
                    return Err(fail(
                        "x and y must be base64url coordinates of the curve's size",
                    ));
                };
                let point = [&[0x04][..], &x, &y].concat();
                ParsedPublicKey::new(verification, &point)
                    .map_err(|_| fail("not a point on the curve"))?;
                (kind, DecodingKey::from_ec_der(&point))
            }
            AlgorithmParameters::OctetKey(_) => {
                return Err(fail("symmetric keys are not accepted (RFC 8725 §2.1)"));
            }
            _ => return Err(fail("key type must be RSA or EC")),
        };
        if declared.is_some_and(|alg| !kind.permits(alg)) {
            return Err(fail("alg does not match the key type or curve"));
        }
        Ok((
            kid,
            VerifyingKey {
                kind,
                declared,
                decoding,
            },
        ))
    }
}

fn decode_b64url(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text).ok()
}

fn bit_length(big_endian: &[u8]) -> usize {
    let leading_zero_bytes = big_endian.iter().take_while(|byte| **byte == 0).count();
    let significant = &big_endian[leading_zero_bytes..];
    significant.first().map_or(0, |first| {
        significant.len() * 8 - first.leading_zeros() as usize
    })
}

/// The gateway's own access-token signing key: ECDSA P-256, used with ES256 only.
pub struct SigningKey {
    kid: String,
    x: String,
    y: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh key held only in memory: tokens it signs die with the process.
    pub fn generate() -> Result<SigningKey, AuthSetupError> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| AuthSetupError::SigningKey("could not generate a P-256 key"))?;
        let pkcs8 = pair
            .to_pkcs8v1()
            .map_err(|_| AuthSetupError::SigningKey("could not encode the generated key"))?;
        Self::from_key_pair(&pair, pkcs8.as_ref())
    }

    /// Loads a P-256 private key from a PKCS#8 `PRIVATE KEY` PEM block (RFC 5208, RFC 7468).
    pub fn from_pkcs8_pem(pem: &str) -> Result<SigningKey, AuthSetupError> {
        let encoding = EncodingKey::from_ec_pem(pem.as_bytes())
            .map_err(|_| AuthSetupError::SigningKey("not a PKCS#8 EC private key PEM"))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, encoding.as_bytes())
            .map_err(|_| AuthSetupError::SigningKey("not a P-256 private key"))?;
        Self::from_key_pair(&pair, encoding.as_bytes())
    }

    fn from_key_pair(pair: &EcdsaKeyPair, pkcs8: &[u8]) -> Result<SigningKey, AuthSetupError> {
        // aws-lc-rs gives the uncompressed SEC1 point: 0x04 || x || y.
        let point = pair.public_key().as_ref();
        let (Some(x), Some(y)) = (point.get(1..33), point.get(33..65)) else {
            return Err(AuthSetupError::SigningKey("unexpected public key encoding"));
        };
        let x = URL_SAFE_NO_PAD.encode(x);
        let y = URL_SAFE_NO_PAD.encode(y);
        // RFC 7638 JWK thumbprint: required members in lexicographic order, no whitespace.
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, canonical.as_bytes()));
        Ok(SigningKey {
            kid,
            x,
            y,
            encoding: EncodingKey::from_ec_der(pkcs8),
            decoding: DecodingKey::from_ec_der(point),
        })
    }

    /// The key id: the RFC 7638 SHA-256 thumbprint of the public key.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK (RFC 7517, RFC 7518 §6.2).
    pub fn public_jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "x": self.x,
            "y": self.y,
            "kid": self.kid,
            "alg": "ES256",
            "use": "sig",
        })
    }

    pub(crate) fn encoding(&self) -> &EncodingKey {
        &self.encoding
    }

    pub(crate) fn decoding(&self) -> &DecodingKey {
        &self.decoding
    }
}
