//! What only the embedded SQLite store promises (the trait-level behaviour is in
//! `store_behaviour.rs`, run against both backends): IG officers can open the file with any
//! SQLite tool.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

mod support;

use caregate_store::sqlite::DATABASE_FILE;
use caregate_store::{Store, WriteMode};
use support::{Backend, NHS_NUMBER, Sqlite, raw_sqlite, single};

#[tokio::test]
async fn ig_officers_can_query_the_audit_table_with_plain_sql() {
    let backend = Sqlite::new().unwrap();
    let dir = &backend.dir;
    let store = backend.open().await;
    store
        .submit(single("gp-a", "obs-1", WriteMode::Create, "a"))
        .await
        .unwrap();
    store.close().await.unwrap();
    let wal = dir.path().join(format!("{DATABASE_FILE}-wal"));
    let wal_len = std::fs::metadata(wal).map_or(0, |wal| wal.len());
    assert_eq!(
        wal_len, 0,
        "after a clean close the database file alone holds everything"
    );

    let conn = raw_sqlite(dir.path());
    let (partner, action, outcome, resource): (String, String, String, String) = conn
        .query_row(
            "SELECT partner_id, action, outcome, resource_type || '/' || resource_id \
             FROM audit_events WHERE patient = ?1",
            [NHS_NUMBER],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )
        .unwrap();
    assert_eq!(
        (
            partner.as_str(),
            action.as_str(),
            outcome.as_str(),
            resource.as_str()
        ),
        ("gp-a", "create", "success", "Observation/obs-1")
    );
}
