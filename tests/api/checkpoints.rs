//! SQLite's WAL checkpoints, taken by the store's task beside the writers (`store::checkpoint`).

use crate::helpers::{Backend, Options, TestApp};
use crate::store::writer_with_brand;
use sea_orm::sqlx::{Connection as _, SqliteConnection};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use vm_workflow::store::Store;

/// A migrated SQLite store of its own, with at most `max_connections` connections.
async fn sqlite_store(max_connections: u32) -> (tempfile::TempDir, String, Arc<Store>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("cp.sqlite3").display()
    );
    let store = Store::connect(&url, max_connections)
        .await
        .expect("connects");
    store.migrate().await.expect("migrates");
    (dir, url, Arc::new(store))
}

/// `n` writers at once, each creating a brand; all must commit within 20 s.
async fn write_round(store: &Arc<Store>, tag: &str, n: usize) {
    let writers: Vec<_> = (0..n)
        .map(|i| {
            let store = store.clone();
            let id = format!("{tag}-{i}");
            tokio::spawn(async move { writer_with_brand(&store, &id).await.commit().await })
        })
        .collect();
    for w in writers {
        tokio::time::timeout(Duration::from_secs(20), w)
            .await
            .expect("a writer finished within 20 s")
            .expect("joins")
            .expect("commits");
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// SQLite: no checkpoint runs inside a commit (`wal_autocheckpoint = 0`); the store's task takes
/// them beside the writers. SQLite starts the WAL over only when a write transaction begins with
/// every frame copied, which passive checkpoints alone never see while a writer always has the
/// batch open (here: one writer holds it across every pass). Once the WAL holds the store's limit
/// of pages the task copies the rest in a write turn of its own, and the WAL stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_wal_stays_bounded_with_checkpoints_outside_commits() {
    let (dir, _, store) = sqlite_store(8).await;
    let pragma = |name: &'static str| {
        let store = store.clone();
        async move { store.sqlite_pragma(name).await.expect("pragma") }
    };
    assert_eq!(pragma("wal_autocheckpoint").await.as_deref(), Some("0"));
    assert_eq!(
        pragma("journal_size_limit").await.as_deref(),
        Some("67108864")
    );
    store.set_wal_limit(64);
    let wal = dir.path().join("cp.sqlite3-wal");
    let mut largest = 0;
    for round in 0..40 {
        write_round(&store, &format!("w{round}"), 50).await;
        // A writer holds the batch open while the checkpoint task takes a pass.
        let holder = writer_with_brand(&store, &format!("h{round}")).await;
        // A read sends its writes: its write transaction is open in SQLite from here on.
        holder.run_version("none").await.expect("read");
        let passes = store.write_stats().checkpoints().passes;
        for _ in 0..500 {
            if store.write_stats().checkpoints().passes > passes {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        holder.commit().await.expect("holder commits");
        largest = largest.max(file_len(&wal));
    }
    let done = store.write_stats().checkpoints();
    assert!(done.passes >= 30, "{done:?}");
    assert!(done.restarts >= 10, "the WAL started over: {done:?}");
    assert_eq!(done.panics, 0);
    assert!(
        largest < 2 << 20,
        "the WAL reached {largest} bytes with a limit of 64 pages"
    );
}

/// The checkpoint task holds a pool connection while it waits for a write turn. A store asked
/// for one connection keeps two: with one, the writer whose turn it was waited for the task's
/// connection, and the task for that writer's turn, until the pool gave up (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_turns_do_not_starve_a_one_connection_store() {
    let (_dir, _, store) = sqlite_store(1).await;
    store.set_wal_limit(1);
    for round in 0..40 {
        write_round(&store, &format!("r{round}"), 10).await;
        if round % 4 == 0 {
            // Let a pass start while nobody writes, then write into it.
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    }
    let done = store.write_stats().checkpoints();
    assert!(done.turns >= 3, "checkpoint turns were taken: {done:?}");
}

/// A reader that keeps an old snapshot open holds every frame after it: no checkpoint can copy
/// them, so the task's write turns are wasted. It backs off (1, 2, 4 … passes) instead of taking
/// one at every pass, and the WAL starts over again once the reader has gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_reader_makes_the_checkpoint_task_back_off() {
    let (_dir, url, store) = sqlite_store(4).await;
    store.set_wal_limit(1);
    write_round(&store, "before", 5).await;
    let mut reader = SqliteConnection::connect(&url).await.expect("reader");
    let mut snapshot = reader.begin().await.expect("begin");
    let (events,): (i64,) = sea_orm::sqlx::query_as("SELECT COUNT(*) FROM events")
        .fetch_one(&mut *snapshot)
        .await
        .expect("read");
    assert!(events >= 5);
    // A pass set off before the reader came may still find everything copied: wait for a write
    // turn taken with the reader there before counting.
    let before = store.write_stats().checkpoints().turns;
    let mut round = 0;
    while store.write_stats().checkpoints().turns == before {
        write_round(&store, &format!("first{round}"), 5).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        round += 1;
        assert!(round < 2000, "no checkpoint turn was taken");
    }
    let start = store.write_stats().checkpoints();
    let mut round = 0;
    while store.write_stats().checkpoints().passes < start.passes + 40 {
        write_round(&store, &format!("held{round}"), 5).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        round += 1;
        assert!(round < 2000, "checkpoint passes stalled");
    }
    let held = store.write_stats().checkpoints();
    let (passes, turns) = (held.passes - start.passes, held.turns - start.turns);
    assert_eq!(
        held.restarts, start.restarts,
        "nothing restarts under the reader"
    );
    assert!(turns >= 2, "{turns} write turns in {passes} passes");
    assert!(
        turns * 4 <= passes,
        "{turns} write turns in {passes} passes: the task backs off"
    );
    snapshot.commit().await.expect("reader ends");
    drop(reader);
    let mut round = 0;
    while store.write_stats().checkpoints().restarts == held.restarts {
        write_round(&store, &format!("after{round}"), 5).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        round += 1;
        assert!(
            round < 2000,
            "the WAL never started over after the reader ended"
        );
    }
}

/// A graceful stop commits what is pending and empties the WAL into the database file: the next
/// start reads no log. The store stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_empties_the_wal() {
    let app = TestApp::spawn_with(Options::new(Backend::Sqlite)).await;
    let thread = app.thread().await;
    app.start_run(&thread, "content_calendar").await;
    let store = app.services.store.clone();
    let wal = app.data_dir.join("test.sqlite3-wal");
    assert!(file_len(&wal) > 0, "the WAL holds the writes");
    let head = store.head_sequence().await.expect("head");
    let (_dir, _, _tmp) = app.stop().await;
    assert_eq!(file_len(&wal), 0, "the WAL is empty after a graceful stop");
    assert!(
        store.head_sequence().await.expect("the store still reads") >= head,
        "nothing was lost"
    );
}

/// The offline commands (`seed-history`, `rebuild-projections`) end the same way: their writes
/// are in the database file, not left in a WAL for the next start to replay.
#[test]
fn seeding_history_leaves_no_wal_behind() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vm-workflow"))
        .arg("--data-dir")
        .arg(tmp.path())
        .args(["seed-history", "--events", "2000"])
        .output()
        .expect("seed-history runs");
    assert!(out.status.success(), "{out:?}");
    let db = tmp.path().join("vm-workflow.sqlite3");
    assert!(
        file_len(&db) > 100_000,
        "the events are in the database file"
    );
    assert_eq!(file_len(&tmp.path().join("vm-workflow.sqlite3-wal")), 0);
}
