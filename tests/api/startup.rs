//! Startup refuses bad configuration with an error that names what is wrong, and writes nothing.

use std::process::Command;
use vm_workflow::config::Config;
use vm_workflow::startup::Application;

fn config_with_profiles(dir: &std::path::Path, yaml: &str) -> Config {
    let path = dir.join("bad-profiles.yaml");
    std::fs::write(&path, yaml).expect("write");
    let mut config = Config::for_data_dir(dir.join("data"));
    config.profiles_path = Some(path);
    config
}

async fn build_error(config: Config) -> String {
    match Application::build(config).await {
        Ok(_) => panic!("startup should fail"),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test]
async fn a_malformed_profiles_file_stops_startup() {
    let tmp = tempfile::tempdir().expect("tmp");
    let yaml = "version: v1\nprofiles:\n  - mode: broken\n    stages:\n      - key: s1\n        skills: [a]\n        retry_policy: { max_attempts: 0 }\n";
    let err = build_error(config_with_profiles(tmp.path(), yaml)).await;
    assert!(err.contains("bad-profiles.yaml"), "{err}");
    assert!(err.contains("profile `broken`"), "{err}");
    assert!(err.contains("max_attempts"), "{err}");
    assert!(!tmp.path().join("data").exists(), "nothing written");
}

#[tokio::test]
async fn a_missing_foundation_mode_stops_startup() {
    let tmp = tempfile::tempdir().expect("tmp");
    let yaml =
        "version: v1\nprofiles:\n  - mode: only\n    stages:\n      - {key: s1, skills: [a]}\n";
    let err = build_error(config_with_profiles(tmp.path(), yaml)).await;
    assert!(err.contains("foundation_stack"), "{err}");
}

#[tokio::test]
async fn a_bad_fault_spec_stops_startup() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut config = Config::for_data_dir(tmp.path().join("data"));
    config.fault_injection = Some("research=explode".into());
    let err = build_error(config).await;
    assert!(
        err.contains("VM_FAULT_INJECTION") && err.contains("explode"),
        "{err}"
    );
}

#[test]
fn check_profiles_command() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ok = Command::new(env!("CARGO_BIN_EXE_vm-workflow"))
        .args(["check-profiles"])
        .output()
        .expect("run");
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout)
        .contains("content_calendar, foundation_stack, plan_90d"));
    let bad = tmp.path().join("p.yaml");
    std::fs::write(
        &bad,
        "version: v1\nprofiles:\n  - mode: m\n    stages: [1, 2]\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_vm-workflow"))
        .args(["check-profiles", "--path"])
        .arg(&bad)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.yaml") && err.contains("profile `m`") && err.contains("stages[0]"),
        "{err}"
    );
}

#[test]
fn export_schema_command_prints_the_sdl() {
    let out = Command::new(env!("CARGO_BIN_EXE_vm-workflow"))
        .arg("export-schema")
        .output()
        .expect("run");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        vm_workflow::graphql::export_sdl()
    );
}

/// Logs written to a file or a pipe are plain text: no terminal colour codes.
#[test]
fn logs_off_a_terminal_carry_no_colour_codes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = Command::new(env!("CARGO_BIN_EXE_vm-workflow"))
        .arg("--data-dir")
        .arg(tmp.path())
        .arg("rebuild-projections")
        .env_remove("RUST_LOG")
        .output()
        .expect("run");
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains(" INFO "), "an info line is logged: {log}");
    assert!(!log.contains('\u{1b}'), "no escape codes: {log:?}");
}
