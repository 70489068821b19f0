//! What the store test suites share: a [`Backend`] factory per store implementation, record and
//! event builders, and [`backend_tests!`], which instantiates a generic test for SQLite and for
//! PostgreSQL (the hermetic server from `caregate_testkit::postgres`; skipped with a message when
//! the PostgreSQL binaries are not installed).

#![allow(dead_code, reason = "each test binary uses part of the shared support")]

use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::pin::Pin;
use std::task::Poll;

use caregate_audit::CheckpointVerifier;
use caregate_audit::{Action, Actor, AuditEvent, Entity, Outcome};
use caregate_store::postgres::{LOG_LOCK_KEY, PostgresOptions, PostgresStore};
use caregate_store::sqlite::{
    AuditSigning, AuditVerification, SqliteOptions, SqliteStore, StoreStats,
};
use caregate_store::{RecordWrite, Store, Submission, WriteMode};
use rusqlite::config::DbConfig;

pub(crate) const NHS_NUMBER: &str = "9434765919";

/// Store options a test may set; everything else is the backend's default.
#[derive(Debug, Clone, Default)]
pub(crate) struct TestOptions {
    pub(crate) max_batch: Option<usize>,
    pub(crate) audit_signing: Option<AuditSigning>,
}

/// A store implementation under test, with one empty place to keep its data (a directory, a
/// database) that every `open` of this value reopens.
pub(crate) trait Backend: Sized + Send + Sync + 'static {
    type Store: Store;

    /// A fresh place, or `None` (with a message printed) when the backend cannot run here.
    fn new() -> Option<Self>;

    /// Open (or reopen) the store with `options`.
    fn open_with(&self, options: TestOptions) -> impl Future<Output = Self::Store> + Send;

    fn open(&self) -> impl Future<Output = Self::Store> + Send {
        self.open_with(TestOptions::default())
    }

    /// Close cleanly, committing everything queued; panics if the store reports a failure.
    fn close(store: Self::Store) -> impl Future<Output = ()> + Send;

    fn stats(store: &Self::Store) -> StoreStats;

    /// Verify the audit chain of the store kept here (for PostgreSQL: the test instance's).
    fn verify(
        &self,
        verifier: &CheckpointVerifier,
    ) -> impl Future<Output = AuditVerification> + Send;

    /// Block the store's commits from outside (the writer waits, requests queue up) until the
    /// returned hold is released.
    fn hold_commits(&self) -> impl Future<Output = Hold> + Send;
}

/// Something holding the store's commit path.
pub(crate) enum Hold {
    /// A SQLite connection inside `BEGIN IMMEDIATE`.
    Sqlite(rusqlite::Connection),
    /// A PostgreSQL session holding the log lock; dropping it ends the session and the lock.
    Postgres(tokio_postgres::Client),
}

impl Hold {
    pub(crate) fn release(self) {
        match self {
            Self::Sqlite(conn) => conn.execute_batch("ROLLBACK").unwrap(),
            Self::Postgres(client) => drop(client),
        }
    }
}

/// The embedded store in a temporary directory.
pub(crate) struct Sqlite {
    pub(crate) dir: tempfile::TempDir,
}

impl Backend for Sqlite {
    type Store = SqliteStore;

    fn new() -> Option<Self> {
        Some(Self {
            dir: tempfile::tempdir().unwrap(),
        })
    }

    async fn open_with(&self, options: TestOptions) -> SqliteStore {
        let defaults = SqliteOptions::default();
        SqliteStore::open(
            self.dir.path(),
            SqliteOptions {
                max_batch: options.max_batch.unwrap_or(defaults.max_batch),
                audit_signing: options.audit_signing,
                ..defaults
            },
        )
        .expect("store opens")
    }

    async fn close(store: SqliteStore) {
        store.close().await.unwrap();
    }

    fn stats(store: &SqliteStore) -> StoreStats {
        store.stats()
    }

    async fn verify(&self, verifier: &CheckpointVerifier) -> AuditVerification {
        caregate_store::sqlite::verify_audit(self.dir.path(), verifier, &[]).unwrap()
    }

    async fn hold_commits(&self) -> Hold {
        let conn = raw_sqlite(self.dir.path());
        conn.execute_batch("BEGIN IMMEDIATE")
            .expect("write lock taken");
        Hold::Sqlite(conn)
    }
}

/// A plain connection to the SQLite store's file, as any SQLite tool would open. It skips the
/// checkpoint on close, like the store's own connections.
pub(crate) fn raw_sqlite(dir: &std::path::Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join(caregate_store::sqlite::DATABASE_FILE))
        .expect("database opens");
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .expect("connection configures");
    conn
}

/// A fresh database on the test binary's hermetic PostgreSQL server; instance `test-instance`.
pub(crate) struct Postgres {
    pub(crate) url: String,
    pub(crate) instance_id: String,
}

impl Postgres {
    /// A fresh database, or `None` (after printing why) without PostgreSQL binaries.
    pub(crate) fn database() -> Option<String> {
        match caregate_testkit::postgres::shared() {
            Some(server) => Some(server.create_database().expect("test database created")),
            None => {
                eprintln!("{}", caregate_testkit::postgres::SKIPPED_NO_POSTGRES);
                None
            }
        }
    }

    /// Open another instance of the cluster on the same database.
    pub(crate) async fn open_instance(
        &self,
        instance_id: &str,
        options: TestOptions,
    ) -> PostgresStore {
        let mut pg = PostgresOptions::new(instance_id);
        if let Some(max_batch) = options.max_batch {
            pg.max_batch = max_batch;
        }
        pg.audit_signing = options.audit_signing;
        PostgresStore::connect(&self.url, pg)
            .await
            .expect("postgres store connects")
    }

    /// A plain client, as `psql` would be.
    pub(crate) async fn client(&self) -> tokio_postgres::Client {
        postgres_client(&self.url).await
    }
}

pub(crate) async fn postgres_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("postgres connects");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

impl Backend for Postgres {
    type Store = PostgresStore;

    fn new() -> Option<Self> {
        Some(Self {
            url: Self::database()?,
            instance_id: "test-instance".to_owned(),
        })
    }

    async fn open_with(&self, options: TestOptions) -> PostgresStore {
        self.open_instance(&self.instance_id, options).await
    }

    async fn close(store: PostgresStore) {
        store.close().await.unwrap();
    }

    fn stats(store: &PostgresStore) -> StoreStats {
        store.stats()
    }

    async fn verify(&self, verifier: &CheckpointVerifier) -> AuditVerification {
        caregate_store::postgres::verify_instance(
            &self.url,
            &caregate_store::postgres::PostgresTls::by_host(),
            &self.instance_id,
            verifier,
            &[],
        )
        .await
        .unwrap()
        .verification
    }

    async fn hold_commits(&self) -> Hold {
        let client = self.client().await;
        client
            .execute(
                "SELECT pg_advisory_lock($1, $2)",
                &[&LOG_LOCK_KEY[0], &LOG_LOCK_KEY[1]],
            )
            .await
            .expect("log lock taken");
        Hold::Postgres(client)
    }
}

/// Instantiate generic tests `async fn name<B: Backend>(backend: B)` for both backends, as
/// `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(backend) = <$crate::support::Sqlite as $crate::support::Backend>::new() {
                        super::$name(backend).await;
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(backend) = <$crate::support::Postgres as $crate::support::Backend>::new() {
                        super::$name(backend).await;
                    }
                }
            )*
        }
    };
}

/// A stand-in for SHA-256 (the store only compares hashes): deterministic, 32 bytes.
pub(crate) fn hash(content: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (lane, chunk) in out.chunks_mut(8).enumerate() {
        let mut hasher = DefaultHasher::new();
        (lane, content).hash(&mut hasher);
        chunk.copy_from_slice(&hasher.finish().to_le_bytes());
    }
    out
}

pub(crate) fn record(id: &str, mode: WriteMode, body: &str) -> RecordWrite {
    RecordWrite {
        resource_type: "Observation".into(),
        id: id.into(),
        mode,
        content: body.as_bytes().to_vec(),
        content_hash: hash(body.as_bytes()),
        nhs_number: Some(NHS_NUMBER.into()),
        identifiers: Vec::new(),
        decision: None,
    }
}

pub(crate) fn event(partner: &str, request_id: &str, record: &RecordWrite) -> AuditEvent {
    let actor = Actor {
        partner_id: Some(partner.into()),
        ..Actor::default()
    };
    let mut event = AuditEvent::new(request_id, actor, Action::Create, Outcome::Success);
    event.entity = Some(Entity {
        resource_type: record.resource_type.clone(),
        id: record.id.clone(),
        version_id: None,
        content_hash: None,
    });
    event.patient = record.nhs_number.clone();
    event
}

/// One submission from `partner` carrying `records`, with one audit event per record.
pub(crate) fn submission(partner: &str, request_id: &str, records: Vec<RecordWrite>) -> Submission {
    let audit = records
        .iter()
        .map(|record| event(partner, request_id, record))
        .collect();
    Submission {
        partner: partner.into(),
        idempotency_key: None,
        records,
        audit,
    }
}

pub(crate) fn single(partner: &str, id: &str, mode: WriteMode, body: &str) -> Submission {
    submission(partner, &format!("req-{id}"), vec![record(id, mode, body)])
}

/// An audit-only submission carrying `event`.
pub(crate) fn audit_only(partner: &str, event: AuditEvent) -> Submission {
    Submission {
        partner: partner.into(),
        idempotency_key: None,
        records: Vec::new(),
        audit: vec![event],
    }
}

pub(crate) fn update(if_match: Option<i64>) -> WriteMode {
    WriteMode::Update { if_match }
}

pub(crate) async fn log_len(store: &impl Store) -> usize {
    store.read_log(0, 10_000).await.expect("log reads").len()
}

/// Poll every future once (each queues its request with the writer), run `then`, then drive them
/// all to completion. Runs unconstrained by tokio's cooperative budget so the first pass really
/// reaches every future.
pub(crate) async fn queue_all_then<F: Future>(
    futures: Vec<F>,
    then: impl FnOnce(),
) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    let mut then = Some(then);
    tokio::task::unconstrained(std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if let Some(then) = then.take() {
            then();
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }))
    .await;
    outputs.into_iter().map(Option::unwrap).collect()
}
