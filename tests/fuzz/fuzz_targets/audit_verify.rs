//! The audit verifier over corrupted logs (issue 9; DOMAIN.md B2 `T1`): a small valid audit log is
//! written once by the real store (`SqliteStore`, signed checkpoints every 5 events, 11 events so
//! the newest checkpoint covers them all and is kept as a witness's copy). Each input is a list of
//! corruptions applied to a copy of that SQLite file — row-level ones through SQLite (delete an
//! event, swap two events' sequence numbers, truncate the log, edit an event's bytes with or
//! without recomputing its leaf hash, edit a query column or a recorded leaf, edit or delete a
//! stored checkpoint, append an event) and then file-level ones on the bytes (byte flips,
//! truncation) — and then `caregate_store::sqlite::verify_audit` runs on it, given the witness's
//! checkpoint, as `caregate audit verify --checkpoint` does.
//!
//! Properties beyond "no panic" (libFuzzer's `-timeout` makes a hang a failure too):
//! - the verifier returns a verdict: a report, or an error for a file SQLite cannot read;
//! - when a corruption changed an audited byte — the `seq`, event bytes, recorded leaf or a query
//!   column of any of the 11 events, as SQLite now reads them with the verifier's own query —
//!   the verdict is not "ok";
//! - when event content changed (not only a query column), the report names a first bad sequence
//!   number no later than the first changed event, or at least does not attest it (an attacker who
//!   recomputes leaf hashes and truncates the log below every checkpoint covering the edit leaves
//!   nothing that could name it);
//! - a stored checkpoint that parses but is not one the log signed makes the verdict not "ok".
//!
//! The copy lives in `/tmp/caregate-fuzz-audit-<pid>/`, rewritten for every input and removed
//! after it; directories left by a run that stopped on a crash are removed by the next run.
#![no_main]

use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use caregate_audit::checkpoint::{CheckpointSchedule, CheckpointSigner};
use caregate_audit::event_hash::event_leaf_hash;
use caregate_audit::{
    Action, Actor, AuditEvent, CheckpointVerifier, Entity, Outcome, SignedCheckpoint,
};
use caregate_store::sqlite::{AuditSigning, SqliteOptions, SqliteStore, verify_audit};
use caregate_store::{Store, Submission};
use libfuzzer_sys::fuzz_target;
use rusqlite::{Connection, OpenFlags};

const EVENTS: u64 = 11;
const DATABASE_FILE: &str = "caregate.db";
const LOG_ID: &str = "caregate.fuzz/audit";

/// One audit row as the verifier reads it: seq, event, leaf, then the seven query columns.
type Row = (i64, String, Vec<u8>, [Option<String>; 7]);

/// The verifier's own query (`verify_audit`), so both read the same rows from a damaged file.
const EVENTS_QUERY: &str = "SELECT seq, event, leaf_hash, patient, partner_id, action, outcome, \
     request_id, resource_type, resource_id FROM audit_events ORDER BY seq";
const CHECKPOINTS_QUERY: &str = "SELECT checkpoint FROM audit_checkpoints ORDER BY size";

struct Base {
    /// The database file after a clean close (WAL checkpointed into it).
    bytes: Vec<u8>,
    rows: Vec<Row>,
    checkpoints: Vec<String>,
    verifier: CheckpointVerifier,
    witness: SignedCheckpoint,
}

fn event(n: u64) -> AuditEvent {
    let actor = Actor {
        partner_id: Some(["gp-a81001", "trust-rx1", "icb-qe1"][(n % 3) as usize].to_owned()),
        ods_code: Some("A81001".to_owned()),
        client_id: None,
        remote_addr: Some("192.0.2.7".to_owned()),
    };
    let action = [
        Action::Create,
        Action::Read,
        Action::Deliver,
        Action::AuditQuery,
    ][(n % 4) as usize];
    let mut event = AuditEvent::new(format!("req-{n}"), actor, action, Outcome::Success);
    if n % 2 == 0 {
        event.patient = Some("9434765919".to_owned());
        event.entity = Some(Entity {
            resource_type: "Observation".to_owned(),
            id: format!("obs-{n}"),
            version_id: Some(1),
            content_hash: None,
        });
    }
    event.status = Some(201);
    event
}

fn read_rows(conn: &Connection) -> rusqlite::Result<Vec<Row>> {
    let mut statement = conn.prepare(EVENTS_QUERY)?;
    let mut rows = statement.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push((
            row.get(0)?,
            row.get(1)?,
            row.get(2)?,
            [
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
                row.get(6)?,
                row.get(7)?,
                row.get(8)?,
                row.get(9)?,
            ],
        ));
    }
    Ok(out)
}

fn read_checkpoints(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut statement = conn.prepare(CHECKPOINTS_QUERY)?;
    let rows = statement.query_map([], |row| row.get::<_, String>(0))?;
    rows.collect()
}

fn open_read_only(path: &Path) -> rusqlite::Result<Connection> {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

/// Remove work directories left by earlier runs that stopped on a crash (a failing input aborts
/// the process before its clean-up), when the process that made them is gone.
fn remove_stale_work_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix("caregate-fuzz-audit-"))
        else {
            continue;
        };
        let pid = rest.strip_prefix("base-").unwrap_or(rest);
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

static BASE: LazyLock<Base> = LazyLock::new(|| {
    remove_stale_work_dirs();
    let dir = std::env::temp_dir().join(format!("caregate-fuzz-audit-base-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let signer = Arc::new(CheckpointSigner::generate(LOG_ID).expect("a key"));
    let options = SqliteOptions {
        audit_signing: Some(AuditSigning {
            signer: signer.clone(),
            schedule: CheckpointSchedule {
                every_events: NonZeroU64::new(5).expect("non-zero"),
                every: time::Duration::hours(1),
            },
        }),
        read_connections: 1,
        ..SqliteOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let store = SqliteStore::open(&dir, options).expect("the store opens");
        for n in 1..=EVENTS {
            store
                .submit(Submission {
                    partner: "gp-a81001".into(),
                    idempotency_key: None,
                    records: vec![],
                    audit: vec![event(n)],
                })
                .await
                .expect("an audit event commits");
        }
        store.close().await.expect("the store closes");
    });
    let path = dir.join(DATABASE_FILE);
    for suffix in ["-wal", "-shm"] {
        let side = dir.join(format!("{DATABASE_FILE}{suffix}"));
        if let Ok(meta) = std::fs::metadata(&side) {
            assert!(
                suffix == "-shm" || meta.len() == 0,
                "the closed store left a non-empty WAL"
            );
        }
    }
    let bytes = std::fs::read(&path).expect("the database file");
    let conn = open_read_only(&path).expect("the database opens");
    let rows = read_rows(&conn).expect("the events read");
    let checkpoints = read_checkpoints(&conn).expect("the checkpoints read");
    drop(conn);
    assert_eq!(rows.len() as u64, EVENTS);
    let verifier = signer.verifier();
    let witness = SignedCheckpoint::parse(checkpoints.last().expect("a checkpoint"))
        .expect("a stored checkpoint parses");
    assert_eq!(
        witness.unverified().size,
        EVENTS,
        "the newest checkpoint covers the whole log"
    );
    let clean = verify_audit(&dir, &verifier, std::slice::from_ref(&witness)).expect("verifies");
    assert!(
        clean.is_ok(),
        "the untouched log does not verify: {clean:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Base {
        bytes,
        rows,
        checkpoints,
        verifier,
        witness,
    }
});

/// A cursor over the fuzzer's bytes; reads past the end give zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    fn seq(&mut self) -> i64 {
        // 0..=12: one below and one beyond the log as well.
        i64::from(self.byte() % 13)
    }
}

/// Row-level corruptions, made through SQLite as an attacker with write access to the file would.
fn corrupt_rows(conn: &Connection, op: u8, input: &mut Input<'_>) {
    // Errors (constraint violations, rows that do not exist) leave the file as it was.
    let _ = match op {
        0 => conn.execute("DELETE FROM audit_events WHERE seq = ?1", [input.seq()]),
        1 => {
            let (a, b) = (input.seq(), input.seq());
            conn.execute_batch(&format!(
                "UPDATE audit_events SET seq = -1 WHERE seq = {a};
                 UPDATE audit_events SET seq = {a} WHERE seq = {b};
                 UPDATE audit_events SET seq = {b} WHERE seq = -1;"
            ))
            .map(|()| 0)
        }
        2 => conn.execute("DELETE FROM audit_events WHERE seq > ?1", [input.seq()]),
        3 | 4 => {
            // Edit one byte of an event; op 4 also recomputes its leaf (an attacker who knows
            // the hashing but not the checkpoint key).
            let seq = input.seq();
            let position = usize::from(input.byte());
            let replacement = input.byte();
            let Ok(event) = conn.query_row(
                "SELECT event FROM audit_events WHERE seq = ?1",
                [seq],
                |row| row.get::<_, String>(0),
            ) else {
                return;
            };
            let mut bytes = event.into_bytes();
            if bytes.is_empty() {
                return;
            }
            let at = position % bytes.len();
            bytes[at] = if replacement.is_ascii() && replacement != bytes[at] {
                replacement
            } else {
                bytes[at] ^ 0x01
            };
            let Ok(edited) = String::from_utf8(bytes) else {
                return;
            };
            let result = conn.execute(
                "UPDATE audit_events SET event = ?1 WHERE seq = ?2",
                rusqlite::params![edited, seq],
            );
            if op == 4 {
                let leaf = event_leaf_hash(u64::try_from(seq).unwrap_or(0), edited.as_bytes());
                let _ = conn.execute(
                    "UPDATE audit_events SET leaf_hash = ?1 WHERE seq = ?2",
                    rusqlite::params![leaf.as_bytes().to_vec(), seq],
                );
            }
            result
        }
        5 => {
            let column = [
                "patient",
                "partner_id",
                "action",
                "outcome",
                "request_id",
                "resource_type",
                "resource_id",
            ][usize::from(input.byte() % 7)];
            let seq = input.seq();
            let value = match input.byte() % 3 {
                0 => None,
                1 => Some("9000000009".to_owned()),
                _ => Some(format!("x{}", input.byte())),
            };
            conn.execute(
                &format!("UPDATE audit_events SET {column} = ?1 WHERE seq = ?2"),
                rusqlite::params![value, seq],
            )
        }
        6 => {
            let seq = input.seq();
            let length = usize::from(input.byte() % 40);
            let leaf: Vec<u8> = (0..length).map(|_| input.byte()).collect();
            conn.execute(
                "UPDATE audit_events SET leaf_hash = ?1 WHERE seq = ?2",
                rusqlite::params![leaf, seq],
            )
        }
        7 => {
            // Edit one byte of a stored checkpoint.
            let size = i64::from(input.byte() % 13);
            let position = usize::from(input.byte());
            let replacement = input.byte() & 0x7f;
            let Ok(text) = conn.query_row(
                "SELECT checkpoint FROM audit_checkpoints WHERE size = ?1",
                [size],
                |row| row.get::<_, String>(0),
            ) else {
                return;
            };
            let mut bytes = text.into_bytes();
            if bytes.is_empty() {
                return;
            }
            let at = position % bytes.len();
            bytes[at] = replacement;
            let Ok(edited) = String::from_utf8(bytes) else {
                return;
            };
            conn.execute(
                "UPDATE audit_checkpoints SET checkpoint = ?1 WHERE size = ?2",
                rusqlite::params![edited, size],
            )
        }
        8 => conn.execute(
            "DELETE FROM audit_checkpoints WHERE size = ?1",
            [i64::from(input.byte() % 13)],
        ),
        _ => {
            // Append a well-formed event after the log (growth, not a change of what was
            // audited; it is beyond the witness's checkpoint).
            let seq = EVENTS + 1;
            let text = r#"{"action":"read","actor":{},"outcome":"success","recorded":"2026-01-01T00:00:00Z","request_id":"forged"}"#;
            let leaf = event_leaf_hash(seq, text.as_bytes());
            conn.execute(
                "INSERT INTO audit_events (seq, recorded, request_id, action, outcome, event, leaf_hash) \
                 VALUES (?1, '2026-01-01T00:00:00Z', 'forged', 'read', 'success', ?2, ?3)",
                rusqlite::params![seq as i64, text, leaf.as_bytes().to_vec()],
            )
        }
    };
}

/// Whether a row holds the original event: same seq, event bytes and recorded leaf. (A recorded
/// leaf of the wrong length is a change like any other: this target found that `verify_audit` once
/// ignored it — regression test `t1_malformed_recorded_leaf_is_named` in crates/store.)
fn same_event(row: &Row, original: &Row) -> bool {
    row.0 == original.0 && row.1 == original.1 && row.2 == original.2
}

fn work_dir() -> PathBuf {
    std::env::temp_dir().join(format!("caregate-fuzz-audit-{}", std::process::id()))
}

fn run(data: &[u8], dir: &Path) {
    let base = &*BASE;
    let path = dir.join(DATABASE_FILE);
    std::fs::create_dir_all(dir).expect("the work directory");
    std::fs::write(&path, &base.bytes).expect("the copy is written");

    // Byte 0: how many row-level corruptions (0..=3); then the row-level ones; the rest are
    // file-level (flips and truncation) on the bytes SQLite wrote.
    let mut input = Input(data);
    let row_ops = input.byte() % 4;
    if row_ops > 0 {
        let conn = Connection::open(&path).expect("the copy opens");
        for _ in 0..row_ops {
            let op = input.byte() % 10;
            corrupt_rows(&conn, op, &mut input);
        }
        conn.close().expect("the copy closes");
    }
    let mut bytes = std::fs::read(&path).expect("the copy reads");
    let mut file_ops = 0;
    while !input.0.is_empty() && file_ops < 8 {
        file_ops += 1;
        let op = input.byte();
        let offset = input.u32() as usize % bytes.len().max(1);
        if op % 8 == 7 {
            bytes.truncate(offset);
        } else if let Some(byte) = bytes.get_mut(offset) {
            *byte ^= input.byte().max(1);
        }
    }
    if file_ops > 0 {
        // A leftover WAL would be replayed over the edited bytes; make the edit the last word.
        let _ = std::fs::remove_file(dir.join(format!("{DATABASE_FILE}-wal")));
        let _ = std::fs::remove_file(dir.join(format!("{DATABASE_FILE}-shm")));
        std::fs::write(&path, &bytes).expect("the corrupted copy is written");
    }

    // What SQLite now reads, with the verifier's own queries.
    let observed = open_read_only(&path).and_then(|conn| {
        let rows = read_rows(&conn)?;
        let checkpoints = read_checkpoints(&conn)?;
        Ok((rows, checkpoints))
    });
    let verdict = verify_audit(dir, &base.verifier, std::slice::from_ref(&base.witness));

    let Ok(verification) = verdict else {
        // An unreadable file is a verdict ("cannot verify"), never "ok".
        return;
    };
    let Ok((rows, checkpoints)) = observed else {
        assert!(
            !verification.is_ok(),
            "the verifier says ok about a file SQLite cannot read the same way"
        );
        return;
    };
    // Rows of the 11 audited events (an appended event beyond them is growth).
    let audited: Vec<&Row> = rows
        .iter()
        .filter(|row| (1..=EVENTS as i64).contains(&row.0))
        .collect();
    let first_event_change = (0..base.rows.len()).find(|&n| {
        audited
            .get(n)
            .is_none_or(|row| !same_event(row, &base.rows[n]))
    });
    let changed = audited.len() != base.rows.len()
        || audited
            .iter()
            .zip(&base.rows)
            .any(|(row, original)| !same_event(row, original) || row.3 != original.3);
    if changed {
        assert!(
            !verification.is_ok(),
            "an audited byte changed (first changed event position {first_event_change:?}) \
             and the verifier says ok: {verification:?}"
        );
    }
    if let Some(position) = first_event_change {
        // The changed event is named (or an earlier one), or at least not attested: when the
        // attacker recomputed its leaf and also cut the log short of every checkpoint covering
        // it, no verifier can name it — but it must not be claimed as proven.
        let first_changed_seq = position as u64 + 1;
        let report = &verification.report;
        assert!(
            report
                .first_bad_seq
                .is_some_and(|seq| seq <= first_changed_seq)
                || report.attested_size < first_changed_seq,
            "event {first_changed_seq} changed but the report names {:?} and attests 1..={}: \
             {verification:?}",
            report.first_bad_seq,
            report.attested_size
        );
    }
    for text in &checkpoints {
        if base.checkpoints.contains(text) {
            continue;
        }
        if let Ok(signed) = SignedCheckpoint::parse(text) {
            match base.verifier.verify(&signed) {
                Ok(checkpoint) => assert!(
                    base.checkpoints.iter().any(|original| {
                        SignedCheckpoint::parse(original)
                            .is_ok_and(|o| o.unverified() == &checkpoint)
                    }),
                    "a checkpoint the log never signed verifies"
                ),
                Err(_) => assert!(
                    !verification.is_ok(),
                    "a stored checkpoint with a bad signature and the verifier says ok"
                ),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = work_dir();
    let _ = std::fs::remove_dir_all(&dir);
    run(data, &dir);
    let _ = std::fs::remove_dir_all(&dir);
});
