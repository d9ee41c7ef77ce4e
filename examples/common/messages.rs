//! The server messages the benchmark clients read, parsed without building a JSON tree: 1,000
//! subscribers parse every transition on the same cores as the server.

use anyhow::bail;
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;

/// Any server message: its type.
#[derive(Deserialize)]
pub struct Kind<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
}

#[derive(Deserialize)]
struct Next<'a> {
    #[serde(borrow)]
    payload: NextPayload<'a>,
}

#[derive(Deserialize)]
struct NextPayload<'a> {
    #[serde(borrow)]
    data: Option<NextData<'a>>,
    errors: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NextData<'a> {
    #[serde(borrow)]
    workflow_run_status_changed: Change<'a>,
}

/// One `workflowRunStatusChanged` item.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Change<'a> {
    #[serde(borrow)]
    pub run_id: Cow<'a, str>,
    #[serde(borrow)]
    pub to_status: Cow<'a, str>,
    #[serde(borrow)]
    pub stage_key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub occurred_at: Cow<'a, str>,
}

/// The transition in a `next` message; an error if it carries errors or no data.
pub fn change(text: &str) -> anyhow::Result<Change<'_>> {
    let next: Next = serde_json::from_str(text)?;
    if let Some(errors) = next.payload.errors {
        bail!("subscription error: {errors}");
    }
    match next.payload.data {
        Some(data) => Ok(data.workflow_run_status_changed),
        None => bail!("subscription message without data: {text}"),
    }
}

/// An RFC 3339 time in microseconds since the epoch.
pub fn micros(rfc3339: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .ok()
        .map(|t| t.timestamp_micros())
}

/// The benchmark clients' WebSocket settings: a 4 KiB read buffer. tungstenite zeroes its whole
/// read buffer before every read; with the 128 KiB default that `memset` was 45 % of the CPU
/// of 1,000 clients and a server on these 2 cores (`examples/wsfloor.rs` under `perf`).
pub fn client_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096)
}
