//! `fsync_probe [DIR] [COUNT]`: the latency of a small durable write on the disk holding `DIR`
//! (default: the current directory; COUNT default 500), the floor under every store commit.
//!
//! A SQLite commit in WAL mode with `synchronous=FULL` writes its frames to the `-wal` file and
//! syncs it once; the WAL is reused in place after a checkpoint and grows before one. So three
//! patterns are timed, each `COUNT` times, each a 4 KiB write then a sync:
//! - `overwrite+fdatasync` — rewrite one block of a preallocated file (a reused WAL);
//! - `append+fdatasync` — append to a growing file (the size change must be made durable too);
//! - `append+fsync` — the same with `fsync`, which also flushes metadata such as mtime.
//!
//! Prints p50, p90, p99 and max per pattern. The probe file (`DIR/.caregate-fsync-probe-<pid>`)
//! is removed afterwards. Put `DIR` on the disk the store will use: on a tmpfs every sync is free.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes per write: one SQLite page plus a little, as one small commit writes.
const WRITE_SIZE: usize = 4_096;

#[derive(Debug, Clone, Copy)]
enum Pattern {
    OverwriteFdatasync,
    AppendFdatasync,
    AppendFsync,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Self::OverwriteFdatasync => "overwrite+fdatasync",
            Self::AppendFdatasync => "append+fdatasync",
            Self::AppendFsync => "append+fsync",
        }
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let dir = args
        .next()
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let count: usize = match args.next() {
        None => 500,
        Some(count) => count
            .to_str()
            .and_then(|count| count.parse().ok())
            .filter(|&count| count > 0)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "usage: fsync_probe [DIR] [COUNT>0]",
                )
            })?,
    };
    let path = dir.join(format!(".caregate-fsync-probe-{}", std::process::id()));
    eprintln!(
        "fsync probe: {count} x {WRITE_SIZE} B writes per pattern in {}",
        dir.display()
    );
    let result = probe_all(&path, count);
    let _ = std::fs::remove_file(&path);
    result
}

fn probe_all(path: &Path, count: usize) -> std::io::Result<()> {
    for pattern in [
        Pattern::OverwriteFdatasync,
        Pattern::AppendFdatasync,
        Pattern::AppendFsync,
    ] {
        let mut samples = probe(path, pattern, count)?;
        samples.sort_unstable();
        let at = |quantile: f64| {
            // Nearest-rank percentile.
            let rank = (quantile * samples.len() as f64).ceil() as usize;
            samples[rank.clamp(1, samples.len()) - 1]
        };
        eprintln!(
            "{:<20} p50 {:>9.3?}  p90 {:>9.3?}  p99 {:>9.3?}  max {:>9.3?}",
            pattern.name(),
            at(0.50),
            at(0.90),
            at(0.99),
            samples[samples.len() - 1],
        );
    }
    Ok(())
}

/// Time `count` write+sync pairs of `pattern` on a fresh file at `path`.
fn probe(path: &Path, pattern: Pattern, count: usize) -> std::io::Result<Vec<Duration>> {
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    let block = vec![0x5a_u8; WRITE_SIZE];
    if let Pattern::OverwriteFdatasync = pattern {
        // Allocate and persist the block first, so each timed sync carries data only.
        file.write_all(&block)?;
        file.sync_all()?;
    }
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        match pattern {
            Pattern::OverwriteFdatasync => {
                file.seek(SeekFrom::Start(0))?;
                file.write_all(&block)?;
                file.sync_data()?;
            }
            Pattern::AppendFdatasync => {
                file.write_all(&block)?;
                file.sync_data()?;
            }
            Pattern::AppendFsync => {
                file.write_all(&block)?;
                file.sync_all()?;
            }
        }
        samples.push(start.elapsed());
    }
    drop::<File>(file);
    Ok(samples)
}
