//! `caregate demo` (issue 7): a short day in the example ICS through the real binary exits 0 with
//! every check held, and the kept data directory answers the other commands.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

use std::process::Command;

use caregate_e2e::{binary, workspace_root};

#[test]
fn demo_runs_a_short_day_and_every_check_holds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let output = Command::new(binary())
        .current_dir(workspace_root())
        .args(["demo", "--patients", "60", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "demo failed ({:?})\n{stdout}\n{stderr}\ngateway log:\n{}",
        output.status,
        std::fs::read_to_string(data.join("caregate.log")).unwrap_or_default()
    );
    for expected in [
        "all checks held",
        "[ok] every synthetic record accepted",
        "[ok] every broken request refused with an OperationOutcome",
        "[ok] every allowed record delivered once, none pending or dead",
        "[ok] audit chain verified",
        "example OperationOutcome",
        "Withheld at intake, by rule",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in\n{stdout}"
        );
    }
    assert!(!stdout.contains("FAILED"), "{stdout}");

    // The kept directory is a gateway data directory the other commands read.
    let verify = Command::new(binary())
        .args(["audit", "verify", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let status = Command::new(binary())
        .args(["deliveries", "status", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("gp-a81001: pending 0"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    assert!(
        data.join("feeds")
            .join("icb-qe1-population-health")
            .is_dir()
    );

    // The feed's export goes on to NATS JetStream (a hermetic nats-server), once.
    let Some(nats) = caregate_testkit::nats::NatsServer::start() else {
        eprintln!("{}", caregate_testkit::nats::SKIPPED_NO_NATS);
        return;
    };
    let nats = nats.unwrap();
    let publish = |expect: &str| {
        let output = Command::new(binary())
            .args(["feed", "publish", "icb-qe1-population-health", "--data"])
            .arg(&data)
            .args(["--nats", &nats.url()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains(expect), "{stdout}");
    };
    publish("messages stored, 0 already there");
    publish(": 0 messages stored,");
}

#[test]
fn demo_refuses_a_data_directory_that_is_not_empty() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("something"), "x").unwrap();
    let output = Command::new(binary())
        .current_dir(workspace_root())
        .args(["demo", "--data"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not empty"), "{stderr}");
}
