//! Postgres only: a writer's writes go in one simple-query message with their values as SQL
//! literals, and the batch's first send takes the advisory write lock (src/store/mod.rs).

use crate::helpers::{fresh_pg_database, pg_admin_url, Backend, Options, TestApp};
use crate::store::{brand_created, meta, streams_after, until_queued};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use sea_orm::{DatabaseTransaction, TransactionTrait};
use serde_json::json;
use std::sync::Arc;
use vm_workflow::store::Store;

/// The store's advisory write lock (`PG_WRITE_LOCK_KEY` in src/store/mod.rs).
const WRITE_LOCK: i64 = 0x766d_776f_726b;

/// A fresh database with `settings` (`ALTER DATABASE … SET …`), an app on it without workers,
/// and the database's address.
async fn app_on_database_with(settings: &[&str]) -> (TestApp, Arc<Store>, String) {
    let url = fresh_pg_database().await;
    let name = database_name(&url);
    let admin = Database::connect(pg_admin_url()).await.expect("admin");
    for setting in settings {
        admin
            .execute_unprepared(&format!("ALTER DATABASE {name} SET {setting}"))
            .await
            .expect("set");
    }
    let _ = admin.close().await;
    let app = TestApp::spawn_with(without_workers_on(&url)).await;
    let store = app.services.store.clone();
    (app, store, url)
}

/// Options for an app without workers on the database at `url`.
fn without_workers_on(url: &str) -> Options {
    let mut opts = Options::new(Backend::Postgres);
    opts.workers = 0;
    opts.database_url = Some(url.to_string());
    opts
}

/// Whether another connection can take the write lock right now (it lets go at once).
async fn lock_is_free(other: &DatabaseConnection) -> bool {
    let tx = other.begin().await.expect("begin");
    let free = try_lock(&tx).await;
    tx.rollback().await.expect("rollback");
    free
}

async fn try_lock(tx: &DatabaseTransaction) -> bool {
    tx.query_one_raw(Statement::from_string(
        DbBackend::Postgres,
        format!("SELECT pg_try_advisory_xact_lock({WRITE_LOCK})"),
    ))
    .await
    .expect("try the lock")
    .and_then(|r| r.try_get_by_index::<bool>(0).ok())
    .expect("a row")
}

/// Literals mean the same whatever the server's quoting settings: quotes are doubled, and
/// backslashes doubled inside `E'…'` (a `\'` would be refused with `backslash_quote = off`).
#[tokio::test]
async fn text_round_trips_whatever_the_quoting_settings() {
    let (app, _store, _) =
        app_on_database_with(&["backslash_quote = off", "standard_conforming_strings = off"]).await;
    for name in ["O'Brien", "back\\slash \\' and ''", "plain"] {
        assert_eq!(app.brand_name_round_trip(name).await, json!(name));
    }
}

/// The lock statement fails (here `lock_timeout` while another instance holds the lock): only
/// the writer whose send it was fails. The next writer in line, which has nothing in the
/// abandoned batch, goes on in a new one once the lock is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_lock_fails_only_its_writer() {
    let (_app, store, url) = app_on_database_with(&["lock_timeout = '300ms'"]).await;
    let other = Database::connect(&url).await.expect("another instance");
    let holder = other.begin().await.expect("begin");
    assert!(try_lock(&holder).await, "the other instance takes the lock");

    let mut a = store.write().await.expect("writer a");
    let b = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut w = store.write().await?;
            w.append("brand:lb", 0, &meta(), brand_created("lb"))
                .await?;
            w.commit().await
        })
    };
    until_queued(&store, 1).await;
    let head = store.head_sequence().await.expect("head");
    let refused = a.append("brand:la", 0, &meta(), brand_created("la")).await;
    assert!(refused.is_err(), "the lock timed out: {refused:?}");
    holder.commit().await.expect("the other instance lets go");
    drop(a);
    let b = b.await.expect("b joins");
    assert!(b.is_ok(), "b had nothing in the abandoned batch: {b:?}");
    assert_eq!(streams_after(&store, head).await, ["brand:lb"]);
}

/// The lock is taken before the batch's first savepoint, at the transaction's top level: when
/// the writer that took it is rolled back to its savepoint, the lock stays held for the rest of
/// the batch, and the batch's commit lets go of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_outlives_the_writer_that_took_it() {
    let (_app, store, url) = app_on_database_with(&[]).await;
    let other = Database::connect(&url).await.expect("another instance");
    let mut a = store.write().await.expect("writer a");
    a.append("brand:ka", 0, &meta(), brand_created("ka"))
        .await
        .expect("append");
    a.commit().await.expect("commit");
    assert!(lock_is_free(&other).await, "no batch is open");
    let head = store.head_sequence().await.expect("head");

    // b opens the next batch (its first send takes the lock), then fails: version 0 of
    // brand:ka exists. c is in line and goes on in the same batch.
    let mut b = store.write().await.expect("writer b");
    b.append("brand:ka", 0, &meta(), brand_created("ka"))
        .await
        .expect("queued");
    assert!(!lock_is_free(&other).await, "b's first send took the lock");
    let c_in_line = {
        let store = store.clone();
        tokio::spawn(async move { store.write().await })
    };
    until_queued(&store, 1).await;
    let conflict = b.run_version("no-such-run").await;
    assert!(conflict.is_err(), "{conflict:?}");
    drop(b);
    let mut c = c_in_line.await.expect("c joins").expect("c's turn");
    assert!(
        !lock_is_free(&other).await,
        "the lock outlives b's rollback"
    );
    c.append("brand:kc", 0, &meta(), brand_created("kc"))
        .await
        .expect("append");
    c.commit().await.expect("c commits the batch");
    assert!(lock_is_free(&other).await, "the commit let go of the lock");
    assert_eq!(streams_after(&store, head).await, ["brand:kc"]);
}

/// The batch's first appending writer notifies other instances, after its release: a later
/// writer's rollback cannot take the notification back, and later appending writers of the
/// same batch send none (Postgres delivers one per transaction and payload anyway).
#[tokio::test]
async fn a_batch_notifies_once_whoever_rolls_back() {
    let (_app, store, url) = app_on_database_with(&[]).await;
    let mut listener = sea_orm::sqlx::postgres::PgListener::connect(&url)
        .await
        .expect("listener");
    listener
        .listen(vm_workflow::store::PG_CHANNEL)
        .await
        .expect("listen");
    let head = store.head_sequence().await.expect("head");
    let statements = |s: &Store| s.write_stats().statements();
    let in_line = |store: &Arc<Store>| {
        let store = store.clone();
        tokio::spawn(async move { store.write().await })
    };

    // a appends and commits, leaving the batch open for b, who is in line.
    let before = statements(&store);
    let mut a = store.write().await.expect("writer a");
    a.append("brand:na", 0, &meta(), brand_created("na"))
        .await
        .expect("append");
    let b_in_line = in_line(&store);
    until_queued(&store, 1).await;
    let a_done = tokio::spawn(a.commit());
    let mut b = b_in_line.await.expect("b joins").expect("b's turn");
    // The lock, SAVEPOINT, the head; the event, RELEASE and the notification.
    assert_eq!(statements(&store) - before, 6, "a notifies");

    // b appends and rolls back, with c in line.
    b.append("brand:nb", 0, &meta(), brand_created("nb"))
        .await
        .expect("append");
    let c_in_line = in_line(&store);
    until_queued(&store, 1).await;
    drop(b);
    let mut c = c_in_line.await.expect("c joins").expect("c's turn");

    // c appends and commits the batch, without a notification of its own.
    let before = statements(&store);
    c.append("brand:nc", 0, &meta(), brand_created("nc"))
        .await
        .expect("append");
    c.commit().await.expect("c commits the batch");
    // SAVEPOINT and the head (read again after b's rollback); the event and RELEASE.
    assert_eq!(statements(&store) - before, 4, "c does not notify");
    a_done.await.expect("a's commit").expect("a committed");
    assert_eq!(streams_after(&store, head).await, ["brand:na", "brand:nc"]);

    let heard = tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv())
        .await
        .expect("a notification within 10 s")
        .expect("receive");
    assert_eq!(heard.payload(), store.notify_payload());
}

/// The writers' connection breaking in the middle of a batch fails that batch: none of its
/// writes lands, not even those sent after the break (a connection from a pool would have run
/// them on their own, outside the batch's transaction). The next batch connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_writer_connection_fails_its_batch_and_the_next_reconnects() {
    let (_app, store, url) = app_on_database_with(&[]).await;
    let admin = Database::connect(&url).await.expect("admin");
    let head = store.head_sequence().await.expect("head");
    let mut w = store.write().await.expect("writer");
    // Its first send: `BEGIN`, the lock, the savepoint and the log's head.
    w.append("brand:cut", 0, &meta(), brand_created("cut"))
        .await
        .expect("append");
    let ended = admin
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'vm-workflow writer' AND datname = current_database()",
        ))
        .await
        .expect("terminate")
        .and_then(|r| r.try_get_by_index::<bool>(0).ok());
    assert_eq!(ended, Some(true), "the writers' connection was found");
    w.append("brand:after-cut", 0, &meta(), brand_created("after-cut"))
        .await
        .expect("queued");
    assert!(w.commit().await.is_err(), "the batch failed");
    assert_eq!(streams_after(&store, head).await, Vec::<String>::new());

    let mut next = store.write().await.expect("next writer");
    next.append("brand:next", 0, &meta(), brand_created("next"))
        .await
        .expect("append on a new connection");
    next.commit().await.expect("commit");
    assert_eq!(streams_after(&store, head).await, ["brand:next"]);
    let _ = admin.close().await;
}

/// The database a URL without parameters names.
fn database_name(url: &str) -> String {
    url.rsplit('/').next().expect("a database name").to_string()
}

/// Whether each connection of this server to database `name` uses TLS, by application name.
async fn tls_by_connection(admin: &DatabaseConnection, name: &str) -> Vec<(String, bool)> {
    let rows = admin
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            format!(
                "SELECT a.application_name, s.ssl FROM pg_stat_activity a \
                 JOIN pg_stat_ssl s USING (pid) WHERE a.datname = '{name}' \
                 AND a.pid <> pg_backend_pid() ORDER BY 1"
            ),
        ))
        .await
        .expect("pg_stat_ssl");
    rows.iter()
        .map(|r| {
            (
                r.try_get::<String>("", "application_name").expect("name"),
                r.try_get::<bool>("", "ssl").expect("ssl"),
            )
        })
        .collect()
}

/// A server on a loopback address is reached without TLS when the URL says nothing of it
/// (src/store/pg_connect.rs), and with it when the URL asks.
#[tokio::test]
async fn a_loopback_postgres_is_reached_without_tls_unless_the_url_asks() {
    let url = fresh_pg_database().await;
    assert!(
        !url.contains('?'),
        "this test needs VM_TEST_DATABASE_URL without parameters: {url}"
    );
    let name = database_name(&url);
    let admin = Database::connect(pg_admin_url()).await.expect("admin");
    // The server offers TLS, so leaving it out is something the store does.
    let tls = Database::connect(format!("{url}?sslmode=require"))
        .await
        .expect("the test Postgres must accept TLS connections (Debian's default certificate)");
    let _ = tls.close().await;

    let app = TestApp::spawn_with(without_workers_on(&url)).await;
    let plain = tls_by_connection(&admin, &name).await;
    assert!(
        plain.iter().any(|(app, _)| app == "vm-workflow writer"),
        "{plain:?}"
    );
    assert!(plain.len() >= 2, "the writer and the pool: {plain:?}");
    assert!(plain.iter().all(|(_, ssl)| !ssl), "{plain:?}");
    app.stop().await;

    // Another database, so that no connection of the first server is counted.
    let url = fresh_pg_database().await;
    let name = database_name(&url);
    let app = TestApp::spawn_with(without_workers_on(&format!("{url}?sslmode=require"))).await;
    let asked = tls_by_connection(&admin, &name).await;
    let writer: Vec<_> = asked
        .iter()
        .filter(|(app, _)| app == "vm-workflow writer")
        .collect();
    assert!(!writer.is_empty(), "{asked:?}");
    assert!(writer.iter().all(|(_, ssl)| *ssl), "{asked:?}");
    app.stop().await;
    let _ = admin.close().await;
}

/// Write `text` to the server's file `path`, as the server's user (a large object exported):
/// the test's own process may not be allowed to write there.
async fn write_server_file(admin: &DatabaseConnection, path: &str, text: &str) {
    let made = admin
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT lo_from_bytea(0, convert_to($1, 'UTF8'))::int8",
            [text.into()],
        ))
        .await
        .expect("a large object")
        .expect("its oid");
    let oid: i64 = made.try_get_by_index(0).expect("oid");
    admin
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("SELECT lo_export({oid}, $1::text)"),
            [path.into()],
        ))
        .await
        .expect("write the server's file");
    admin
        .execute_unprepared(&format!("SELECT lo_unlink({oid})"))
        .await
        .expect("drop the large object");
    admin
        .execute_unprepared("SELECT pg_reload_conf()")
        .await
        .expect("reload");
}

/// A loopback server that refuses connections without TLS to a database (`hostnossl … reject`
/// in `pg_hba.conf`, for this test's database only) is still reached, with TLS.
#[tokio::test]
async fn a_loopback_postgres_that_wants_tls_is_reached_with_it() {
    let url = fresh_pg_database().await;
    let name = database_name(&url);
    let admin = Database::connect(pg_admin_url()).await.expect("admin");
    let value = |sql: &'static str| {
        let admin = &admin;
        async move {
            let row = admin
                .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
                .await
                .expect(sql)
                .expect("a row");
            row.try_get_by_index::<String>(0).expect("text")
        }
    };
    let hba_file = value("SHOW hba_file").await;
    let hba = value("SELECT pg_read_file(current_setting('hba_file'))").await;
    write_server_file(
        &admin,
        &hba_file,
        &format!("hostnossl {name} all all reject\n{hba}"),
    )
    .await;
    // The reload is asynchronous: the rule is in force once it refuses a connection.
    let mut refused = false;
    for _ in 0..100 {
        match Database::connect(format!("{url}?sslmode=disable")).await {
            Ok(c) => {
                let _ = c.close().await;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(_) => {
                refused = true;
                break;
            }
        }
    }
    let app = TestApp::try_spawn_with(without_workers_on(&url)).await;
    let connections = tls_by_connection(&admin, &name).await;
    // The server's file as it was before anything is asserted.
    write_server_file(&admin, &hba_file, &hba).await;
    assert!(refused, "the rule refuses connections without TLS");
    let app = app.expect("the server starts, with TLS");
    assert!(
        connections
            .iter()
            .any(|(app, _)| app == "vm-workflow writer"),
        "{connections:?}"
    );
    assert!(connections.iter().all(|(_, ssl)| *ssl), "{connections:?}");
    assert_eq!(
        app.brand_name_round_trip("over TLS").await,
        json!("over TLS")
    );
    app.stop().await;
    let _ = admin.close().await;
}
