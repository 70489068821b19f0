//! deploy/ (issue 8): the Kubernetes manifests parse and reference the right image, ports, probes
//! and config keys. `kubectl --dry-run` needs a cluster; `deploy/k8s/check.py` checks statically,
//! for the embedded Deployment (deploy/k8s) and the cluster-mode StatefulSet
//! (deploy/k8s/example-cluster/caregate-cluster.yaml) alike: every document's kind and name,
//! probes on /livez and /readyz over the admin port that `[admin] listen` names, one image and
//! uid, selectors and named ports (no Service or PDB selects both workloads' pods), Secrets listed
//! in secrets.md, grace period above the shutdown grace, every key of each ConfigMap's
//! caregate.toml (nested tables included) a field of crates/gateway/src/config.rs, and every path
//! in it under a mount of each container that loads it. Cluster mode besides: the PostgreSQL
//! backend, TLS not disabled, `instance_id` rendered per pod from its name (not one value shared
//! by the replicas), `caregate db migrate` before the gateway, `[feeds] export_dir` on a
//! ReadWriteMany volume. `check.py --self-test` breaks the manifests in memory one way at a time
//! (a config key typo, a wrong probe path, a fixed instance_id, a ReadWriteOnce export volume, …)
//! and fails unless check.py reports each. It needs Python 3.11+ with PyYAML (Debian:
//! python3-yaml).

use std::process::Command;

use caregate_e2e::workspace_root;

fn has_python_yaml() -> bool {
    Command::new("python3")
        .args(["-c", "import yaml, tomllib"])
        .status()
        .is_ok_and(|status| status.success())
}

/// Runs deploy/k8s/check.py with `args`; its standard output, after asserting it succeeded.
fn run_check(args: &[&str]) -> String {
    let output = Command::new("python3")
        .arg(workspace_root().join("deploy/k8s/check.py"))
        .args(args)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "deploy/k8s/check.py {args:?} failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn k8s_manifests_reference_the_right_image_ports_probes_and_config_keys() {
    if !has_python_yaml() {
        eprintln!("skipped: python3 with PyYAML and tomllib (3.11+) not found");
        return;
    }
    let stdout = run_check(&[]);
    assert!(stdout.contains("checked"), "{stdout}");
    // Both workloads were found and checked with their own ConfigMap.
    assert!(
        stdout.contains("Deployment caregate (deploy/k8s/deployment.yaml, config caregate-config)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "StatefulSet caregate (deploy/k8s/example-cluster/caregate-cluster.yaml, config caregate-cluster-config)"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn k8s_check_catches_config_typos_wrong_probes_and_cluster_mistakes() {
    if !has_python_yaml() {
        eprintln!("skipped: python3 with PyYAML and tomllib (3.11+) not found");
        return;
    }
    let stdout = run_check(&["--self-test"]);
    for breakage in [
        "typo in an embedded config key: caught",
        "typo in a cluster config key: caught",
        "wrong cluster probe path: caught",
        "instance_id fixed for every replica: caught",
        "export_dir on a ReadWriteOnce volume: caught",
        "TLS to PostgreSQL disabled: caught",
        "cluster on SQLite: caught",
    ] {
        assert!(stdout.contains(breakage), "{breakage}:\n{stdout}");
    }
    assert!(stdout.contains("all caught"), "{stdout}");
}

#[test]
fn the_systemd_unit_reloads_with_sighup_and_outlasts_the_shutdown_grace() {
    let unit = std::fs::read_to_string(workspace_root().join("deploy/systemd/caregate.service"))
        .expect("the unit exists");
    assert!(
        unit.contains("ExecReload=/bin/kill -HUP $MAINPID"),
        "{unit}"
    );
    assert!(unit.contains("caregate serve --config"), "{unit}");
    let stop: u64 = unit
        .lines()
        .find_map(|line| line.strip_prefix("TimeoutStopSec="))
        .and_then(|value| value.trim().trim_end_matches('s').parse().ok())
        .expect("TimeoutStopSec in seconds");
    // deploy/example/caregate.toml: shutdown_grace_secs = 30.
    assert!(
        stop > 30,
        "TimeoutStopSec={stop} must exceed the shutdown grace"
    );
}
