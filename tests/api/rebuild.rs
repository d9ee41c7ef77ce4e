use crate::helpers::{Backend, Options, TestApp};
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

crate::both_backends!(rebuilt_read_models_equal_live_ones);
