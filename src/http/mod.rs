//! The axum router: GraphQL over HTTP and WebSocket, GraphiQL, health.

use crate::graphql::documents::ParsedDocuments;
use crate::graphql::fanout::{Renders, SharedExecutor};
use crate::graphql::{ActorId, AppSchema};
use async_graphql::http::WebSocketProtocols;
use async_graphql::http::{GraphiQLSource, ALL_WEBSOCKET_PROTOCOLS};
use async_graphql_axum::{GraphQLRequest, GraphQLResponse};
use axum::extract::{State, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

mod console;
mod ws;
pub use ws::WsSettings;

#[derive(Clone)]
pub struct HttpState {
    pub schema: AppSchema,
    pub ws: WsSettings,
    /// Subscription renderings shared by every WebSocket connection.
    pub renders: Arc<Renders>,
    /// Documents parsed for earlier HTTP requests, by their text.
    pub documents: Arc<ParsedDocuments>,
}

pub fn router(state: HttpState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/graphql", get(graphiql).post(graphql))
        .route("/graphql/ws", get(graphql_ws))
        .route("/", get(console::index))
        .route("/console/app.js", get(console::app_js))
        .route("/console/style.css", get(console::style_css))
        .route("/healthz", get(health))
        .route("/api/v1/health", get(health))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            max_body_bytes,
        ))
        .with_state(state)
}

fn actor_from(headers: &HeaderMap) -> ActorId {
    let id = headers
        .get("x-actor-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 64)
        .unwrap_or("anonymous");
    ActorId(id.to_string())
}

async fn graphql(
    State(state): State<HttpState>,
    headers: HeaderMap,
    req: GraphQLRequest,
) -> GraphQLResponse {
    let req = state
        .documents
        .prepare(req.into_inner())
        .data(actor_from(&headers));
    state.schema.execute(req).await.into()
}

async fn graphiql() -> impl IntoResponse {
    Html(
        GraphiQLSource::build()
            .endpoint("/graphql")
            .subscription_endpoint("/graphql/ws")
            .title("vm-workflow GraphiQL")
            .finish(),
    )
}

async fn graphql_ws(
    State(state): State<HttpState>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let Some(protocol) = ws_protocol(&headers) else {
        let msg = "expected Sec-WebSocket-Protocol graphql-transport-ws or graphql-ws";
        return (axum::http::StatusCode::BAD_REQUEST, msg).into_response();
    };
    let actor = actor_from(&headers);
    let executor = SharedExecutor::new(state.schema.clone(), state.renders.clone(), &actor.0);
    let settings = state.ws.clone();
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        // tungstenite zeroes its whole read buffer before every read attempt, and the connection
        // polls for client messages each time it sends one: with the 128 KiB default that memset
        // was 37 % of the server's CPU with 1,000 subscribers. Client messages are small; a
        // larger one grows the buffer as needed, up to the limit below.
        .read_buffer_size(ws::READ_BUFFER_BYTES)
        .max_message_size(settings.max_message_bytes)
        .max_frame_size(settings.max_message_bytes)
        .on_upgrade(move |socket| async move {
            let mut data = async_graphql::Data::default();
            data.insert(actor);
            ws::serve(socket, executor, protocol, data, settings).await
        })
}

/// The first subprotocol the client offers that we speak.
fn ws_protocol(headers: &HeaderMap) -> Option<WebSocketProtocols> {
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().parse().ok())
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}
