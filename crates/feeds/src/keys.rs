//! Per-feed pseudonymisation keys (DOMAIN.md `PSEU-2`: one key per recipient domain, rotation =
//! a new version): a TOML key file, mode 0600, outside the data directory's database.
//!
//! Pseudonyms are HMAC-SHA-256 under the feed's current key, so they are stable within a feed and
//! key version and unlinkable across feeds (different keys). The secret never appears in `Debug`,
//! errors or logs; `list` shows only a fingerprint (an HMAC of a fixed label, not the secret).

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::definition::valid_feed_id;

/// Bytes of secret per key (HMAC-SHA-256's block-size-friendly 256 bits).
const SECRET_BYTES: usize = 32;

/// One version of one feed's key.
#[derive(Clone, PartialEq, Eq)]
pub struct FeedKey {
    pub feed: String,
    pub version: u32,
    secret: Vec<u8>,
}

impl fmt::Debug for FeedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FeedKey")
            .field("feed", &self.feed)
            .field("version", &self.version)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl FeedKey {
    /// A key from known bytes (tests, benches). Production keys come from [`KeyFile`].
    pub fn from_secret(feed: &str, version: u32, secret: &[u8]) -> FeedKey {
        FeedKey {
            feed: feed.to_owned(),
            version,
            secret: secret.to_vec(),
        }
    }

    pub(crate) fn hmac_key(&self) -> aws_lc_rs::hmac::Key {
        aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.secret)
    }

    /// A public fingerprint for listings: 8 bytes of HMAC(secret, label), hex.
    pub fn fingerprint(&self) -> String {
        let tag = aws_lc_rs::hmac::sign(&self.hmac_key(), b"caregate-feeds/fingerprint");
        hex::encode(&tag.as_ref()[..8])
    }
}

/// Why the key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("key file {path}: readable by group or others (mode {mode:o}); chmod 600 it")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("feed {feed} already has a key; use rotate")]
    Exists { feed: String },
    #[error("feed {feed} has no key; create one with `caregate keys new {feed}`")]
    Missing { feed: String },
    #[error("'{0}' is not a valid feed id")]
    FeedId(String),
    #[error("no random bytes from the system")]
    Random,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileText {
    #[serde(default, rename = "key")]
    keys: Vec<KeyEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    feed: String,
    version: u32,
    #[serde(with = "time::serde::rfc3339")]
    created: OffsetDateTime,
    /// base64url, no padding.
    secret: String,
}

/// A listing row (no secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub feed: String,
    pub version: u32,
    pub created: OffsetDateTime,
    pub current: bool,
    pub fingerprint: String,
}

/// The key file: every version of every feed's key.
#[derive(Debug)]
pub struct KeyFile {
    path: PathBuf,
    keys: Vec<(KeyEntry, FeedKey)>,
}

impl KeyFile {
    /// Open the key file, or an empty one if it does not exist yet. Refuses a file that group or
    /// others can read.
    pub fn open(path: &Path) -> Result<KeyFile, KeyError> {
        let io = |e: std::io::Error| KeyError::Io {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(KeyFile {
                    path: path.to_owned(),
                    keys: Vec::new(),
                });
            }
            Err(e) => return Err(io(e)),
        };
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let parsed: KeyFileText = toml::from_str(&text).map_err(|e| KeyError::Invalid {
            path: path.to_owned(),
            // The parser's message only; never the offending text (it may be a secret).
            reason: e.message().to_owned(),
        })?;
        let mut keys = Vec::with_capacity(parsed.keys.len());
        for entry in parsed.keys {
            let secret = URL_SAFE_NO_PAD
                .decode(entry.secret.as_bytes())
                .ok()
                .filter(|s| s.len() == SECRET_BYTES)
                .ok_or_else(|| KeyError::Invalid {
                    path: path.to_owned(),
                    reason: format!(
                        "the secret of {} version {} is not {SECRET_BYTES} base64url bytes",
                        entry.feed, entry.version
                    ),
                })?;
            let key = FeedKey {
                feed: entry.feed.clone(),
                version: entry.version,
                secret,
            };
            keys.push((entry, key));
        }
        Ok(KeyFile {
            path: path.to_owned(),
            keys,
        })
    }

    /// The newest version of `feed`'s key.
    pub fn current(&self, feed: &str) -> Result<&FeedKey, KeyError> {
        self.keys
            .iter()
            .filter(|(_, key)| key.feed == feed)
            .map(|(_, key)| key)
            .max_by_key(|key| key.version)
            .ok_or_else(|| KeyError::Missing {
                feed: feed.to_owned(),
            })
    }

    /// A given version (to re-derive an older export's pseudonyms for IG re-identification).
    pub fn version(&self, feed: &str, version: u32) -> Option<&FeedKey> {
        self.keys
            .iter()
            .map(|(_, key)| key)
            .find(|key| key.feed == feed && key.version == version)
    }

    /// Every key version, without secrets, ordered by feed then version.
    pub fn list(&self) -> Vec<KeyInfo> {
        let mut rows: Vec<KeyInfo> = self
            .keys
            .iter()
            .map(|(entry, key)| KeyInfo {
                feed: key.feed.clone(),
                version: key.version,
                created: entry.created,
                current: self
                    .current(&key.feed)
                    .is_ok_and(|c| c.version == key.version),
                fingerprint: key.fingerprint(),
            })
            .collect();
        rows.sort_by(|a, b| (&a.feed, a.version).cmp(&(&b.feed, b.version)));
        rows
    }

    /// Create version 1 of `feed`'s key and save the file.
    pub fn create(&mut self, feed: &str) -> Result<KeyInfo, KeyError> {
        if self.current(feed).is_ok() {
            return Err(KeyError::Exists {
                feed: feed.to_owned(),
            });
        }
        self.add(feed, 1)
    }

    /// Start a new version of `feed`'s key and save the file. Older versions are kept.
    pub fn rotate(&mut self, feed: &str) -> Result<KeyInfo, KeyError> {
        let next = self.current(feed)?.version.saturating_add(1);
        self.add(feed, next)
    }

    fn add(&mut self, feed: &str, version: u32) -> Result<KeyInfo, KeyError> {
        if !valid_feed_id(feed) {
            return Err(KeyError::FeedId(feed.to_owned()));
        }
        let mut secret = vec![0u8; SECRET_BYTES];
        aws_lc_rs::rand::fill(&mut secret).map_err(|_| KeyError::Random)?;
        let entry = KeyEntry {
            feed: feed.to_owned(),
            version,
            created: OffsetDateTime::now_utc()
                .replace_nanosecond(0)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            secret: URL_SAFE_NO_PAD.encode(&secret),
        };
        let key = FeedKey {
            feed: feed.to_owned(),
            version,
            secret,
        };
        let info = KeyInfo {
            feed: feed.to_owned(),
            version,
            created: entry.created,
            current: true,
            fingerprint: key.fingerprint(),
        };
        self.keys.push((entry, key));
        self.save()?;
        Ok(info)
    }

    /// Write the file atomically: a new 0600 file beside it, fsync, rename.
    fn save(&self) -> Result<(), KeyError> {
        let io = |e: std::io::Error| KeyError::Io {
            path: self.path.clone(),
            reason: e.to_string(),
        };
        let text = KeyFileText {
            keys: self.keys.iter().map(|(entry, _)| entry.clone()).collect(),
        };
        let body = toml::to_string(&text).map_err(|e| KeyError::Invalid {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let temporary = self
            .path
            .with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io)?;
        let written = file
            .write_all(b"# caregate feed keys: SECRET. Mode 0600; never in the data directory, never logged.\n")
            .and_then(|()| file.write_all(body.as_bytes()))
            .and_then(|()| file.sync_all());
        if let Err(e) = written.and_then(|()| std::fs::rename(&temporary, &self.path)) {
            let _ = std::fs::remove_file(&temporary);
            return Err(io(e));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseu_2_keys_are_versioned_private_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let mut file = KeyFile::open(&path).unwrap();
        let first = file.create("icb-qe1-population-health").unwrap();
        assert_eq!(first.version, 1);
        assert!(matches!(
            file.create("icb-qe1-population-health"),
            Err(KeyError::Exists { .. })
        ));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let rotated = file.rotate("icb-qe1-population-health").unwrap();
        assert_eq!(rotated.version, 2);
        let reopened = KeyFile::open(&path).unwrap();
        let current = reopened.current("icb-qe1-population-health").unwrap();
        assert_eq!(current.version, 2);
        assert_ne!(
            reopened.version("icb-qe1-population-health", 1).unwrap(),
            current
        );
        let listed = reopened.list();
        assert_eq!(listed.len(), 2);
        assert!(listed[1].current && !listed[0].current);

        let debug = format!("{current:?}");
        let text = std::fs::read_to_string(&path).unwrap();
        let secret_line = text.lines().find(|l| l.starts_with("secret")).unwrap();
        let secret = secret_line.split('"').nth(1).unwrap();
        assert!(!debug.contains(secret));
        assert!(!format!("{listed:?}").contains(secret));
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        KeyFile::open(&path).unwrap().create("feed-a").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            KeyFile::open(&path),
            Err(KeyError::Permissions { .. })
        ));
    }

    #[test]
    fn missing_key_names_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let file = KeyFile::open(&dir.path().join("none.toml")).unwrap();
        let error = file.current("feed-a").unwrap_err().to_string();
        assert!(error.contains("caregate keys new feed-a"), "{error}");
    }
}
