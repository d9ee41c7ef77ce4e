//! A small GraphQL WebSocket client for tests, speaking either protocol over a real socket.

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `graphql-transport-ws` (the `graphql-ws` npm library).
    Transport,
    /// The legacy `graphql-ws` (subscriptions-transport-ws).
    Legacy,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Transport => "graphql-transport-ws",
            Protocol::Legacy => "graphql-ws",
        }
    }
}

/// What the server sent, as the tests care about it.
#[derive(Debug)]
pub enum Incoming {
    Data { id: String, data: Value },
    Error { id: String, payload: Value },
    Complete { id: String },
    Ping,
    KeepAlive,
    Closed { code: Option<u16>, reason: String },
    Other(Value),
}

pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
    pub protocol: Protocol,
}

const WAIT: Duration = Duration::from_secs(30);

impl WsClient {
    pub async fn connect(url: &str, protocol: Protocol) -> WsClient {
        Self::connect_with(url, protocol, None).await
    }

    /// Connect and initialise as caller `actor` (the `x-actor-id` header).
    pub async fn connect_init_as(url: &str, protocol: Protocol, actor: &str) -> WsClient {
        let c = Self::connect_with(url, protocol, Some(actor)).await;
        c.init().await
    }

    async fn connect_with(url: &str, protocol: Protocol, actor: Option<&str>) -> WsClient {
        let mut req = url.into_client_request().expect("ws request");
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            protocol.name().parse().expect("header"),
        );
        if let Some(actor) = actor {
            req.headers_mut()
                .insert("x-actor-id", actor.parse().expect("header"));
        }
        let (ws, resp) = tokio_tungstenite::connect_async(req)
            .await
            .expect("websocket connects");
        let chosen = resp
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert_eq!(chosen, protocol.name(), "server picks the offered protocol");
        WsClient { ws, protocol }
    }

    /// Connect and complete the handshake.
    pub async fn connect_init(url: &str, protocol: Protocol) -> WsClient {
        Self::connect(url, protocol).await.init().await
    }

    /// Complete the `connection_init` / `connection_ack` handshake.
    async fn init(mut self) -> WsClient {
        self.send(json!({ "type": "connection_init", "payload": {} }))
            .await;
        match self.recv().await {
            Incoming::Other(v) if v["type"] == "connection_ack" => self,
            other => panic!("expected connection_ack, got {other:?}"),
        }
    }

    pub async fn send(&mut self, msg: Value) {
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .expect("ws send");
    }

    pub async fn subscribe(&mut self, id: &str, query: &str, variables: Value) {
        let kind = match self.protocol {
            Protocol::Transport => "subscribe",
            Protocol::Legacy => "start",
        };
        self.send(json!({ "type": kind, "id": id, "payload": { "query": query, "variables": variables } }))
            .await;
    }

    pub async fn stop(&mut self, id: &str) {
        let kind = match self.protocol {
            Protocol::Transport => "complete",
            Protocol::Legacy => "stop",
        };
        self.send(json!({ "type": kind, "id": id })).await;
    }

    /// The next message from the server (fails the test after 30 s of silence).
    pub async fn recv(&mut self) -> Incoming {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a message from the server within 30 s");
            let msg = match msg {
                None => {
                    return Incoming::Closed {
                        code: None,
                        reason: String::new(),
                    }
                }
                Some(Err(e)) => panic!("websocket error: {e}"),
                Some(Ok(m)) => m,
            };
            match msg {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("json message");
                    let id = v["id"].as_str().unwrap_or_default().to_string();
                    return match v["type"].as_str().unwrap_or_default() {
                        "next" | "data" => Incoming::Data {
                            id,
                            data: v["payload"].clone(),
                        },
                        "error" => Incoming::Error {
                            id,
                            payload: v["payload"].clone(),
                        },
                        "complete" => Incoming::Complete { id },
                        "ping" => Incoming::Ping,
                        "ka" => Incoming::KeepAlive,
                        _ => Incoming::Other(v),
                    };
                }
                Message::Close(frame) => {
                    return Incoming::Closed {
                        code: frame.as_ref().map(|f| u16::from(f.code)),
                        reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    }
                }
                _ => continue,
            }
        }
    }

    /// The next `data` payload of operation `id`; answers pings, fails on anything else.
    pub async fn next_data(&mut self, id: &str) -> Value {
        loop {
            match self.recv().await {
                Incoming::Data { id: got, data } if got == id => {
                    assert!(data.get("errors").is_none(), "errors in data: {data}");
                    return data["data"].clone();
                }
                Incoming::Ping => self.send(json!({ "type": "pong" })).await,
                Incoming::KeepAlive => {}
                other => panic!("expected data for {id}, got {other:?}"),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}
