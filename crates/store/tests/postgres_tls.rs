//! The PostgreSQL store over TLS (issue 8), against a hermetic server with `ssl = on`, a
//! certificate from an rcgen test CA and `hostssl`-only `pg_hba.conf`: a store opened with
//! `verify-full` commits and reads, and every one of its connections (writer and readers) is
//! encrypted; the same store configured with another CA or without TLS does not open. The
//! connection-level cases (name mismatch, `require`, channel binding) are unit tests in
//! `src/postgres/tls.rs`. Prints a skip message and passes without PostgreSQL binaries.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

use caregate_audit::{Action, Actor, AuditEvent, Outcome};
use caregate_store::postgres::{CaCertificates, PostgresOptions, PostgresStore, PostgresTls};
use caregate_store::{Store, StoreError, Submission};
use caregate_testkit::partner_server::TestCa;
use caregate_testkit::postgres::{PgServer, PgServerOptions, PgServerTls, SKIPPED_NO_POSTGRES};

/// A TLS-only server and the PEM of the CA that issued its certificate.
fn tls_server() -> Option<(PgServer, String)> {
    let ca = TestCa::new("caregate store TLS test CA");
    let issued = ca.issue_server();
    let options = PgServerOptions {
        tls: Some(PgServerTls {
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
            required: true,
        }),
    };
    match PgServer::start_with(&options) {
        Some(server) => Some((server.unwrap(), ca.pem().to_owned())),
        None => {
            eprintln!("{SKIPPED_NO_POSTGRES}");
            None
        }
    }
}

fn options(instance_id: &str, tls: PostgresTls) -> PostgresOptions {
    PostgresOptions {
        tls,
        read_connections: 2,
        ..PostgresOptions::new(instance_id)
    }
}

fn audit_only(n: usize) -> Submission {
    Submission {
        partner: "gp".into(),
        idempotency_key: None,
        records: Vec::new(),
        audit: vec![AuditEvent::new(
            format!("req-{n}"),
            Actor {
                partner_id: Some("gp".into()),
                ..Actor::default()
            },
            Action::Read,
            Outcome::Success,
        )],
    }
}

#[tokio::test]
async fn verify_full_store_commits_and_every_connection_is_encrypted() {
    let Some((server, ca_pem)) = tls_server() else {
        return;
    };
    let url = server.create_database().unwrap();
    let tls = PostgresTls::verify_full(CaCertificates::from_pem(ca_pem.as_bytes()).unwrap());
    let store = PostgresStore::connect(&url, options("gw-tls", tls))
        .await
        .unwrap();
    for n in 0..3 {
        store.submit(audit_only(n)).await.unwrap();
    }
    let page = store.read_audit(0, 10).await.unwrap();
    assert_eq!(page.len(), 3);

    // Seen from the server: the writer and both readers, each on TLS.
    let (admin, connection) =
        tokio_postgres::connect(&server.socket_url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let rows = admin
        .query(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.application_name LIKE 'caregate %gw-tls' \
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let seen: Vec<(String, bool)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    assert_eq!(
        seen,
        vec![
            ("caregate reader gw-tls".to_owned(), true),
            ("caregate reader gw-tls".to_owned(), true),
            ("caregate writer gw-tls".to_owned(), true),
        ]
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn the_store_does_not_open_with_another_ca_or_without_tls() {
    let Some((server, _)) = tls_server() else {
        return;
    };
    let url = server.create_database().unwrap();
    let other = TestCa::new("not the database's CA");
    let wrong_ca =
        PostgresTls::verify_full(CaCertificates::from_pem(other.pem().as_bytes()).unwrap());
    let error = PostgresStore::connect(&url, options("gw-a", wrong_ca))
        .await
        .unwrap_err();
    // Nothing was acknowledged, and the message names the TLS failure.
    assert!(
        matches!(&error, StoreError::Unavailable(message)
            if message.contains("error performing TLS handshake")
                && message.contains("invalid peer certificate: UnknownIssuer")),
        "{error}"
    );
    let error = PostgresStore::connect(&url, options("gw-a", PostgresTls::disable()))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("no pg_hba.conf entry")
            && error.to_string().contains("no encryption"),
        "{error}"
    );
}
