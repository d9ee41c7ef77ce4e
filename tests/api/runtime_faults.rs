use crate::helpers::{Backend, Options, TestApp};
use serde_json::Value;

const FAST_PROFILES: &str = "version: v-test
profiles:
  - mode: foundation_stack
    description: fast foundation
    stages:
      - key: research
        skills: [01-research/research-framework]
        retry_policy: { max_attempts: 3, backoff_seconds: 0.05 }
        timeout_seconds: 0.5
      - key: brand-voice
        skills: [03-strategy/brand-voice]
        approval_required: true
        retry_policy: { max_attempts: 2, backoff_seconds: 0.05 }
        timeout_seconds: 0.5
      - key: positioning
        skills: [03-strategy/positioning-angles]
        retry_policy: { max_attempts: 2, backoff_seconds: 0 }
        timeout_seconds: 0.5
      - key: keywords
        skills: [03-strategy/keyword-research]
        timeout_seconds: 5
";

async fn app_with_faults(backend: Backend, faults: &str) -> TestApp {
    let mut opts = Options::new(backend);
    opts.fault_injection = Some(faults.to_string());
    opts.profiles_yaml = Some(FAST_PROFILES.to_string());
    TestApp::spawn_with(opts).await
}

fn stage<'a>(run: &'a Value, key: &str) -> &'a Value {
    run["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .find(|s| s["key"] == key)
        .expect("stage")
}

async fn a_retryable_failure_is_retried(backend: Backend) {
    let app = app_with_faults(backend, "research=fail-once").await;
    let thread = app.thread().await;
    let id = app.start_run_id(&thread, "x").await;
    let run = app.wait_status(&id, &["WAITING_APPROVAL", "FAILED"]).await;
    assert_eq!(run["status"], "WAITING_APPROVAL");
    let research = stage(&run, "research");
    assert_eq!(research["status"], "COMPLETED");
    assert_eq!(research["attempts"], 2);
    // Error fields describe the latest failed attempt.
    assert_eq!(research["errorCode"], "STAGE_EXECUTION_ERROR");
    assert_eq!(research["retryable"], true);
    assert!(research["errorMessage"]
        .as_str()
        .expect("msg")
        .contains("fail-once"));
    let types = app.event_types(&id).await;
    let failed = types
        .iter()
        .filter(|t| *t == "WorkflowRunStageFailed")
        .count();
    assert_eq!(failed, 1, "{types:?}");
    // The failed attempt is recorded on disk.
    let attempt = app
        .data_dir
        .join("runs")
        .join(&id)
        .join("stages/01-research/attempts/001.json");
    let rec: Value = serde_json::from_str(&std::fs::read_to_string(attempt).expect("attempt file"))
        .expect("json");
    assert_eq!(rec["status"], "failed");
    assert_eq!(rec["errorCode"], "STAGE_EXECUTION_ERROR");
    // The completed attempt is recorded by the stage's output and manifest, not in `attempts/`.
    let stage_dir = app
        .data_dir
        .join("runs")
        .join(&id)
        .join("stages/01-research");
    assert!(!stage_dir.join("attempts/002.json").exists());
    for file in ["output.json", "manifest.json"] {
        let rec: Value =
            serde_json::from_str(&std::fs::read_to_string(stage_dir.join(file)).expect(file))
                .expect("json");
        assert_eq!(rec["attempt"], 2, "{file}");
        assert!(rec["finishedAt"].is_string(), "{file}");
    }
}

async fn retries_stop_at_max_attempts_and_keep_completed_stages(backend: Backend) {
    let app = app_with_faults(backend, "brand-voice=fail").await;
    let thread = app.thread().await;
    let id = app.start_run_id(&thread, "x").await;
    app.wait_status(&id, &["WAITING_APPROVAL"]).await;
    app.approve(&id, None).await;
    let run = app.wait_status(&id, &["FAILED"]).await;
    let bv = stage(&run, "brand-voice");
    assert_eq!(bv["status"], "FAILED");
    assert_eq!(bv["attempts"], 2, "max_attempts is 2");
    assert_eq!(bv["errorCode"], "STAGE_EXECUTION_ERROR");
    assert_eq!(bv["retryable"], true);
    let research = stage(&run, "research");
    assert_eq!(research["status"], "COMPLETED");
    assert_eq!(research["artifacts"].as_array().expect("a").len(), 1);
    assert!(!research["artifacts"][0]["content"]
        .as_str()
        .expect("c")
        .is_empty());
    let types = app.event_types(&id).await;
    assert_eq!(types.last().map(String::as_str), Some("WorkflowRunFailed"));
    assert!(
        types.contains(&"WorkflowRunStageCompleted".to_string()),
        "timeline kept: {types:?}"
    );
}

async fn a_fatal_failure_is_not_retried(backend: Backend) {
    let app = app_with_faults(backend, "research=fail-fatal").await;
    let thread = app.thread().await;
    let id = app.start_run_id(&thread, "x").await;
    let run = app.wait_status(&id, &["FAILED"]).await;
    let research = stage(&run, "research");
    assert_eq!(research["attempts"], 1);
    assert_eq!(research["retryable"], false);
    assert_eq!(research["errorCode"], "STAGE_EXECUTION_ERROR");
}

async fn a_hanging_stage_times_out(backend: Backend) {
    let app = app_with_faults(backend, "positioning=hang").await;
    let thread = app.thread().await;
    let id = app.start_run_id(&thread, "x").await;
    app.wait_status(&id, &["WAITING_APPROVAL"]).await;
    app.approve(&id, None).await;
    let run = app.wait_status(&id, &["FAILED"]).await;
    let p = stage(&run, "positioning");
    assert_eq!(p["errorCode"], "STAGE_TIMEOUT");
    assert_eq!(p["retryable"], true);
    assert_eq!(p["attempts"], 2);
    assert!(p["errorMessage"].as_str().expect("m").contains("timeout"));
    assert_eq!(stage(&run, "brand-voice")["status"], "COMPLETED");
}

/// `run.json` is written where the run rests (queued, waiting for approval, and its end), not
/// when it starts running again: a file replaced at every transition is what a run costs most on
/// disk.
async fn run_json_follows_the_resting_points(backend: Backend) {
    let app = app_with_faults(backend, "positioning=hang").await;
    let thread = app.thread().await;
    let id = app.start_run_id(&thread, "x").await;
    let waiting = app.wait_status(&id, &["WAITING_APPROVAL"]).await;
    let at_gate = app.wait_run_json(&id, "waiting_approval").await;
    let completed = waiting["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .filter(|s| s["status"] == "COMPLETED")
        .count();
    let manifests = at_gate["manifestPaths"].as_array().expect("manifests");
    assert!(completed >= 1);
    assert_eq!(
        manifests.len(),
        completed,
        "one per completed stage: {at_gate}"
    );

    // Approved: the run is running positioning (which hangs until its timeout).
    let approved = app.approve(&id, None).await;
    assert_eq!(approved["resumeApplied"], true, "{approved}");
    assert_eq!(
        app.run_json(&id),
        Some(at_gate.clone()),
        "not rewritten for running"
    );
    let running = app.run(&id).await;
    assert_eq!(running["status"], "RUNNING", "still running: {running}");

    let failed = app.wait_run_json(&id, "failed").await;
    let manifests = failed["manifestPaths"].as_array().expect("manifests");
    assert_eq!(
        manifests.len(),
        completed + 1,
        "and the stage approved since: {failed}"
    );
}

async fn delayed_stages_still_complete(backend: Backend) {
    let app = app_with_faults(backend, "research=delay-100").await;
    let thread = app.thread().await;
    let id = app.start_run_id(&thread, "x").await;
    let run = app.wait_status(&id, &["WAITING_APPROVAL"]).await;
    assert_eq!(stage(&run, "research")["attempts"], 1);
    assert_eq!(stage(&run, "research")["errorCode"], Value::Null);
}

async fn cancel_abandons_an_attempt_in_flight(backend: Backend) {
    let app = app_with_faults(backend, "research=delay-1500").await;
    let thread = app.thread().await;
    let id = app.start_run_id(&thread, "x").await;
    // Wait until the attempt is in flight.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while stage(&app.run(&id).await, "research")["status"] != "RUNNING" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "research never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    app.data(
        "mutation($r:ID!) { cancelWorkflowRun(input:{runId:$r}) { run { status } } }",
        serde_json::json!({"r": id}),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let run = app.run(&id).await;
    assert_eq!(run["status"], "CANCELED");
    assert_eq!(stage(&run, "research")["status"], "CANCELED");
    let types = app.event_types(&id).await;
    assert!(
        !types.contains(&"WorkflowRunStageCompleted".to_string()),
        "result discarded: {types:?}"
    );
}

/// Each worker of a runtime leases under its own name: two runs in flight at once hold two
/// different lease owners. (With one name per process, a worker whose lease ran out could keep
/// renewing it after a sibling worker had claimed the run again.)
async fn workers_lease_under_their_own_names(backend: Backend) {
    use sea_orm::{ConnectionTrait, Database, Statement};
    let mut opts = Options::new(backend);
    opts.fault_injection = Some("research=delay-1500".to_string());
    opts.workers = 2;
    let app = TestApp::spawn_with(opts).await;
    let thread = app.thread().await;
    app.start_run_id(&thread, "x").await;
    app.start_run_id(&thread, "x").await;
    let db = Database::connect(app.database_url.as_str())
        .await
        .expect("a second connection");
    let sql = "SELECT lease_owner FROM run_queue WHERE lease_owner IS NOT NULL";
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let owners = loop {
        let rows = db
            .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
            .await
            .expect("leases");
        let owners: Vec<String> = rows
            .iter()
            .map(|r| r.try_get_by_index::<String>(0).expect("owner"))
            .collect();
        if owners.len() == 2 {
            break owners;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "both runs never in flight: {owners:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_ne!(owners[0], owners[1], "one lease name for two workers");
}

crate::both_backends!(
    workers_lease_under_their_own_names,
    a_retryable_failure_is_retried,
    retries_stop_at_max_attempts_and_keep_completed_stages,
    a_fatal_failure_is_not_retried,
    a_hanging_stage_times_out,
    run_json_follows_the_resting_points,
    delayed_stages_still_complete,
    cancel_abandons_an_attempt_in_flight,
);
