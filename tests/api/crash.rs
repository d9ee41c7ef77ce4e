//! Crash safety: the real binary is killed with SIGKILL while runs are in flight, started again on
//! the same data, and every run completes with each stage completed exactly once.

use crate::helpers::{fresh_pg_database, Backend};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use vm_workflow::store::{EventFilter, Store};

struct Server {
    child: Child,
    url: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

async fn start(data_dir: &std::path::Path, db: &str) -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_vm-workflow"))
        .arg("serve")
        .env("VM_BIND", format!("127.0.0.1:{port}"))
        .env("VM_DATA_DIR", data_dir)
        .env("DATABASE_URL", db)
        .env("VM_WORKERS", "4")
        .env("VM_RUN_LEASE_SECONDS", "1.5")
        .env(
            "VM_FAULT_INJECTION",
            "research=delay-300,brand-voice=delay-300,positioning=delay-300,keywords=delay-300",
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the binary");
    let server = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if client
            .get(format!("{}/healthz", server.url))
            .send()
            .await
            .is_ok()
        {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not start");
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn gql(url: &str, query: &str, variables: Value) -> Value {
    let body: Value = reqwest::Client::new()
        .post(format!("{url}/graphql"))
        .json(&json!({"query": query, "variables": variables}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert!(body.get("errors").is_none(), "{body}");
    body["data"].clone()
}

async fn a_killed_server_finishes_every_run_after_restart(backend: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = match backend {
        Backend::Sqlite => format!(
            "sqlite://{}?mode=rwc",
            tmp.path().join("crash.sqlite3").display()
        ),
        Backend::Postgres => fresh_pg_database().await,
    };
    let mut server = start(tmp.path(), &db).await;
    let url = server.url.clone();
    gql(
        &url,
        "mutation { createBrand(input:{brandId:\"b\", name:\"B\"}) { brand { id } } }",
        json!({}),
    )
    .await;
    gql(&url, "mutation { createProject(input:{projectId:\"p\", brandId:\"b\", name:\"P\"}) { project { id } } }", json!({})).await;
    gql(&url, "mutation { createThread(input:{threadId:\"t\", projectId:\"p\", title:\"T\"}) { thread { id } } }", json!({})).await;
    let mut runs = Vec::new();
    for _ in 0..6 {
        let d = gql(&url, "mutation { startWorkflowRun(input:{threadId:\"t\", requestText:\"crash test\", mode:\"content_calendar\"}) { run { id } } }", json!({})).await;
        let id = d["startWorkflowRun"]["run"]["id"]
            .as_str()
            .expect("id")
            .to_string();
        // Approve every gate early so the runs need no one while the server restarts.
        for gate in ["brand-voice", "positioning", "keywords"] {
            gql(&url, "mutation($r:ID!, $s:String) { approveWorkflowRun(input:{runId:$r, stageKey:$s}) { resumeApplied } }", json!({"r": id, "s": gate})).await;
        }
        runs.push(id);
    }
    // Let work get under way, then kill -9 in the middle of it.
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.child.kill().expect("SIGKILL");
    let _ = server.child.wait();
    drop(server);

    let server = start(tmp.path(), &db).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for id in &runs {
        loop {
            let d = gql(
                &server.url,
                "query($id:ID!) { workflowRun(id:$id) { status } }",
                json!({"id": id}),
            )
            .await;
            if d["workflowRun"]["status"] == "COMPLETED" {
                break;
            }
            assert_ne!(d["workflowRun"]["status"], "FAILED");
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {id} did not complete after restart: {d}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    drop(server);

    let store = Store::connect(&db, 2).await.expect("connect");
    let events = store
        .read_events(0, &EventFilter::default(), 100_000)
        .await
        .expect("events");
    // The global sequence is gap-free.
    for (i, ev) in events.iter().enumerate() {
        assert_eq!(ev.sequence, i as i64 + 1, "sequence gap at {i}");
    }
    // Each stream's versions are gap-free, and each stage completed exactly once.
    let mut versions: BTreeMap<&str, i64> = BTreeMap::new();
    let mut completed: BTreeMap<(String, String), usize> = BTreeMap::new();
    for ev in &events {
        let v = versions.entry(ev.stream_id.as_str()).or_insert(0);
        *v += 1;
        assert_eq!(ev.stream_version, *v, "stream {} version gap", ev.stream_id);
        if let vm_workflow::domain::events::DomainEvent::WorkflowRunStageCompleted {
            run_id,
            stage_key,
            ..
        } = &ev.body
        {
            *completed
                .entry((run_id.clone(), stage_key.clone()))
                .or_default() += 1;
        }
    }
    for id in &runs {
        for stage in ["research", "brand-voice", "positioning", "keywords"] {
            assert_eq!(
                completed.get(&(id.clone(), stage.to_string())),
                Some(&1),
                "{id} {stage}"
            );
        }
    }
}

crate::both_backends!(a_killed_server_finishes_every_run_after_restart);
