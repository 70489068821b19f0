//! The NATS JetStream sink for feeds (issue 8): a finished export, published to a stream of its
//! own feed so analytics consumers can subscribe instead of polling Bulk Data `$export`.
//!
//! Only *finished* exports are published, never records one by one: disclosure control
//! (k-anonymity, `KANON`/`SDC-1`) is a property of a whole release, so what reaches the stream is
//! exactly what the export's files hold, after opt-outs, pseudonymisation and suppression, and the
//! release report travels with it.
//!
//! - **Stream per feed**: `caregate-feed-<feed id>` with file storage, subjects
//!   `caregate.feed.<feed id>.>`; one message per NDJSON line on
//!   `caregate.feed.<feed id>.<ResourceType>`, then the manifest (file list, key version, release
//!   report) on `caregate.feed.<feed id>.manifest` — a consumer that has the manifest of an export
//!   has every line before it in the stream.
//! - **Acknowledged, deduplicated**: every message carries `Nats-Msg-Id` =
//!   `<export id>/<ResourceType>/<line number>` (or `<export id>/manifest`) and is published with
//!   a JetStream acknowledgement awaited before the export counts as published. Publishing the same
//!   export again (after a crash, or by an operator) stores nothing twice within the stream's
//!   duplicate window ([`SinkOptions::duplicate_window`], 24 hours by default).
//! - **Durability**: a JetStream acknowledgement means the server *stored* the message, not that it
//!   reached the disk: JetStream's default `sync_interval` flushes to disk every two minutes. Where
//!   loss is unacceptable run the server with `jetstream { sync_interval: always }` (fsync per
//!   message), as the tests do — see deploy/CONFIG.md.
//!
//! Messages hold pseudonymised FHIR only (what the export files hold); no subject, header or error
//! message carries a patient identifier.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;

use crate::export::{ExportManifest, MANIFEST_FILE};

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("cannot create or read the JetStream stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("publishing to {subject} failed: {reason}")]
    Publish { subject: String, reason: String },
    #[error("cannot read the export file {file}: {reason}")]
    Read { file: String, reason: String },
    #[error(
        "the feed id {0:?} cannot be used in a NATS subject (letters, digits, '-' and '_' only)"
    )]
    FeedId(String),
}

/// How the sink talks to JetStream.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// How long JetStream remembers message ids to drop repeats (a stream setting; applies when
    /// the stream is created).
    pub duplicate_window: Duration,
    /// Messages published and not yet acknowledged, at most.
    pub in_flight: usize,
}

impl Default for SinkOptions {
    fn default() -> Self {
        Self {
            duplicate_window: Duration::from_secs(24 * 3600),
            in_flight: 256,
        }
    }
}

/// What one publish did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishReport {
    pub stream: String,
    /// Messages the stream stored now (lines and the manifest).
    pub stored: u64,
    /// Messages it already had (same message id within the duplicate window).
    pub duplicates: u64,
}

/// The stream name of a feed.
pub fn stream_name(feed: &str) -> String {
    format!("caregate-feed-{feed}")
}

/// The subject prefix of a feed (`caregate.feed.<id>`).
pub fn subject_prefix(feed: &str) -> String {
    format!("caregate.feed.{feed}")
}

fn check_feed_id(feed: &str) -> Result<(), SinkError> {
    let ok = !feed.is_empty()
        && feed
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(SinkError::FeedId(feed.to_owned()))
    }
}

/// A connection to a JetStream server.
#[derive(Debug, Clone)]
pub struct NatsSink {
    jetstream: jetstream::Context,
    options: SinkOptions,
}

impl NatsSink {
    /// Connect to `url` (e.g. `nats://127.0.0.1:4222`).
    pub async fn connect(url: &str, options: SinkOptions) -> Result<Self, SinkError> {
        let client = async_nats::ConnectOptions::new()
            .name("caregate-feeds")
            .connection_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|e| SinkError::Connect {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            jetstream: jetstream::new(client),
            options,
        })
    }

    /// The feed's stream, created (file storage) if it does not exist.
    pub async fn ensure_stream(&self, feed: &str) -> Result<stream::Stream, SinkError> {
        check_feed_id(feed)?;
        let name = stream_name(feed);
        self.jetstream
            .get_or_create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![format!("{}.>", subject_prefix(feed))],
                storage: stream::StorageType::File,
                duplicate_window: self.options.duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(|e| SinkError::Stream {
                stream: name,
                reason: e.to_string(),
            })
    }

    /// Publish the export in `directory` (its NDJSON files, then its manifest), waiting for every
    /// acknowledgement.
    pub async fn publish_export(
        &self,
        directory: &Path,
        manifest: &ExportManifest,
    ) -> Result<PublishReport, SinkError> {
        self.ensure_stream(&manifest.feed).await?;
        let prefix = subject_prefix(&manifest.feed);
        let mut report = PublishReport {
            stream: stream_name(&manifest.feed),
            ..PublishReport::default()
        };
        let mut pending = std::collections::VecDeque::new();
        for file in &manifest.files {
            check_resource_type(&file.resource_type)?;
            let path = directory.join(&file.file_name);
            let read_error = |e: std::io::Error| SinkError::Read {
                file: file.file_name.clone(),
                reason: e.to_string(),
            };
            let raw = std::fs::File::open(&path).map_err(read_error)?;
            let reader: Box<dyn std::io::Read> = if file.file_name.ends_with(".gz") {
                Box::new(flate2::read::GzDecoder::new(raw))
            } else {
                Box::new(raw)
            };
            let subject = format!("{prefix}.{}", file.resource_type);
            for (number, line) in BufReader::new(reader).lines().enumerate() {
                let line = line.map_err(read_error)?;
                if line.trim().is_empty() {
                    continue;
                }
                let id = format!(
                    "{}/{}/{}",
                    manifest.export_id,
                    file.resource_type,
                    number + 1
                );
                pending.push_back(self.send(&subject, &id, manifest, line.into()).await?);
                if pending.len() >= self.options.in_flight.max(1)
                    && let Some(ack) = pending.pop_front()
                {
                    count(&mut report, ack.await, &subject)?;
                }
            }
        }
        while let Some(ack) = pending.pop_front() {
            count(&mut report, ack.await, &prefix)?;
        }
        // The manifest last: its arrival says every line of the export is in the stream.
        let manifest_bytes =
            std::fs::read(directory.join(MANIFEST_FILE)).map_err(|e| SinkError::Read {
                file: MANIFEST_FILE.to_owned(),
                reason: e.to_string(),
            })?;
        let subject = format!("{prefix}.manifest");
        let id = format!("{}/manifest", manifest.export_id);
        let ack = self
            .send(&subject, &id, manifest, Bytes::from(manifest_bytes))
            .await?;
        count(&mut report, ack.await, &subject)?;
        Ok(report)
    }

    async fn send(
        &self,
        subject: &str,
        id: &str,
        manifest: &ExportManifest,
        payload: Bytes,
    ) -> Result<jetstream::context::PublishAckFuture, SinkError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        headers.insert("Caregate-Export", manifest.export_id.as_str());
        headers.insert(
            "Caregate-Key-Version",
            manifest.key_version.to_string().as_str(),
        );
        self.jetstream
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await
            .map_err(|e| SinkError::Publish {
                subject: subject.to_owned(),
                reason: e.to_string(),
            })
    }
}

fn check_resource_type(resource_type: &str) -> Result<(), SinkError> {
    if !resource_type.is_empty() && resource_type.chars().all(|c| c.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(SinkError::Read {
            file: resource_type.to_owned(),
            reason: "the manifest names a resource type that is not a FHIR type name".to_owned(),
        })
    }
}

fn count(
    report: &mut PublishReport,
    ack: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
    subject: &str,
) -> Result<(), SinkError> {
    let ack = ack.map_err(|e| SinkError::Publish {
        subject: subject.to_owned(),
        reason: e.to_string(),
    })?;
    if ack.duplicate {
        report.duplicates += 1;
    } else {
        report.stored += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feed_ids_outside_subject_tokens_are_refused() {
        assert!(check_feed_id("icb-qe1-population-health").is_ok());
        for bad in ["", "a.b", "a*", "a>", "a b"] {
            assert!(check_feed_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            subject_prefix("icb-qe1-population-health"),
            "caregate.feed.icb-qe1-population-health"
        );
        assert_eq!(stream_name("f"), "caregate-feed-f");
    }
}
