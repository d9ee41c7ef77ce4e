//! The floor under fan-out delivery on this machine: what the same WebSocket stack (axum,
//! tungstenite, tokio) and the load generator's client code take to deliver one frame to S
//! subscribers, with nothing else in the server: no GraphQL, no event log, no database.
//!
//! ```text
//! cargo run --release --example wsfloor -- --subscribers 1000 --frames 800 --burst 3 --gap-ms 30
//! ```
//!
//! One process, two runtimes of 2 worker threads each (like the server and the load generator
//! side by side on the 2 cores): the server side writes each frame, built per connection as
//! `src/http/ws.rs` builds it, to every subscriber; the client side opens S WebSockets and parses
//! every message as `examples/loadgen.rs` does. Frames are sent in bursts of `--burst` (a run's
//! approval and its next gate come that close) every `--gap-ms`; the delay from a frame's
//! `occurredAt` to its parse is reported like the load generator's `fanout_delivery_ms`.

use anyhow::{anyhow, Context as _};
use axum::extract::ws::{Message as ServerMessage, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::routing::get;
use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

#[path = "common/messages.rs"]
mod messages;

#[derive(Parser, Debug)]
struct Args {
    /// WebSocket subscribers.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Frames sent in all.
    #[arg(long, default_value_t = 800)]
    frames: usize,
    /// Frames sent back to back.
    #[arg(long, default_value_t = 1)]
    burst: usize,
    /// Pause between bursts.
    #[arg(long, default_value_t = 30)]
    gap_ms: u64,
    /// Worker threads of each side's runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

type Frames = broadcast::Sender<Arc<str>>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = |name: &str| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .thread_name(name)
            .enable_all()
            .build()
    };
    let server = runtime("server")?;
    let clients = runtime("clients")?;
    let (frames, _) = broadcast::channel::<Arc<str>>(4096);
    let listener = server.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let url = format!("ws://{}/ws", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/ws", get(upgrade))
        .with_state(frames.clone());
    server.spawn(async move { axum::serve(listener, app).await });

    let cpu_before = process_cpu_s();
    let result = clients.block_on(drive(&args, &url, &frames, &server))?;
    let cpu = process_cpu_s() - cpu_before;
    let deliveries = result.delays_us.len();
    let mut delays = result.delays_us;
    delays.sort_unstable();
    let pct = |p: f64| {
        let i = ((p / 100.0) * delays.len() as f64).ceil() as usize;
        delays[i.clamp(1, delays.len()) - 1] as f64 / 1000.0
    };
    let summary = json!({
        "subscribers": args.subscribers,
        "frames": args.frames,
        "burst": args.burst,
        "gap_ms": args.gap_ms,
        "deliveries": deliveries,
        "delivery_p50_ms": pct(50.0),
        "delivery_p99_ms": pct(99.0),
        "delivery_max_ms": pct(100.0),
        "process_cpu_s": cpu,
        "cpu_us_per_delivery": cpu * 1e6 / deliveries.max(1) as f64,
        "elapsed_s": result.elapsed.as_secs_f64(),
    });
    println!("{summary}");
    Ok(())
}

struct Outcome {
    delays_us: Vec<u64>,
    elapsed: Duration,
}

/// Connect every subscriber, send the frames from the server side, collect every delay.
async fn drive(
    args: &Args,
    url: &str,
    frames: &Frames,
    server: &tokio::runtime::Runtime,
) -> anyhow::Result<Outcome> {
    let mut readers = Vec::new();
    for _ in 0..args.subscribers {
        let (ws, _) = tokio_tungstenite::connect_async_with_config(
            url,
            Some(messages::client_config()),
            false,
        )
        .await
        .context("connect")?;
        let want = args.frames;
        readers.push(tokio::spawn(read(ws, want)));
    }
    while frames.receiver_count() < args.subscribers {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start = Instant::now();
    let (sender, burst, gap, total) = (
        frames.clone(),
        args.burst.max(1),
        Duration::from_millis(args.gap_ms),
        args.frames,
    );
    server.spawn(async move {
        let mut sent = 0;
        while sent < total {
            for _ in 0..burst.min(total - sent) {
                sent += 1;
                let _ = sender.send(transition(sent));
            }
            tokio::time::sleep(gap).await;
        }
    });
    let mut delays_us = Vec::with_capacity(args.subscribers * args.frames);
    for reader in readers {
        delays_us.extend(reader.await??);
    }
    Ok(Outcome {
        delays_us,
        elapsed: start.elapsed(),
    })
}

/// A payload the size and shape of the load generator's transition, stamped now.
fn transition(sequence: usize) -> Arc<str> {
    json!({ "data": { "workflowRunStatusChanged": {
        "sequence": sequence,
        "runId": "0192f0c4-2c8e-7cc1-9a51-3f1c2e4d5a6b",
        "fromStatus": "RUNNING",
        "toStatus": "WAITING_APPROVAL",
        "stageKey": "brand-voice",
        "occurredAt": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    } } })
    .to_string()
    .into()
}

async fn upgrade(
    State(frames): State<Frames>,
    upgrade: WebSocketUpgrade,
) -> axum::response::Response {
    let rx = frames.subscribe();
    upgrade
        .read_buffer_size(4096)
        .on_upgrade(move |socket| serve(socket, rx))
}

/// Write every frame to the socket, with whatever else is ready in the same write.
async fn serve(mut socket: WebSocket, mut rx: broadcast::Receiver<Arc<str>>) {
    let frame = |payload: &str| {
        let id = json!("1");
        ServerMessage::Text(format!(r#"{{"type":"next","id":{id},"payload":{payload}}}"#).into())
    };
    while let Ok(payload) = rx.recv().await {
        if socket.feed(frame(&payload)).await.is_err() {
            return;
        }
        while let Ok(payload) = rx.try_recv() {
            if socket.feed(frame(&payload)).await.is_err() {
                return;
            }
        }
        if socket.flush().await.is_err() {
            return;
        }
    }
}

type ClientSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Parse `want` frames as the load generator does; their delays in microseconds.
async fn read(mut ws: ClientSocket, want: usize) -> anyhow::Result<Vec<u64>> {
    let mut delays = Vec::with_capacity(want);
    while delays.len() < want {
        let msg = ws.next().await.ok_or_else(|| anyhow!("closed early"))??;
        let tokio_tungstenite::tungstenite::Message::Text(text) = msg else {
            continue;
        };
        let arrived = chrono::Utc::now().timestamp_micros();
        let kind: messages::Kind = serde_json::from_str(&text)?;
        if kind.kind == "next" {
            let change = messages::change(&text)?;
            anyhow::ensure!(
                !change.run_id.is_empty()
                    && change.to_status == "WAITING_APPROVAL"
                    && change.stage_key.is_some(),
                "unexpected frame {}",
                text.as_str()
            );
            let occurred = messages::micros(&change.occurred_at).unwrap_or(arrived);
            delays.push((arrived - occurred).max(0) as u64);
        }
    }
    Ok(delays)
}

/// This process's CPU time (user + system) in seconds, from `/proc/self/stat`.
fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    (ticks(11) + ticks(12)) / 100.0
}
