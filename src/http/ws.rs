//! One GraphQL WebSocket connection: both protocols (`graphql-transport-ws` and the legacy
//! `graphql-ws`), spoken here rather than by async-graphql's WebSocket layer so that a shared
//! subscription rendering ([`Payload`], serialized once) is only wrapped in each subscriber's
//! message, never re-serialized per subscriber. Around the protocol: a `connection_init` deadline
//! (close 4408), server pings on every connection (`ping`, or `ka` on the legacy protocol), and a
//! bound on the operations active at once on one connection.

use crate::graphql::fanout::{Payload, SharedExecutor};
use async_graphql::http::{ClientMessage, WebSocketProtocols};
use async_graphql::Data;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::stream::BoxStream;
use futures::{FutureExt, SinkExt, StreamExt};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamMap;

/// Close code for a missing `connection_init` (graphql-transport-ws).
pub const CLOSE_INIT_TIMEOUT: u16 = 4408;
/// Close code for a second operation under an id already in use (graphql-transport-ws).
pub const CLOSE_DUPLICATE_ID: u16 = 4409;
/// Close code for a client message that is not one of the protocol's (graphql-transport-ws).
pub const CLOSE_INVALID_MESSAGE: u16 = 4400;
/// Close code for an operation sent before `connection_init` (graphql-transport-ws).
pub const CLOSE_UNAUTHORIZED: u16 = 4401;
/// Close code for a second `connection_init` (graphql-transport-ws).
pub const CLOSE_TOO_MANY_INITS: u16 = 4429;
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
    /// A write that takes longer ends the connection: the client stopped reading. A write is
    /// everything ready at once (up to [`MAX_BURST`] messages) and its flush.
    pub write_timeout: Duration,
    pub max_operations: usize,
    /// WebSocket connections open right now, shared by all of them.
    pub open_connections: Arc<AtomicUsize>,
    /// Largest client message (and frame) accepted; a larger one closes the connection with 1009.
    pub max_message_bytes: usize,
}

/// What an operation's stream yields: a response's whole protocol message, then its end.
enum OpItem {
    Next(String),
    Done,
}

/// The active operations of a connection by id: stopping one drops its stream.
type Operations = StreamMap<Arc<str>, BoxStream<'static, OpItem>>;

/// The protocol state of one connection.
struct Connection {
    legacy: bool,
    executor: SharedExecutor,
    /// The connection's request data until `connection_init`, then shared by its operations.
    data: Option<Data>,
    session: Option<Arc<Data>>,
    max_operations: usize,
}

/// What woke a connection.
enum Woke {
    Op(Arc<str>, OpItem),
    Read(Option<Result<Message, axum::Error>>),
    InitDeadline,
    Ping,
}

/// What to write after a wake-up.
enum Reply {
    Nothing,
    Send(Message),
    /// Close the connection with this frame.
    Close(Message),
}

/// Serve one upgraded socket until either side closes it.
pub async fn serve(
    mut socket: WebSocket,
    executor: SharedExecutor,
    protocol: WebSocketProtocols,
    data: Data,
    settings: WsSettings,
) {
    let mut conn = Connection {
        legacy: matches!(protocol, WebSocketProtocols::SubscriptionsTransportWS),
        executor,
        data: Some(data),
        session: None,
        max_operations: settings.max_operations,
    };
    let _open = Open::count(&settings.open_connections);
    let mut ops = Operations::new();
    let init_deadline = tokio::time::sleep(settings.init_timeout);
    tokio::pin!(init_deadline);
    let start = tokio::time::Instant::now() + settings.ping_interval;
    let mut pings = tokio::time::interval_at(start, settings.ping_interval);

    loop {
        let initialised = conn.session.is_some();
        let woke = tokio::select! {
            Some((id, item)) = ops.next(), if !ops.is_empty() => Woke::Op(id, item),
            read = socket.next() => Woke::Read(read),
            _ = &mut init_deadline, if !initialised => Woke::InitDeadline,
            _ = pings.tick() => Woke::Ping,
        };
        let first = match woke {
            Woke::Op(id, item) => Reply::Send(op_message(&id, item, &mut ops)),
            Woke::Read(None) => return, // the client went away
            Woke::Read(Some(Ok(Message::Close(_)))) => {
                // tungstenite has queued its answer to the close; send it and stop.
                let _ = socket.flush().await;
                return;
            }
            Woke::Read(Some(Ok(Message::Text(text)))) => conn.on_client(text.as_bytes(), &mut ops),
            Woke::Read(Some(Ok(Message::Binary(bytes)))) => conn.on_client(&bytes, &mut ops),
            // Control frames: tungstenite answers pings.
            Woke::Read(Some(Ok(_))) => Reply::Nothing,
            Woke::Read(Some(Err(e))) => {
                // The client learns why its connection ends; the details stay in our log.
                tracing::debug!(error = %e, "WebSocket read failed; closing");
                Reply::Close(read_error_close(&e))
            }
            Woke::InitDeadline => Reply::Close(close(
                CLOSE_INIT_TIMEOUT,
                "Connection initialisation timeout",
            )),
            Woke::Ping if !initialised => Reply::Nothing,
            Woke::Ping => {
                let kind = if conn.legacy { "ka" } else { "ping" };
                Reply::Send(text(json!({ "type": kind }).to_string()))
            }
        };
        let msg = match first {
            Reply::Nothing => continue,
            Reply::Send(msg) => msg,
            Reply::Close(frame) => {
                drop(ops);
                if written(settings.write_timeout, socket.send(frame)).await {
                    // We close: keep the socket a moment so the client reads our close frame.
                    // Closing a socket with unread input (the rest of an oversized message,
                    // say) sends a TCP reset, which can discard the frame before it is read.
                    tokio::time::sleep(CLOSE_LINGER).await;
                }
                return;
            }
        };
        // Whatever else is ready goes out with it in one write: the transitions of one commit
        // reach a subscriber together, and each write is a system call. One deadline for the
        // whole write, not a timer per message.
        let burst = async {
            socket.feed(msg).await?;
            for _ in 1..MAX_BURST {
                let Some(Some((id, item))) = ops.next().now_or_never() else {
                    break;
                };
                socket.feed(op_message(&id, item, &mut ops)).await?;
            }
            socket.flush().await
        };
        if !written(settings.write_timeout, burst).await {
            return;
        }
    }
}

/// Counts a connection in [`WsSettings::open_connections`] while it lives.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn count(open: &Arc<AtomicUsize>) -> Open {
        open.fetch_add(1, Ordering::SeqCst);
        Open(open.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether `write` finished, and within `limit`. One that takes longer means the client stopped
/// reading (its socket's buffers are full): the connection ends, with its subscriptions.
async fn written<E>(
    limit: Duration,
    write: impl std::future::Future<Output = Result<(), E>>,
) -> bool {
    match tokio::time::timeout(limit, write).await {
        Ok(result) => result.is_ok(),
        Err(_) => {
            tracing::info!(
                seconds = limit.as_secs_f64(),
                "a WebSocket client read nothing for too long; closing its connection"
            );
            false
        }
    }
}

impl Connection {
    /// Act on one client message.
    fn on_client(&mut self, bytes: &[u8], ops: &mut Operations) -> Reply {
        let msg = match ClientMessage::from_bytes(bytes) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::debug!(error = %e, "unreadable client message; closing");
                return Reply::Close(
                    self.protocol_close(CLOSE_INVALID_MESSAGE, "Invalid message received"),
                );
            }
        };
        match msg {
            ClientMessage::ConnectionInit { .. } => match self.data.take() {
                Some(data) => {
                    self.session = Some(Arc::new(data));
                    Reply::Send(text(json!({ "type": "connection_ack" }).to_string()))
                }
                None => Reply::Close(
                    self.protocol_close(CLOSE_TOO_MANY_INITS, "Too many initialisation requests"),
                ),
            },
            ClientMessage::Start { id, payload } => {
                let Some(session) = self.session.clone() else {
                    return Reply::Close(self.protocol_close(CLOSE_UNAUTHORIZED, "Unauthorized"));
                };
                let id: Arc<str> = id.into();
                if ops.contains_key(&id) {
                    if !self.legacy {
                        let reason = format!("Subscriber for {id} already exists");
                        return Reply::Close(close(CLOSE_DUPLICATE_ID, &reason));
                    }
                    // The legacy protocol replaces the operation under a reused id (below).
                } else if ops.len() >= self.max_operations {
                    return Reply::Send(refuse(&id, self.legacy, self.max_operations));
                }
                let kind = if self.legacy { "data" } else { "next" };
                let wrap = Wrapper::new(kind, &id);
                let responses = self
                    .executor
                    .payloads(payload, session)
                    .map(move |payload| OpItem::Next(wrap.message(&payload)))
                    .chain(futures::stream::once(async { OpItem::Done }));
                ops.insert(id, responses.boxed());
                Reply::Nothing
            }
            ClientMessage::Stop { id } => match ops.remove(id.as_str()) {
                Some(_) => Reply::Send(complete(&id)),
                None => Reply::Nothing,
            },
            ClientMessage::ConnectionTerminate => Reply::Close(close(1000, "")),
            ClientMessage::Ping { .. } => Reply::Send(text(json!({ "type": "pong" }).to_string())),
            ClientMessage::Pong { .. } => Reply::Nothing,
        }
    }

    /// The close frame for a protocol violation: `code` on graphql-transport-ws, 1002 on the
    /// legacy protocol (which defines no codes of its own).
    fn protocol_close(&self, code: u16, reason: &str) -> Message {
        close(
            if self.legacy {
                CLOSE_PROTOCOL_ERROR
            } else {
                code
            },
            reason,
        )
    }
}

/// The message for an operation's next response or its end.
fn op_message(id: &str, item: OpItem, ops: &mut Operations) -> Message {
    match item {
        OpItem::Next(message) => text(message),
        OpItem::Done => {
            // Gone at once: the map itself would drop the ended stream only when it next
            // polls it, and until then the id would count as active.
            ops.remove(id);
            complete(id)
        }
    }
}

/// The start of an operation's response messages (`{"type":"next","id":…,"payload":`), made
/// once per operation: a response only adds its payload, already JSON, and the closing brace.
struct Wrapper(String);

impl Wrapper {
    fn new(kind: &str, id: &str) -> Self {
        Wrapper(format!(
            r#"{{"type":"{kind}","id":{},"payload":"#,
            json!(id)
        ))
    }

    fn message(&self, payload: &Payload) -> String {
        let mut message = String::with_capacity(self.0.len() + payload.len() + 1);
        message.push_str(&self.0);
        message.push_str(payload);
        message.push('}');
        message
    }
}

fn text(s: String) -> Message {
    Message::Text(s.into())
}

fn complete(id: &str) -> Message {
    let id = json!(id);
    text(format!(r#"{{"type":"complete","id":{id}}}"#))
}

/// How long a connection the server closes stays open after its close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Messages written to the socket before one flush, at most.
const MAX_BURST: usize = 64;

/// A close frame; its reason cut to what fits in a control frame (125 bytes with the code).
fn close(code: u16, reason: &str) -> Message {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: reason[..end].to_string().into(),
    }))
}

/// Bytes of a close frame's reason: a control frame carries at most 125, 2 of them the code.
const MAX_CLOSE_REASON: usize = 123;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(msg: Message) -> String {
        match msg {
            Message::Close(Some(frame)) => frame.reason.to_string(),
            other => panic!("not a close frame: {other:?}"),
        }
    }

    #[test]
    fn close_reasons_fit_a_control_frame() {
        let long = format!("Subscriber for {} already exists", "é".repeat(100));
        let cut = reason(close(CLOSE_DUPLICATE_ID, &long));
        assert!(cut.len() <= MAX_CLOSE_REASON, "{} bytes", cut.len());
        assert!(long.starts_with(&cut));
        assert_eq!(reason(close(4400, "short")), "short");
    }
}
