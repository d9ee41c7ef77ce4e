//! Load generator: drives a running `vm-workflow serve` over HTTP and WebSocket as real clients do.
//!
//! ```text
//! cargo run --release --example loadgen -- --url http://127.0.0.1:18766 --runs 500 --concurrency 50
//! cargo run --release --example loadgen -- --url http://127.0.0.1:18766 --runs 500 --concurrency 50 --fanout 1000
//! ```
//!
//! It creates a brand, a project and a thread, subscribes to `workflowRunStatusChanged(threadId)`
//! over `graphql-transport-ws`, starts N runs with C concurrent clients, approves every gate as
//! soon as the subscription reports `WAITING_APPROVAL`, and waits until every run is `COMPLETED`.
//! One warm-up run goes through first (not counted) so every subscriber is live when timing starts.
//! It prints a summary and, last, one JSON line with every figure.

use anyhow::{anyhow, bail, Context as _};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[path = "common/messages.rs"]
mod messages;
use messages::Kind;

#[derive(Debug, Parser, Clone)]
#[command(
    name = "loadgen",
    about = "Drive a running vm-workflow server and measure it"
)]
struct Args {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8766")]
    url: String,
    /// Runs to complete (N).
    #[arg(long, default_value_t = 500)]
    runs: usize,
    /// Concurrent clients (C); each drives one run at a time from start to completion.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Extra subscribers (S) watching the same thread; their delivery delay is measured too.
    #[arg(long, default_value_t = 0)]
    fanout: usize,
    /// Server process id for the peak RSS (default: the process listening on the URL's port).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Requested mode of every run.
    #[arg(long, default_value = "content_calendar")]
    mode: String,
    /// Seconds to wait for any one transition before counting the run as failed.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Open the C clients' HTTP connections before the window (C concurrent `{ __typename }`
    /// queries), as long-lived clients would have them: the first starts then measure the
    /// server, not TCP and HTTP connection setup.
    #[arg(long)]
    warm_connections: bool,
    /// A free-form label copied into the JSON line (e.g. `sqlite-empty`).
    #[arg(long, default_value = "")]
    label: String,
}

// ---- small statistics -------------------------------------------------------------------------

/// Latencies in microseconds.
#[derive(Default, Clone)]
struct Samples(Vec<u64>);

impl Samples {
    fn push(&mut self, d: Duration) {
        self.0.push(d.as_micros() as u64);
    }
    fn push_us(&mut self, us: u64) {
        self.0.push(us);
    }
    fn merge(&mut self, other: Samples) {
        self.0.extend(other.0);
    }
    fn finish(&mut self) {
        self.0.sort_unstable();
    }
    /// Percentile in milliseconds (samples must be sorted).
    fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        let i = rank.clamp(1, self.0.len()) - 1;
        self.0[i] as f64 / 1000.0
    }
    fn max(&self) -> f64 {
        self.0.last().copied().unwrap_or(0) as f64 / 1000.0
    }
    fn json(&self) -> Value {
        json!({
            "count": self.0.len(),
            "p50_ms": round3(self.pct(50.0)),
            "p95_ms": round3(self.pct(95.0)),
            "p99_ms": round3(self.pct(99.0)),
            "max_ms": round3(self.max()),
        })
    }
    fn line(&self, name: &str) -> String {
        format!(
            "{name:<28} n={:<7} p50={:>8.2} ms  p95={:>8.2} ms  p99={:>8.2} ms  max={:>8.2} ms",
            self.0.len(),
            self.pct(50.0),
            self.pct(95.0),
            self.pct(99.0),
            self.max()
        )
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ---- HTTP ------------------------------------------------------------------------------------

#[derive(Clone)]
struct Gql {
    http: reqwest::Client,
    endpoint: String,
}

impl Gql {
    async fn call(&self, query: &str, variables: Value) -> anyhow::Result<Value> {
        let resp = self
            .http
            .post(&self.endpoint)
            .header("x-actor-id", "loadgen")
            .json(&json!({ "query": query, "variables": variables }))
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await.context("response is not JSON")?;
        if let Some(errors) = body.get("errors") {
            bail!("GraphQL error (HTTP {status}): {errors}");
        }
        body.get("data")
            .cloned()
            .ok_or_else(|| anyhow!("no data in response (HTTP {status})"))
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> anyhow::Result<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p).ok_or_else(|| anyhow!("missing `{p}` in {v}"))?;
    }
    cur.as_str()
        .ok_or_else(|| anyhow!("`{path:?}` is not a string"))
}

// ---- WebSocket subscriber --------------------------------------------------------------------

const SUBSCRIPTION: &str = "subscription($t: ID!, $after: Int) { workflowRunStatusChanged(threadId: $t, afterSequence: $after) { sequence runId fromStatus toStatus stageKey occurredAt } }";

/// A transition routed to the client driving its run.
#[derive(Debug, Clone)]
struct Transition {
    run_id: String,
    to: String,
    stage_key: Option<String>,
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connect, `connection_init`, wait for the ack, subscribe to the thread's transitions.
async fn subscribe(ws_url: &str, thread_id: &str) -> anyhow::Result<WsStream> {
    let mut req = ws_url.into_client_request()?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().expect("header value"),
    );
    req.headers_mut()
        .insert("x-actor-id", "loadgen".parse().expect("header value"));
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(req, Some(messages::client_config()), true)
            .await?;
    ws.send(Message::text(
        json!({"type": "connection_init", "payload": {}}).to_string(),
    ))
    .await?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| anyhow!("no connection_ack within 30 s"))?
            .ok_or_else(|| anyhow!("socket closed before connection_ack"))??;
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t)?;
            match v["type"].as_str() {
                Some("connection_ack") => break,
                Some("ping") => {
                    ws.send(Message::text(json!({"type": "pong"}).to_string()))
                        .await?
                }
                other => bail!("unexpected message before ack: {other:?}"),
            }
        }
    }
    // afterSequence 0: the server replays what this (new) thread already has, then goes live,
    // so nothing committed before the subscription is registered can be missed.
    ws.send(Message::text(
        json!({
            "id": "1",
            "type": "subscribe",
            "payload": {"query": SUBSCRIPTION, "variables": {"t": thread_id, "after": 0}}
        })
        .to_string(),
    ))
    .await?;
    Ok(ws)
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// One transition as a subscriber sees it, borrowed from the message.
struct Seen<'a> {
    run_id: &'a str,
    to: &'a str,
    stage_key: Option<&'a str>,
    /// Delivery delay: arrival time minus the event's `occurredAt`.
    delay_us: u64,
}

impl Seen<'_> {
    fn to_owned(&self) -> Transition {
        Transition {
            run_id: self.run_id.to_string(),
            to: self.to.to_string(),
            stage_key: self.stage_key.map(str::to_string),
        }
    }
}

/// Read transitions until the socket ends; hand each to `on`.
async fn pump(mut ws: WsStream, mut on: impl FnMut(Seen<'_>)) -> anyhow::Result<()> {
    while let Some(msg) = ws.next().await {
        let text = match msg? {
            Message::Text(t) => t,
            Message::Close(_) => break,
            _ => continue,
        };
        let arrived = now_us();
        let kind: Kind = serde_json::from_str(&text)?;
        match kind.kind.as_ref() {
            "next" => {
                let c = messages::change(&text)?;
                let occurred = messages::micros(&c.occurred_at).unwrap_or(arrived);
                on(Seen {
                    run_id: &c.run_id,
                    to: &c.to_status,
                    stage_key: c.stage_key.as_deref(),
                    delay_us: (arrived - occurred).max(0) as u64,
                });
            }
            "ping" => {
                ws.send(Message::text(json!({"type": "pong"}).to_string()))
                    .await?
            }
            "error" => {
                let v: Value = serde_json::from_str(&text)?;
                bail!("subscription error: {}", v["payload"])
            }
            "complete" => break,
            _ => {}
        }
    }
    Ok(())
}

/// Routes the main subscription's transitions to the client driving each run; transitions that
/// arrive before the client knows its run id (the start response can lose that race) are kept.
#[derive(Default)]
struct Router {
    routes: Mutex<HashMap<String, Route>>,
}

enum Route {
    Early(Vec<Transition>),
    To(mpsc::UnboundedSender<Transition>),
}

impl Router {
    fn deliver(&self, t: Transition) {
        let mut map = self.routes.lock().expect("router lock");
        match map.get_mut(&t.run_id) {
            Some(Route::To(tx)) => {
                let _ = tx.send(t);
            }
            Some(Route::Early(buf)) => buf.push(t),
            None => {
                let id = t.run_id.clone();
                map.insert(id, Route::Early(vec![t]));
            }
        }
    }

    fn register(&self, run_id: &str) -> mpsc::UnboundedReceiver<Transition> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut map = self.routes.lock().expect("router lock");
        if let Some(Route::Early(buf)) = map.remove(run_id) {
            for t in buf {
                let _ = tx.send(t);
            }
        }
        map.insert(run_id.to_string(), Route::To(tx));
        rx
    }

    fn forget(&self, run_id: &str) {
        self.routes.lock().expect("router lock").remove(run_id);
    }
}

// ---- the workload ----------------------------------------------------------------------------

const START: &str =
    "mutation($i: StartWorkflowRunInput!) { startWorkflowRun(input: $i) { run { id status } } }";
const APPROVE: &str = "mutation($i: ApproveWorkflowRunInput!) { approveWorkflowRun(input: $i) { resumeApplied run { id status } } }";

#[derive(Default)]
struct ClientStats {
    start: Samples,
    /// Starts after each client's first: all C clients start their first runs at once, and
    /// those queue behind one another; later starts come as runs finish.
    start_after_first: Samples,
    started: u64,
    approve: Samples,
    run_total: Samples,
    completed: u64,
    errors: Vec<String>,
}

/// Drive one run: start it, approve each gate when the subscription says it waits, until done.
async fn drive_run(
    gql: &Gql,
    router: &Router,
    thread_id: &str,
    mode: &str,
    index: usize,
    timeout: Duration,
    stats: &mut ClientStats,
) -> anyhow::Result<String> {
    let t0 = Instant::now();
    let data = gql
        .call(
            START,
            json!({"i": {"threadId": thread_id, "mode": mode,
                "requestText": format!("Load test run {index}: CRM for clinics")}}),
        )
        .await
        .context("startWorkflowRun")?;
    let took = t0.elapsed();
    stats.start.push(took);
    if stats.started > 0 {
        stats.start_after_first.push(took);
    }
    stats.started += 1;
    let run_id = str_at(&data, &["startWorkflowRun", "run", "id"])?.to_string();
    let mut rx = router.register(&run_id);
    let result = async {
        loop {
            let t = tokio::time::timeout(timeout, rx.recv())
                .await
                .map_err(|_| anyhow!("run {run_id}: no transition within {timeout:?}"))?
                .ok_or_else(|| anyhow!("subscription ended"))?;
            match t.to.as_str() {
                "WAITING_APPROVAL" => {
                    let t1 = Instant::now();
                    gql.call(
                        APPROVE,
                        json!({"i": {"runId": run_id, "stageKey": t.stage_key,
                            "comment": "approved by loadgen"}}),
                    )
                    .await
                    .context("approveWorkflowRun")?;
                    stats.approve.push(t1.elapsed());
                }
                "COMPLETED" => return Ok(()),
                "FAILED" | "CANCELED" => bail!("run {run_id} ended {}", t.to),
                _ => {}
            }
        }
    }
    .await;
    router.forget(&run_id);
    result?;
    stats.run_total.push(t0.elapsed());
    stats.completed += 1;
    Ok(run_id)
}

// ---- server process --------------------------------------------------------------------------

/// The pid of the process with a listening TCP socket on `port` (Linux /proc).
fn pid_listening_on(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" {
                continue; // 0A = LISTEN
            }
            let local_port = cols[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                inodes.push(format!("socket:[{}]", cols[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.to_string_lossy() == *i) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// A `/proc/<pid>/status` field in KiB (`VmHWM`, `VmRSS`).
fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Server CPU time (user + system) in seconds, from `/proc/<pid>/stat`.
fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let cols: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = cols.get(11)?.parse().ok()?;
    let stime: f64 = cols.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---- main ------------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let base = args.url.trim_end_matches('/').to_string();
    let ws_url = format!(
        "{}/graphql/ws",
        base.replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1)
    );
    let port = reqwest::Url::parse(&base)?
        .port_or_known_default()
        .unwrap_or(80);
    let server_pid = args.server_pid.or_else(|| pid_listening_on(port));
    let gql = Gql {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency.max(1) * 2)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(60))
            .build()?,
        endpoint: format!("{base}/graphql"),
    };
    let load_before = load_average();

    // Workspace.
    let tag = format!("{:x}", now_us());
    let b = gql
        .call(
            "mutation($i: CreateBrandInput!) { createBrand(input: $i) { brand { id } } }",
            json!({"i": {"name": format!("Loadgen brand {tag}")}}),
        )
        .await
        .context("createBrand (is the server running?)")?;
    let brand_id = str_at(&b, &["createBrand", "brand", "id"])?.to_string();
    let p = gql
        .call(
            "mutation($i: CreateProjectInput!) { createProject(input: $i) { project { id } } }",
            json!({"i": {"brandId": brand_id, "name": "Loadgen project"}}),
        )
        .await?;
    let project_id = str_at(&p, &["createProject", "project", "id"])?.to_string();
    let t = gql
        .call(
            "mutation($i: CreateThreadInput!) { createThread(input: $i) { thread { id } } }",
            json!({"i": {"projectId": project_id, "title": "Loadgen thread"}}),
        )
        .await?;
    let thread_id = str_at(&t, &["createThread", "thread", "id"])?.to_string();

    // The main subscriber: routes transitions to the clients and measures delivery.
    // Samples count only inside the measured window (`measuring`) and never for the warm-up run.
    let router = Arc::new(Router::default());
    let main_delays = Arc::new(Mutex::new(Samples::default()));
    let measuring = Arc::new(AtomicBool::new(false));
    let warm_id: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let ws = subscribe(&ws_url, &thread_id).await?;
    let main_sub = {
        let router = router.clone();
        let delays = main_delays.clone();
        let measuring = measuring.clone();
        let warm_id = warm_id.clone();
        tokio::spawn(async move {
            pump(ws, move |t| {
                if measuring.load(Ordering::SeqCst)
                    && warm_id.lock().expect("lock").as_deref() != Some(t.run_id)
                {
                    delays.lock().expect("lock").push_us(t.delay_us);
                }
                router.deliver(t.to_owned());
            })
            .await
        })
    };

    // Fan-out subscribers: each its own connection; they only measure.
    let warm_seen = Arc::new(AtomicUsize::new(0));
    let fanout_done = Arc::new(AtomicUsize::new(0));
    let mut fanout_tasks = Vec::new();
    let mut fanout_samples: Vec<Arc<Mutex<Samples>>> = Vec::new();
    let mut fanout_errors = Vec::new();
    if args.fanout > 0 {
        let connect = futures::stream::iter(0..args.fanout)
            .map(|_| subscribe(&ws_url, &thread_id))
            .buffer_unordered(50)
            .collect::<Vec<_>>()
            .await;
        for ws in connect {
            let ws = match ws {
                Ok(ws) => ws,
                Err(e) => {
                    fanout_errors.push(format!("fan-out connect: {e:#}"));
                    continue;
                }
            };
            let measuring = measuring.clone();
            let warm_id = warm_id.clone();
            let warm_seen = warm_seen.clone();
            let done = fanout_done.clone();
            let target = args.runs;
            // Samples live outside the task: the task is aborted once every run is seen.
            let samples = Arc::new(Mutex::new(Samples::default()));
            fanout_samples.push(samples.clone());
            fanout_tasks.push(tokio::spawn(async move {
                let mut completed = 0usize;
                pump(ws, move |t| {
                    if !measuring.load(Ordering::SeqCst) {
                        // Only the warm-up runs before the window.
                        if t.to == "COMPLETED" {
                            warm_seen.fetch_add(1, Ordering::SeqCst);
                        }
                        return;
                    }
                    if warm_id.lock().expect("lock").as_deref() == Some(t.run_id) {
                        return;
                    }
                    samples.lock().expect("lock").push_us(t.delay_us);
                    if t.to == "COMPLETED" {
                        completed += 1;
                        if completed == target {
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
                .await
                .err()
                .map(|e| format!("fan-out subscriber: {e:#}"))
            }));
        }
    }

    // Warm-up: one run through every gate, not measured; every subscriber must see it complete
    // before the window opens, so all of them are live.
    {
        let data = gql
            .call(
                START,
                json!({"i": {"threadId": thread_id, "mode": args.mode, "requestText": "warm-up"}}),
            )
            .await
            .context("warm-up startWorkflowRun")?;
        let id = str_at(&data, &["startWorkflowRun", "run", "id"])?.to_string();
        *warm_id.lock().expect("lock") = Some(id.clone());
        let mut rx = router.register(&id);
        loop {
            let t = tokio::time::timeout(Duration::from_secs(args.timeout), rx.recv())
                .await
                .map_err(|_| anyhow!("warm-up run made no progress"))?
                .ok_or_else(|| anyhow!("subscription ended during warm-up"))?;
            match t.to.as_str() {
                "WAITING_APPROVAL" => {
                    gql.call(
                        APPROVE,
                        json!({"i": {"runId": id, "stageKey": t.stage_key}}),
                    )
                    .await?;
                }
                "COMPLETED" => break,
                "FAILED" | "CANCELED" => bail!("warm-up run ended {}", t.to),
                _ => {}
            }
        }
        router.forget(&id);
        let t = Instant::now();
        while warm_seen.load(Ordering::SeqCst) < fanout_tasks.len()
            && t.elapsed() < Duration::from_secs(args.timeout)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if args.warm_connections {
        let calls: Vec<_> = (0..args.concurrency.max(1))
            .map(|_| {
                let gql = gql.clone();
                tokio::spawn(async move { gql.call("{ __typename }", json!({})).await })
            })
            .collect();
        for c in calls {
            c.await?.context("warming a connection")?;
        }
    }
    measuring.store(true, Ordering::SeqCst);

    // The measured window.
    let cpu0 = server_pid.and_then(proc_cpu_seconds);
    let next = Arc::new(AtomicUsize::new(0));
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampler = server_pid.map(|pid| {
        let peak = peak_rss.clone();
        tokio::spawn(async move {
            loop {
                if let Some(kib) = proc_kib(pid, "VmRSS:") {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let started = Instant::now();
    let timeout = Duration::from_secs(args.timeout);
    let mut clients = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let gql = gql.clone();
        let router = router.clone();
        let next = next.clone();
        let thread_id = thread_id.clone();
        let mode = args.mode.clone();
        let n = args.runs;
        clients.push(tokio::spawn(async move {
            let mut stats = ClientStats::default();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    break;
                }
                if let Err(e) =
                    drive_run(&gql, &router, &thread_id, &mode, i, timeout, &mut stats).await
                {
                    stats.errors.push(format!("{e:#}"));
                }
            }
            stats
        }));
    }
    let mut all = ClientStats::default();
    for c in clients {
        let s = c.await?;
        all.start.merge(s.start);
        all.start_after_first.merge(s.start_after_first);
        all.approve.merge(s.approve);
        all.run_total.merge(s.run_total);
        all.completed += s.completed;
        all.errors.extend(s.errors);
    }
    let elapsed = started.elapsed();
    let cpu1 = server_pid.and_then(proc_cpu_seconds);

    // Fan-out subscribers: wait until each has seen every run complete (bounded), then stop.
    let mut fanout = Samples::default();
    let mut fanout_wait = Duration::ZERO;
    if !fanout_tasks.is_empty() {
        let t = Instant::now();
        let want = fanout_tasks.len();
        while fanout_done.load(Ordering::SeqCst) < want && t.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        fanout_wait = t.elapsed();
        for task in &fanout_tasks {
            if task.is_finished() {
                continue;
            }
            task.abort();
        }
        for task in fanout_tasks {
            if let Ok(Some(err)) = task.await {
                fanout_errors.push(err);
            }
        }
        for s in &fanout_samples {
            fanout.merge(std::mem::take(&mut *s.lock().expect("lock")));
        }
        if fanout_done.load(Ordering::SeqCst) < fanout_samples.len() {
            fanout_errors.push(format!(
                "{} fan-out subscribers did not see every run complete",
                fanout_samples.len() - fanout_done.load(Ordering::SeqCst)
            ));
        }
    }
    if let Some(s) = sampler {
        s.abort();
    }
    main_sub.abort();

    // Events appended by the measured runs: the per-run event count of a sample of runs.
    let events_per_run = {
        let q = "query($t: ID!) { workflowRuns(threadId: $t, first: 5) { nodes { id events(first: 100) { nodes { sequence } } } } }";
        match gql.call(q, json!({"t": thread_id})).await {
            Ok(d) => {
                let nodes = d["workflowRuns"]["nodes"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let counts: Vec<usize> = nodes
                    .iter()
                    .map(|n| n["events"]["nodes"].as_array().map_or(0, Vec::len))
                    .collect();
                if counts.is_empty() {
                    0.0
                } else {
                    counts.iter().sum::<usize>() as f64 / counts.len() as f64
                }
            }
            Err(_) => 0.0,
        }
    };

    all.start.finish();
    all.start_after_first.finish();
    all.approve.finish();
    all.run_total.finish();
    let mut main = std::mem::take(&mut *main_delays.lock().expect("lock"));
    main.finish();
    fanout.finish();
    let secs = elapsed.as_secs_f64();
    let runs_per_s = all.completed as f64 / secs;
    let events_per_s = runs_per_s * events_per_run;
    let hwm = server_pid.and_then(|p| proc_kib(p, "VmHWM:"));
    let rss_now = server_pid.and_then(|p| proc_kib(p, "VmRSS:"));
    let server_cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let errors: Vec<String> = all.errors.iter().chain(&fanout_errors).cloned().collect();

    println!("vm-workflow loadgen {}", args.label);
    println!(
        "  server {base} (pid {}), thread {thread_id}",
        server_pid.map_or("?".into(), |p| p.to_string())
    );
    println!(
        "  runs {} / {} completed, concurrency {}, fan-out subscribers {}",
        all.completed, args.runs, args.concurrency, args.fanout
    );
    println!(
        "  elapsed {secs:.2} s, load average before {load_before}, after {}",
        load_average()
    );
    println!("  runs/s {runs_per_s:.1}   events/s {events_per_s:.0} ({events_per_run:.1} events per run)");
    println!("  {}", all.start.line("startWorkflowRun"));
    println!(
        "  {}",
        all.start_after_first.line("  after each client's first")
    );
    println!("  {}", all.approve.line("approveWorkflowRun"));
    println!("  {}", all.run_total.line("run start→completed"));
    println!("  {}", main.line("delivery (main subscriber)"));
    if args.fanout > 0 {
        println!("  {}", fanout.line("delivery (fan-out subs)"));
        println!(
            "  fan-out drain after last run: {:.2} s",
            fanout_wait.as_secs_f64()
        );
    }
    if let Some(c) = server_cpu {
        println!(
            "  server CPU {c:.2} s in the window ({:.0}% of one core)",
            100.0 * c / secs
        );
    }
    println!(
        "  server RSS peak (VmHWM) {} MiB, sampled peak {} MiB, now {} MiB",
        hwm.map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
        format_args!("{:.1}", peak_rss.load(Ordering::Relaxed) as f64 / 1024.0),
        rss_now.map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
    );
    println!("  errors {}", errors.len());
    for e in errors.iter().take(5) {
        println!("    {e}");
    }
    let line = json!({
        "label": args.label,
        "runs": args.runs,
        "completed": all.completed,
        "concurrency": args.concurrency,
        "fanout": args.fanout,
        "warm_connections": args.warm_connections,
        "elapsed_s": round3(secs),
        "runs_per_s": round3(runs_per_s),
        "events_per_s": round3(events_per_s),
        "events_per_run": events_per_run,
        "start_ms": all.start.json(),
        "start_after_first_ms": all.start_after_first.json(),
        "approve_ms": all.approve.json(),
        "run_total_ms": all.run_total.json(),
        "delivery_ms": main.json(),
        "fanout_delivery_ms": fanout.json(),
        "errors": errors.len(),
        "server_pid": server_pid,
        "server_cpu_s": server_cpu.map(round3),
        "server_vmhwm_kib": hwm,
        "server_rss_peak_sampled_kib": peak_rss.load(Ordering::Relaxed),
        "load_before": load_before,
    });
    println!("{line}");
    if all.completed < args.runs as u64 {
        std::process::exit(1);
    }
    Ok(())
}
