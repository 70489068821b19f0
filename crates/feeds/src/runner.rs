//! Running an export against the real store from async code (the gateway's background task, the
//! CLI): the blocking export runs on a blocking thread and reads the async [`Store`] through a
//! runtime handle, so request threads never wait on it; the feed's cursor (`feed:<id>`) moves to
//! the export's last log position when it completes.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use caregate_store::{LogEntry, Seq, Store, StoreError};
use time::OffsetDateTime;

use crate::definition::FeedDefinition;
use crate::export::{
    ExportControl, ExportError, ExportManifest, ExportRequest, LogSource, export_dir,
    latest_export, reader_name, run_export,
};
use crate::keys::FeedKey;
use crate::policy::FeedPolicy;

/// The async store seen synchronously from a blocking thread.
#[derive(Debug)]
pub struct StoreLogSource {
    store: Arc<dyn Store>,
    handle: tokio::runtime::Handle,
}

impl StoreLogSource {
    pub fn new(store: Arc<dyn Store>, handle: tokio::runtime::Handle) -> Self {
        StoreLogSource { store, handle }
    }
}

impl LogSource for StoreLogSource {
    fn read_log(&self, after: Seq, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        self.handle.block_on(self.store.read_log(after, limit))
    }

    fn is_current(&self, entry: &LogEntry) -> Result<bool, StoreError> {
        let current = self.handle.block_on(self.store.read_current(
            &entry.partner,
            &entry.resource_type,
            &entry.id,
        ))?;
        Ok(current.is_none_or(|current| current.seq == entry.seq))
    }
}

/// Where an export starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// From the start of the retained log (a new or changed definition, or a full Bulk export).
    Rebuild,
    /// From the feed's cursor, unless the definition changed since the last export (then rebuild).
    Incremental,
}

/// One export to run.
#[derive(Debug, Clone)]
pub struct ExportJob {
    pub definition: Arc<FeedDefinition>,
    pub key: FeedKey,
    pub data_dir: PathBuf,
    pub export_id: String,
    pub types: Option<BTreeSet<String>>,
    pub since: Option<OffsetDateTime>,
    pub start: Start,
    pub transaction_time: OffsetDateTime,
}

/// Run `job` on a blocking thread and move the feed's cursor when it completes.
pub async fn run(
    store: Arc<dyn Store>,
    policy: Arc<dyn FeedPolicy>,
    job: ExportJob,
    control: Arc<ExportControl>,
) -> Result<ExportManifest, ExportError> {
    let reader = reader_name(&job.definition.id);
    let after_seq = match job.start {
        Start::Rebuild => 0,
        Start::Incremental => {
            let previous = latest_export(&job.data_dir, &job.definition.id)?;
            if previous.is_some_and(|p| p.definition_digest == job.definition.digest) {
                store.load_cursor(&reader).await?
            } else {
                0
            }
        }
    };
    let handle = tokio::runtime::Handle::current();
    let source = StoreLogSource::new(store.clone(), handle);
    let manifest = tokio::task::spawn_blocking(move || {
        let request = ExportRequest {
            definition: &job.definition,
            key: &job.key,
            export_id: job.export_id.clone(),
            types: job.types.clone(),
            since: job.since,
            after_seq,
            transaction_time: job.transaction_time,
            directory: export_dir(&job.data_dir, &job.definition.id, &job.export_id),
        };
        run_export(&source, policy.as_ref(), &request, &control)
    })
    .await
    .map_err(|e| ExportError::Io(std::io::Error::other(e)))??;
    if manifest.types.is_none() && manifest.since.is_none() {
        store.save_cursor(&reader, manifest.through_seq).await?;
    }
    Ok(manifest)
}
