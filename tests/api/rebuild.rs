use crate::helpers::{Backend, Options, TestApp};
use migration::MigratorTrait;
use sea_orm::ConnectionTrait;
use serde_json::json;

/// Replaying the log into empty read models gives the live tables back, row for row.
async fn rebuilt_read_models_equal_live_ones(backend: Backend) {
    let mut opts = Options::new(backend);
    opts.fault_injection = Some("positioning=fail-once".into());
    let app = TestApp::spawn_with(opts).await;
    let thread = app.thread().await;
    app.data("mutation($t:ID!) { addThreadMode(input:{threadId:$t, mode:\"plan_90d\"}) { thread { id } } }", json!({"t": thread})).await;
    let done = app.start_run_id(&thread, "content_calendar").await;
    let waiting = app.start_run_id(&thread, "x").await;
    let rejected = app.start_run_id(&thread, "x").await;
    for _ in 0..3 {
        app.wait_status(&done, &["WAITING_APPROVAL"]).await;
        app.approve(&done, None).await;
    }
    app.wait_status(&done, &["COMPLETED"]).await;
    app.wait_status(&waiting, &["WAITING_APPROVAL"]).await;
    app.approve(&waiting, Some("keywords")).await;
    app.wait_status(&rejected, &["WAITING_APPROVAL"]).await;
    app.data(
        "mutation($r:ID!) { rejectWorkflowRun(input:{runId:$r}) { run { status } } }",
        json!({"r": rejected}),
    )
    .await;
    let (data_dir, db, tmp) = app.stop().await;

    let mut opts = Options::new(backend);
    opts.data_dir = Some(data_dir);
    opts.database_url = Some(db);
    opts.workers = 0;
    let app = TestApp::spawn_with(opts).await;
    let live = app.services.store.dump_read_models().await.expect("dump");
    assert!(
        live["runs"].len() == 3 && live["timeline_items"].len() > 30,
        "{live:?}"
    );
    let n = app
        .services
        .store
        .rebuild_projections()
        .await
        .expect("rebuild");
    assert_eq!(n as i64, app.head().await);
    let rebuilt = app.services.store.dump_read_models().await.expect("dump");
    for (table, rows) in &live {
        assert_eq!(rows, &rebuilt[table], "table {table} differs after rebuild");
    }
    drop(tmp);
}

const TIMELINE: &str = "query($t:ID!, $a:String) { thread(id:$t) { timeline(first:100, after:$a) {
    edges { cursor node { sequence eventId type actorType actorId runId occurredAt } } } } }";

async fn timeline(app: &TestApp, thread: &str, after: Option<&str>) -> Vec<serde_json::Value> {
    let d = app.data(TIMELINE, json!({"t": thread, "a": after})).await;
    d["thread"]["timeline"]["edges"]
        .as_array()
        .expect("edges")
        .clone()
}

/// A thread's timeline is read from the log (a view over `events` since migration 2): every
/// event with that thread, in order, with its columns. A database made before the view keeps
/// its timeline through the migration both ways (down rebuilds the table from the log), and
/// a run's events are found by its stream without `ix_events_run`.
async fn the_timeline_is_the_logs_through_the_migration(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let run = app.start_run_id(&thread, "content_calendar").await;
    app.wait_status(&run, &["WAITING_APPROVAL"]).await;
    let before = timeline(&app, &thread, None).await;
    let run_events = app.event_types(&run).await;
    // ThreadCreated, then the run's events (the brand and project are not the thread's).
    let types: Vec<&str> = before
        .iter()
        .map(|e| e["node"]["type"].as_str().expect("type"))
        .collect();
    assert_eq!(types[0], "ThreadCreated");
    assert_eq!(
        types[1..],
        run_events.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(before[1..].iter().all(|e| e["node"]["runId"] == json!(run)));
    let (data_dir, db_url, tmp) = app.stop().await;

    // Down to the first migration: the table again, filled from the log.
    let db = sea_orm::Database::connect(&db_url).await.expect("connect");
    migration::Migrator::down(&db, Some(1)).await.expect("down");
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT sequence FROM timeline_items ORDER BY sequence",
        ))
        .await
        .expect("table");
    let sequences: Vec<i64> = rows
        .iter()
        .map(|r| r.try_get_by_index(0).expect("sequence"))
        .collect();
    let expected: Vec<i64> = before
        .iter()
        .map(|e| e["node"]["sequence"].as_i64().expect("sequence"))
        .collect();
    assert_eq!(sequences, expected);
    db.close().await.expect("close");

    // Up again when the server starts: the view, the same items, and the next ones with no
    // write of their own.
    let mut opts = Options::new(backend);
    opts.data_dir = Some(data_dir);
    opts.database_url = Some(db_url);
    let app = TestApp::spawn_with(opts).await;
    assert_eq!(timeline(&app, &thread, None).await, before);
    assert_eq!(app.event_types(&run).await, run_events);
    app.approve(&run, None).await;
    app.wait_status(&run, &["WAITING_APPROVAL"]).await;
    let cursor = before.last().expect("items")["cursor"]
        .as_str()
        .expect("cursor")
        .to_string();
    let later = timeline(&app, &thread, Some(&cursor)).await;
    let later_types: Vec<&str> = later
        .iter()
        .map(|e| e["node"]["type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        later_types,
        app.event_types(&run).await[run_events.len()..]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );
    assert!(later_types.contains(&"ApprovalGranted"), "{later_types:?}");
    drop(tmp);
}

crate::both_backends!(
    rebuilt_read_models_equal_live_ones,
    the_timeline_is_the_logs_through_the_migration
);
