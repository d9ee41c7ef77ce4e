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
//!    the first subscriber to need it renders it, the others reuse the result ([`Renders`]).
//!
//! A rendering that carries errors is not shared: each subscriber renders its own. Queries and
//! mutations sent over a WebSocket, and anything the probe cannot hand over, run on the schema
//! exactly as before.

use super::AppSchema;
use crate::domain::events::StoredEvent;
use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, OperationType};
use async_graphql::{Data, Executor, Request, Response, Value, Variables};
use futures::stream::{BoxStream, StreamExt};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

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

/// Renderings shared between subscribers, the most recent [`Renders::CAPACITY`] kept.
#[derive(Default)]
pub struct Renders {
    inner: Mutex<RenderMap>,
    /// Executions of a subscription's selection set for one event, shared or not.
    executed: AtomicU64,
}

type RenderKey = (Arc<str>, i64);
/// The data of one event's rendering (`None`: the resolver dropped the event).
type Rendering = Arc<OnceCell<Option<Value>>>;

#[derive(Default)]
struct RenderMap {
    cells: HashMap<RenderKey, Rendering>,
    order: VecDeque<RenderKey>,
}

impl Renders {
    /// Renderings kept; an evicted one is rendered again if a late subscriber needs it.
    pub const CAPACITY: usize = 4096;

    fn cell(&self, request: &Arc<str>, sequence: i64) -> Rendering {
        let mut map = lock(&self.inner);
        let key = (request.clone(), sequence);
        if let Some(cell) = map.cells.get(&key) {
            return cell.clone();
        }
        let cell = Rendering::default();
        map.cells.insert(key.clone(), cell.clone());
        map.order.push_back(key);
        while map.order.len() > Self::CAPACITY {
            if let Some(old) = map.order.pop_front() {
                map.cells.remove(&old);
            }
        }
        cell
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

    /// Everything that decides how an event renders, as one string.
    fn key(&self, caller: &str) -> Arc<str> {
        format!(
            "{caller}\u{0}{}\u{0}{}\u{0}{}\u{0}{}",
            self.operation_name.as_deref().unwrap_or(""),
            json(&self.variables),
            json(&self.extensions),
            self.query
        )
        .into()
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

impl Executor for SharedExecutor {
    async fn execute(&self, request: Request) -> Response {
        self.schema.execute(request).await
    }

    fn execute_stream(
        &self,
        request: Request,
        session: Option<Arc<Data>>,
    ) -> BoxStream<'static, Response> {
        let parts = Parts {
            document: async_graphql::parser::parse_query(&request.query).ok(),
            query: request.query,
            operation_name: request.operation_name,
            variables: request.variables,
            extensions: request.extensions,
        };
        let session = session.unwrap_or_default();
        if !parts.is_subscription() {
            return self
                .schema
                .execute_stream_with_session_data(parts.request(), session);
        }
        let this = self.clone();
        async_stream::stream! {
            let slot = HandOver::default();
            let probe = parts.request().data(slot.clone());
            let mut probe = this.schema.execute_stream_with_session_data(probe, session.clone());
            let mut answered = false;
            while let Some(response) = probe.next().await {
                answered = true;
                yield response;
            }
            let Some(mut events) = slot.take_one() else {
                if !answered {
                    // Not a single-field subscription we can share: the schema serves it.
                    let mut plain = this.schema.execute_stream_with_session_data(parts.request(), session);
                    while let Some(response) = plain.next().await {
                        yield response;
                    }
                }
                return;
            };
            let key = parts.key(&this.caller);
            while let Some(item) = events.next().await {
                let failed = item.is_err();
                if let Some(response) = this.render(&parts, &key, &session, item).await {
                    yield response;
                }
                if failed {
                    break;
                }
            }
        }
        .boxed()
    }
}

impl SharedExecutor {
    /// The response for one event (`None` if the resolver drops it): shared when it renders
    /// without errors.
    async fn render(
        &self,
        parts: &Parts,
        key: &Arc<str>,
        session: &Arc<Data>,
        item: EventItem,
    ) -> Option<Response> {
        let sequence = match &item {
            Ok(ev) => ev.sequence,
            Err(_) => return self.render_alone(parts, session, item).await,
        };
        let cell = self.renders.cell(key, sequence);
        let shared = cell
            .get_or_try_init(|| async {
                match self.render_alone(parts, session, item.clone()).await {
                    Some(response) if response.errors.is_empty() => Ok(Some(response.data)),
                    Some(response) => Err(response),
                    None => Ok(None),
                }
            })
            .await;
        match shared {
            Ok(data) => data.clone().map(Response::new),
            Err(response) => Some(response),
        }
    }

    async fn render_alone(
        &self,
        parts: &Parts,
        session: &Arc<Data>,
        item: EventItem,
    ) -> Option<Response> {
        self.renders.executed.fetch_add(1, Ordering::Relaxed);
        let request = parts.request().data(RenderOne(item));
        let mut responses = self
            .schema
            .execute_stream_with_session_data(request, session.clone());
        responses.next().await
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
