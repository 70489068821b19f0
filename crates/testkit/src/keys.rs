//! Partner signing keys for tests, demos and benchmarks.
//!
//! A [`PartnerKey`] plays the part of an ICS partner's SMART Backend Services client: it owns a
//! private key, publishes the matching public JWK (RFC 7517) for the partner's registration, and
//! signs client assertions (RFC 7523 §2.2, SMART Backend Services "Protocol details").
//!
//! Signing goes straight through aws-lc-rs rather than through `jsonwebtoken`, so that tests can
//! craft the malformed and hostile tokens DOMAIN.md B2 row B5 asks for (any header, any claims,
//! `alg: none`, HS256 keyed with a public key) and so that the gateway's verifier is exercised
//! against an independent signer.
//!
//! Panics: key generation and signing panic only if aws-lc-rs itself fails (its RNG or an
//! internal error); inputs that can be wrong, such as a PEM, give a [`KeyError`].

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::hmac;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{
    self, ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
    EcdsaSigningAlgorithm, KeyPair as _, RsaEncoding,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Map, Value, json};

/// Lifetime of the assertions [`PartnerKey::sign_assertion`] makes: inside the five minutes that
/// SMART Backend Services and the NHS signed-JWT guide allow.
pub const ASSERTION_LIFETIME_SECS: i64 = 240;

/// The JWS algorithm a partner key signs with (RFC 7518 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-384 (RSA 2048).
    Rs384,
    /// ECDSA P-384 with SHA-384.
    Es384,
    /// ECDSA P-256 with SHA-256.
    Es256,
}

impl KeyAlg {
    /// The `alg` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rs384 => "RS384",
            Self::Es384 => "ES384",
            Self::Es256 => "ES256",
        }
    }

    fn ecdsa(self) -> Option<&'static EcdsaSigningAlgorithm> {
        match self {
            Self::Rs384 => None,
            Self::Es384 => Some(&ECDSA_P384_SHA384_FIXED_SIGNING),
            Self::Es256 => Some(&ECDSA_P256_SHA256_FIXED_SIGNING),
        }
    }
}

/// Why a key could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The text is not a single `PRIVATE KEY` PEM block with valid base64.
    Pem,
    /// The DER is not a PKCS#8 private key of the stated algorithm.
    KeyRejected,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pem => f.write_str("not a PKCS#8 PRIVATE KEY PEM block"),
            Self::KeyRejected => f.write_str("the key does not match the stated algorithm"),
        }
    }
}

impl std::error::Error for KeyError {}

enum Material {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// A partner's private signing key with its key id.
pub struct PartnerKey {
    kid: String,
    alg: KeyAlg,
    material: Material,
}

impl std::fmt::Debug for PartnerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material, even in test output.
        f.debug_struct("PartnerKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl PartnerKey {
    /// A fresh RSA 2048 key for RS384.
    ///
    /// # Panics
    /// If aws-lc-rs cannot generate a key.
    pub fn generate_rs384(kid: &str) -> Self {
        let pair = RsaKeyPair::generate(KeySize::Rsa2048)
            .unwrap_or_else(|_| panic!("aws-lc-rs failed to generate an RSA key"));
        Self {
            kid: kid.to_owned(),
            alg: KeyAlg::Rs384,
            material: Material::Rsa(pair),
        }
    }

    /// A fresh P-384 key for ES384.
    ///
    /// # Panics
    /// If aws-lc-rs cannot generate a key.
    pub fn generate_es384(kid: &str) -> Self {
        Self::generate_ec(kid, KeyAlg::Es384, &ECDSA_P384_SHA384_FIXED_SIGNING)
    }

    /// A fresh P-256 key for ES256.
    ///
    /// # Panics
    /// If aws-lc-rs cannot generate a key.
    pub fn generate_es256(kid: &str) -> Self {
        Self::generate_ec(kid, KeyAlg::Es256, &ECDSA_P256_SHA256_FIXED_SIGNING)
    }

    fn generate_ec(kid: &str, alg: KeyAlg, curve: &'static EcdsaSigningAlgorithm) -> Self {
        let pair = EcdsaKeyPair::generate(curve)
            .unwrap_or_else(|_| panic!("aws-lc-rs failed to generate an EC key"));
        Self {
            kid: kid.to_owned(),
            alg,
            material: Material::Ec(pair),
        }
    }

    /// Loads a key written by [`PartnerKey::private_pem`] (PKCS#8, RFC 5208).
    pub fn from_private_pem(kid: &str, alg: KeyAlg, pem: &str) -> Result<Self, KeyError> {
        let der = pem_decode(pem, "PRIVATE KEY").ok_or(KeyError::Pem)?;
        let material = match alg.ecdsa() {
            None => Material::Rsa(RsaKeyPair::from_pkcs8(&der).map_err(|_| KeyError::KeyRejected)?),
            Some(curve) => Material::Ec(
                EcdsaKeyPair::from_pkcs8(curve, &der).map_err(|_| KeyError::KeyRejected)?,
            ),
        };
        Ok(Self {
            kid: kid.to_owned(),
            alg,
            material,
        })
    }

    /// The key id (`kid`).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm this key signs with.
    pub fn alg(&self) -> KeyAlg {
        self.alg
    }

    /// The private key as a PKCS#8 `PRIVATE KEY` PEM block.
    ///
    /// # Panics
    /// If aws-lc-rs cannot serialise the key.
    pub fn private_pem(&self) -> String {
        let der = match &self.material {
            Material::Rsa(pair) => {
                AsDer::<Pkcs8V1Der<'static>>::as_der(pair).map(|der| der.as_ref().to_vec())
            }
            Material::Ec(pair) => pair.to_pkcs8v1().map(|doc| doc.as_ref().to_vec()),
        }
        .unwrap_or_else(|_| panic!("aws-lc-rs failed to serialise a private key"));
        pem_encode("PRIVATE KEY", &der)
    }

    /// The public key as a SubjectPublicKeyInfo `PUBLIC KEY` PEM block (RFC 5280), which is what
    /// a key/algorithm-confusion attacker would use as an HMAC secret (RFC 8725 §2.1).
    ///
    /// # Panics
    /// If aws-lc-rs cannot serialise the key.
    pub fn public_pem(&self) -> String {
        let der = match &self.material {
            Material::Rsa(pair) => AsDer::<PublicKeyX509Der<'static>>::as_der(pair.public_key())
                .map(|der| der.as_ref().to_vec()),
            Material::Ec(pair) => AsDer::<PublicKeyX509Der<'static>>::as_der(pair.public_key())
                .map(|der| der.as_ref().to_vec()),
        }
        .unwrap_or_else(|_| panic!("aws-lc-rs failed to serialise a public key"));
        pem_encode("PUBLIC KEY", &der)
    }

    /// The public JWK (RFC 7517 §4, RFC 7518 §6): `kid`, `kty`, `alg`, `use: sig`, and `n`/`e` or
    /// `crv`/`x`/`y`, base64url without padding.
    pub fn jwk(&self) -> Value {
        match &self.material {
            Material::Rsa(pair) => {
                let public = pair.public_key();
                json!({
                    "kty": "RSA",
                    "kid": self.kid,
                    "alg": self.alg.as_str(),
                    "use": "sig",
                    "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
                    "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
                })
            }
            Material::Ec(pair) => {
                // aws-lc-rs gives the uncompressed SEC1 point: 0x04 || x || y.
                let point = pair.public_key().as_ref();
                let coordinates = point.get(1..).unwrap_or_default();
                let (x, y) = coordinates.split_at(coordinates.len() / 2);
                let crv = if self.alg == KeyAlg::Es384 {
                    "P-384"
                } else {
                    "P-256"
                };
                json!({
                    "kty": "EC",
                    "kid": self.kid,
                    "alg": self.alg.as_str(),
                    "use": "sig",
                    "crv": crv,
                    "x": URL_SAFE_NO_PAD.encode(x),
                    "y": URL_SAFE_NO_PAD.encode(y),
                })
            }
        }
    }

    /// A JWK Set (RFC 7517 §5) holding the public halves of `keys`.
    pub fn jwks(keys: &[&PartnerKey]) -> Value {
        json!({ "keys": keys.iter().map(|key| key.jwk()).collect::<Vec<_>>() })
    }

    /// The claims of a well-formed client assertion (SMART Backend Services, "Authentication
    /// JWT"): `iss` = `sub` = the client id, `aud` = the token endpoint, `exp` 240 s ahead, `iat`
    /// now, and a fresh `jti`. Tests change one field and sign with [`PartnerKey::sign_claims`].
    pub fn assertion_claims(client_id: &str, token_endpoint: &str) -> Value {
        let now = unix_now();
        json!({
            "iss": client_id,
            "sub": client_id,
            "aud": token_endpoint,
            "exp": now + ASSERTION_LIFETIME_SECS,
            "iat": now,
            "jti": uuid::Uuid::new_v4().to_string(),
        })
    }

    /// A fresh, valid client assertion for `client_id` at `token_endpoint`.
    pub fn sign_assertion(&self, client_id: &str, token_endpoint: &str) -> String {
        self.sign_claims(
            &Self::assertion_claims(client_id, token_endpoint),
            &json!({}),
        )
    }

    /// Signs arbitrary claims. The header starts as `{"alg": <own alg>, "typ": "JWT", "kid": <own
    /// kid>}`; each member of `header_overrides` (a JSON object) replaces or adds a member, and a
    /// `null` removes it. The signature uses the header's final `alg` when this key can produce
    /// it (an RSA key signs RS256/RS384/RS512/PS256/PS384/PS512, an EC key its own curve's alg),
    /// and the key's own algorithm otherwise, so a lying `alg` yields a mismatched signature.
    ///
    /// # Panics
    /// If aws-lc-rs fails to sign.
    pub fn sign_claims(&self, claims: &Value, header_overrides: &Value) -> String {
        let mut header = Map::new();
        header.insert("alg".into(), Value::from(self.alg.as_str()));
        header.insert("typ".into(), Value::from("JWT"));
        header.insert("kid".into(), Value::from(self.kid.as_str()));
        if let Some(overrides) = header_overrides.as_object() {
            for (name, value) in overrides {
                if value.is_null() {
                    header.remove(name);
                } else {
                    header.insert(name.clone(), value.clone());
                }
            }
        }
        let header = Value::Object(header);
        let signing_input = signing_input(&header, claims);
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let signature = self.sign_bytes(alg, signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    fn sign_bytes(&self, alg: &str, message: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.material {
            Material::Rsa(pair) => {
                let encoding: &'static dyn RsaEncoding = match alg {
                    "RS256" => &signature::RSA_PKCS1_SHA256,
                    "RS512" => &signature::RSA_PKCS1_SHA512,
                    "PS256" => &signature::RSA_PSS_SHA256,
                    "PS384" => &signature::RSA_PSS_SHA384,
                    "PS512" => &signature::RSA_PSS_SHA512,
                    _ => &signature::RSA_PKCS1_SHA384,
                };
                let mut out = vec![0; pair.public_modulus_len()];
                pair.sign(encoding, &rng, message, &mut out)
                    .unwrap_or_else(|_| panic!("aws-lc-rs failed to sign with RSA"));
                out
            }
            Material::Ec(pair) => pair
                .sign(&rng, message)
                .map(|sig| sig.as_ref().to_vec())
                .unwrap_or_else(|_| panic!("aws-lc-rs failed to sign with ECDSA")),
        }
    }
}

/// An unsecured JWS (`alg: none`, RFC 7519 §6): the two encoded parts and an empty signature.
pub fn unsigned_token(header: &Value, claims: &Value) -> String {
    format!("{}.", signing_input(header, claims))
}

/// A JWS whose signature is HMAC-SHA256 keyed with `secret`, whatever the header says: with the
/// victim's public key PEM as `secret` and `"alg": "HS256"` this is the key/algorithm confusion
/// attack of RFC 8725 §2.1.
pub fn hmac_token(secret: &[u8], header: &Value, claims: &Value) -> String {
    let input = signing_input(header, claims);
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_decode(pem: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = pem[start..].find(&end)? + start;
    let body: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    STANDARD.decode(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_pem_round_trips_for_every_algorithm() {
        for key in [
            PartnerKey::generate_rs384("rsa"),
            PartnerKey::generate_es384("p384"),
            PartnerKey::generate_es256("p256"),
        ] {
            let loaded = PartnerKey::from_private_pem(key.kid(), key.alg(), &key.private_pem())
                .expect("pem loads");
            assert_eq!(loaded.jwk(), key.jwk());
        }
    }

    #[test]
    fn from_private_pem_rejects_wrong_algorithm_and_garbage() {
        let key = PartnerKey::generate_es384("p384");
        assert_eq!(
            PartnerKey::from_private_pem("k", KeyAlg::Es256, &key.private_pem()).err(),
            Some(KeyError::KeyRejected)
        );
        assert_eq!(
            PartnerKey::from_private_pem("k", KeyAlg::Es256, "nope").err(),
            Some(KeyError::Pem)
        );
    }

    #[test]
    fn jwk_has_rfc7518_members() {
        let rsa = PartnerKey::generate_rs384("r1").jwk();
        assert_eq!(rsa["kty"], "RSA");
        assert_eq!(rsa["e"], "AQAB");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(rsa["n"].as_str().unwrap_or_default())
                .map(|n| n.len()),
            Ok(256)
        );
        let ec = PartnerKey::generate_es384("e1").jwk();
        assert_eq!(ec["crv"], "P-384");
        assert_eq!(ec["use"], "sig");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(ec["x"].as_str().unwrap_or_default())
                .map(|x| x.len()),
            Ok(48)
        );
    }

    #[test]
    fn sign_claims_applies_header_overrides() {
        let key = PartnerKey::generate_es256("k1");
        let token = key.sign_claims(&json!({"a": 1}), &json!({"kid": null, "jku": "https://x"}));
        let header = token.split('.').next().unwrap_or_default();
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).expect("b64")).expect("json");
        assert_eq!(
            header,
            json!({"alg": "ES256", "typ": "JWT", "jku": "https://x"})
        );
    }
}
