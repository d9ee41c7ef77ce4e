//! Subscriptions with a cursor: catch up from the log after `afterSequence`, then live events
//! from the bus, dropping any already sent; a lagging subscriber re-reads the log. On WebSocket
//! connections each event is rendered once per distinct request (see [`super::fanout`]).

use super::fanout::{event_source, EventItem};
use super::services;
use super::types::{ts, RunStatus, WorkflowEvent, WorkflowRun};
use crate::bus::EventBus;
use crate::domain::events::StoredEvent;
use crate::error::AppError;
use crate::service::Services;
use crate::store::EventFilter;
use async_graphql::{Context, Object, Result, Subscription, ID};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt, TryStreamExt};
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;

const CATCH_UP_BATCH: u64 = 500;

fn matches(ev: &StoredEvent, filter: &EventFilter) -> bool {
    filter
        .run_id
        .as_ref()
        .is_none_or(|r| ev.run_id.as_ref() == Some(r))
        && filter
            .thread_id
            .as_ref()
            .is_none_or(|t| ev.thread_id.as_ref() == Some(t))
}

/// Every event matching `filter` and `keep` after `after` (or from now on), gap-free, each once,
/// in order. `keep` runs on the shared event, so what a subscriber does not want is never copied.
pub fn event_stream(
    services: Arc<Services>,
    bus: EventBus,
    filter: EventFilter,
    keep: fn(&StoredEvent) -> bool,
    after: Option<i64>,
) -> impl Stream<Item = Result<Arc<StoredEvent>, AppError>> {
    async_stream::try_stream! {
        // Subscribe first, then read the log: nothing committed in between can be missed.
        let mut rx = bus.subscribe();
        let mut last = match after {
            Some(after) => after,
            None => bus.head(),
        };
        let mut catch_up = after.is_some();
        loop {
            if catch_up {
                loop {
                    let batch = services.store.read_events(last, &filter, CATCH_UP_BATCH).await?;
                    let n = batch.len() as u64;
                    for ev in batch {
                        last = ev.sequence;
                        if keep(&ev) {
                            yield Arc::new(ev);
                        }
                    }
                    if n < CATCH_UP_BATCH {
                        break;
                    }
                }
                catch_up = false;
            }
            match rx.recv().await {
                Ok(ev) => {
                    if ev.sequence <= last {
                        continue;
                    }
                    last = ev.sequence;
                    if matches(&ev, &filter) && keep(&ev) {
                        // Shared by every subscriber: nothing is copied per subscriber.
                        yield ev;
                    }
                }
                Err(RecvError::Lagged(skipped)) => {
                    tracing::debug!(skipped, "subscriber lagged; recovering from the log");
                    catch_up = true;
                }
                Err(RecvError::Closed) => break,
            }
        }
    }
}

/// A resolver's events: [`event_stream`], through [`event_source`] (which shares renderings on
/// WebSocket connections).
fn events(
    ctx: &Context<'_>,
    filter: EventFilter,
    keep: fn(&StoredEvent) -> bool,
    after: Option<i64>,
) -> futures::stream::BoxStream<'static, EventItem> {
    event_source(ctx, || {
        let bus = ctx.data_unchecked::<EventBus>().clone();
        event_stream(services(ctx).clone(), bus, filter, keep, after)
            .map_err(Into::into)
            .boxed()
    })
}

fn parse_cursor(after: Option<i64>) -> Result<Option<i64>, AppError> {
    match after {
        Some(n) if n < 0 => Err(AppError::validation("afterSequence must be >= 0")),
        other => Ok(other),
    }
}

/// One run status change.
pub struct RunStatusChange {
    event: Arc<StoredEvent>,
    from: RunStatus,
    to: RunStatus,
    stage_key: Option<String>,
}

#[Object]
impl RunStatusChange {
    /// The sequence of the event that made the change: resubscribe with it as `afterSequence`.
    async fn sequence(&self) -> i64 {
        self.event.sequence
    }
    async fn event_id(&self) -> ID {
        ID(self.event.event_id.clone())
    }
    async fn run_id(&self) -> ID {
        ID(self.event.run_id.clone().unwrap_or_default())
    }
    async fn thread_id(&self) -> Option<ID> {
        self.event.thread_id.clone().map(ID)
    }
    async fn from_status(&self) -> RunStatus {
        self.from
    }
    async fn to_status(&self) -> RunStatus {
        self.to
    }
    /// The stage of a gate or stage-driven change.
    async fn stage_key(&self) -> Option<&str> {
        self.stage_key.as_deref()
    }
    async fn occurred_at(&self) -> DateTime<Utc> {
        ts(&self.event.occurred_at)
    }
    /// The run as it is when this change is delivered (over a WebSocket: when it was rendered
    /// for identical subscriptions, at most a second before).
    async fn run(&self, ctx: &Context<'_>) -> Result<Option<WorkflowRun>> {
        let id = self.event.run_id.clone().unwrap_or_default();
        Ok(services(ctx).store.run(&id).await?.map(WorkflowRun))
    }
}

#[derive(Default)]
pub struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// Every status change of one run, or of all runs of a thread. `afterSequence`: first what was
    /// missed after that sequence, then live changes.
    async fn workflow_run_status_changed(
        &self,
        ctx: &Context<'_>,
        run_id: Option<ID>,
        thread_id: Option<ID>,
        after_sequence: Option<i64>,
    ) -> Result<impl Stream<Item = Result<RunStatusChange, async_graphql::Error>>> {
        if run_id.is_none() && thread_id.is_none() {
            return Err(AppError::validation("give runId or threadId").into());
        }
        let after = parse_cursor(after_sequence)?;
        let filter = EventFilter {
            run_id: run_id.map(|i| i.0),
            thread_id: thread_id.map(|i| i.0),
        };
        let stream = events(
            ctx,
            filter,
            |ev| ev.body.status_transition().is_some(),
            after,
        );
        Ok(stream.filter_map(|item| async move {
            match item {
                Err(e) => Some(Err(e)),
                Ok(ev) => {
                    let (from, to, stage) = ev.body.status_transition()?;
                    let stage_key = stage.map(str::to_string);
                    Some(Ok(RunStatusChange {
                        from: from.into(),
                        to: to.into(),
                        stage_key,
                        event: ev,
                    }))
                }
            }
        }))
    }

    /// Every event of a run (the full envelope with its payload).
    async fn workflow_run_events(
        &self,
        ctx: &Context<'_>,
        run_id: ID,
        after_sequence: Option<i64>,
    ) -> Result<impl Stream<Item = Result<WorkflowEvent, async_graphql::Error>>> {
        let after = parse_cursor(after_sequence)?;
        let filter = EventFilter {
            run_id: Some(run_id.0),
            thread_id: None,
        };
        let stream = events(ctx, filter, |_| true, after);
        Ok(stream.map(|item| item.map(WorkflowEvent)))
    }
}
