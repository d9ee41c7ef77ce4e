//! Subscriptions rendered once per event, however many clients watch.
//!
//! async-graphql executes a subscription's selection set for every event and every subscriber:
//! with 1,000 clients on a thread, each transition was resolved 1,000 times. [`SharedExecutor`]
//! stands in for the schema on WebSocket connections. For a subscription operation it
//!
//! 1. executes the request once as a *probe*: the resolver validates its arguments as always, but
//!    hands its event stream (catch-up from the cursor, then live) over to [`HandOver`] instead
//!    of letting async-graphql render it; errors the probe produces go to the client as before;
//! 2. reads that event stream itself, per subscriber, so every client keeps its own cursor;
//! 3. renders each event by executing the same request with the event pinned ([`RenderOne`]),
//!    once per *distinct request* (document, operation, variables, extensions, caller) and event:
//!    the first subscriber to need it starts it, every subscriber waiting for it drives it (one
//!    that stops reading holds up nobody), later ones reuse it for [`Renders::MAX_AGE`].
//!    A rendering is kept as the JSON the client receives ([`Payload`]), serialized once: a
//!    subscriber only wraps it in its protocol message.
//!
//! A rendering that carries errors goes to those already waiting for it and is then dropped, so
//! the next subscriber renders again. Queries and mutations sent over a WebSocket, and any
//! subscription whose probe answers something (an error) or hands over other than exactly one
//! stream, run on the schema exactly as before.

use super::AppSchema;
use crate::domain::events::StoredEvent;
use crate::sync::lock;
use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, OperationType};
use async_graphql::{Data, Request, Response, Variables};
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{BoxStream, StreamExt};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One item of a subscription resolver's event stream.
pub type EventItem = Result<Arc<StoredEvent>, async_graphql::Error>;

/// Request data for a probe: the resolver puts its event stream here and yields nothing.
#[derive(Default, Clone)]
pub struct HandOver(Arc<Mutex<Vec<BoxStream<'static, EventItem>>>>);

impl HandOver {
    fn put(&self, events: BoxStream<'static, EventItem>) {
        lock(&self.0).push(events);
    }

    /// The one stream handed over; `None` if there was none, or more than one root field.
    fn take_one(&self) -> Option<BoxStream<'static, EventItem>> {
        let mut streams = std::mem::take(&mut *lock(&self.0));
        if streams.len() == 1 {
            streams.pop()
        } else {
            None
        }
    }
}

/// Request data for a rendering: the resolver yields this one item and ends.
pub struct RenderOne(pub EventItem);

/// Where a subscription resolver's events come from: the pinned event of a rendering, nothing
/// (after handing `events` over) in a probe, or `events` itself on the plain schema path.
pub fn event_source(
    ctx: &async_graphql::Context<'_>,
    events: impl FnOnce() -> BoxStream<'static, EventItem>,
) -> BoxStream<'static, EventItem> {
    if let Some(RenderOne(item)) = ctx.data_opt::<RenderOne>() {
        return futures::stream::iter([item.clone()]).boxed();
    }
    match ctx.data_opt::<HandOver>() {
        Some(slot) => {
            slot.put(events());
            futures::stream::empty().boxed()
        }
        None => events(),
    }
}

/// Renderings shared between subscribers: at most [`Renders::CAPACITY`], none older than
/// [`Renders::MAX_AGE`].
#[derive(Default)]
pub struct Renders {
    inner: Mutex<RenderMap>,
    /// Executions of a subscription's selection set for one event, shared or not.
    executed: AtomicU64,
}

/// A request's key (a SHA-256 digest: entries stay small however long the document) and an
/// event's sequence.
type RenderKey = ([u8; 32], i64);
/// One event's rendering, and whether it carries errors; `None` if the resolver dropped the event.
type Rendered = Option<(Payload, bool)>;

/// A GraphQL response as the client receives it (`{"data":…}`, with `errors` when there are
/// any), serialized once however many subscribers send it.
pub type Payload = Arc<str>;

/// The JSON of a response.
pub fn payload_of(response: &Response) -> Payload {
    match serde_json::to_string(response) {
        Ok(json) => json.into(),
        // A response is built from JSON-compatible values; should that ever fail, the client
        // learns that this one response was lost, not why.
        Err(e) => {
            tracing::error!(error = %e, "a GraphQL response could not be serialized");
            r#"{"data":null,"errors":[{"message":"internal error","extensions":{"code":"INTERNAL"}}]}"#
                .into()
        }
    }
}
/// Driven by whichever subscriber polls it, so a subscriber that stops reading holds up nobody.
type Rendering = Shared<BoxFuture<'static, Rendered>>;

#[derive(Default)]
struct RenderMap {
    cells: HashMap<RenderKey, (Rendering, Instant)>,
    order: VecDeque<(RenderKey, Instant)>,
}

impl Renders {
    /// Renderings kept; an evicted one is rendered again if a subscriber needs it.
    pub const CAPACITY: usize = 4096;
    /// How long a rendering is reused: a nested `run { … }` is at most this old.
    pub const MAX_AGE: Duration = Duration::from_secs(1);

    /// The rendering of `sequence` for `request`: the one in progress or made within
    /// [`Self::MAX_AGE`], or a new one from `render`.
    fn rendering(
        &self,
        request: &[u8; 32],
        sequence: i64,
        render: impl FnOnce() -> BoxFuture<'static, Rendered>,
    ) -> Rendering {
        let now = Instant::now();
        let mut map = lock(&self.inner);
        while let Some((old, made)) = map.order.front().cloned() {
            if map.order.len() < Self::CAPACITY && now.duration_since(made) <= Self::MAX_AGE {
                break;
            }
            map.order.pop_front();
            if map.cells.get(&old).is_some_and(|(_, at)| *at == made) {
                map.cells.remove(&old);
            }
        }
        let key = (*request, sequence);
        if let Some((cell, _)) = map.cells.get(&key) {
            return cell.clone();
        }
        let cell = render().shared();
        map.cells.insert(key, (cell.clone(), now));
        map.order.push_back((key, now));
        cell
    }

    /// Drop a rendering (one that failed): the next subscriber renders again.
    fn forget(&self, request: &[u8; 32], sequence: i64) {
        lock(&self.inner).cells.remove(&(*request, sequence));
    }

    /// How many times an event has been rendered (a shared rendering counts once).
    pub fn executed(&self) -> u64 {
        self.executed.load(Ordering::Relaxed)
    }
}

/// The schema, with subscriptions rendered once per distinct request and event.
#[derive(Clone)]
pub struct SharedExecutor {
    schema: AppSchema,
    renders: Arc<Renders>,
    /// Who is calling: part of what makes two requests the same.
    caller: Arc<str>,
}

impl SharedExecutor {
    pub fn new(schema: AppSchema, renders: Arc<Renders>, caller: &str) -> Self {
        SharedExecutor {
            schema,
            renders,
            caller: caller.into(),
        }
    }
}

/// What a request is made of, to execute it more than once.
#[derive(Clone)]
struct Parts {
    /// Parsed once per subscriber, not once per event.
    document: Option<ExecutableDocument>,
    query: String,
    operation_name: Option<String>,
    variables: Variables,
    extensions: async_graphql::Extensions,
}

impl Parts {
    fn request(&self) -> Request {
        let mut request = Request::new(self.query.clone()).variables(self.variables.clone());
        if let Some(document) = &self.document {
            request.set_parsed_query(document.clone());
        }
        request.operation_name = self.operation_name.clone();
        request.extensions = self.extensions.clone();
        request
    }

    /// A digest of everything that decides how an event renders.
    fn key(&self, caller: &str) -> [u8; 32] {
        let mut digest = Sha256::new();
        for part in [
            caller,
            self.operation_name.as_deref().unwrap_or(""),
            &json(&self.variables),
            &json(&self.extensions),
            &self.query,
        ] {
            // Length-prefixed, so no two different requests feed the same bytes.
            digest.update((part.len() as u64).to_le_bytes());
            digest.update(part.as_bytes());
        }
        digest.finalize().into()
    }

    fn is_subscription(&self) -> bool {
        let Some(doc) = &self.document else {
            return false;
        };
        let op = match (&doc.operations, &self.operation_name) {
            (DocumentOperations::Single(op), None) => Some(op),
            (DocumentOperations::Multiple(ops), Some(name)) => ops.get(name.as_str()),
            (DocumentOperations::Multiple(ops), None) if ops.len() == 1 => ops.values().next(),
            _ => None,
        };
        op.is_some_and(|op| op.node.ty == OperationType::Subscription)
    }
}

/// JSON for the request key (the inputs came from JSON, so this cannot fail).
fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

impl SharedExecutor {
    /// The responses to one operation sent over a WebSocket, serialized: one for a query or a
    /// mutation, one per event for a subscription.
    pub fn payloads(&self, request: Request, session: Arc<Data>) -> BoxStream<'static, Payload> {
        let parts = Parts {
            document: async_graphql::parser::parse_query(&request.query).ok(),
            query: request.query,
            operation_name: request.operation_name,
            variables: request.variables,
            extensions: request.extensions,
        };
        if !parts.is_subscription() {
            return self.plain(&parts, session);
        }
        let this = self.clone();
        async_stream::stream! {
            let slot = HandOver::default();
            let probe = parts.request().data(slot.clone());
            let mut probe = this.schema.execute_stream_with_session_data(probe, session.clone());
            // Shared only when the probe answered nothing (no error anywhere in the request)
            // and handed over exactly one stream; otherwise the schema serves the request
            // exactly as it would without sharing (errors and all).
            let answered = probe.next().await.is_some();
            let events = if answered { None } else { slot.take_one() };
            let Some(mut events) = events else {
                let mut plain = this.plain(&parts, session);
                while let Some(payload) = plain.next().await {
                    yield payload;
                }
                return;
            };
            drop(probe);
            let key = parts.key(&this.caller);
            let parts = Arc::new(parts);
            while let Some(item) = events.next().await {
                let failed = item.is_err();
                if let Some(payload) = this.render(&parts, &key, &session, item).await {
                    yield payload;
                }
                if failed {
                    break;
                }
            }
        }
        .boxed()
    }

    /// The request served by the schema alone, each response serialized for its one client.
    fn plain(&self, parts: &Parts, session: Arc<Data>) -> BoxStream<'static, Payload> {
        self.schema
            .execute_stream_with_session_data(parts.request(), session)
            .map(|response| payload_of(&response))
            .boxed()
    }
}

impl SharedExecutor {
    /// The response for one event (`None` if the resolver drops it), shared by every subscriber
    /// with the same request; one that carries errors is shared only by those waiting for it.
    async fn render(
        &self,
        parts: &Arc<Parts>,
        key: &[u8; 32],
        session: &Arc<Data>,
        item: EventItem,
    ) -> Option<Payload> {
        let sequence = match &item {
            Ok(ev) => ev.sequence,
            Err(_) => {
                let (payload, _) = self
                    .render_alone(parts.clone(), session.clone(), item)
                    .await?;
                return Some(payload);
            }
        };
        let rendering = self.renders.rendering(key, sequence, || {
            let (this, parts, session) = (self.clone(), parts.clone(), session.clone());
            async move { this.render_alone(parts, session, item).await }.boxed()
        });
        let (payload, failed) = rendering.await?;
        if failed {
            self.renders.forget(key, sequence);
        }
        Some(payload)
    }

    async fn render_alone(
        &self,
        parts: Arc<Parts>,
        session: Arc<Data>,
        item: EventItem,
    ) -> Rendered {
        self.renders.executed.fetch_add(1, Ordering::Relaxed);
        let request = parts.request().data(RenderOne(item));
        let mut responses = self
            .schema
            .execute_stream_with_session_data(request, session);
        let response = responses.next().await?;
        let failed = !response.errors.is_empty();
        // What the client gets: data and errors (as before the sharing, no extensions).
        let mut sent = Response::new(response.data);
        sent.errors = response.errors;
        Some((payload_of(&sent), failed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(n: i64) -> BoxFuture<'static, Rendered> {
        async move { Some((n.to_string().into(), false)) }.boxed()
    }

    fn data(rendered: Rendered) -> i64 {
        rendered.expect("rendered").0.parse().expect("a number")
    }

    /// The subscriber that started a rendering stops polling it (its socket is full): another
    /// subscriber waiting for the same rendering drives it to the end.
    #[tokio::test]
    async fn a_stalled_subscriber_holds_up_nobody() {
        let renders = Renders::default();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let mut first = renders.rendering(&[1; 32], 7, || {
            async move {
                let _ = wait.await;
                Some(("7".into(), false))
            }
            .boxed()
        });
        assert!((&mut first).now_or_never().is_none());
        let second = renders.rendering(&[1; 32], 7, || unreachable!("shared"));
        go.send(()).expect("send");
        let got = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the second subscriber is not held up");
        assert_eq!(data(got), 7);
    }

    #[tokio::test]
    async fn renderings_are_reused_per_request_and_event_until_they_age() {
        let renders = Renders::default();
        assert_eq!(data(renders.rendering(&[1; 32], 1, || value(1)).await), 1);
        let reused = renders.rendering(&[1; 32], 1, || unreachable!("reused"));
        assert_eq!(data(reused.await), 1);
        let other_event = renders.rendering(&[1; 32], 2, || value(2));
        assert_eq!(data(other_event.await), 2);
        let other_request = renders.rendering(&[2; 32], 1, || value(3));
        assert_eq!(data(other_request.await), 3);

        renders.forget(&[1; 32], 1);
        assert_eq!(data(renders.rendering(&[1; 32], 1, || value(4)).await), 4);

        tokio::time::sleep(Renders::MAX_AGE + Duration::from_millis(50)).await;
        assert_eq!(data(renders.rendering(&[1; 32], 2, || value(5)).await), 5);
        assert_eq!(
            lock(&renders.inner).cells.len(),
            1,
            "aged renderings are dropped"
        );
    }

    #[test]
    fn at_most_capacity_renderings_are_kept() {
        let renders = Renders::default();
        for seq in 0..(Renders::CAPACITY as i64 + 10) {
            drop(renders.rendering(&[1; 32], seq, || value(seq)));
        }
        let map = lock(&renders.inner);
        assert_eq!(map.cells.len(), Renders::CAPACITY);
        assert!(!map.cells.contains_key(&([1; 32], 0)));
    }
}
