//! The command line as an operator and an integration engineer meet it: a broken config fails at
//! start naming file, line and field; `caregate validate` prints the same OperationOutcomes as the
//! gateway and exits 1 on any invalid file; `partner-key` writes a usable key pair.

use std::process::Command;

use caregate_e2e::{binary, patient, workspace_root};

fn run(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(binary())
        .args(args)
        .output()
        .expect("run caregate");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn invalid_config_fails_at_start_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("caregate.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[[partner]]\nid = \"gp-1\"\nname = \"GP\"\nods_code = \"not an ods code\"\nkind = \"gp\"\nscopes = [\"system/*.cru\"]\njwks = { keys = [] }\n",
    )
    .unwrap();
    let (code, _, stderr) = run(&["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!("{}:8", config.display())),
        "names file and line: {stderr}"
    );
    assert!(
        stderr.contains("partner[0].ods_code"),
        "names the field: {stderr}"
    );

    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\nlisen = 1\n",
    )
    .unwrap();
    let (code, _, stderr) = run(&["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains(":4") && stderr.contains("unknown field `lisen`"),
        "{stderr}"
    );
}

#[test]
fn validate_prints_outcomes_and_exits_1_on_invalid_input() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("good.json"),
        patient("9434765919").to_string(),
    )
    .unwrap();
    let (code, stdout, _) = run(&["validate", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("1 valid, 0 invalid"), "{stdout}");

    std::fs::write(
        dir.path().join("bad.json"),
        patient("9434765918").to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("lines.ndjson"),
        format!(
            "{}\n{{\"resourceType\":\"Patient\",\"gender\":\"x\",\"gender\":\"y\"}}\n",
            patient("9434765919")
        ),
    )
    .unwrap();
    let (code, stdout, _) = run(&["validate", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("INVALID") && stdout.contains("bad.json"),
        "{stdout}"
    );
    assert!(
        stdout.contains("lines.ndjson:2"),
        "NDJSON errors name the line: {stdout}"
    );
    assert!(
        stdout.contains("\"expression\"") && stdout.contains("Patient.identifier[0].value"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("9434765918"),
        "the NHS number is not echoed: {stdout}"
    );
    assert!(stdout.contains("2 valid, 2 invalid"), "{stdout}");

    let (code, _, stderr) = run(&["validate", "/no/such/file.json"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/no/such/file.json"), "{stderr}");
}

#[test]
fn partner_key_writes_a_private_key_and_a_jwks_the_gateway_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(&[
        "partner-key",
        "--partner",
        "gp-z99999",
        "--alg",
        "RS384",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("gp-z99999.key.pem"));
    let jwks: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("gp-z99999.jwks.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(jwks["keys"][0]["kty"], "RSA");
    assert!(
        jwks["keys"][0].get("d").is_none(),
        "the JWKS holds no private material"
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.path().join("gp-z99999.key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Refuses to overwrite.
    let (code, _, _) = run(&[
        "partner-key",
        "--partner",
        "gp-z99999",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
}

#[test]
fn the_shipped_example_config_is_valid() {
    let example = workspace_root().join("deploy/example/caregate.toml");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.json"), patient("9434765919").to_string()).unwrap();
    let (code, stdout, stderr) = run(&[
        "validate",
        "--config",
        example.to_str().unwrap(),
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[test]
fn policy_check_and_test_pass_on_the_shipped_bundle_and_name_a_broken_file() {
    let policies = workspace_root().join("policies");
    let (code, stdout, stderr) = run(&["policy", "check", "--dir", policies.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("version: sha256:"), "{stdout}");
    let (code, stdout, _) = run(&["policy", "test", "--dir", policies.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.trim_end().ends_with("passed, 0 failed"), "{stdout}");

    let broken = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", policies.display()))
        .arg(broken.path())
        .status()
        .unwrap();
    assert!(status.success());
    let cedar = broken.path().join("20-direct-care.cedar");
    let text = std::fs::read_to_string(&cedar).unwrap();
    std::fs::write(&cedar, text.replacen("principal", "princpal", 1)).unwrap();
    let (code, _, stderr) = run(&["policy", "check", "--dir", broken.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("20-direct-care.cedar:"),
        "names the file and line: {stderr}"
    );
}

#[test]
fn ndoo_5_load_ndoo_installs_a_valid_list_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("caregate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[policy]\ndir = \"{}\"\nndoo_list = \"ndoo.txt\"\n",
            workspace_root().join("policies").display()
        ),
    )
    .unwrap();
    let good = dir.path().join("received.txt");
    std::fs::write(&good, "9434765919\n4000000004\n").unwrap();
    let (code, stdout, stderr) = run(&[
        "consent",
        "load-ndoo",
        good.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("installed 2 NHS numbers"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ndoo.txt")).unwrap(),
        "9434765919\n4000000004\n"
    );

    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "9434765919\n9434765918\n").unwrap();
    let (code, _, stderr) = run(&[
        "consent",
        "load-ndoo",
        bad.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        !stderr.contains("9434765918"),
        "the NHS number is not echoed: {stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ndoo.txt")).unwrap(),
        "9434765919\n4000000004\n",
        "the installed list is unchanged"
    );
}
