//! Subscriptions: cursor semantics at the schema level (`execute_stream`, the seam between catch-up
//! and live, a forced lag), then over real WebSockets in both protocols, across reconnects and
//! across two server processes sharing one Postgres.

use crate::helpers::{Backend, Options, TestApp};
use crate::ws_client::{Incoming, Protocol, WsClient};
use futures::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::Duration;
use vm_workflow::bus::EventBus;
use vm_workflow::graphql::fanout::Renders;
use vm_workflow::graphql::{build_schema, AppSchema};
use vm_workflow::store::EventFilter;

const STATUS_SUB: &str = "subscription($t: ID, $r: ID, $a: Int) {
    workflowRunStatusChanged(threadId: $t, runId: $r, afterSequence: $a) {
        sequence runId fromStatus toStatus stageKey occurredAt run { id status } } }";

const EVENTS_SUB: &str = "subscription($r: ID!, $a: Int) {
    workflowRunEvents(runId: $r, afterSequence: $a) { sequence type runId payload } }";

/// One transition as a subscriber saw it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    sequence: i64,
    run: String,
    from: String,
    to: String,
    stage: Option<String>,
}

fn seen(item: &Value) -> Seen {
    let c = &item["workflowRunStatusChanged"];
    Seen {
        sequence: c["sequence"].as_i64().expect("sequence"),
        run: c["runId"].as_str().expect("runId").to_string(),
        from: c["fromStatus"].as_str().expect("from").to_string(),
        to: c["toStatus"].as_str().expect("to").to_string(),
        stage: c["stageKey"].as_str().map(str::to_string),
    }
}

/// The full life of a Foundation run with three gates, as (from, to, stage of the gate).
fn foundation_life() -> Vec<(&'static str, &'static str, Option<&'static str>)> {
    vec![
        ("QUEUED", "RUNNING", None),
        ("RUNNING", "WAITING_APPROVAL", Some("brand-voice")),
        ("WAITING_APPROVAL", "RUNNING", Some("brand-voice")),
        ("RUNNING", "WAITING_APPROVAL", Some("positioning")),
        ("WAITING_APPROVAL", "RUNNING", Some("positioning")),
        ("RUNNING", "WAITING_APPROVAL", Some("keywords")),
        ("WAITING_APPROVAL", "RUNNING", Some("keywords")),
        ("RUNNING", "COMPLETED", None),
    ]
}

fn assert_life(got: &[Seen]) {
    let pairs: Vec<(&str, &str)> = got
        .iter()
        .map(|s| (s.from.as_str(), s.to.as_str()))
        .collect();
    let want: Vec<(&str, &str)> = foundation_life().iter().map(|(f, t, _)| (*f, *t)).collect();
    assert_eq!(pairs, want, "transitions: {got:#?}");
    let gates: Vec<Option<&str>> = got
        .iter()
        .filter(|s| s.to == "WAITING_APPROVAL")
        .map(|s| s.stage.as_deref())
        .collect();
    assert_eq!(
        gates,
        vec![Some("brand-voice"), Some("positioning"), Some("keywords")]
    );
    assert_strictly_increasing(got);
}

fn assert_strictly_increasing(got: &[Seen]) {
    for w in got.windows(2) {
        assert!(
            w[0].sequence < w[1].sequence,
            "sequence must increase: {got:#?}"
        );
    }
}

/// The status changes the log holds after `after`, for a thread: what a subscriber must get.
async fn logged_transitions(app: &TestApp, thread: &str, after: i64) -> Vec<i64> {
    let filter = EventFilter {
        run_id: None,
        thread_id: Some(thread.to_string()),
    };
    app.services
        .store
        .read_events(after, &filter, 100_000)
        .await
        .expect("read log")
        .into_iter()
        .filter(|e| e.body.status_transition().is_some())
        .map(|e| e.sequence)
        .collect()
}

/// A schema of our own over the app's services, with a bus of the given capacity.
fn own_schema(
    app: &TestApp,
    capacity: usize,
    head: i64,
) -> (AppSchema, tokio::sync::watch::Sender<bool>) {
    let bus = EventBus::new(capacity, head);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    bus.spawn_feeder(app.services.store.clone(), stop_rx);
    (build_schema(Some(app.services.clone()), Some(bus)), stop_tx)
}

fn request(query: &str, vars: Value) -> async_graphql::Request {
    async_graphql::Request::new(query).variables(async_graphql::Variables::from_json(vars))
}

async fn next_item<S>(stream: &mut S) -> Value
where
    S: futures::Stream<Item = async_graphql::Response> + Unpin,
{
    let resp = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("an item within 30 s")
        .expect("stream open");
    assert!(resp.errors.is_empty(), "errors: {:?}", resp.errors);
    resp.data.into_json().expect("json")
}

/// Catch-up from the log while other runs commit: the items cross from the log to the live bus
/// with no gap and no duplicate, exactly the logged transitions after the cursor.
async fn schema_cursor_crosses_the_seam(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let first = app.start_run_id(&thread, "content_calendar").await;
    app.wait_status(&first, &["WAITING_APPROVAL"]).await;
    let cursor = app.head().await;
    app.approve_until_done(&first).await;

    let (schema, _stop) = own_schema(&app, 4096, app.head().await);
    // Writers commit while the subscriber reads its catch-up, so the seam is crossed live.
    let writer = {
        let url = app.url.clone();
        let thread = thread.clone();
        let services = app.services.clone();
        tokio::spawn(async move {
            let app = TestApp::attach(url, services);
            let mut ids = Vec::new();
            for _ in 0..3 {
                let run = app.start_run(&thread, "content_calendar").await;
                ids.push(run["id"].as_str().expect("id").to_string());
            }
            for id in &ids {
                app.approve_until_done(id).await;
            }
            ids
        })
    };
    let mut stream =
        schema.execute_stream(request(STATUS_SUB, json!({ "t": thread, "a": cursor })));
    let mut got = Vec::new();
    let mut completed = 0;
    // Run 1 completes after the cursor too: 1 + 3 runs end with COMPLETED.
    while completed < 4 {
        let s = seen(&next_item(&mut stream).await);
        if s.to == "COMPLETED" {
            completed += 1;
        }
        got.push(s);
    }
    writer.await.expect("writer");
    let want = logged_transitions(&app, &thread, cursor).await;
    let sequences: Vec<i64> = got.iter().map(|s| s.sequence).collect();
    assert_eq!(sequences, want, "exactly the logged transitions, in order");
    assert_eq!(
        sequences.len(),
        6 + 3 * 8,
        "first run's rest and three full runs"
    );
}

/// A subscriber that does not read while far more events are published than the bus holds
/// recovers them from the log: every transition, in order, once.
async fn schema_lagging_subscriber_recovers(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let (schema, _stop) = own_schema(&app, 2, app.head().await);
    let cursor = app.head().await;
    let mut stream =
        schema.execute_stream(request(STATUS_SUB, json!({ "t": thread, "a": cursor })));
    // Poll once so the subscription is registered on the bus, then stop reading.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), stream.next())
            .await
            .is_err(),
        "nothing to deliver yet"
    );
    let run = app.start_run_id(&thread, "content_calendar").await;
    app.approve_until_done(&run).await;
    let mut got = Vec::new();
    for _ in 0..foundation_life().len() {
        got.push(seen(&next_item(&mut stream).await));
    }
    assert_life(&got);
    let want = logged_transitions(&app, &thread, cursor).await;
    assert_eq!(got.iter().map(|s| s.sequence).collect::<Vec<_>>(), want);
}

/// Read transitions of operation `op` until the run completes, approving each gate (through
/// `approver`) when the subscriber sees the run wait at it.
async fn follow_to_completion(
    ws: &mut WsClient,
    op: &str,
    approver: &TestApp,
    run: &str,
) -> Vec<Seen> {
    let mut got = Vec::new();
    loop {
        let s = seen(&ws.next_data(op).await);
        assert_eq!(s.run, run);
        if s.to == "WAITING_APPROVAL" {
            approver.approve(run, None).await;
        }
        let done = s.to == "COMPLETED";
        got.push(s);
        if done {
            return got;
        }
    }
}

/// Subscribe, start a run, approve each gate when the subscriber sees it waiting: exactly the
/// run's life, in order.
async fn drive_over_ws(app: &TestApp, protocol: Protocol) -> Vec<Seen> {
    let thread = app.thread().await;
    let mut ws = WsClient::connect_init(&app.ws_url(), protocol).await;
    let cursor = app.head().await;
    ws.subscribe("s1", STATUS_SUB, json!({ "t": thread, "a": cursor }))
        .await;
    let run = app.start_run_id(&thread, "content_calendar").await;
    let got = follow_to_completion(&mut ws, "s1", app, &run).await;
    ws.close().await;
    got
}

async fn ws_transport_protocol_streams_the_run(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let got = drive_over_ws(&app, Protocol::Transport).await;
    assert_life(&got);
}

async fn ws_legacy_protocol_streams_the_run(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let got = drive_over_ws(&app, Protocol::Legacy).await;
    assert_life(&got);
}

/// Disconnect midway, let the run move on, resubscribe with the last sequence seen: exactly the
/// rest arrives.
async fn ws_resubscribe_with_last_sequence(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let cursor = app.head().await;
    let mut ws = WsClient::connect_init(&app.ws_url(), Protocol::Transport).await;
    ws.subscribe("a", STATUS_SUB, json!({ "t": thread, "a": cursor }))
        .await;
    let run = app.start_run_id(&thread, "content_calendar").await;
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(seen(&ws.next_data("a").await));
    }
    ws.close().await;
    // While nobody listens: approve the first gate and wait for the second.
    app.approve(&run, None).await;
    loop {
        let r = app.run(&run).await;
        if r["pendingApprovals"][0]["stageKey"] == "positioning" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = got.last().expect("seen").sequence;
    let mut ws = WsClient::connect_init(&app.ws_url(), Protocol::Transport).await;
    ws.subscribe("b", STATUS_SUB, json!({ "r": run, "a": last }))
        .await;
    got.extend(follow_to_completion(&mut ws, "b", &app, &run).await);
    assert_life(&got);
    let want = logged_transitions(&app, &thread, cursor).await;
    assert_eq!(got.iter().map(|s| s.sequence).collect::<Vec<_>>(), want);
}

/// Without a cursor: live events only, none from before the subscription, none missed after the
/// first one delivered; the run's event stream carries the envelope and payload.
async fn ws_live_only_without_cursor(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let run = app.start_run_id(&thread, "content_calendar").await;
    app.wait_status(&run, &["WAITING_APPROVAL"]).await;
    let before = app.head().await;
    let mut ws = WsClient::connect_init(&app.ws_url(), Protocol::Transport).await;
    ws.subscribe("e", EVENTS_SUB, json!({ "r": run })).await;
    // Give the server a moment to register the subscription, then keep approving until the run
    // completes; whatever was delivered must be a gap-free tail of the log.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let driver = {
        let app = TestApp::attach(app.url.clone(), app.services.clone());
        let run = run.clone();
        tokio::spawn(async move { app.approve_until_done(&run).await })
    };
    let mut got: Vec<(i64, String)> = Vec::new();
    loop {
        let d = ws.next_data("e").await;
        let e = &d["workflowRunEvents"];
        assert_eq!(e["runId"], json!(run));
        assert!(e["payload"].is_object(), "payload: {e}");
        let ty = e["type"].as_str().expect("type").to_string();
        got.push((e["sequence"].as_i64().expect("seq"), ty.clone()));
        if ty == "WorkflowRunCompleted" {
            break;
        }
    }
    driver.await.expect("driver");
    assert!(got[0].0 > before, "no event from before the subscription");
    let filter = EventFilter {
        run_id: Some(run.clone()),
        thread_id: None,
    };
    let log: Vec<i64> = app
        .services
        .store
        .read_events(got[0].0 - 1, &filter, 10_000)
        .await
        .expect("log")
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), log);
}

/// Bad subscription arguments get a clear error with a code, over the socket.
async fn ws_bad_arguments_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut ws = WsClient::connect_init(&app.ws_url(), Protocol::Transport).await;
    ws.subscribe("x", STATUS_SUB, json!({})).await;
    ws.subscribe("y", EVENTS_SUB, json!({ "r": "r1", "a": -1 }))
        .await;
    let mut refused = Vec::new();
    while refused.len() < 2 {
        let (id, code) = match ws.recv().await {
            Incoming::Error { id, payload } => (id, payload[0]["extensions"]["code"].clone()),
            Incoming::Data { id, data } => (id, data["errors"][0]["extensions"]["code"].clone()),
            Incoming::Complete { .. } => continue,
            other => panic!("expected an error, got {other:?}"),
        };
        assert_eq!(code, "VALIDATION", "operation {id}");
        refused.push(id);
    }
    refused.sort();
    assert_eq!(refused, ["x", "y"]);
}

/// `eventHead` is the log's last sequence: load state, then subscribe from it, and nothing that
/// happens afterwards is missed.
async fn event_head_is_where_to_subscribe_from(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let head = app.data("{ eventHead }", json!({})).await["eventHead"]
        .as_i64()
        .expect("eventHead");
    assert_eq!(head, app.head().await);
    let run = app.start_run_id(&thread, "content_calendar").await;
    app.wait_status(&run, &["WAITING_APPROVAL"]).await;
    let after = app.data("{ eventHead }", json!({})).await["eventHead"]
        .as_i64()
        .expect("eventHead");
    assert!(after > head);
    let mut ws = WsClient::connect_init(&app.ws_url(), Protocol::Transport).await;
    ws.subscribe("h", STATUS_SUB, json!({ "t": thread, "a": head }))
        .await;
    let got = follow_to_completion(&mut ws, "h", &app, &run).await;
    assert_life(&got);
}

/// An idle bus sleeps: it reads the log on another instance's NOTIFY or at a gap, and otherwise
/// only on its slow safety timer (every 500 ms), never in a loop; this process's commits reach
/// it without a read.
async fn idle_bus_does_not_spin(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let bus = EventBus::new(256, app.head().await);
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    bus.spawn_feeder(app.services.store.clone(), stop_rx);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle = bus.log_reads();
    assert!(
        idle <= 10,
        "the idle feeder read the log {idle} times in 1.5 s"
    );
    // A commit still wakes it at once.
    app.thread().await;
    let mut waited = 0;
    while bus.head() < app.head().await {
        assert!(waited < 3000, "the bus never caught up");
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += 10;
    }
    // This process's commits reach the bus without being read back from the log: every one of
    // them, in order, with only the safety timer's reads.
    let mut rx = bus.subscribe();
    let (from, reads) = (bus.head(), bus.log_reads());
    for _ in 0..10 {
        app.thread().await;
    }
    let to = app.head().await;
    let mut got = Vec::new();
    while got.last() != Some(&to) {
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("published within 5 s")
            .expect("bus open");
        got.push(ev.sequence);
    }
    assert_eq!(got, ((from + 1)..=to).collect::<Vec<_>>());
    let read = bus.log_reads() - reads;
    assert!(read <= 6, "{} commits, {read} log reads", to - from);
}

/// How many times the server has rendered a subscription event so far.
fn executed(app: &TestApp) -> u64 {
    app.renders.as_ref().expect("a spawned app").executed()
}

/// Every data payload of operation `op` until the run's `COMPLETED` transition.
async fn payloads_until_completed(ws: &mut WsClient, op: &str) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let data = ws.next_data(op).await;
        let done = data["workflowRunStatusChanged"]["toStatus"] == "COMPLETED";
        got.push(data);
        if done {
            return got;
        }
    }
}

/// A new thread, and `STATUS_SUB` variables that watch it from the log's current head.
async fn watched_thread(app: &TestApp) -> (String, Value) {
    let thread = app.thread().await;
    let cursor = app.head().await;
    let vars = json!({ "t": thread, "a": cursor });
    (thread, vars)
}

/// Subscribers sending the same request share one rendering of each event, whatever their
/// protocol; another caller or another selection renders its own. Each gets every transition.
async fn ws_subscribers_share_each_rendering(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (thread, vars) = watched_thread(&app).await;
    let url = app.ws_url();
    let mut driver = WsClient::connect_init(&url, Protocol::Transport).await;
    let mut same = vec![
        WsClient::connect_init(&url, Protocol::Transport).await,
        WsClient::connect_init(&url, Protocol::Transport).await,
        WsClient::connect_init(&url, Protocol::Legacy).await,
    ];
    let mut other_caller = WsClient::connect_init_as(&url, Protocol::Transport, "bob").await;
    let mut other_selection = WsClient::connect_init(&url, Protocol::Transport).await;
    driver.subscribe("d", STATUS_SUB, vars.clone()).await;
    for ws in &mut same {
        ws.subscribe("s", STATUS_SUB, vars.clone()).await;
    }
    other_caller.subscribe("c", STATUS_SUB, vars.clone()).await;
    let aliased = "subscription($t: ID, $a: Int) {
        workflowRunStatusChanged(threadId: $t, afterSequence: $a) { seq: sequence toStatus } }";
    other_selection.subscribe("o", aliased, vars.clone()).await;
    let before = executed(&app);

    let run = app.start_run_id(&thread, "content_calendar").await;
    let driven = follow_to_completion(&mut driver, "d", &app, &run).await;
    assert_life(&driven);
    let mut first: Option<Vec<Value>> = None;
    for ws in &mut same {
        let got = payloads_until_completed(ws, "s").await;
        assert_eq!(got.len(), driven.len());
        let seqs: Vec<i64> = got.iter().map(|d| seen(d).sequence).collect();
        assert_eq!(seqs, driven.iter().map(|s| s.sequence).collect::<Vec<_>>());
        match &first {
            // One rendering: even `run { status }`, read when rendered, is the same for all.
            Some(f) => assert_eq!(&got, f),
            None => first = Some(got),
        }
    }
    let theirs = payloads_until_completed(&mut other_caller, "c").await;
    assert_eq!(theirs.len(), driven.len());
    let mut shaped = Vec::new();
    while shaped.len() < driven.len() {
        let d = other_selection.next_data("o").await;
        let c = &d["workflowRunStatusChanged"];
        assert!(c.get("sequence").is_none(), "alias kept: {d}");
        shaped.push(c["seq"].as_i64().expect("aliased sequence"));
    }
    assert_eq!(
        shaped,
        driven.iter().map(|s| s.sequence).collect::<Vec<_>>()
    );

    // 8 transitions: once for the four identical requests, once for bob, once for the alias.
    assert_eq!(executed(&app) - before, 3 * driven.len() as u64);
}

/// Subscribers that arrive after the run catch up from their own cursor; those sending the same
/// request share one fresh rendering of each event: a nested `run` shows the run as it is when
/// they catch up (completed), not as it was when the early subscriber's renderings were made.
/// A different cursor is a different request.
async fn ws_late_subscribers_share_fresh_renderings(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (thread, vars) = watched_thread(&app).await;
    let url = app.ws_url();
    let mut early = WsClient::connect_init(&url, Protocol::Transport).await;
    early.subscribe("e", STATUS_SUB, vars.clone()).await;
    let run = app.start_run_id(&thread, "content_calendar").await;
    let driven = follow_to_completion(&mut early, "e", &app, &run).await;
    // Past the age up to which a rendering is reused.
    tokio::time::sleep(Renders::MAX_AGE + Duration::from_millis(200)).await;
    let after_run = executed(&app);

    let mut late = vec![
        WsClient::connect_init(&url, Protocol::Transport).await,
        WsClient::connect_init(&url, Protocol::Transport).await,
    ];
    for ws in &mut late {
        ws.subscribe("l", STATUS_SUB, vars.clone()).await;
    }
    for ws in &mut late {
        let got = payloads_until_completed(ws, "l").await;
        assert_eq!(got.iter().map(seen).collect::<Vec<_>>(), driven);
        for d in &got {
            assert_eq!(d["workflowRunStatusChanged"]["run"]["status"], "COMPLETED");
        }
    }
    assert_eq!(executed(&app) - after_run, driven.len() as u64);

    let from_second = driven[1].sequence;
    late[0]
        .subscribe("m", STATUS_SUB, json!({ "t": thread, "a": from_second }))
        .await;
    let rest: Vec<Seen> = payloads_until_completed(&mut late[0], "m")
        .await
        .iter()
        .map(seen)
        .collect();
    assert_eq!(rest, driven[2..]);
    assert_eq!(
        executed(&app) - after_run,
        (driven.len() + rest.len()) as u64
    );
}

/// An error in one root field of a subscription (`b`: neither runId nor threadId) does not hide
/// the events of the other: one error, then the events, exactly as without sharing.
async fn ws_partly_failing_subscription_still_streams(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let mut ws = WsClient::connect_init(&app.ws_url(), Protocol::Transport).await;
    let query = "subscription($t: ID, $a: Int) {
        a: workflowRunStatusChanged(threadId: $t, afterSequence: $a) { sequence toStatus }
        b: workflowRunStatusChanged { sequence } }";
    ws.subscribe("p", query, json!({ "t": thread, "a": app.head().await }))
        .await;
    let run = app.start_run_id(&thread, "content_calendar").await;
    let (mut statuses, mut errors) = (Vec::new(), 0);
    while statuses.last().map(String::as_str) != Some("COMPLETED") {
        match ws.recv().await {
            Incoming::Data { id, data } if id == "p" => {
                match data["data"]["a"]["toStatus"].as_str() {
                    Some(to) => {
                        if to == "WAITING_APPROVAL" {
                            app.approve(&run, None).await;
                        }
                        statuses.push(to.to_string());
                    }
                    None => {
                        assert!(
                            data.get("errors").is_some(),
                            "neither data nor errors: {data}"
                        );
                        errors += 1;
                    }
                }
            }
            Incoming::Ping => ws.send(json!({ "type": "pong" })).await,
            other => panic!("unexpected {other:?} after {statuses:?}, {errors} errors"),
        }
    }
    assert_eq!(statuses.len(), foundation_life().len());
    assert_eq!(errors, 1);
}

/// A subscription with two root fields is not shared: the schema serves it, both fields live.
async fn ws_two_root_fields_still_stream(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let mut ws = WsClient::connect_init(&app.ws_url(), Protocol::Transport).await;
    let both = "subscription($t: ID, $a: Int) {
        a: workflowRunStatusChanged(threadId: $t, afterSequence: $a) { toStatus }
        b: workflowRunStatusChanged(threadId: $t, afterSequence: $a) { sequence } }";
    ws.subscribe("two", both, json!({ "t": thread, "a": app.head().await }))
        .await;
    let run = app.start_run_id(&thread, "content_calendar").await;
    let (mut a, mut b) = (Vec::new(), 0);
    while a.last().map(String::as_str) != Some("COMPLETED") || b < a.len() {
        let d = ws.next_data("two").await;
        if let Some(to) = d["a"]["toStatus"].as_str() {
            if to == "WAITING_APPROVAL" {
                app.approve(&run, None).await;
            }
            a.push(to.to_string());
        } else {
            assert!(d["b"]["sequence"].is_i64(), "unexpected item {d}");
            b += 1;
        }
    }
    assert_eq!(a.len(), foundation_life().len());
    assert_eq!(b, a.len());
    assert_eq!(executed(&app), 0);
}

/// Queries and mutations sent over a WebSocket run once, as before.
async fn ws_queries_and_mutations_run_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut ws = WsClient::connect_init(&app.ws_url(), Protocol::Transport).await;
    ws.subscribe(
        "m",
        "mutation { createBrand(input: { name: \"Over WS\" }) { brand { name } } }",
        json!({}),
    )
    .await;
    let created = ws.next_data("m").await;
    assert_eq!(created["createBrand"]["brand"]["name"], "Over WS");
    ws.subscribe(
        "q",
        "query { brands(first: 10) { nodes { name } } }",
        json!({}),
    )
    .await;
    let listed = loop {
        match ws.recv().await {
            Incoming::Data { id, data } if id == "q" => break data["data"].clone(),
            Incoming::Complete { .. } | Incoming::Ping => continue,
            other => panic!("expected the query's data, got {other:?}"),
        }
    };
    assert_eq!(listed["brands"]["nodes"], json!([{ "name": "Over WS" }]));
    assert_eq!(executed(&app), 0);
}

crate::both_backends!(
    ws_subscribers_share_each_rendering,
    ws_late_subscribers_share_fresh_renderings,
    ws_partly_failing_subscription_still_streams,
    ws_queries_and_mutations_run_once,
    ws_two_root_fields_still_stream,
    idle_bus_does_not_spin,
    event_head_is_where_to_subscribe_from,
    schema_cursor_crosses_the_seam,
    schema_lagging_subscriber_recovers,
    ws_transport_protocol_streams_the_run,
    ws_legacy_protocol_streams_the_run,
    ws_resubscribe_with_last_sequence,
    ws_live_only_without_cursor,
    ws_bad_arguments_are_refused,
);

/// The connection rules do not depend on the backend: SQLite only.
fn sqlite_with(f: impl FnOnce(&mut Options)) -> Options {
    let mut o = Options::new(Backend::Sqlite);
    f(&mut o);
    o
}

#[tokio::test]
async fn ws_without_connection_init_closes_4408() {
    let app = TestApp::spawn_with(sqlite_with(|o| o.ws_init_timeout_seconds = 1)).await;
    for protocol in [Protocol::Transport, Protocol::Legacy] {
        let mut ws = WsClient::connect(&app.ws_url(), protocol).await;
        match ws.recv().await {
            Incoming::Closed { code, reason } => {
                assert_eq!(code, Some(4408), "{protocol:?}");
                assert!(reason.contains("initialisation"), "{reason}");
            }
            other => panic!("expected close 4408, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn ws_server_pings_idle_connections() {
    let app = TestApp::spawn_with(sqlite_with(|o| o.ws_ping_interval_seconds = 1)).await;
    let mut ws = WsClient::connect_init(&app.ws_url(), Protocol::Transport).await;
    for _ in 0..2 {
        match ws.recv().await {
            Incoming::Ping => ws.send(json!({ "type": "pong" })).await,
            other => panic!("expected ping, got {other:?}"),
        }
    }
    let mut legacy = WsClient::connect_init(&app.ws_url(), Protocol::Legacy).await;
    match legacy.recv().await {
        Incoming::KeepAlive => {}
        other => panic!("expected ka, got {other:?}"),
    }
    // Still usable after the pings.
    let thread = app.thread().await;
    let run = app.start_run(&thread, "content_calendar").await;
    ws.subscribe("e", EVENTS_SUB, json!({ "r": run["id"], "a": 0 }))
        .await;
    let d = ws.next_data("e").await;
    assert_eq!(d["workflowRunEvents"]["type"], "WorkflowRunQueued");
}

/// A client that stops reading fills its socket's buffers, then the server's, and the server's
/// write waits. After the write timeout the server closes the connection instead of holding it
/// and its subscriptions for ever.
#[tokio::test]
async fn ws_closes_a_connection_whose_client_stopped_reading() {
    const SUBS: usize = 1000;
    let app = TestApp::spawn_with(sqlite_with(|o| {
        o.ws_write_timeout_seconds = 1;
        o.ws_max_operations = SUBS;
    }))
    .await;
    let open = app.ws_connections.clone().expect("a spawned app");
    let thread = app.thread().await;
    let run = app.start_run_id(&thread, "content_calendar").await;
    app.approve_until_done(&run).await;
    let mut ws = WsClient::connect_init(&app.ws_url(), Protocol::Transport).await;
    // Replays of the run's events, ~10 MB: more than the two sockets' buffers hold (~4.5 MB on
    // loopback), to a client that reads nothing from here on.
    for i in 0..SUBS {
        ws.subscribe(&format!("s{i}"), EVENTS_SUB, json!({ "r": run, "a": 0 }))
            .await;
    }
    assert_eq!(open.load(Ordering::SeqCst), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while open.load(Ordering::SeqCst) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection of a client that reads nothing is still open after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(ws);
}

#[tokio::test]
async fn ws_bounds_operations_per_connection() {
    let app = TestApp::spawn_with(sqlite_with(|o| o.ws_max_operations = 2)).await;
    let thread = app.thread().await;
    let run = app.start_run(&thread, "content_calendar").await;
    let vars = json!({ "r": run["id"], "a": 0 });
    let mut ws = WsClient::connect_init(&app.ws_url(), Protocol::Transport).await;
    ws.subscribe("1", EVENTS_SUB, vars.clone()).await;
    ws.next_data("1").await;
    ws.subscribe("2", EVENTS_SUB, vars.clone()).await;
    // Operation 3 is refused with a code; 1 and 2 go on.
    ws.subscribe("3", EVENTS_SUB, vars.clone()).await;
    loop {
        match ws.recv().await {
            Incoming::Error { id, payload } => {
                assert_eq!(id, "3");
                assert_eq!(payload[0]["extensions"]["code"], "TOO_MANY_OPERATIONS");
                break;
            }
            Incoming::Data { id, .. } => assert!(id == "1" || id == "2", "data for {id}"),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Ending one makes room for another.
    ws.stop("1").await;
    ws.subscribe("4", EVENTS_SUB, vars.clone()).await;
    loop {
        match ws.recv().await {
            Incoming::Data { id, .. } if id == "4" => break,
            Incoming::Data { id, .. } | Incoming::Complete { id } => {
                assert!(id == "1" || id == "2", "unexpected message for {id}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Reusing an active id closes the connection (graphql-transport-ws: 4409).
    ws.subscribe("2", EVENTS_SUB, vars).await;
    loop {
        match ws.recv().await {
            Incoming::Closed { code, .. } => {
                assert_eq!(code, Some(4409));
                break;
            }
            Incoming::Data { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Messages outside the protocol close the connection with graphql-transport-ws's codes (the
/// legacy protocol has none of its own: 1002); a client `ping` gets a `pong`.
#[tokio::test]
async fn ws_protocol_violations_close_with_their_codes() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let url = app.ws_url();
    let closed = |got: Incoming| match got {
        Incoming::Closed { code, reason } => (code, reason),
        other => panic!("expected a close, got {other:?}"),
    };

    let mut ws = WsClient::connect_init(&url, Protocol::Transport).await;
    ws.send(json!({ "type": "ping" })).await;
    match ws.recv().await {
        Incoming::Other(v) => assert_eq!(v, json!({ "type": "pong" })),
        other => panic!("expected pong, got {other:?}"),
    }
    ws.send(json!({ "type": "no_such_message" })).await;
    let (code, reason) = closed(ws.recv().await);
    assert_eq!(code, Some(4400), "{reason}");

    let mut ws = WsClient::connect(&url, Protocol::Transport).await;
    ws.subscribe("early", STATUS_SUB, json!({})).await;
    let (code, reason) = closed(ws.recv().await);
    assert_eq!((code, reason.as_str()), (Some(4401), "Unauthorized"));

    let mut ws = WsClient::connect_init(&url, Protocol::Transport).await;
    ws.send(json!({ "type": "connection_init" })).await;
    let (code, _) = closed(ws.recv().await);
    assert_eq!(code, Some(4429));

    let mut legacy = WsClient::connect_init(&url, Protocol::Legacy).await;
    legacy.send(json!({ "type": "start", "id": 7 })).await;
    let (code, _) = closed(legacy.recv().await);
    assert_eq!(code, Some(1002));
}

/// A client that completes a subscription gets `complete` for it and nothing more from it; an
/// operation that ends by itself (a query) is completed by the server, and its id is free again:
/// a client `complete` for it gets no second `complete`, and reusing it is no duplicate.
#[tokio::test]
async fn ws_completed_operations_stop() {
    // No server pings: every message read below is one the test expects.
    let app = TestApp::spawn_with(sqlite_with(|o| o.ws_ping_interval_seconds = 3600)).await;
    let thread = app.thread().await;
    let run = app.start_run(&thread, "content_calendar").await;
    let vars = json!({ "r": run["id"], "a": 0 });
    let mut ws = WsClient::connect_init(&app.ws_url(), Protocol::Transport).await;
    ws.subscribe("gone", EVENTS_SUB, vars.clone()).await;
    ws.next_data("gone").await;
    ws.stop("gone").await;
    loop {
        match ws.recv().await {
            Incoming::Complete { id } if id == "gone" => break,
            Incoming::Data { id, .. } if id == "gone" => {} // sent before the stop arrived
            other => panic!("unexpected {other:?}"),
        }
    }
    for _ in 0..2 {
        ws.subscribe("q", "query { eventHead }", json!({})).await;
        let head = ws.next_data("q").await;
        assert!(head["eventHead"].is_i64(), "{head}");
        match ws.recv().await {
            Incoming::Complete { id } => assert_eq!(id, "q"),
            other => panic!("expected complete for q, got {other:?}"),
        }
        ws.stop("q").await;
    }
    // Nothing more for "gone", though its run goes on to the end, and no second `complete`.
    app.approve_until_done(run["id"].as_str().expect("run id"))
        .await;
    ws.subscribe("still", EVENTS_SUB, vars).await;
    match ws.recv().await {
        Incoming::Data { id, .. } => assert_eq!(id, "still"),
        other => panic!("expected data for still, got {other:?}"),
    }
}

/// A catch-up longer than one write (the connection writes at most 64 ready messages per flush)
/// arrives whole and in order: 9 completed runs, 72 transitions, all ready at once.
#[tokio::test]
async fn ws_long_catch_up_loses_nothing() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let thread = app.thread().await;
    let mut runs = Vec::new();
    for _ in 0..9 {
        runs.push(app.start_run_id(&thread, "content_calendar").await);
    }
    for run in &runs {
        app.approve_until_done(run).await;
    }
    let want = logged_transitions(&app, &thread, 0).await;
    assert_eq!(want.len(), 72, "8 transitions per run");
    let mut ws = WsClient::connect_init(&app.ws_url(), Protocol::Transport).await;
    // No `run` field: nothing to read per message, so every transition is ready at once.
    let light = "subscription($t: ID, $a: Int) { workflowRunStatusChanged(threadId: $t, \
                 afterSequence: $a) { sequence runId fromStatus toStatus stageKey } }";
    ws.subscribe("all", light, json!({ "t": thread, "a": 0 }))
        .await;
    let last = *want.last().expect("transitions");
    let mut got = Vec::new();
    loop {
        let s = seen(&ws.next_data("all").await);
        got.push(s.sequence);
        if s.sequence >= last {
            break;
        }
    }
    assert_eq!(got, want);
}

/// Client messages larger than the read buffer are read whole; one over the body limit closes the
/// connection with 1009 and nothing else.
#[tokio::test]
async fn ws_message_size_is_bounded() {
    let limit = 64 * 1024;
    let app = TestApp::spawn_with(sqlite_with(|o| o.max_body_bytes = Some(limit))).await;
    let thread = app.thread().await;
    let run = app.start_run(&thread, "content_calendar").await;
    let vars = json!({ "r": run["id"], "a": 0 });
    // A comment pads the document: 40 KiB, ten times the initial read buffer, under the limit.
    let padded = |bytes: usize| format!("#{}\n{EVENTS_SUB}", "x".repeat(bytes));
    let mut ws = WsClient::connect_init(&app.ws_url(), Protocol::Transport).await;
    ws.subscribe("big", &padded(40 * 1024), vars.clone()).await;
    let d = ws.next_data("big").await;
    assert_eq!(d["workflowRunEvents"]["type"], "WorkflowRunQueued");

    let mut over = WsClient::connect_init(&app.ws_url(), Protocol::Transport).await;
    over.subscribe("huge", &padded(limit + 1), vars.clone())
        .await;
    match over.recv().await {
        Incoming::Closed { code, reason } => {
            assert_eq!(code, Some(1009), "{reason}");
            assert_eq!(reason, "message too big");
        }
        other => panic!("expected close 1009, got {other:?}"),
    }
    // The first connection is unaffected ("big" goes on streaming the run meanwhile).
    ws.subscribe("again", EVENTS_SUB, vars).await;
    loop {
        match ws.recv().await {
            Incoming::Data { id, data } if id == "again" => {
                assert_eq!(
                    data["data"]["workflowRunEvents"]["type"],
                    "WorkflowRunQueued"
                );
                break;
            }
            Incoming::Data { id, .. } => assert_eq!(id, "big"),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A refusal and an oversized message sent back to back: the client gets both answers, the
/// refusal and then the close.
#[tokio::test]
async fn ws_refusal_then_oversized_message_gets_both_answers() {
    let limit = 16 * 1024;
    let app = TestApp::spawn_with(sqlite_with(|o| {
        o.max_body_bytes = Some(limit);
        o.ws_max_operations = 1;
    }))
    .await;
    let thread = app.thread().await;
    let run = app.start_run(&thread, "content_calendar").await;
    let vars = json!({ "r": run["id"], "a": 0 });
    let mut ws = WsClient::connect_init(&app.ws_url(), Protocol::Transport).await;
    ws.subscribe("1", EVENTS_SUB, vars.clone()).await;
    ws.subscribe("2", EVENTS_SUB, vars.clone()).await;
    let huge = format!("#{}\n{EVENTS_SUB}", "x".repeat(limit));
    ws.subscribe("3", &huge, vars).await;
    let mut refused = false;
    loop {
        match ws.recv().await {
            Incoming::Data { id, .. } => assert_eq!(id, "1"),
            Incoming::Error { id, payload } => {
                assert_eq!(id, "2");
                assert_eq!(payload[0]["extensions"]["code"], "TOO_MANY_OPERATIONS");
                refused = true;
            }
            Incoming::Closed { code, .. } => {
                assert_eq!(code, Some(1009));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(refused, "the refusal came before the close");
}

#[tokio::test]
async fn ws_without_a_known_protocol_is_refused() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let resp = app
        .client
        .get(app.ws_url().replacen("ws://", "http://", 1))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-protocol", "chat")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 400);
}

/// Two server processes on one Postgres database: the run executes on A (B has no workers), and
/// a subscriber on B sees every transition, woken by LISTEN/NOTIFY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_subscriber_on_one_instance_sees_runs_of_another() {
    let a = TestApp::spawn(Backend::Postgres).await;
    let mut ob = Options::new(Backend::Postgres);
    ob.database_url = Some(a.database_url.clone());
    ob.workers = 0;
    let b = TestApp::spawn_with(ob).await;
    let thread = b.thread().await;
    let mut ws = WsClient::connect_init(&b.ws_url(), Protocol::Transport).await;
    ws.subscribe("s", STATUS_SUB, json!({ "t": thread, "a": b.head().await }))
        .await;
    let run = b.start_run_id(&thread, "content_calendar").await;
    let got = follow_to_completion(&mut ws, "s", &a, &run).await;
    assert_life(&got);
    // Every stage ran on A: B has no runtime at all.
    let events = a.event_types(&run).await;
    assert_eq!(
        events
            .iter()
            .filter(|t| *t == "WorkflowRunStageCompleted")
            .count(),
        4
    );
}
