//! deploy/ (issue 8): the Kubernetes manifests parse and reference the right image, ports, probes
//! and config keys. `kubectl --dry-run` needs a cluster; `deploy/k8s/check.py` checks statically
//! (every document's kind and name, probes on /livez and /readyz over the admin port that
//! `[admin] listen` names, one image and uid, selectors and named ports, Secrets listed, grace
//! period above the shutdown grace, and every key of the ConfigMap's caregate.toml a field of
//! crates/gateway/src/config.rs). It needs Python 3.11+ with PyYAML (Debian: python3-yaml).

use std::process::Command;

use caregate_e2e::workspace_root;

#[test]
fn k8s_manifests_reference_the_right_image_ports_probes_and_config_keys() {
    let has_yaml = Command::new("python3")
        .args(["-c", "import yaml, tomllib"])
        .status()
        .is_ok_and(|status| status.success());
    if !has_yaml {
        eprintln!("skipped: python3 with PyYAML and tomllib (3.11+) not found");
        return;
    }
    let output = Command::new("python3")
        .arg(workspace_root().join("deploy/k8s/check.py"))
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "deploy/k8s/check.py failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("checked"), "{stdout}");
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
