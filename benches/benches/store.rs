//! Group commit throughput of the embedded store (`caregate_store::sqlite::SqliteStore`).
//!
//! `group_commit/{1,16,128}_submitters`: 2 KB Observation creates (each with its audit event and
//! an idempotency key, as the gateway's create path writes them) submitted by that many concurrent
//! tokio tasks, each awaiting its own `Store::submit` before sending the next. One criterion
//! iteration is one submission, so the reported time is per submission (wall clock, the
//! submitters overlapping) and the throughput is submissions per second. Each concurrency level
//! gets a fresh database, and after the last one the commits/submissions ratio from
//! `SqliteStore::stats` is printed: 1.0 means no batching, 1/16 means 16 submissions shared each
//! fsync.
//!
//! `Store::submit` returns only after the commit is fsync'd, so a single submitter is bounded by
//! the disk's fsync latency; run `cargo run --release -p caregate-benches --bin fsync_probe` for
//! that baseline. The database goes in `$CAREGATE_BENCH_DATA_DIR` if set, else in cargo's
//! `target/tmp`: a real disk, not a tmpfs `/tmp` where fsync is free.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caregate_benches::SubmissionFactory;
use caregate_fhir::Validator;
use caregate_fhir::validate::ValidatorConfig;
use caregate_store::sqlite::{SqliteOptions, SqliteStore, StoreStats};
use caregate_store::{Store, Submission};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;

/// Concurrent submitters per benchmark.
const SUBMITTERS: [usize; 3] = [1, 16, 128];

fn data_dir_parent() -> PathBuf {
    std::env::var_os("CAREGATE_BENCH_DATA_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from)
}

/// Submit `submissions` from `submitters` concurrent tasks; the time from the first submit to the
/// last commit.
fn submit_all(
    runtime: &Runtime,
    store: &Arc<SqliteStore>,
    submitters: usize,
    submissions: Vec<Submission>,
) -> Duration {
    let tasks = submitters.min(submissions.len()).max(1);
    let mut queues: Vec<Vec<Submission>> = (0..tasks).map(|_| Vec::new()).collect();
    for (index, submission) in submissions.into_iter().enumerate() {
        queues[index % tasks].push(submission);
    }
    runtime.block_on(async {
        let start = Instant::now();
        let handles: Vec<_> = queues
            .into_iter()
            .map(|queue| {
                let store = Arc::clone(store);
                tokio::spawn(async move {
                    for submission in queue {
                        store.submit(submission).await.expect("the store commits");
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.await.expect("a submitter task finished");
        }
        start.elapsed()
    })
}

fn group_commit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let validator = Validator::new(ValidatorConfig::default()).expect("built-in schemas compile");
    let parent = data_dir_parent();
    std::fs::create_dir_all(&parent).expect("the benchmark data directory can be created");
    eprintln!("store data directories under {}", parent.display());

    let mut group = c.benchmark_group("group_commit");
    // A single submitter takes one fsync per iteration (milliseconds): flat sampling with the
    // minimum sample count keeps the run short without changing what is measured.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.throughput(Throughput::Elements(1));

    let mut stats: Vec<(usize, StoreStats)> = Vec::new();
    for submitters in SUBMITTERS {
        let dir = tempfile::Builder::new()
            .prefix("caregate-bench-store-")
            .tempdir_in(&parent)
            .expect("a temporary data directory");
        let store = Arc::new(
            SqliteStore::open(dir.path(), SqliteOptions::default()).expect("the store opens"),
        );
        let mut factory = SubmissionFactory::new(&validator, "gp-bench", 1);
        let name = if submitters == 1 {
            "1_submitter".to_owned()
        } else {
            format!("{submitters}_submitters")
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                // Built outside the timed region: only committing is measured.
                let submissions = (0..iterations).map(|_| factory.next_submission()).collect();
                submit_all(&runtime, &store, submitters, submissions)
            });
        });
        stats.push((submitters, store.stats()));
        let store = Arc::into_inner(store).expect("no submitter holds the store any more");
        runtime
            .block_on(store.close())
            .expect("the store closes cleanly");
    }
    group.finish();

    eprintln!("group commit (warm-up included):");
    for (submitters, stats) in stats {
        let plural = if submitters == 1 { "" } else { "s" };
        let ratio = stats.commits as f64 / stats.submissions.max(1) as f64;
        eprintln!(
            "  {submitters:>3} submitter{plural}: {} submissions in {} commits: {ratio:.3} commits per \
             submission ({:.1} submissions per fsync)",
            stats.submissions,
            stats.commits,
            1.0 / ratio.max(f64::MIN_POSITIVE),
        );
    }
}

criterion_group!(benches, group_commit);
criterion_main!(benches);
