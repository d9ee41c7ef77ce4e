use crate::helpers::{Backend, Options, TestApp};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn artifacts(run: &Value) -> Vec<Value> {
    run["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .flat_map(|s| s["artifacts"].as_array().expect("artifacts").clone())
        .collect()
}

async fn any_mode_falls_back_to_foundation_and_completes_on_approvals(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let run = app.start_run(&thread, "content_calendar").await;
    assert_eq!(run["status"], "QUEUED", "start returns at once, queued");
    assert_eq!(run["requestedMode"], "content_calendar");
    assert_eq!(run["effectiveMode"], "foundation_stack");
    assert_eq!(run["fallbackApplied"], true);
    assert_eq!(run["profileVersion"], "v1");
    let id = run["id"].as_str().expect("id").to_string();

    // plan.json holds the snapshot.
    let plan: Value = serde_json::from_str(
        &std::fs::read_to_string(app.data_dir.join("runs").join(&id).join("plan.json"))
            .expect("plan.json"),
    )
    .expect("json");
    assert_eq!(plan["requestedMode"], "content_calendar");
    assert_eq!(plan["effectiveMode"], "foundation_stack");
    assert_eq!(plan["profileVersion"], "v1");
    assert_eq!(plan["fallbackApplied"], true);
    assert_eq!(plan["stages"].as_array().expect("stages").len(), 4);

    let waiting = app.wait_status(&id, &["WAITING_APPROVAL"]).await;
    assert_eq!(waiting["currentStage"], "brand-voice");
    assert_eq!(waiting["pendingApprovals"][0]["stageKey"], "brand-voice");
    assert_eq!(waiting["stages"][0]["status"], "COMPLETED");
    assert_eq!(waiting["stages"][0]["errorCode"], Value::Null);
    assert_eq!(waiting["stages"][0]["retryable"], false);

    for gate in ["brand-voice", "positioning", "keywords"] {
        let run = app.wait_status(&id, &["WAITING_APPROVAL"]).await;
        assert_eq!(run["currentStage"], gate);
        let approved = app.approve(&id, None).await;
        assert_eq!(approved["resumeApplied"], true);
        assert_eq!(approved["approval"]["status"], "GRANTED");
        assert_eq!(approved["approval"]["decidedBy"], "ana");
        assert_eq!(approved["approval"]["comment"], "looks good");
    }
    let done = app.wait_status(&id, &["COMPLETED"]).await;
    let arts = artifacts(&done);
    let paths: Vec<_> = arts
        .iter()
        .map(|a| a["path"].as_str().expect("path"))
        .collect();
    assert_eq!(
        paths,
        [
            "research/research-report.md",
            "strategy/brand-voice-guide.md",
            "strategy/positioning-strategy.md",
            "final/foundation-brief.md",
            "strategy/keyword-map.md"
        ]
    );
    for a in &arts {
        let content = a["content"].as_str().expect("content");
        assert_eq!(a["sha256"], hex::encode(Sha256::digest(content.as_bytes())));
        assert_eq!(a["size"], content.len());
        assert_eq!(a["kind"], "md");
    }
    // What happened, should a stage have run twice (seen once, under load, not reproduced).
    let events = app.event_types(&id).await;
    for s in done["stages"].as_array().expect("stages") {
        assert_eq!(s["status"], "COMPLETED");
        assert_eq!(s["attempts"], 1, "stage {s}; events {events:?}");
    }
    // Manifests on disk list the same sha256 values, and no temporary files remain.
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(
            app.data_dir
                .join("runs")
                .join(&id)
                .join("stages/04-keywords/manifest.json"),
        )
        .expect("manifest"),
    )
    .expect("json");
    assert_eq!(manifest["artifacts"].as_array().expect("a").len(), 2);
    assert_eq!(manifest["stagePosition"], 4);
    let run_json = app.wait_run_json(&id, "completed").await;
    assert_eq!(run_json["manifestPaths"].as_array().expect("m").len(), 4);
    let tmp_files = walk(&app.data_dir.join("runs"))
        .into_iter()
        .filter(|p| p.ends_with(".tmp") || p.ends_with(".run.json.spare"))
        .count();
    assert_eq!(tmp_files, 0, "temporary or spare files left behind");

    let types = app.event_types(&id).await;
    assert_eq!(
        types.iter().filter(|t| *t == "WorkflowRunResumed").count(),
        3,
        "{types:?}"
    );
    assert_eq!(types.first().map(String::as_str), Some("WorkflowRunQueued"));
    assert_eq!(
        types.last().map(String::as_str),
        Some("WorkflowRunCompleted")
    );

    // resume is idempotent on a completed run: nothing changes, no event.
    let head = app.head().await;
    for key in ["r1", "r2"] {
        let d = app
            .data(
                "mutation($r:ID!, $k:String) { resumeWorkflowRun(input:{runId:$r, idempotencyKey:$k}) { resumeApplied run { status } } }",
                json!({"r": id, "k": key}),
            )
            .await;
        assert_eq!(
            d["resumeWorkflowRun"],
            json!({"resumeApplied": false, "run": {"status": "COMPLETED"}})
        );
    }
    assert_eq!(app.head().await, head);
    // The thread lists the run with both modes.
    let d = app
        .data("query($t:ID!) { thread(id:$t) { runs { edges { node { id requestedMode effectiveMode status } } } tasks { status } approvals { status } } }", json!({"t": thread}))
        .await;
    assert_eq!(d["thread"]["runs"]["edges"][0]["node"]["id"], id.as_str());
    assert_eq!(
        d["thread"]["tasks"],
        json!([{"status": "COMPLETED"}, {"status": "COMPLETED"}, {"status": "COMPLETED"}])
    );
    assert_eq!(d["thread"]["approvals"].as_array().expect("a").len(), 3);
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

async fn runs_on_one_thread_are_isolated(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let a = app.start_run(&thread, "foundation_stack").await["id"]
        .as_str()
        .expect("a")
        .to_string();
    let b = app.start_run(&thread, "foundation_stack").await["id"]
        .as_str()
        .expect("b")
        .to_string();
    assert_ne!(a, b);
    let ra = app.wait_status(&a, &["WAITING_APPROVAL"]).await;
    let rb = app.wait_status(&b, &["WAITING_APPROVAL"]).await;
    let ca = ra["stages"][0]["artifacts"][0]["content"]
        .as_str()
        .expect("content");
    let cb = rb["stages"][0]["artifacts"][0]["content"]
        .as_str()
        .expect("content");
    assert!(ca.contains(&format!("{thread}--{a}")) && cb.contains(&format!("{thread}--{b}")));
    assert_ne!(ca, cb);
    assert!(app
        .data_dir
        .join("runs")
        .join(&a)
        .join("stages/01-research/manifest.json")
        .exists());
    assert!(app
        .data_dir
        .join("runs")
        .join(&b)
        .join("stages/01-research/manifest.json")
        .exists());
    // Approval ids are per run and stage.
    assert_ne!(
        ra["pendingApprovals"][0]["id"],
        rb["pendingApprovals"][0]["id"]
    );
    // A start replayed with its key gives the same run.
    let q = "mutation($t:ID!) { startWorkflowRun(input:{threadId:$t, requestText:\"x\", mode:\"plan_90d\", idempotencyKey:\"k\"}) { run { id } } }";
    let one = app.data(q, json!({"t": thread})).await;
    let two = app.data(q, json!({"t": thread})).await;
    assert_eq!(one, two);
}

async fn early_and_repeated_approvals(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let id = app.start_run_id(&thread, "x").await;
    // Approve a later gate before the run reaches it: it is kept.
    let early = app.approve(&id, Some("positioning")).await;
    assert_eq!(early["resumeApplied"], false);
    assert_eq!(early["approval"]["status"], "GRANTED");
    app.wait_status(&id, &["WAITING_APPROVAL"]).await;
    assert_eq!(app.approve(&id, None).await["resumeApplied"], true);
    let run = app.wait_status(&id, &["WAITING_APPROVAL"]).await;
    assert_eq!(
        run["currentStage"], "keywords",
        "the early-approved gate did not stop the run"
    );
    // Approving an already granted gate changes nothing and is not an error.
    let head = app.head().await;
    let again = app.approve(&id, Some("brand-voice")).await;
    assert_eq!(again["resumeApplied"], false);
    assert_eq!(app.head().await, head);
    // Approving a stage without a gate, or an unknown stage, is a validation error.
    let q = "mutation($r:ID!, $s:String) { approveWorkflowRun(input:{runId:$r, stageKey:$s}) { resumeApplied } }";
    assert_eq!(
        app.error_code(q, json!({"r": id, "s": "research"})).await,
        "VALIDATION"
    );
    assert_eq!(
        app.error_code(q, json!({"r": id, "s": "nope"})).await,
        "VALIDATION"
    );
    app.approve(&id, None).await;
    app.wait_status(&id, &["COMPLETED"]).await;
    // Nothing to approve on a completed run without a stage key.
    assert_eq!(
        app.error_code(q, json!({"r": id, "s": null})).await,
        "VALIDATION"
    );
}

async fn reject_fails_the_run(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let id = app.start_run_id(&thread, "x").await;
    app.wait_status(&id, &["WAITING_APPROVAL"]).await;
    let q = "mutation($r:ID!) { rejectWorkflowRun(input:{runId:$r, comment:\"off-brand\"}) { run { status } approval { status comment decidedBy } } }";
    let d = app.data(q, json!({"r": id})).await;
    assert_eq!(d["rejectWorkflowRun"]["run"]["status"], "FAILED");
    assert_eq!(
        d["rejectWorkflowRun"]["approval"],
        json!({"status": "REJECTED", "comment": "off-brand", "decidedBy": "ana"})
    );
    let run = app.run(&id).await;
    let stage = &run["stages"][1];
    assert_eq!(stage["status"], "FAILED");
    assert_eq!(stage["errorCode"], "APPROVAL_REJECTED");
    assert_eq!(stage["retryable"], false);
    // The completed stage keeps its artifacts.
    assert_eq!(run["stages"][0]["status"], "COMPLETED");
    assert_eq!(
        run["stages"][0]["artifacts"].as_array().expect("a").len(),
        1
    );
    let approve = "mutation($r:ID!) { approveWorkflowRun(input:{runId:$r, stageKey:\"brand-voice\"}) { resumeApplied } }";
    assert_eq!(
        app.error_code(approve, json!({"r": id})).await,
        "INVALID_TRANSITION"
    );
}

async fn cancel_stops_a_run(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let id = app.start_run_id(&thread, "x").await;
    app.wait_status(&id, &["WAITING_APPROVAL"]).await;
    let q = "mutation($r:ID!) { cancelWorkflowRun(input:{runId:$r, reason:\"not needed\"}) { run { status finishedAt } } }";
    let d = app.data(q, json!({"r": id})).await;
    assert_eq!(d["cancelWorkflowRun"]["run"]["status"], "CANCELED");
    let head = app.head().await;
    // A terminal run is left as it is.
    assert_eq!(
        app.data(q, json!({"r": id})).await["cancelWorkflowRun"]["run"]["status"],
        "CANCELED"
    );
    assert_eq!(app.head().await, head);
    let run = app.run(&id).await;
    assert_eq!(run["pendingApprovals"], json!([]));
    let approve = "mutation($r:ID!) { approveWorkflowRun(input:{runId:$r, stageKey:\"brand-voice\"}) { resumeApplied } }";
    assert_eq!(
        app.error_code(approve, json!({"r": id})).await,
        "INVALID_TRANSITION"
    );
}

async fn resume_never_flips_a_waiting_run(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let id = app.start_run_id(&thread, "x").await;
    app.wait_status(&id, &["WAITING_APPROVAL"]).await;
    let head = app.head().await;
    let q =
        "mutation($r:ID!) { resumeWorkflowRun(input:{runId:$r}) { resumeApplied run { status } } }";
    for _ in 0..3 {
        let d = app.data(q, json!({"r": id})).await;
        assert_eq!(
            d["resumeWorkflowRun"],
            json!({"resumeApplied": false, "run": {"status": "WAITING_APPROVAL"}})
        );
    }
    assert_eq!(app.head().await, head);
    assert_eq!(
        app.run(&id).await["stages"][1]["status"],
        "WAITING_APPROVAL"
    );
}

async fn concurrent_approvals_grant_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let id = app.start_run_id(&thread, "x").await;
    app.wait_status(&id, &["WAITING_APPROVAL"]).await;
    let calls = (0..50).map(|_| {
        let client = app.client.clone();
        let url = format!("{}/graphql", app.url);
        let id = id.clone();
        tokio::spawn(async move {
            let body: Value = client
                .post(url)
                .json(&json!({"query": "mutation($r:ID!) { approveWorkflowRun(input:{runId:$r, stageKey:\"brand-voice\"}) { resumeApplied } }", "variables": {"r": id}}))
                .send()
                .await
                .expect("send")
                .json()
                .await
                .expect("json");
            body
        })
    });
    let results = futures::future::join_all(calls).await;
    let mut applied = 0;
    for r in results {
        let body = r.expect("task");
        assert!(body.get("errors").is_none(), "{body}");
        if body["data"]["approveWorkflowRun"]["resumeApplied"] == true {
            applied += 1;
        }
    }
    assert_eq!(applied, 1);
    let types = app.event_types(&id).await;
    assert_eq!(
        types.iter().filter(|t| *t == "ApprovalGranted").count(),
        1,
        "{types:?}"
    );
    assert_eq!(
        types.iter().filter(|t| *t == "WorkflowRunResumed").count(),
        1,
        "{types:?}"
    );
    let run = app.wait_status(&id, &["WAITING_APPROVAL"]).await;
    assert_eq!(run["currentStage"], "positioning");
    assert_eq!(run["stages"][1]["attempts"], 1, "brand-voice executed once");
}

async fn native_profiles_complete_without_fallback(backend: Backend) {
    let mut opts = Options::new(backend);
    opts.force_fallback = false;
    let app = TestApp::spawn_with(opts).await;
    let thread = app.thread().await;
    let cal = app.start_run(&thread, "content_calendar").await;
    assert_eq!(cal["effectiveMode"], "content_calendar");
    assert_eq!(cal["fallbackApplied"], false);
    let done = app
        .wait_status(cal["id"].as_str().expect("id"), &["COMPLETED", "FAILED"])
        .await;
    assert_eq!(done["status"], "COMPLETED");
    let paths: Vec<_> = artifacts(&done)
        .iter()
        .map(|a| a["path"].as_str().expect("p").to_string())
        .collect();
    assert_eq!(paths, ["stages/topic_map.md", "stages/publish_plan.md"]);

    let plan = app.start_run(&thread, "plan_90d").await;
    let id = plan["id"].as_str().expect("id").to_string();
    let run = app.wait_status(&id, &["WAITING_APPROVAL"]).await;
    assert_eq!(run["currentStage"], "strategy_draft");
    app.approve(&id, None).await;
    assert_eq!(
        app.wait_status(&id, &["COMPLETED", "FAILED"]).await["status"],
        "COMPLETED"
    );
    // Unknown modes still fall back.
    let unknown = app.start_run(&thread, "mystery").await;
    assert_eq!(unknown["effectiveMode"], "foundation_stack");
    assert_eq!(unknown["fallbackApplied"], true);
}

async fn complete_task_by_hand(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let id = app.start_run_id(&thread, "x").await;
    app.wait_status(&id, &["WAITING_APPROVAL"]).await;
    let d = app
        .data(
            "query($t:ID!) { thread(id:$t) { tasks(status: OPEN) { id stageKey title } } }",
            json!({"t": thread}),
        )
        .await;
    let task = d["thread"]["tasks"][0].clone();
    assert_eq!(task["stageKey"], "brand-voice");
    assert_eq!(task["title"], "Review stage brand-voice");
    let q = "mutation($id:ID!) { completeTask(input:{taskId:$id}) { task { status } } }";
    assert_eq!(
        app.data(q, json!({"id": task["id"]})).await["completeTask"]["task"]["status"],
        "COMPLETED"
    );
    let head = app.head().await;
    app.data(q, json!({"id": task["id"]})).await;
    assert_eq!(app.head().await, head, "completing twice is a no-op");
}

/// Wait until all `workers` of the app's runtime wait in line for a handed-off run.
async fn until_workers_idle(app: &TestApp, workers: usize) {
    for _ in 0..1000 {
        if app.services.handoffs.idle() >= workers {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!(
        "the workers never went idle: {}",
        app.services.handoffs.idle()
    );
}

/// A start or an approval made with a worker idle leases the run to that worker and starts its
/// next stage attempt in the request's own write turn: a Foundation run takes 8 write turns (a
/// start, 4 stage completions, 3 approvals) instead of 12 (a worker's claim for each stage),
/// and ends as it always did.
async fn requests_hand_runs_to_idle_workers(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let workers = 4;
    until_workers_idle(&app, workers).await;
    let (writers_before, _) = app.services.store.write_stats().get();
    let run = app.start_run_id(&thread, "content_calendar").await;
    for _ in 0..3 {
        app.wait_status(&run, &["WAITING_APPROVAL"]).await;
        until_workers_idle(&app, workers).await;
        let approved = app.approve(&run, None).await;
        assert_eq!(approved["resumeApplied"], true, "{approved}");
    }
    let done = app.wait_status(&run, &["COMPLETED"]).await;
    until_workers_idle(&app, workers).await;
    let (writers_after, _) = app.services.store.write_stats().get();
    // 8, or 9 if a slow stage made a lease renewal; 12 when workers claim runs themselves.
    let turns = writers_after - writers_before;
    assert!(
        (8..=9).contains(&turns),
        "{turns} write turns for one run with idle workers"
    );
    assert_eq!(done["stages"].as_array().map(Vec::len), Some(4), "{done}");
    assert_eq!(app.event_count(&run, "WorkflowRunStageCompleted").await, 4);
}

/// With runs waiting for a busy worker, the write turn that leaves the worker's run at a gate
/// claims its next run and starts that run's stage in the same turn: three runs brought to
/// their first gate by one worker take 6 write turns (3 starts, 3 stage completions) instead of
/// 8 (a claim of its own for each run that waited).
async fn a_worker_claims_its_next_run_with_its_last_step(backend: Backend) {
    let mut opts = Options::new(backend);
    opts.workers = 1;
    // The first run's research keeps the worker busy while the others are started.
    opts.fault_injection = Some("research=delay-300".into());
    let app = TestApp::spawn_with(opts).await;
    let thread = app.thread().await;
    until_workers_idle(&app, 1).await;
    let (writers_before, _) = app.services.store.write_stats().get();
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(app.start_run_id(&thread, "content_calendar").await);
    }
    for run in &runs {
        let r = app.wait_status(run, &["WAITING_APPROVAL"]).await;
        assert_eq!(r["currentStage"], "brand-voice", "{r}");
    }
    until_workers_idle(&app, 1).await;
    let (writers_after, _) = app.services.store.write_stats().get();
    let turns = writers_after - writers_before;
    assert_eq!(turns, 6, "write turns for three runs to their first gate");
    for run in &runs {
        app.approve_until_done(run).await;
    }
}

crate::both_backends!(
    any_mode_falls_back_to_foundation_and_completes_on_approvals,
    runs_on_one_thread_are_isolated,
    early_and_repeated_approvals,
    reject_fails_the_run,
    cancel_stops_a_run,
    resume_never_flips_a_waiting_run,
    concurrent_approvals_grant_once,
    native_profiles_complete_without_fallback,
    complete_task_by_hand,
    requests_hand_runs_to_idle_workers,
    a_worker_claims_its_next_run_with_its_last_step,
);
