//! One GraphQL WebSocket connection. async-graphql speaks both protocols (`graphql-transport-ws`
//! and the legacy `graphql-ws`); around it we add what a long-lived public endpoint needs:
//! a `connection_init` deadline (close 4408), server pings on every connection (`ping`, or `ka` on
//! the legacy protocol), and a bound on the operations active at once on one connection.

use crate::graphql::fanout::SharedExecutor;
use crate::sync::lock;
use async_graphql::http::{WebSocketProtocols, WsMessage};
use async_graphql::Data;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{future, FutureExt, SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Close code for a missing `connection_init` (graphql-transport-ws).
pub const CLOSE_INIT_TIMEOUT: u16 = 4408;
/// Close code for a second operation under an id already in use (graphql-transport-ws).
pub const CLOSE_DUPLICATE_ID: u16 = 4409;
/// `extensions.code` of an operation refused because the connection has too many.
pub const TOO_MANY_OPERATIONS: &str = "TOO_MANY_OPERATIONS";
/// Close code for a client message over the size limit (RFC 6455 "message too big").
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code for a frame the WebSocket layer could not read (RFC 6455 "protocol error").
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Initial read buffer of a connection (see `crate::http::graphql_ws`).
pub const READ_BUFFER_BYTES: usize = 4096;

#[derive(Debug, Clone)]
pub struct WsSettings {
    pub init_timeout: Duration,
    pub ping_interval: Duration,
    pub max_operations: usize,
    /// Largest client message (and frame) accepted; a larger one closes the connection with 1009.
    pub max_message_bytes: usize,
}

/// What the connection knows about the client's messages, shared by the reading and writing side.
#[derive(Default)]
struct Tracker {
    initialised: bool,
    active: HashSet<String>,
}

/// Serve one upgraded socket until either side closes it.
pub async fn serve(
    socket: WebSocket,
    executor: SharedExecutor,
    protocol: WebSocketProtocols,
    data: Data,
    settings: WsSettings,
) {
    let legacy = matches!(protocol, WebSocketProtocols::SubscriptionsTransportWS);
    let (mut sink, source) = socket.split();
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    // Answers to refused client messages, sent by the writing loop below.
    let (refusals_tx, mut refusals) = mpsc::unbounded_channel::<Message>();

    let input = {
        let tracker = tracker.clone();
        let max = settings.max_operations;
        let read_errors = refusals_tx.clone();
        source
            .take_while(move |m| {
                if let Err(e) = m {
                    // The client learns why its connection ends; the details stay in our log.
                    tracing::debug!(error = %e, "WebSocket read failed; closing");
                    let _ = read_errors.send(read_error_close(e));
                }
                future::ready(m.is_ok())
            })
            .filter_map(move |m| {
                let admitted = match m {
                    Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                        let bytes = msg.into_data();
                        match admit(&tracker, &bytes, legacy, max) {
                            Ok(()) => Some(bytes),
                            Err(refusal) => {
                                let _ = refusals_tx.send(refusal);
                                None
                            }
                        }
                    }
                    _ => None,
                };
                future::ready(admitted)
            })
    };

    let graphql =
        async_graphql::http::WebSocket::new(executor, input, protocol).connection_data(data);
    tokio::pin!(graphql);
    let init_deadline = tokio::time::sleep(settings.init_timeout);
    tokio::pin!(init_deadline);
    let start = tokio::time::Instant::now() + settings.ping_interval;
    let mut pings = tokio::time::interval_at(start, settings.ping_interval);

    loop {
        let initialised = lock(&tracker).initialised;
        let ready = tokio::select! {
            out = graphql.next() => Ready::Graphql(out),
            Some(refusal) = refusals.recv() => Ready::Message(refusal),
            _ = &mut init_deadline, if !initialised => {
                Ready::Message(close(CLOSE_INIT_TIMEOUT, "Connection initialisation timeout"))
            }
            _ = pings.tick() => {
                if !initialised {
                    continue;
                }
                let kind = if legacy { "ka" } else { "ping" };
                Ready::Message(Message::Text(json!({ "type": kind }).to_string().into()))
            }
        };
        // Whatever else is ready goes out with it in one write: the transitions of one commit
        // reach a subscriber together, and each write is a system call.
        let mut next = outgoing(ready, &tracker, &mut refusals);
        let mut written = 0;
        loop {
            match next {
                Outgoing::Send(msg) => {
                    if sink.feed(msg).await.is_err() {
                        return;
                    }
                }
                Outgoing::End(last) => {
                    let closing = last.iter().any(|m| matches!(m, Message::Close(_)));
                    for msg in last {
                        if sink.feed(msg).await.is_err() {
                            return;
                        }
                    }
                    let _ = sink.flush().await;
                    if closing {
                        // We close: keep the socket a moment so the client reads our close frame.
                        // Closing a socket with unread input (the rest of an oversized message,
                        // say) sends a TCP reset, which can discard the frame before it is read.
                        tokio::time::sleep(CLOSE_LINGER).await;
                    }
                    return;
                }
            }
            written += 1;
            if written == MAX_BURST {
                break;
            }
            match graphql.next().now_or_never() {
                Some(out) => next = outgoing(Ready::Graphql(out), &tracker, &mut refusals),
                None => break,
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

/// How long a connection the server closes stays open after its close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Messages written to the socket before one flush, at most.
const MAX_BURST: usize = 64;

/// What woke the connection's loop.
enum Ready {
    Graphql(Option<WsMessage>),
    Message(Message),
}

/// What to write next.
enum Outgoing {
    Send(Message),
    /// The connection ends after these messages.
    End(Vec<Message>),
}

fn outgoing(
    ready: Ready,
    tracker: &Mutex<Tracker>,
    refusals: &mut mpsc::UnboundedReceiver<Message>,
) -> Outgoing {
    match ready {
        // The input ended: what is still queued goes out (refusals, then a read error's close).
        Ready::Graphql(None) => {
            let mut last = Vec::new();
            while let Ok(msg) = refusals.try_recv() {
                let closing = matches!(msg, Message::Close(_));
                last.push(msg);
                if closing {
                    break;
                }
            }
            Outgoing::End(last)
        }
        Ready::Graphql(Some(WsMessage::Text(text))) => {
            note_server_message(tracker, &text);
            Outgoing::Send(Message::Text(text.into()))
        }
        Ready::Graphql(Some(WsMessage::Close(code, reason))) => {
            Outgoing::End(vec![close(code, &reason)])
        }
        Ready::Message(msg @ Message::Close(_)) => Outgoing::End(vec![msg]),
        Ready::Message(msg) => Outgoing::Send(msg),
    }
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.to_string().into(),
    }))
}

/// The close frame for a client message the WebSocket layer refused to read.
fn read_error_close(error: &axum::Error) -> Message {
    // axum wraps tungstenite's error; its capacity errors read "Space limit exceeded: …".
    let text = error.to_string();
    if text.contains("Space limit exceeded") || text.contains("too long") {
        close(CLOSE_TOO_BIG, "message too big")
    } else {
        close(CLOSE_PROTOCOL_ERROR, "unreadable frame")
    }
}

/// Decide whether a client message goes on to async-graphql; `Err` carries the answer instead.
fn admit(tracker: &Mutex<Tracker>, bytes: &[u8], legacy: bool, max: usize) -> Result<(), Message> {
    let Ok(Value::Object(msg)) = serde_json::from_slice::<Value>(bytes) else {
        return Ok(()); // malformed: async-graphql closes the connection with its protocol error
    };
    let kind = msg.get("type").and_then(Value::as_str).unwrap_or("");
    let id = msg.get("id").and_then(Value::as_str).map(str::to_string);
    let mut t = lock(tracker);
    match (kind, id) {
        ("connection_init", _) => t.initialised = true,
        ("subscribe" | "start", Some(id)) => {
            if t.active.contains(&id) {
                if !legacy {
                    return Err(close(
                        CLOSE_DUPLICATE_ID,
                        &format!("Subscriber for {id} already exists"),
                    ));
                }
            } else if t.active.len() >= max {
                return Err(refuse(&id, legacy, max));
            } else {
                t.active.insert(id);
            }
        }
        ("complete" | "stop", Some(id)) => {
            t.active.remove(&id);
        }
        _ => {}
    }
    Ok(())
}

/// The error message for an operation over the per-connection bound.
fn refuse(id: &str, legacy: bool, max: usize) -> Message {
    let error = json!({
        "message": format!("too many operations on this connection (at most {max})"),
        "extensions": { "code": TOO_MANY_OPERATIONS },
    });
    let payload = if legacy { error } else { json!([error]) };
    Message::Text(
        json!({ "type": "error", "id": id, "payload": payload })
            .to_string()
            .into(),
    )
}

/// An operation the server ends (`complete`, or `error`) no longer counts against the bound.
fn note_server_message(tracker: &Mutex<Tracker>, text: &str) {
    if !(text.starts_with(r#"{"type":"complete""#) || text.starts_with(r#"{"type":"error""#)) {
        return;
    }
    if let Ok(msg) = serde_json::from_str::<Value>(text) {
        if let Some(id) = msg.get("id").and_then(Value::as_str) {
            lock(tracker).active.remove(id);
        }
    }
}
