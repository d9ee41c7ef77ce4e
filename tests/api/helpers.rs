//! Test harness: the real server on port 0, a fresh database per test (SQLite file or a new
//! Postgres database), real HTTP.

use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vm_workflow::config::Config;
use vm_workflow::graphql::fanout::Renders;
use vm_workflow::service::Services;
use vm_workflow::startup::Application;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The server for Postgres tests: `VM_TEST_DATABASE_URL`, else the local default.
pub fn pg_admin_url() -> String {
    std::env::var("VM_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_PG.to_string())
}

/// Test databases are not dropped when their test ends (the server under test may still hold
/// connections). Once per test process, the ones older than an hour go: their names carry their
/// creation time (generated ids lead with milliseconds since the epoch; names from before that
/// are 16 random hex digits and all older). One still in use elsewhere refuses and stays.
async fn drop_stale_test_databases(db: &sea_orm::DatabaseConnection) {
    use sea_orm::{ConnectionTrait, Statement};
    let Ok(rows) = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT datname FROM pg_database WHERE datname LIKE 'vmw_test_%'",
        ))
        .await
    else {
        return;
    };
    let now_ms = vm_workflow::domain::time::now_millis();
    for row in rows {
        let Ok(name) = row.try_get::<String>("", "datname") else {
            continue;
        };
        let id = &name["vmw_test_".len()..];
        // Names from before ids carried their time: 16 random digits.
        let created_ms = match id.len() {
            16 => Some(0),
            _ => vm_workflow::domain::ids::generated_millis(id),
        };
        if created_ms.is_some_and(|t| now_ms.saturating_sub(t) > 3_600_000) {
            let _ = db
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name}"))
                .await;
        }
    }
}

/// Create a fresh database and return its URL.
pub async fn fresh_pg_database() -> String {
    use sea_orm::{ConnectionTrait, Database};
    let admin = pg_admin_url();
    let name = format!("vmw_test_{}", vm_workflow::domain::ids::generate(""));
    let db = Database::connect(&admin).await.unwrap_or_else(|e| {
        panic!("Postgres tests need a server at {admin} (VM_TEST_DATABASE_URL): {e}")
    });
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT.get_or_init(|| drop_stale_test_databases(&db)).await;
    db.execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    let _ = db.close().await;
    match admin.rfind('/') {
        Some(i) if admin[..i].ends_with(|c: char| c != '/') => format!("{}/{name}", &admin[..i]),
        _ => format!("{admin}/{name}"),
    }
}

/// Warnings and errors of the servers a test starts, shown with that test's output when it fails.
fn init_test_logs() {
    // Only the first call in a process installs it; the others fail harmlessly.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .try_init();
}

pub struct Options {
    pub backend: Backend,
    pub fault_injection: Option<String>,
    pub profiles_yaml: Option<String>,
    pub force_fallback: bool,
    pub workers: usize,
    /// Reuse a data dir / database (restart tests).
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub ws_init_timeout_seconds: u64,
    pub ws_ping_interval_seconds: u64,
    pub ws_write_timeout_seconds: u64,
    pub ws_max_operations: usize,
    /// The server's default unless set.
    pub max_body_bytes: Option<usize>,
}

impl Options {
    pub fn new(backend: Backend) -> Self {
        Options {
            backend,
            fault_injection: None,
            profiles_yaml: None,
            force_fallback: true,
            workers: 4,
            data_dir: None,
            database_url: None,
            ws_init_timeout_seconds: 10,
            ws_ping_interval_seconds: 15,
            ws_write_timeout_seconds: 30,
            ws_max_operations: 100,
            max_body_bytes: None,
        }
    }
}

pub struct TestApp {
    pub url: String,
    pub client: reqwest::Client,
    pub services: Arc<Services>,
    /// The server's shared subscription renderings (`None` on an attached handle).
    pub renders: Option<Arc<Renders>>,
    /// The server's count of open WebSocket connections (`None` on an attached handle).
    pub ws_connections: Option<Arc<std::sync::atomic::AtomicUsize>>,
    /// The server's parsed GraphQL documents (`None` on an attached handle).
    pub documents: Option<Arc<vm_workflow::graphql::documents::ParsedDocuments>>,
    pub data_dir: PathBuf,
    pub database_url: String,
    _tmp: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(Options::new(backend)).await
    }

    pub async fn spawn_with(opts: Options) -> TestApp {
        Self::try_spawn_with(opts)
            .await
            .expect("application builds")
    }

    /// [`TestApp::spawn_with`], with the application's failure to build returned.
    pub async fn try_spawn_with(opts: Options) -> anyhow::Result<TestApp> {
        init_test_logs();
        let (tmp, data_dir) = match opts.data_dir.clone() {
            Some(d) => (None, d),
            None => {
                let t = tempfile::tempdir().expect("tempdir");
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        let database_url = match (opts.database_url.clone(), opts.backend) {
            (Some(url), _) => url,
            (None, Backend::Sqlite) => format!(
                "sqlite://{}?mode=rwc",
                data_dir.join("test.sqlite3").display()
            ),
            (None, Backend::Postgres) => fresh_pg_database().await,
        };
        let mut config = Config::for_data_dir(data_dir.clone());
        config.database_url = Some(database_url.clone());
        config.fault_injection = opts.fault_injection.clone();
        config.force_foundation_fallback = opts.force_fallback;
        config.workers = opts.workers;
        config.lease_seconds = 5.0;
        config.db_max_connections = 8;
        config.ws_init_timeout_seconds = opts.ws_init_timeout_seconds;
        config.ws_ping_interval_seconds = opts.ws_ping_interval_seconds;
        config.ws_max_operations = opts.ws_max_operations;
        config.ws_write_timeout_seconds = opts.ws_write_timeout_seconds;
        if let Some(limit) = opts.max_body_bytes {
            config.max_body_bytes = limit;
        }
        if let Some(yaml) = &opts.profiles_yaml {
            let path = data_dir.join("profiles.yaml");
            std::fs::write(&path, yaml).expect("write profiles");
            config.profiles_path = Some(path);
        }
        let app = Application::build(config).await?;
        let url = format!("http://{}", app.addr());
        let services = app.services.clone();
        let renders = app.renders.clone();
        let ws_connections = app.ws_connections.clone();
        let documents = app.documents.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            app.run_until(async {
                let _ = rx.await;
            })
            .await
            .expect("server runs");
        });
        Ok(TestApp {
            url,
            client: reqwest::Client::new(),
            services,
            renders: Some(renders),
            ws_connections: Some(ws_connections),
            documents: Some(documents),
            data_dir,
            database_url,
            _tmp: tmp,
            stop: Some(tx),
            server: Some(server),
        })
    }

    /// A second handle on a running app (for tasks that drive it concurrently); stops nothing.
    pub fn attach(url: String, services: Arc<Services>) -> TestApp {
        TestApp {
            url,
            client: reqwest::Client::new(),
            services,
            renders: None,
            ws_connections: None,
            documents: None,
            data_dir: PathBuf::new(),
            database_url: String::new(),
            _tmp: None,
            stop: None,
            server: None,
        }
    }

    /// Stop the server gracefully (runtime included) and keep the data.
    pub async fn stop(mut self) -> (PathBuf, String, Option<tempfile::TempDir>) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(s) = self.server.take() {
            let _ = s.await;
        }
        (
            self.data_dir.clone(),
            self.database_url.clone(),
            self._tmp.take(),
        )
    }

    /// The subscription endpoint.
    pub fn ws_url(&self) -> String {
        format!("{}/graphql/ws", self.url.replacen("http://", "ws://", 1))
    }

    /// POST a GraphQL request and return the whole response body.
    pub async fn gql(&self, query: &str, variables: Value) -> Value {
        self.post_body(&json!({ "query": query, "variables": variables }))
            .await
    }

    /// POST a GraphQL request body as given (an operation name, say) and return the response.
    pub async fn post_body(&self, body: &Value) -> Value {
        self.client
            .post(format!("{}/graphql", self.url))
            .header("x-actor-id", "ana")
            .json(body)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json body")
    }

    /// The `data` of a request that must succeed.
    pub async fn data(&self, query: &str, variables: Value) -> Value {
        let body = self.gql(query, variables).await;
        assert!(body.get("errors").is_none(), "unexpected errors: {body}");
        body["data"].clone()
    }

    /// The `extensions.code` of a request that must fail.
    pub async fn error_code(&self, query: &str, variables: Value) -> String {
        let body = self.gql(query, variables).await;
        let err = &body["errors"][0];
        assert!(err.is_object(), "expected an error: {body}");
        err["extensions"]["code"]
            .as_str()
            .unwrap_or("<none>")
            .to_string()
    }

    pub async fn head(&self) -> i64 {
        self.services.store.head_sequence().await.expect("head")
    }

    /// Create a brand named `name`; its id.
    pub async fn create_brand(&self, name: &str) -> String {
        let b = self
            .data(
                "mutation($n:String!) { createBrand(input:{name:$n}) { brand { id } } }",
                json!({ "n": name }),
            )
            .await;
        b["createBrand"]["brand"]["id"]
            .as_str()
            .expect("brand")
            .to_string()
    }

    /// The name of a brand created with `name`, as read back.
    pub async fn brand_name_round_trip(&self, name: &str) -> Value {
        let brand = self.create_brand(name).await;
        let back = self
            .data(
                "query($b:ID!) { brand(id:$b) { name } }",
                json!({ "b": brand }),
            )
            .await;
        back["brand"]["name"].clone()
    }

    /// Create a brand, a project and a thread; returns the thread id.
    pub async fn thread(&self) -> String {
        let brand = self.create_brand("Acme").await;
        let p = self
            .data(
                "mutation($b:ID!) { createProject(input:{brandId:$b, name:\"Launch\"}) { project { id } } }",
                json!({ "b": brand }),
            )
            .await;
        let project = p["createProject"]["project"]["id"]
            .as_str()
            .expect("project")
            .to_string();
        let t = self
            .data(
                "mutation($p:ID!) { createThread(input:{projectId:$p, title:\"Q1\"}) { thread { id } } }",
                json!({ "p": project }),
            )
            .await;
        t["createThread"]["thread"]["id"]
            .as_str()
            .expect("thread")
            .to_string()
    }

    pub async fn start_run(&self, thread: &str, mode: &str) -> Value {
        let d = self
            .data(
                "mutation($t:ID!, $m:String!) { startWorkflowRun(input:{threadId:$t, requestText:\"CRM for clinics\", mode:$m}) {
                    run { id status requestedMode effectiveMode fallbackApplied profileVersion profileDigest } } }",
                json!({ "t": thread, "m": mode }),
            )
            .await;
        d["startWorkflowRun"]["run"].clone()
    }

    /// Start a run and return its id.
    pub async fn start_run_id(&self, thread: &str, mode: &str) -> String {
        self.start_run(thread, mode).await["id"]
            .as_str()
            .expect("run id")
            .to_string()
    }

    pub async fn run(&self, id: &str) -> Value {
        let d = self.data(RUN_QUERY, json!({ "id": id })).await;
        d["workflowRun"].clone()
    }

    /// The run's run.json (written after the commit that changed the run, so poll with
    /// [`TestApp::wait_run_json`] for a given status).
    pub fn run_json(&self, id: &str) -> Option<Value> {
        let path = self.data_dir.join("runs").join(id).join("run.json");
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }

    /// Poll until the run's run.json has `status` (bounded: fails after 30 s).
    pub async fn wait_run_json(&self, id: &str, status: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let doc = self.run_json(id);
            if let Some(doc) = doc.as_ref().filter(|d| d["status"] == status) {
                return doc.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run.json of {id} never said {status}: {doc:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Poll until the run's status is one of `statuses` (bounded: fails after 30 s).
    pub async fn wait_status(&self, id: &str, statuses: &[&str]) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let run = self.run(id).await;
            if statuses.contains(&run["status"].as_str().unwrap_or("")) {
                return run;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {id} never reached {statuses:?}: {run}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn approve(&self, run: &str, stage: Option<&str>) -> Value {
        let d = self
            .data(
                "mutation($r:ID!, $s:String) { approveWorkflowRun(input:{runId:$r, stageKey:$s, comment:\"looks good\"}) {
                    resumeApplied run { status } approval { id status decidedBy comment stageKey } } }",
                json!({ "r": run, "s": stage }),
            )
            .await;
        d["approveWorkflowRun"].clone()
    }

    /// Approve each gate as the run reaches it, until it is `COMPLETED`; returns the run.
    pub async fn approve_until_done(&self, run: &str) -> Value {
        loop {
            let r = self
                .wait_status(
                    run,
                    &["WAITING_APPROVAL", "COMPLETED", "FAILED", "CANCELED"],
                )
                .await;
            match r["status"].as_str() {
                Some("WAITING_APPROVAL") => {
                    self.approve(run, None).await;
                }
                Some("COMPLETED") => return r,
                _ => panic!("run {run} ended badly: {r}"),
            }
        }
    }

    /// How many of a run's events are of type `kind`.
    pub async fn event_count(&self, run: &str, kind: &str) -> usize {
        self.event_types(run)
            .await
            .iter()
            .filter(|t| *t == kind)
            .count()
    }

    /// Event types of a run, in order.
    pub async fn event_types(&self, run: &str) -> Vec<String> {
        let d = self
            .data(
                "query($id:ID!) { workflowRun(id:$id) { events(first:100) { edges { node { type } } } } }",
                json!({ "id": run }),
            )
            .await;
        d["workflowRun"]["events"]["edges"]
            .as_array()
            .expect("edges")
            .iter()
            .map(|e| e["node"]["type"].as_str().expect("type").to_string())
            .collect()
    }
}

pub const RUN_QUERY: &str = "query($id:ID!) { workflowRun(id:$id) {
    id status requestedMode effectiveMode fallbackApplied profileVersion profileDigest currentStage
    pendingApprovals { id stageKey status }
    stages { key position status attempts approvalRequired errorCode errorMessage retryable
             approval { id status decidedBy comment }
             artifacts { path kind sha256 size content } }
} }";

/// Generate a `#[tokio::test]` per backend for an `async fn(Backend)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Sqlite).await
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Postgres).await
                }
            )+
        }
    };
}
