//! Group commit: writers share one transaction per burst, each in its own savepoint.

use crate::helpers::{Backend, Options, TestApp};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use vm_workflow::domain::events::{Actor, ArtifactMeta, DomainEvent, EventMeta};
use vm_workflow::domain::run::{RunState, RunStatus, StageStatus, Step};
use vm_workflow::error::AppError;
use vm_workflow::service::runs::Claimed;
use vm_workflow::service::Services;
use vm_workflow::store::event_log::NewEvent;
use vm_workflow::store::{EventFilter, Store, WriteTx};

pub(crate) fn meta() -> EventMeta {
    EventMeta {
        actor: Actor::user("tester"),
        correlation_id: None,
        causation_id: None,
    }
}

pub(crate) fn brand_created(id: &str) -> Vec<NewEvent> {
    vec![NewEvent {
        body: DomainEvent::BrandCreated {
            brand_id: id.to_string(),
            name: format!("brand {id}"),
        },
        thread_id: None,
        run_id: None,
    }]
}

pub(crate) async fn until_queued(store: &Store, n: usize) {
    for _ in 0..500 {
        if store.queued_writers() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "expected {n} queued writers, have {}",
        store.queued_writers()
    );
}

/// Wait until `(requests, background)` writers are in line for a write turn.
async fn until_waiting(store: &Store, waiting: (usize, usize)) {
    for _ in 0..500 {
        if store.waiting_turns() == waiting {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "expected {waiting:?} writers in line, have {:?}",
        store.waiting_turns()
    );
}

/// An app without workers (no writer but the test's), its store and the log's head.
async fn quiet_store(backend: Backend) -> (TestApp, Arc<Store>, i64) {
    let mut opts = Options::new(backend);
    opts.workers = 0;
    let app = TestApp::spawn_with(opts).await;
    let store = app.services.store.clone();
    let head = store.head_sequence().await.expect("head");
    (app, store, head)
}

/// An app without workers (the test takes the runtime's steps), its services and store, and a
/// thread on it.
async fn stepped_by_hand(backend: Backend) -> (TestApp, Arc<Services>, Arc<Store>, String) {
    let mut opts = Options::new(backend);
    opts.workers = 0;
    let app = TestApp::spawn_with(opts).await;
    let services = app.services.clone();
    let store = services.store.clone();
    let thread = app.thread().await;
    (app, services, store, thread)
}

/// A writer that appended the creation of brand `id`.
pub(crate) async fn writer_with_brand(store: &Store, id: &str) -> WriteTx {
    let mut w = store.write().await.expect("writer");
    w.append(&format!("brand:{id}"), 0, &meta(), brand_created(id))
        .await
        .expect("append");
    w
}

/// The streams of the committed events after `head`, in log order.
pub(crate) async fn streams_after(store: &Store, head: i64) -> Vec<String> {
    let events = store
        .read_events(head, &EventFilter::default(), 100)
        .await
        .expect("read");
    events.into_iter().map(|e| e.stream_id).collect()
}

/// Three writers in one batch: the first waits for the batch, the second fails (its savepoint is
/// rolled back), the third commits for both survivors. Nothing of the second is kept, nothing of
/// the others is lost, and the log stays gap-free.
async fn a_failed_writer_leaves_the_rest_of_its_batch(backend: Backend) {
    let (_app, store, head) = quiet_store(backend).await;
    let (writers0, commits0) = store.write_stats().get();
    let a = writer_with_brand(&store, "a").await;
    let b = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut w = store.write().await.expect("writer b");
            // Version 0 of brand:a exists (a's write, in the same transaction): a conflict.
            w.append("brand:a", 0, &meta(), brand_created("a")).await?;
            w.commit().await
        })
    };
    until_queued(&store, 1).await;
    let c = {
        let store = store.clone();
        tokio::spawn(async move { writer_with_brand(&store, "c").await.commit().await })
    };
    until_queued(&store, 2).await;
    // Others are queued: a leaves the batch open for them and returns once it commits.
    a.commit().await.expect("a commits with the batch");
    let b = b.await.expect("b joins");
    assert!(
        matches!(b, Err(vm_workflow::error::AppError::Conflict(_))),
        "b must fail with a conflict: {b:?}"
    );
    c.await.expect("c joins").expect("c commits");

    let events = store
        .read_events(head, &EventFilter::default(), 100)
        .await
        .expect("read");
    let got: Vec<(i64, String)> = events
        .iter()
        .map(|e| (e.sequence, e.stream_id.clone()))
        .collect();
    assert_eq!(
        got,
        vec![(head + 1, "brand:a".into()), (head + 2, "brand:c".into())]
    );
    let (writers, commits) = store.write_stats().get();
    assert_eq!(
        (writers - writers0, commits - commits0),
        (2, 1),
        "a and c share one commit"
    );
}

/// A writer that would commit the batch (nobody queued for a turn) first lets the tasks that
/// are ready run once: a writer among them that asks for a turn then joins the batch, and one
/// commit covers both. On a runtime of one thread the order is fixed: a's commit task is
/// spawned, then b's task, which asks for a turn when it first runs: after a's task has begun,
/// and while it yields.
async fn a_writer_ready_while_the_last_one_commits_joins_its_batch(backend: Backend) {
    let mut opts = Options::new(backend);
    opts.workers = 0;
    let app = TestApp::spawn_with(opts).await;
    let store = app.services.store.clone();
    let head = store.head_sequence().await.expect("head");
    let commits = |s: &Store| s.write_stats().get().1;
    let a = writer_with_brand(&store, "ya").await;
    let before = commits(&store);
    let b_store = store.clone();
    let mut b = None;
    let (a_done, ()) = tokio::join!(a.commit(), async {
        b = Some(tokio::spawn(async move {
            let w = writer_with_brand(&b_store, "yb").await;
            w.commit().await
        }));
    });
    a_done.expect("a commits");
    let b = b.expect("b was spawned");
    b.await.expect("b joins").expect("b commits");
    assert_eq!(commits(&store) - before, 1, "one commit for a and b");
    assert_eq!(streams_after(&store, head).await, ["brand:ya", "brand:yb"]);
}

#[tokio::test]
async fn a_writer_ready_while_the_last_one_commits_joins_its_batch_sqlite() {
    a_writer_ready_while_the_last_one_commits_joins_its_batch(Backend::Sqlite).await
}

#[tokio::test]
async fn a_writer_ready_while_the_last_one_commits_joins_its_batch_postgres() {
    a_writer_ready_while_the_last_one_commits_joins_its_batch(Backend::Postgres).await
}

/// Concurrent clients: every write is kept, and they need fewer commits than writes.
async fn concurrent_writes_share_commits(backend: Backend) {
    let mut opts = Options::new(backend);
    opts.workers = 0;
    let app = Arc::new(TestApp::spawn_with(opts).await);
    let store = app.services.store.clone();
    let (writers0, commits0) = store.write_stats().get();
    let n = 60;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                app.data(
                    "mutation($n:String!) { createBrand(input:{name:$n}) { brand { id } } }",
                    json!({ "n": format!("brand {i}") }),
                )
                .await
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client");
    }
    let listed = app
        .data(
            "{ brands(first: 100) { edges { node { name } } } }",
            json!({}),
        )
        .await;
    let count = listed["brands"]["edges"].as_array().map(Vec::len);
    assert_eq!(count, Some(n), "{listed}");
    let (writers, commits) = store.write_stats().get();
    let (writers, commits) = (writers - writers0, commits - commits0);
    assert!(writers >= n as u64, "{writers} writers for {n} brands");
    assert!(
        commits < writers,
        "{writers} writers took {commits} commits: nothing was grouped"
    );
}

/// Text with quotes, backslashes, control characters and non-ASCII survives the write path
/// byte for byte, on both backends.
async fn awkward_text_round_trips(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // Postgres writes carry their values as SQL literals (store::inline_postgres): quotes,
    // backslashes, control characters and placeholder look-alikes must come back as they went.
    let name = "O'Brien \\ \"quoted\" ''; DROP TABLE brands; -- \\n\n\t\r\u{8}\u{1}\u{c}\u{1b}\u{7f} $1 ? E'x' é ✓ 𝄞 \\'";
    assert_eq!(app.brand_name_round_trip(name).await, json!(name));
    let thread = app.thread().await;
    let run = app
        .data(
            "mutation($t:ID!, $r:String!) { startWorkflowRun(input:{threadId:$t, requestText:$r, mode:\"plan_90d\"}) { run { id requestText } } }",
            json!({ "t": thread, "r": name }),
        )
        .await;
    assert_eq!(
        run["startWorkflowRun"]["run"]["requestText"],
        json!(name.trim())
    );
}

/// The last writer of a batch fails after its statements reached the database: its savepoint is
/// rolled back when the batch commits for the writers that wait on it, and theirs are kept.
async fn a_failed_last_writer_still_commits_the_batch(backend: Backend) {
    let (_app, store, head) = quiet_store(backend).await;
    let a = writer_with_brand(&store, "la").await;
    let b = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut w = store.write().await.expect("writer b");
            w.append("brand:lb", 0, &meta(), brand_created("lb"))
                .await?;
            // Sent now (a read goes with the writes), then refused: version 0 of brand:la exists.
            w.run_version("no-such-run").await?;
            w.append("brand:la", 0, &meta(), brand_created("la"))
                .await?;
            w.commit().await
        })
    };
    until_queued(&store, 1).await;
    // b is queued: a leaves the batch open for b and waits for its commit.
    a.commit().await.expect("a commits once b gave up");
    let b = b.await.expect("b joins");
    assert!(
        matches!(b, Err(AppError::Conflict(_))),
        "b must fail with a conflict: {b:?}"
    );
    assert_eq!(
        streams_after(&store, head).await,
        ["brand:la"],
        "a's event kept, none of b's"
    );
}

/// A commit whose caller goes away midway (a client that left, a heartbeat stopped) still
/// commits, and the writers after it in the batch are not harmed.
async fn a_commit_cut_short_still_commits(backend: Backend) {
    let (_app, store, head) = quiet_store(backend).await;
    let a = writer_with_brand(&store, "ca").await;
    // b holds its turn until told: a's commit cannot finish before b's (they share a batch), so
    // a's caller is sure to leave while its commit is under way, however loaded the machine.
    let (go, gate) = tokio::sync::oneshot::channel::<()>();
    let b = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut w = store.write().await?;
            w.append("brand:cb", 0, &meta(), brand_created("cb"))
                .await?;
            let _ = gate.await;
            w.commit().await
        })
    };
    until_queued(&store, 1).await;
    {
        // Polled once (its statements are on their way), then dropped.
        let mut commit = Box::pin(a.commit());
        assert!(futures::poll!(&mut commit).is_pending());
    }
    go.send(()).expect("b waits");
    b.await.expect("b joins").expect("b commits");
    assert_eq!(
        streams_after(&store, head).await,
        ["brand:ca", "brand:cb"],
        "both committed"
    );
}

/// A client's write goes before the runtime's writes that queued earlier: `Store::write` is a
/// request, `Store::write_background` the runtime's own work (see `store::turns`).
async fn requests_go_before_the_runtimes_waiting_writes(backend: Backend) {
    let (_app, store, head) = quiet_store(backend).await;
    let a = writer_with_brand(&store, "pa").await;
    let mut queued = Vec::new();
    for (n, id) in ["pb1", "pb2"].into_iter().enumerate() {
        let writer = store.clone();
        queued.push(tokio::spawn(async move {
            let mut w = writer.write_background().await?;
            w.append(&format!("brand:{id}"), 0, &meta(), brand_created(id))
                .await?;
            w.commit().await
        }));
        until_waiting(&store, (0, n + 1)).await;
    }
    {
        let store = store.clone();
        queued.push(tokio::spawn(async move {
            writer_with_brand(&store, "pr").await.commit().await
        }));
    }
    until_waiting(&store, (1, 2)).await;
    a.commit().await.expect("a commits");
    for w in queued {
        w.await.expect("joins").expect("commits");
    }
    assert_eq!(
        streams_after(&store, head).await,
        ["brand:pa", "brand:pr", "brand:pb1", "brand:pb2"],
        "the request first, then the background writers in their order"
    );
}

/// `owner` claims the oldest claimable run (there must be one), with its next step if it can.
async fn claim(services: &Services, owner: &str) -> Claimed {
    services
        .claim_and_step(owner, 30.0)
        .await
        .expect("claim")
        .expect("a claimable run")
}

/// A claim takes the run's next step in the same write turn; a claim decided on a stale copy
/// writes nothing, not even its lease, and the next claim starts from the stored run.
async fn a_claim_steps_or_leaves_nothing(backend: Backend) {
    let (app, services, store, thread) = stepped_by_hand(backend).await;
    let run = app.start_run_id(&thread, "content_calendar").await;
    let queued = services.runs.get(&run).expect("the start keeps a copy");
    let turns = |s: &Store| s.write_stats().get().0;

    let before = turns(&store);
    let claimed = claim(&services, "worker-a").await;
    assert_eq!(claimed.run_id, run);
    assert_eq!(turns(&store) - before, 1, "claim and step in one turn");
    let (state, started) = claimed.stepped.expect("a step was taken");
    assert_eq!(state.run.status, RunStatus::Running);
    assert_eq!(started, Some(("research".to_string(), 1)));
    assert!(!store.has_claimable_run().await.expect("look"), "leased");
    assert_eq!(
        app.event_types(&run).await,
        [
            "WorkflowRunQueued",
            "WorkflowRunStarted",
            "WorkflowRunStageStarted"
        ]
    );

    // Another instance takes the lease over once it expires; this one still has the queued copy.
    store
        .release_lease(&run, "worker-a")
        .await
        .expect("release");
    services.runs.put(&queued);
    let head = store.head_sequence().await.expect("head");
    let stale = services.claim_and_step("worker-b", 30.0).await;
    assert!(
        matches!(stale, Err(AppError::Conflict(_))),
        "a stale copy cannot write: {stale:?}"
    );
    assert_eq!(store.head_sequence().await.expect("head"), head);
    assert!(
        store.has_claimable_run().await.expect("look"),
        "the failed claim took no lease"
    );
    let again = claim(&services, "worker-b").await;
    assert_eq!(again.run_id, run);
    assert!(again.stepped.is_none(), "no copy left: the worker loads it");
    assert_eq!(store.head_sequence().await.expect("head"), head);
    assert!(store
        .renew_lease(&run, "worker-b", 30.0)
        .await
        .expect("renew"));
}

/// Without workers: claim the run (its next stage attempt starts with the claim) and complete
/// each attempt until the run rests; the run as it ran its last attempt, and at rest.
async fn drive_to_rest(services: &Services, run: &str) -> (RunState, RunState) {
    let claimed = claim(services, "worker-a").await;
    assert_eq!(claimed.run_id, run);
    let (mut state, mut started) = claimed.stepped.expect("the claim starts an attempt");
    let mut running = state.clone();
    while let Some((stage, attempt)) = started {
        running = state;
        (state, started) = services
            .advance_run(
                run,
                None,
                |s| s.complete_attempt(&stage, attempt, Vec::new()),
                true,
            )
            .await
            .expect("complete the attempt");
    }
    (running, state)
}

/// Run commands decide on this process's copy of the run without reading the stored version
/// first: an approval on a current copy is one send on SQLite. A stale copy cannot mislead the
/// command: a decision on it that appends events conflicts with the stored stream, one that is
/// refused is checked against the stored version, and either way the command is decided on
/// the stored run.
async fn run_commands_decide_on_the_cached_copy(backend: Backend) {
    let (app, services, store, thread) = stepped_by_hand(backend).await;
    let sends = |s: &Store| s.write_stats().sends();
    let run = app.start_run_id(&thread, "content_calendar").await;

    let (_, gate1) = drive_to_rest(&services, &run).await;
    assert_eq!(gate1.run.status, RunStatus::WaitingApproval);
    let cached = services.runs.get(&run).map(|c| c.run.version);
    assert_eq!(cached, Some(gate1.run.version), "the step keeps a copy");
    let before = sends(&store);
    let approved = app.approve(&run, None).await;
    assert_eq!(
        approved["approval"]["stageKey"],
        json!(gate1.run.current_stage),
        "{approved}"
    );
    let used = sends(&store) - before;
    if store.is_postgres() {
        // `BEGIN`, the write lock, SAVEPOINT and the log's head (read in every batch: other
        // instances append too); the event, the run, stage, approval, task and queue rows, the
        // notification, RELEASE and `COMMIT` together (the timeline is a view over the
        // events). No read of the run.
        assert_eq!(used, 2);
    } else {
        // The writes and RELEASE together (the savepoint is opened by the same send).
        assert_eq!(used, 1);
    }

    // A stale copy whose decision appends: approving the copy at the first gate again.
    let (_, gate2) = drive_to_rest(&services, &run).await;
    assert_ne!(gate2.run.current_stage, gate1.run.current_stage);
    approve_on_stale_copy(&app, &gate1, &gate2).await;

    // A stale copy whose decision is refused: the run was still running in it.
    let (running, gate3) = drive_to_rest(&services, &run).await;
    assert_eq!(running.run.status, RunStatus::Running);
    approve_on_stale_copy(&app, &running, &gate3).await;

    let (_, done) = drive_to_rest(&services, &run).await;
    assert_eq!(done.run.status, RunStatus::Completed);
    assert_eq!(
        (
            app.event_count(&run, "ApprovalGranted").await,
            app.event_count(&run, "WorkflowRunStageCompleted").await
        ),
        (3, 4)
    );
}

/// A run command takes the cached copy once its write turn is its own, not before it waits: a
/// client approves as soon as it sees a gate, which it sees when the worker's batch commits,
/// possibly before the worker has put the new state in the cache. An approval that waited for
/// its turn while the copy was brought up to date is decided on the new copy, in as few sends as
/// on a current one (on the copy it found when it came, it would be refused, check the stored
/// version and read the stored run first).
async fn a_run_command_takes_the_copy_recorded_while_it_waited(backend: Backend) {
    let (app, services, store, thread) = stepped_by_hand(backend).await;
    let sends = |s: &Store| s.write_stats().sends();
    let run = app.start_run_id(&thread, "content_calendar").await;
    let (running, gate) = drive_to_rest(&services, &run).await;
    assert_eq!(gate.run.status, RunStatus::WaitingApproval);
    // The gate is committed; the cache still holds the copy before it.
    services.runs.put(&running);
    let held = store.write().await.expect("a turn held");
    let before = sends(&store);
    let recorded = async {
        let queued = async {
            while store.queued_writers() == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), queued)
            .await
            .expect("the approval waits for its turn");
        services.runs.put(&gate);
        held.commit().await.expect("the held turn commits");
    };
    let (approved, ()) = tokio::join!(app.approve(&run, None), recorded);
    assert_eq!(
        approved["approval"]["stageKey"],
        json!(gate.run.current_stage),
        "{approved}"
    );
    // As in `run_commands_decide_on_the_cached_copy`.
    let expected = if store.is_postgres() { 2 } else { 1 };
    assert_eq!(sends(&store) - before, expected);
}

/// A turn that appends to a run several times writes the run's rows once, as its last append
/// left them, and its events in one insert: completing the first stage
/// and reaching the next gate is two appends in one turn. What the turn leaves is what
/// replaying the log gives.
async fn a_turns_appends_write_a_runs_rows_once(backend: Backend) {
    let (app, services, store, thread) = stepped_by_hand(backend).await;
    let run = app.start_run_id(&thread, "content_calendar").await;
    let claimed = claim(&services, "worker-a").await;
    let (_, started) = claimed.stepped.expect("the claim starts research");
    let (stage, attempt) = started.expect("an attempt");

    let before = store.write_stats().statements();
    let (state, next) = services
        .advance_run(
            &run,
            None,
            |s| s.complete_attempt(&stage, attempt, Vec::new()),
            true,
        )
        .await
        .expect("complete research");
    let used = store.write_stats().statements() - before;
    assert_eq!(state.run.status, RunStatus::WaitingApproval);
    assert_eq!(next, None);
    assert_eq!(
        app.event_types(&run).await[3..],
        [
            "WorkflowRunStageCompleted",
            "WorkflowRunWaitingApproval",
            "TaskCreated",
            "ApprovalRequested"
        ]
    );
    // SAVEPOINT; the run's state read (the run, its stages, approvals and tasks: no state was
    // passed in); the four events in one insert; the run; research and brand-voice; the gate's
    // approval and task; the queue row gone; RELEASE. Research's first attempt has no earlier
    // artifacts to delete, and made none to insert; the timeline is a view over the events.
    // Postgres adds the write lock, the log's head and the notification. Projected append by
    // append, the events and the run would be written twice each (15 on SQLite).
    let expected = if store.is_postgres() { 16 } else { 13 };
    assert_eq!(used, expected);

    let live = store.dump_read_models().await.expect("dump");
    let n = store.rebuild_projections().await.expect("rebuild");
    assert_eq!(n as i64, app.head().await);
    let rebuilt = store.dump_read_models().await.expect("dump");
    for (table, rows) in &live {
        assert_eq!(rows, &rebuilt[table], "table {table} differs after rebuild");
    }
}

/// A start with a worker idle hands the run over in its own turn (see `service::handoff`): the
/// lease goes into the queue row the start's appends write, so the turn writes that row and the
/// run's rows once each instead of writing them, updating the lease, then writing them again for
/// the stage the hand-off starts. The lease is the waiting worker's all the same.
async fn a_hand_off_leases_the_row_its_turn_writes(backend: Backend) {
    let (app, services, store, thread) = stepped_by_hand(backend).await;
    let ticket = services.handoffs.wait("worker-h", 30.0);
    let before = store.write_stats().statements();
    let run = app.start_run_id(&thread, "content_calendar").await;
    let used = store.write_stats().statements() - before;
    let claimed = ticket.run.await.expect("the start hands the run over");
    assert_eq!(claimed.run_id, run);
    let (state, started) = claimed.stepped.expect("the hand-off takes a step");
    assert_eq!(state.run.status, RunStatus::Running);
    assert_eq!(started, Some(("research".to_string(), 1)));
    assert_eq!(
        app.event_types(&run).await,
        [
            "WorkflowRunQueued",
            "WorkflowRunStarted",
            "WorkflowRunStageStarted"
        ]
    );
    assert!(!store.has_claimable_run().await.expect("look"), "leased");
    assert!(
        !store
            .renew_lease(&run, "worker-other", 30.0)
            .await
            .expect("renew"),
        "the lease is nobody else's"
    );
    assert!(
        store
            .renew_lease(&run, "worker-h", 30.0)
            .await
            .expect("renew"),
        "the lease is the waiting worker's"
    );
    // SAVEPOINT; the three events in one insert; the thread's last activity; the run; its
    // stages in one insert; its queue row, leased; RELEASE (the timeline is a view). Postgres
    // adds the write lock, the log's head and the notification. Before, 13 on SQLite: the lease
    // an update of its own, sent after the first append's rows (so the events, the run and the
    // stage written twice), and the thread's update sent between the two appends (so the
    // events in two inserts).
    let expected = if store.is_postgres() { 10 } else { 7 };
    assert_eq!(used, expected);

    let live = store.dump_read_models().await.expect("dump");
    store.rebuild_projections().await.expect("rebuild");
    let rebuilt = store.dump_read_models().await.expect("dump");
    for (table, rows) in &live {
        assert_eq!(rows, &rebuilt[table], "table {table} differs after rebuild");
    }
}

/// The store accounts for its write turns' time (`Store::write_timings`, logged at a graceful
/// stop): how long turns held the write lock, and how much of that was spent waiting for the
/// database (sends, `BEGIN`, `COMMIT`), which can only be part of it.
async fn write_turns_account_for_their_time(backend: Backend) {
    let (app, services, store, thread) = stepped_by_hand(backend).await;
    let start = store.write_timings();
    let run = app.start_run_id(&thread, "content_calendar").await;
    let (_, gate) = drive_to_rest(&services, &run).await;
    assert_eq!(gate.run.status, RunStatus::WaitingApproval);
    app.approve(&run, None).await;
    let t = store.write_timings();
    let (writers, commits) = store.write_stats().get();
    assert!(t.turns - start.turns >= 3, "{start:?} then {t:?}");
    assert!(t.turns >= writers, "{t:?}: {writers} writers");
    assert!(commits > 0);
    for (what, spent) in [("sends", t.sends), ("commits", t.commits)] {
        assert!(spent > Duration::ZERO, "no time in {what}: {t:?}");
    }
    assert!(
        t.sends + t.commits <= t.held,
        "waits outside the turns: {t:?}"
    );
}

/// Batches follow one another on the writers' own connection, each begun by its first
/// writer's first send: none checks a connection out of the pool (each checkout cost sqlx's
/// pings), nor sends anything for a writer that leaves without writing. On Postgres the one
/// connection is kept from batch to batch. Either way every batch's writes are committed and
/// visible to other connections.
async fn batches_keep_the_writers_transaction(backend: Backend) {
    let (app, _services, store, _thread) = stepped_by_hand(backend).await;
    let (_, commits_before) = store.write_stats().get();
    let head = store.head_sequence().await.expect("head");
    let writers_before = if store.is_postgres() {
        writer_connections(&app).await
    } else {
        Vec::new()
    };
    for i in 0..5 {
        commit_brand(&store, &format!("kept{i}")).await;
        // A writer that takes its turn and goes without writing anything leaves it as it was.
        let sends = store.write_stats().sends();
        drop(store.write().await.expect("writer"));
        assert_eq!(store.write_stats().sends(), sends, "nothing sent");
    }
    let (_, commits_after) = store.write_stats().get();
    assert_eq!(commits_after - commits_before, 5, "one batch each");
    if store.is_postgres() {
        let writers = writer_connections(&app).await;
        assert_eq!(writers.len(), 1, "{writers:?}");
        assert_eq!(
            writers, writers_before,
            "the same connection since the start"
        );
    }
    let streams = streams_after(&store, head).await;
    assert_eq!(streams.len(), 5, "{streams:?}");
    // Nor does it make the next writer read the log's head again (on SQLite it is kept from
    // batch to batch): an append after such a writer sends what one after a commit sends.
    commit_brand(&store, "first").await;
    let after_commit = commit_brand(&store, "after-commit").await;
    drop(store.write().await.expect("writer"));
    let after_leaving = commit_brand(&store, "after-leaving").await;
    assert_eq!(after_leaving, after_commit);
    app.create_brand("after the batches").await;
}

/// Postgres: the backends of the store's writers' connection (`vm-workflow writer`): their
/// process ids and start times.
async fn writer_connections(app: &TestApp) -> Vec<(i32, String)> {
    use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
    let db = Database::connect(app.database_url.clone())
        .await
        .expect("connect");
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT pid, backend_start::text FROM pg_stat_activity \
             WHERE application_name = 'vm-workflow writer' AND datname = current_database()",
        ))
        .await
        .expect("pg_stat_activity");
    let _ = db.close().await;
    rows.iter()
        .map(|r| {
            (
                r.try_get_by_index(0).expect("pid"),
                r.try_get_by_index(1).expect("backend_start"),
            )
        })
        .collect()
}

/// A writer that creates brand `name` and commits; the statements it sent.
async fn commit_brand(store: &Store, name: &str) -> u64 {
    let before = store.write_stats().statements();
    let mut w = store.write().await.expect("writer");
    w.append(&format!("brand:{name}"), 0, &meta(), brand_created(name))
        .await
        .expect("append");
    w.commit().await.expect("commit");
    store.write_stats().statements() - before
}

/// Append `events` to the run in `w` and project them; the run's new state.
async fn append_to_run(w: &mut WriteTx, state: RunState, events: Vec<DomainEvent>) -> RunState {
    let new = events
        .into_iter()
        .map(|body| NewEvent {
            body,
            thread_id: Some(state.run.thread_id.clone()),
            run_id: Some(state.run.id.clone()),
        })
        .collect();
    let stream = format!("run:{}", state.run.id);
    let version = state.run.version;
    let (_, after) = w
        .append_and_project(&stream, version, &meta(), new, Some(state))
        .await
        .expect("append");
    after.expect("the run's state")
}

/// Complete the running attempt of `state`'s run (with one artifact), then take its next step
/// (here: stop at the next gate).
async fn complete_and_gate(w: &mut WriteTx, state: RunState, artifact: &str) -> RunState {
    let running = state
        .stages
        .iter()
        .find(|s| s.status == StageStatus::Running)
        .expect("a running stage");
    let (key, attempt) = (running.key.clone(), running.attempts);
    let artifacts = vec![ArtifactMeta {
        path: artifact.into(),
        kind: "md".into(),
        sha256: "0".repeat(64),
        size: 3,
    }];
    let events = state
        .complete_attempt(&key, attempt, artifacts)
        .expect("complete");
    let done = append_to_run(w, state, events).await;
    let Step::Gate { stage_key } = done.next_step() else {
        panic!("a gate comes next: {:?}", done.next_step());
    };
    let events = done.stop_at_gate(&stage_key).expect("gate");
    append_to_run(w, done, events).await
}

/// Approve the gate the run waits at.
async fn approve_in(w: &mut WriteTx, state: RunState) -> RunState {
    let (events, _) = state.approve(None, "editor", None).expect("approve");
    append_to_run(w, state, events).await
}

/// Appends merged in one turn leave what a replay of the log leaves, the work queue's rows and
/// their ready times included: a run taken through a completed stage, a gate (not runnable),
/// its approval (runnable again) and the next attempt in one turn; two runs interleaved in
/// another.
async fn merged_appends_equal_a_replay(backend: Backend) {
    let (app, services, store, thread) = stepped_by_hand(backend).await;
    let mut running = Vec::new();
    for _ in 0..3 {
        app.start_run_id(&thread, "content_calendar").await;
    }
    for _ in 0..3 {
        let (state, started) = claim(&services, "worker-a").await.stepped.expect("a step");
        assert!(started.is_some(), "an attempt started");
        running.push(state);
    }
    let [a, b, c] = <[RunState; 3]>::try_from(running).expect("three runs");

    let mut w = store.write().await.expect("writer");
    let a = complete_and_gate(&mut w, a, "a1").await;
    assert!(!a.run.status.is_runnable());
    let a = approve_in(&mut w, a).await;
    assert!(a.run.status.is_runnable());
    let a_ready = a.run.updated_at.clone();
    let Step::Execute { stage_key, attempt } = a.next_step() else {
        panic!("an attempt comes next: {:?}", a.next_step());
    };
    let events = a.start_attempt(&stage_key, attempt).expect("start");
    let a = append_to_run(&mut w, a, events).await;
    w.commit().await.expect("commit");

    let mut w = store.write().await.expect("writer");
    let b = complete_and_gate(&mut w, b, "b1").await;
    let c = complete_and_gate(&mut w, c, "c1").await;
    let b = approve_in(&mut w, b).await;
    let c = approve_in(&mut w, c).await;
    w.commit().await.expect("commit");
    for run in [&a, &b, &c] {
        assert!(run.run.status.is_runnable(), "{:?}", run.run.status);
    }

    let live = store.dump_read_models().await.expect("dump");
    let queue = &live["run_queue"];
    assert_eq!(queue.len(), 3, "{queue:?}");
    for (run, approved_at) in [
        (&a, &a_ready),
        (&b, &b.run.updated_at),
        (&c, &c.run.updated_at),
    ] {
        let row = format!("{} ready at {approved_at}", run.run.id);
        assert!(
            queue.contains(&row),
            "ready since its approval: {row} in {queue:?}"
        );
    }
    store.rebuild_projections().await.expect("rebuild");
    let rebuilt = store.dump_read_models().await.expect("dump");
    for (table, rows) in &live {
        assert_eq!(rows, &rebuilt[table], "table {table} differs after rebuild");
    }
}

/// With `stale` as the process's copy of the run, approve the gate the run waits at (`gate`,
/// as stored): the approval is decided on the stored run.
async fn approve_on_stale_copy(app: &TestApp, stale: &RunState, gate: &RunState) {
    app.services.runs.put(stale);
    let approved = app.approve(&gate.run.id, None).await;
    assert_eq!(
        approved["approval"]["stageKey"],
        json!(gate.run.current_stage),
        "decided on the stored run: {approved}"
    );
}

/// A writer's statements go to the database together: its writes wait for its next read or its
/// commit, and its savepoint is opened by its first send and released by its last, so a writer
/// that only writes is one send: on SQLite its statements executed by the turn's holder, on
/// Postgres one round trip. On SQLite the read runs right after the writes before it; on
/// Postgres (whose multi-statement messages bind no parameters) it follows them in a round trip
/// of its own. Either way a conflict among them rolls back all of the writer's changes.
async fn a_writers_writes_go_together(backend: Backend) {
    let mut opts = Options::new(backend);
    opts.workers = 0;
    let app = TestApp::spawn_with(opts).await;
    let store = app.services.store.clone();
    let sends = |s: &Store| s.write_stats().sends();

    // A writer that only writes (the log's head is read with its first send).
    let before = sends(&store);
    let mut w = store.write().await.expect("writer");
    w.append("brand:w0", 0, &meta(), brand_created("w0"))
        .await
        .expect("append");
    w.commit().await.expect("commit");
    if store.is_postgres() {
        // `BEGIN`, the write lock, SAVEPOINT and the head; the event, its notification,
        // RELEASE and `COMMIT` (before: `BEGIN` and `COMMIT` round trips of their own, the head
        // a round trip of its own).
        assert_eq!(sends(&store) - before, 2);
    } else {
        // SAVEPOINT with the head; the event and RELEASE together.
        assert_eq!(sends(&store) - before, 2);
    }

    // The head is known now on SQLite (this process is the only writer).
    let before = sends(&store);
    let mut w = store.write().await.expect("writer");
    for id in ["w1", "w2"] {
        w.append(&format!("brand:{id}"), 0, &meta(), brand_created(id))
            .await
            .expect("append");
    }
    let after_appends = sends(&store) - before;
    w.run_version("no-such-run").await.expect("a read");
    let after_read = sends(&store) - before;
    w.append("brand:w3", 0, &meta(), brand_created("w3"))
        .await
        .expect("append");
    w.commit().await.expect("commit");
    let after_commit = sends(&store) - before;
    if store.is_postgres() {
        // `BEGIN`, the lock, SAVEPOINT and the head (read in every batch: other instances
        // append too); the two events with the read; the third event with RELEASE and
        // `COMMIT`.
        assert_eq!((after_appends, after_read, after_commit), (1, 2, 3));
    } else {
        assert_eq!((after_appends, after_read, after_commit), (0, 1, 2));
    }

    // The same stream version again: the conflict surfaces at the latest at commit, and
    // nothing of this writer is kept.
    let head = store.head_sequence().await.expect("head");
    let mut w = store.write().await.expect("writer");
    let result = async {
        w.append("brand:w4", 0, &meta(), brand_created("w4"))
            .await?;
        w.append("brand:w1", 0, &meta(), brand_created("w1"))
            .await?;
        w.commit().await
    }
    .await;
    assert!(
        matches!(result, Err(AppError::Conflict(_))),
        "a reused stream version: {result:?}"
    );
    assert_eq!(
        store.head_sequence().await.expect("head"),
        head,
        "no event of the failed writer is kept"
    );

    // A conflict that surfaces at a read: the writer can only roll back, even if its caller
    // ignores the error and commits.
    let mut w = store.write().await.expect("writer");
    w.append("brand:w5", 0, &meta(), brand_created("w5"))
        .await
        .expect("append");
    let conflict = async {
        w.append("brand:w1", 0, &meta(), brand_created("w1"))
            .await?;
        w.run_version("no-such-run").await
    }
    .await;
    assert!(
        matches!(conflict, Err(AppError::Conflict(_))),
        "the conflict surfaces at the read: {conflict:?}"
    );
    assert!(w.commit().await.is_err(), "a failed writer cannot commit");
    assert_eq!(
        store.head_sequence().await.expect("head"),
        head,
        "nothing of a writer whose send failed is kept"
    );
}

/// A writer alone in its batch whose last send was a read (a claim) commits with no send more
/// on SQLite: its savepoint's release goes with the `COMMIT`. What it wrote is committed
/// all the same, and the next writer's savepoint opens cleanly after it.
async fn a_lone_writers_release_goes_with_the_commit(backend: Backend) {
    let (app, _services, store, thread) = stepped_by_hand(backend).await;
    let run = app.start_run_id(&thread, "content_calendar").await;
    let (sends, commits) = (store.write_stats().sends(), store.write_stats().get().1);
    let claimed = store.claim_run("worker-r", 30.0).await.expect("claim");
    assert_eq!(claimed.as_deref(), Some(run.as_str()));
    let used = store.write_stats().sends() - sends;
    // SQLite: the savepoint, the claim (before: and the release, a send of its own).
    // Postgres: `BEGIN`, the lock, the savepoint and the claim; the release with `COMMIT`.
    assert_eq!(used, if store.is_postgres() { 2 } else { 1 });
    assert_eq!(store.write_stats().get().1 - commits, 1, "one commit");
    // Committed: seen from a connection of the read pool, and the lease is the claimer's.
    assert!(!store.has_claimable_run().await.expect("look"), "leased");
    assert!(store
        .renew_lease(&run, "worker-r", 30.0)
        .await
        .expect("renew"));
    // A claim that finds nothing ends the same way, and writers go on after it.
    assert_eq!(
        store.claim_run("worker-s", 30.0).await.expect("claim"),
        None
    );
    let w = writer_with_brand(&store, "after-claims").await;
    w.commit().await.expect("commit");
    let before = store.head_sequence().await.expect("head") - 1;
    assert_eq!(streams_after(&store, before).await, ["brand:after-claims"]);
}

crate::both_backends!(
    a_writers_writes_go_together,
    a_lone_writers_release_goes_with_the_commit,
    a_failed_last_writer_still_commits_the_batch,
    a_commit_cut_short_still_commits,
    a_failed_writer_leaves_the_rest_of_its_batch,
    concurrent_writes_share_commits,
    awkward_text_round_trips,
    a_claim_steps_or_leaves_nothing,
    run_commands_decide_on_the_cached_copy,
    a_run_command_takes_the_copy_recorded_while_it_waited,
    a_turns_appends_write_a_runs_rows_once,
    a_hand_off_leases_the_row_its_turn_writes,
    write_turns_account_for_their_time,
    batches_keep_the_writers_transaction,
    merged_appends_equal_a_replay,
    requests_go_before_the_runtimes_waiting_writes
);

fn pending_stage(run: &serde_json::Value) -> Option<String> {
    run["pendingApprovals"][0]["stageKey"]
        .as_str()
        .map(str::to_string)
}

/// Postgres: a write's text is prepared once on the writers' connection and executed by name
/// after that. A message that failed before a new text's `PREPARE` ran leaves that text to be
/// prepared again: the next writer that sends it succeeds (were it taken as prepared, its
/// `EXECUTE` would name a statement that does not exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writes_are_prepared_once_and_again_after_a_failed_message() {
    let mut opts = Options::new(Backend::Postgres);
    opts.workers = 0;
    let app = TestApp::spawn_with(opts).await;
    let store = app.services.store.clone();
    let prepares = |s: &Store| s.write_stats().prepares();

    let create = |id: &'static str| {
        let store = store.clone();
        async move {
            let mut w = store.write().await.expect("writer");
            w.append_and_project(&format!("brand:{id}"), 0, &meta(), brand_created(id), None)
                .await
                .expect("append");
            w.commit().await.expect("commit");
        }
    };
    create("p0").await;
    let before = prepares(&store);
    create("p1").await;
    assert_eq!(
        prepares(&store),
        before,
        "the same texts again: executed by name"
    );

    // A rename on a stale version: the event's insert fails on brand:p0's version 1, before
    // the brand's update, a text not sent before, is reached.
    let renamed = |name: &str| {
        vec![NewEvent {
            body: DomainEvent::BrandUpdated {
                brand_id: "p0".into(),
                name: name.into(),
            },
            thread_id: None,
            run_id: None,
        }]
    };
    let before = prepares(&store);
    let mut w = store.write().await.expect("writer");
    w.append_and_project("brand:p0", 0, &meta(), renamed("stale"), None)
        .await
        .expect("append");
    let failed = w.commit().await;
    assert!(matches!(failed, Err(AppError::Conflict(_))), "{failed:?}");
    assert_eq!(
        prepares(&store),
        before + 1,
        "the update's text was in the message"
    );

    let mut w = store.write().await.expect("writer");
    w.append_and_project("brand:p0", 1, &meta(), renamed("renamed"), None)
        .await
        .expect("append");
    w.commit().await.expect("the update's text, prepared again");
    assert_eq!(prepares(&store), before + 2);
    let brand = app
        .gql(
            "query($id: ID!) { brand(id: $id) { name } }",
            json!({ "id": "p0" }),
        )
        .await;
    assert_eq!(brand["data"]["brand"]["name"], json!("renamed"), "{brand}");
}

/// Two instances on one Postgres; B executes the runs (A has no workers). A's copy of the run
/// (from its own last command) is stale each time a gate is reached; approvals on A still decide
/// on the stored run, and the run completes with one approval per gate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_stale_run_copy_on_another_instance_misleads_nothing() {
    let mut oa = Options::new(Backend::Postgres);
    oa.workers = 0;
    let a = TestApp::spawn_with(oa).await;
    let mut ob = Options::new(Backend::Postgres);
    ob.database_url = Some(a.database_url.clone());
    ob.data_dir = Some(a.data_dir.clone());
    let b = TestApp::spawn_with(ob).await;
    let thread = a.thread().await;
    let run = a.start_run_id(&thread, "content_calendar").await;
    let mut approved_stages = Vec::new();
    loop {
        let r = a
            .wait_status(&run, &["WAITING_APPROVAL", "COMPLETED"])
            .await;
        if r["status"] == json!("COMPLETED") {
            break;
        }
        let stage = pending_stage(&r).expect("a pending gate");
        if approved_stages.last() == Some(&stage) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let copy = a.services.runs.get(&run).expect("A keeps its last copy");
        assert_ne!(
            copy.run.status,
            RunStatus::WaitingApproval,
            "A's copy is from before B reached the gate"
        );
        let approved = a.approve(&run, None).await;
        assert_eq!(approved["approval"]["stageKey"], json!(stage), "{approved}");
        approved_stages.push(stage);
    }
    assert_eq!(approved_stages.len(), 3, "{approved_stages:?}");
    let events = a.event_types(&run).await;
    let count = |t: &str| events.iter().filter(|e| *e == t).count();
    assert_eq!(
        (count("ApprovalGranted"), count("WorkflowRunStageCompleted")),
        (3, 4),
        "{events:?}"
    );
    drop(b);
}

/// Every writer's turn is a savepoint, and SQLite journals each page a savepoint changes: kept in
/// memory, not spilled to a temporary file (`temp_store = memory`).
#[tokio::test]
async fn sqlite_keeps_savepoint_journals_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = Store::connect(&url, 1).await.expect("sqlite");
    // 2 = MEMORY (0 = the build's default, a file).
    let setting = store.sqlite_pragma("temp_store").await.expect("pragma");
    assert_eq!(setting.as_deref(), Some("2"));
}

/// The bundled SQLite is built with the query planner stability guarantee
/// (`.cargo/config.toml`): without it every statement with a bound `LIMIT ?` (each sea-orm
/// `.one()`) is parsed and planned again on every execution.
#[tokio::test]
async fn sqlite_is_built_with_a_stable_query_planner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("q.db").display());
    let store = Store::connect(&url, 1).await.expect("sqlite");
    assert!(store.planner_is_stable(), "built without ENABLE_QPSG");
    // And, in this process as in the server's, SQLite allocates through mimalloc: the store
    // installed it before SQLite's first connection.
    assert!(vm_workflow::store::sqlite_memory::installed());
}
