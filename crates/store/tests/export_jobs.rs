//! The Bulk export job registry (`caregate_store::export_jobs`, issue 5) through the `Store`
//! trait, on SQLite and PostgreSQL (`backend_tests!`): jobs survive a reopen, end once, cancel
//! once, and start-up recovery fails exactly the unfinished jobs of the restarting instance.
//! On PostgreSQL, a job is seen and cancelled across instances. Retention: the sweep finds
//! exactly the expired jobs, a removal re-checks expiry, and concurrent sweepers (tasks on one
//! store; on PostgreSQL, two instances) each remove a job at most once, none failing.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

mod support;

use caregate_store::StoreError;
use std::sync::Arc;
use std::time::Duration;

use caregate_store::export_jobs::{
    ExportExpiry, ExportJobEnd, ExportJobState, ExportJobs, ExportProgress, NewExportJob,
};
use support::Backend;
use time::OffsetDateTime;

backend_tests!(
    a_job_is_recorded_in_progress_and_survives_reopen,
    an_export_id_is_recorded_once,
    progress_is_recorded_only_while_in_progress_and_a_job_ends_once,
    cancel_answers_the_previous_state_once_and_a_cancelled_job_does_not_end,
    startup_recovery_fails_only_this_instances_unfinished_jobs,
    the_sweep_finds_only_expired_jobs_and_a_removal_rechecks_expiry,
    concurrent_sweepers_remove_each_expired_job_once,
);

const INTERRUPTED: &str = "interrupted by a restart; kick off a new export";

fn at(unix: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix).unwrap()
}

fn new_job(id: &str, instance: &str) -> NewExportJob {
    NewExportJob {
        id: id.to_owned(),
        owner: "icb-qe1".to_owned(),
        feed: "icb-population-health".to_owned(),
        request: "https://gw.example/fhir/Group/icb-population-health/$export?_type=Patient"
            .to_owned(),
        types: Some(vec!["Observation".to_owned(), "Patient".to_owned()]),
        since: Some(at(1_700_000_000)),
        key_version: 3,
        opt_outs: "applied".to_owned(),
        created_at: at(1_760_000_000),
        instance_id: instance.to_owned(),
    }
}

async fn state_of(store: &impl ExportJobs, id: &str) -> ExportJobState {
    store.export_job(id).await.unwrap().unwrap().state
}

async fn a_job_is_recorded_in_progress_and_survives_reopen<B: Backend>(backend: B) {
    let store = backend.open().await;
    store
        .create_export_job(new_job("job-1", "gw-a"))
        .await
        .unwrap();
    let job = store.export_job("job-1").await.unwrap().unwrap();
    assert_eq!(job.state, ExportJobState::InProgress);
    assert_eq!(
        (
            job.owner.as_str(),
            job.feed.as_str(),
            job.instance_id.as_str()
        ),
        ("icb-qe1", "icb-population-health", "gw-a")
    );
    assert_eq!(
        job.types,
        Some(vec!["Observation".to_owned(), "Patient".to_owned()])
    );
    assert_eq!(job.since, Some(at(1_700_000_000)));
    assert_eq!(job.created_at, at(1_760_000_000));
    assert_eq!((job.key_version, job.opt_outs.as_str()), (3, "applied"));
    assert_eq!(job.progress, ExportProgress::default());
    assert_eq!(
        (job.manifest, job.error, job.finished_at),
        (None, None, None)
    );
    assert_eq!(store.export_job("nope").await.unwrap(), None);

    // A job without _type or _since keeps them absent.
    let mut all = new_job("job-2", "gw-a");
    all.types = None;
    all.since = None;
    store.create_export_job(all).await.unwrap();
    B::close(store).await;

    let store = backend.open().await;
    let reopened = store.export_job("job-1").await.unwrap().unwrap();
    assert_eq!(reopened.state, ExportJobState::InProgress);
    assert_eq!(reopened.request, new_job("job-1", "gw-a").request);
    let all = store.export_job("job-2").await.unwrap().unwrap();
    assert_eq!((all.types, all.since), (None, None));
    B::close(store).await;
}

async fn an_export_id_is_recorded_once<B: Backend>(backend: B) {
    let store = backend.open().await;
    store
        .create_export_job(new_job("job-1", "gw-a"))
        .await
        .unwrap();
    let mut other = new_job("job-1", "gw-b");
    other.owner = "someone-else".to_owned();
    let again = store.create_export_job(other).await;
    assert!(matches!(again, Err(StoreError::Conflict)), "{again:?}");
    let job = store.export_job("job-1").await.unwrap().unwrap();
    assert_eq!(
        (job.owner.as_str(), job.instance_id.as_str()),
        ("icb-qe1", "gw-a")
    );
    B::close(store).await;
}

async fn progress_is_recorded_only_while_in_progress_and_a_job_ends_once<B: Backend>(backend: B) {
    let store = backend.open().await;
    store
        .create_export_job(new_job("job-1", "gw-a"))
        .await
        .unwrap();
    let progress = ExportProgress {
        scanned: 500,
        written: 12,
    };
    assert!(store.export_job_progress("job-1", progress).await.unwrap());
    assert_eq!(
        store.export_job("job-1").await.unwrap().unwrap().progress,
        progress
    );
    let manifest =
        r#"{"files":[{"resource_type":"Patient","file_name":"Patient.ndjson","count":2}]}"#;
    assert!(
        store
            .finish_export_job(
                "job-1",
                ExportJobEnd::Complete {
                    manifest: manifest.to_owned()
                }
            )
            .await
            .unwrap()
    );
    let done = store.export_job("job-1").await.unwrap().unwrap();
    assert_eq!(done.state, ExportJobState::Complete);
    assert_eq!(done.manifest.as_deref(), Some(manifest));
    assert!(done.finished_at.is_some());

    // Ended: no more progress, no second end.
    assert!(!store.export_job_progress("job-1", progress).await.unwrap());
    assert!(
        !store
            .finish_export_job(
                "job-1",
                ExportJobEnd::Failed {
                    error: "late".to_owned()
                }
            )
            .await
            .unwrap()
    );
    let still = store.export_job("job-1").await.unwrap().unwrap();
    assert_eq!((still.state, still.error), (ExportJobState::Complete, None));

    // A failure keeps its partner-safe sentence and no manifest.
    store
        .create_export_job(new_job("job-2", "gw-a"))
        .await
        .unwrap();
    assert!(
        store
            .finish_export_job(
                "job-2",
                ExportJobEnd::Failed {
                    error: "the export failed".to_owned()
                }
            )
            .await
            .unwrap()
    );
    let failed = store.export_job("job-2").await.unwrap().unwrap();
    assert_eq!(failed.state, ExportJobState::Failed);
    assert_eq!(
        (failed.error.as_deref(), failed.manifest),
        (Some("the export failed"), None)
    );
    assert!(
        !store
            .export_job_progress("missing", progress)
            .await
            .unwrap()
    );
    B::close(store).await;
}

async fn cancel_answers_the_previous_state_once_and_a_cancelled_job_does_not_end<B: Backend>(
    backend: B,
) {
    let store = backend.open().await;
    store
        .create_export_job(new_job("running", "gw-a"))
        .await
        .unwrap();
    assert_eq!(
        store.cancel_export_job("running").await.unwrap(),
        Some(ExportJobState::InProgress)
    );
    assert_eq!(store.cancel_export_job("running").await.unwrap(), None);
    // The runner learns of it at its next progress write, and its end is not recorded.
    assert!(
        !store
            .export_job_progress("running", ExportProgress::default())
            .await
            .unwrap()
    );
    assert!(
        !store
            .finish_export_job(
                "running",
                ExportJobEnd::Complete {
                    manifest: "{}".to_owned()
                }
            )
            .await
            .unwrap()
    );
    assert_eq!(state_of(&store, "running").await, ExportJobState::Cancelled);

    store
        .create_export_job(new_job("done", "gw-a"))
        .await
        .unwrap();
    store
        .finish_export_job(
            "done",
            ExportJobEnd::Complete {
                manifest: "{}".to_owned(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store.cancel_export_job("done").await.unwrap(),
        Some(ExportJobState::Complete)
    );
    assert_eq!(state_of(&store, "done").await, ExportJobState::Cancelled);
    assert_eq!(store.cancel_export_job("missing").await.unwrap(), None);
    B::close(store).await;
}

async fn startup_recovery_fails_only_this_instances_unfinished_jobs<B: Backend>(backend: B) {
    let store = backend.open().await;
    for (id, instance) in [
        ("a-running", "gw-a"),
        ("a-done", "gw-a"),
        ("b-running", "gw-b"),
    ] {
        store
            .create_export_job(new_job(id, instance))
            .await
            .unwrap();
    }
    store
        .finish_export_job(
            "a-done",
            ExportJobEnd::Complete {
                manifest: "{}".to_owned(),
            },
        )
        .await
        .unwrap();
    // The process running gw-a's export dies; gw-a starts again.
    B::close(store).await;
    let store = backend.open().await;
    let failed = store
        .fail_interrupted_export_jobs("gw-a", INTERRUPTED)
        .await
        .unwrap();
    assert_eq!(
        failed.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        ["a-running"]
    );
    assert_eq!(failed[0].state, ExportJobState::Failed);
    let job = store.export_job("a-running").await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.error.as_deref()),
        (ExportJobState::Failed, Some(INTERRUPTED))
    );
    assert!(job.finished_at.is_some());
    assert_eq!(state_of(&store, "a-done").await, ExportJobState::Complete);
    assert_eq!(
        state_of(&store, "b-running").await,
        ExportJobState::InProgress,
        "another instance's running export is not this instance's to fail"
    );
    assert!(
        store
            .fail_interrupted_export_jobs("gw-a", INTERRUPTED)
            .await
            .unwrap()
            .is_empty()
    );
    B::close(store).await;
}

/// Cluster mode: a job kicked off on one instance is read, cancelled and ended from another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_job_started_on_one_instance_is_seen_and_cancelled_on_another() {
    let Some(backend) = <support::Postgres as Backend>::new() else {
        return;
    };
    let a = backend
        .open_instance("gw-a", support::TestOptions::default())
        .await;
    let b = backend
        .open_instance("gw-b", support::TestOptions::default())
        .await;
    a.create_export_job(new_job("job-1", "gw-a")).await.unwrap();
    let progress = ExportProgress {
        scanned: 7,
        written: 3,
    };
    assert!(a.export_job_progress("job-1", progress).await.unwrap());
    let seen = b.export_job("job-1").await.unwrap().unwrap();
    assert_eq!(
        (seen.state, seen.progress, seen.instance_id.as_str()),
        (ExportJobState::InProgress, progress, "gw-a")
    );
    assert_eq!(
        b.cancel_export_job("job-1").await.unwrap(),
        Some(ExportJobState::InProgress)
    );
    // gw-a's next progress write says stop; its end is not recorded.
    assert!(!a.export_job_progress("job-1", progress).await.unwrap());
    assert!(
        !a.finish_export_job(
            "job-1",
            ExportJobEnd::Complete {
                manifest: "{}".to_owned()
            }
        )
        .await
        .unwrap()
    );
    // gw-b restarting fails none of gw-a's jobs.
    a.create_export_job(new_job("job-2", "gw-a")).await.unwrap();
    assert!(
        b.fail_interrupted_export_jobs("gw-b", INTERRUPTED)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(state_of(&b, "job-2").await, ExportJobState::InProgress);
    <support::Postgres as Backend>::close(a).await;
    <support::Postgres as Backend>::close(b).await;
}

fn complete() -> ExportJobEnd {
    ExportJobEnd::Complete {
        manifest: "{}".to_owned(),
    }
}

/// A cut-off `offset` from now for both ended and silent jobs.
fn expiry_in(offset: time::Duration) -> ExportExpiry {
    let at = OffsetDateTime::now_utc() + offset;
    ExportExpiry {
        finished_before: at,
        silent_before: at,
    }
}

fn ids(jobs: &[caregate_store::export_jobs::ExportJob]) -> Vec<&str> {
    jobs.iter().map(|j| j.id.as_str()).collect()
}

/// Ended jobs (complete, failed, cancelled) expire by their end, running ones by their last
/// write; nothing newer than the cut-off is listed or removed, and a job that reported progress
/// after the cut-off was taken is not removed by it.
async fn the_sweep_finds_only_expired_jobs_and_a_removal_rechecks_expiry<B: Backend>(backend: B) {
    let store = backend.open().await;
    for id in [
        "old-complete",
        "old-failed",
        "old-cancelled",
        "running",
        "new-complete",
    ] {
        store.create_export_job(new_job(id, "gw-a")).await.unwrap();
    }
    store
        .finish_export_job("old-complete", complete())
        .await
        .unwrap();
    store
        .finish_export_job(
            "old-failed",
            ExportJobEnd::Failed {
                error: "failed".to_owned(),
            },
        )
        .await
        .unwrap();
    store
        .finish_export_job("old-cancelled", complete())
        .await
        .unwrap();
    store.cancel_export_job("old-cancelled").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let between = OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(50)).await;
    store
        .finish_export_job("new-complete", complete())
        .await
        .unwrap();

    // Nothing has ended an hour ago.
    assert!(
        store
            .expired_export_jobs(expiry_in(-time::Duration::HOUR), 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        !store
            .remove_expired_export_job("old-complete", expiry_in(-time::Duration::HOUR))
            .await
            .unwrap()
    );
    // Ended before `between`: the three old jobs, oldest end first; the running job is not
    // silent for long enough.
    let cut = ExportExpiry {
        finished_before: between,
        silent_before: between - time::Duration::HOUR,
    };
    let expired = store.expired_export_jobs(cut, 100).await.unwrap();
    assert_eq!(
        ids(&expired),
        ["old-complete", "old-failed", "old-cancelled"]
    );
    assert!(expired.iter().all(|job| cut.covers(job)));
    assert_eq!(
        expired[2].state,
        ExportJobState::Cancelled,
        "a cancelled job is listed like any other ended job"
    );
    assert_eq!(
        ids(&store.expired_export_jobs(cut, 1).await.unwrap()),
        ["old-complete"]
    );
    for job in &expired {
        assert!(store.remove_expired_export_job(&job.id, cut).await.unwrap());
        assert!(
            !store.remove_expired_export_job(&job.id, cut).await.unwrap(),
            "a job is removed once"
        );
        assert!(store.export_job(&job.id).await.unwrap().is_none());
    }
    assert!(
        store
            .expired_export_jobs(cut, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        !store
            .remove_expired_export_job("new-complete", cut)
            .await
            .unwrap()
    );
    assert!(
        !store
            .remove_expired_export_job("running", cut)
            .await
            .unwrap()
    );
    assert!(
        !store
            .remove_expired_export_job("no-such-job", cut)
            .await
            .unwrap()
    );

    // A running job whose instance went silent expires by its last write ...
    let later = expiry_in(time::Duration::HOUR);
    assert_eq!(
        ids(&store.expired_export_jobs(later, 100).await.unwrap()),
        ["running", "new-complete"]
    );
    // ... but not once it reports progress after the cut-off was taken.
    let silent = ExportExpiry {
        finished_before: between,
        silent_before: OffsetDateTime::now_utc(),
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        store
            .export_job_progress("running", ExportProgress::default())
            .await
            .unwrap()
    );
    assert!(
        !store
            .remove_expired_export_job("running", silent)
            .await
            .unwrap()
    );
    assert_eq!(
        state_of(&store, "running").await,
        ExportJobState::InProgress
    );
    assert!(
        store
            .remove_expired_export_job("running", later)
            .await
            .unwrap()
    );
    assert_eq!(
        state_of(&store, "new-complete").await,
        ExportJobState::Complete
    );

    // Removals are durable.
    B::close(store).await;
    let store = backend.open().await;
    assert!(store.export_job("old-complete").await.unwrap().is_none());
    assert!(store.export_job("running").await.unwrap().is_none());
    assert_eq!(
        state_of(&store, "new-complete").await,
        ExportJobState::Complete
    );
    B::close(store).await;
}

/// Sweep every job `store` lists under `expiry` like the gateway does; the ids this sweeper
/// removed.
async fn sweep(store: &impl ExportJobs, expiry: ExportExpiry) -> Vec<String> {
    let mut removed = Vec::new();
    for job in store.expired_export_jobs(expiry, 1_000).await.unwrap() {
        if store
            .remove_expired_export_job(&job.id, expiry)
            .await
            .unwrap()
        {
            removed.push(job.id);
        }
    }
    removed
}

/// Expected removals by several sweepers at once: every job removed by exactly one of them.
fn assert_removed_once(mut removed: Vec<String>, jobs: usize) {
    removed.sort();
    let count = removed.len();
    removed.dedup();
    assert_eq!(removed.len(), count, "no job is removed twice");
    assert_eq!(count, jobs, "every expired job is removed");
}

async fn concurrent_sweepers_remove_each_expired_job_once<B: Backend>(backend: B) {
    const JOBS: usize = 40;
    let store = Arc::new(backend.open().await);
    for n in 0..JOBS {
        let id = format!("job-{n:02}");
        store.create_export_job(new_job(&id, "gw-a")).await.unwrap();
        store.finish_export_job(&id, complete()).await.unwrap();
    }
    store
        .create_export_job(new_job("fresh", "gw-a"))
        .await
        .unwrap();
    let expiry = ExportExpiry {
        finished_before: OffsetDateTime::now_utc() + time::Duration::HOUR,
        silent_before: OffsetDateTime::now_utc() - time::Duration::HOUR,
    };
    let sweepers: Vec<_> = (0..4)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { sweep(store.as_ref(), expiry).await })
        })
        .collect();
    let mut removed = Vec::new();
    for sweeper in sweepers {
        removed.extend(sweeper.await.unwrap());
    }
    assert_removed_once(removed, JOBS);
    assert!(
        store
            .expired_export_jobs(expiry, 1_000)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        state_of(store.as_ref(), "fresh").await,
        ExportJobState::InProgress
    );
    let Ok(store) = Arc::try_unwrap(store) else {
        panic!("the sweepers hold no store");
    };
    B::close(store).await;
}

/// Cluster mode: two instances sweep the shared registry at once; each job goes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_two_instances_sweeping_at_once_remove_each_job_once() {
    const JOBS: usize = 40;
    let Some(backend) = <support::Postgres as Backend>::new() else {
        return;
    };
    let a = backend
        .open_instance("gw-a", support::TestOptions::default())
        .await;
    let b = backend
        .open_instance("gw-b", support::TestOptions::default())
        .await;
    for n in 0..JOBS {
        let (id, owner) = (format!("job-{n:02}"), if n % 2 == 0 { &a } else { &b });
        owner
            .create_export_job(new_job(&id, if n % 2 == 0 { "gw-a" } else { "gw-b" }))
            .await
            .unwrap();
        owner.finish_export_job(&id, complete()).await.unwrap();
    }
    let expiry = expiry_in(time::Duration::HOUR);
    let (from_a, from_b) = tokio::join!(sweep(&a, expiry), sweep(&b, expiry));
    assert_removed_once(from_a.into_iter().chain(from_b).collect(), JOBS);
    assert!(
        a.expired_export_jobs(expiry, 1_000)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        b.expired_export_jobs(expiry, 1_000)
            .await
            .unwrap()
            .is_empty()
    );
    <support::Postgres as Backend>::close(a).await;
    <support::Postgres as Backend>::close(b).await;
}
