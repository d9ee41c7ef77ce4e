//! The append-only event log.

use super::entities::event;
use super::{EventFilter, WriteTx};
use crate::domain::events::{Actor, DomainEvent, EventMeta, StoredEvent};
use crate::domain::{ids, time};
use crate::error::AppError;
use sea_orm::sea_query::{Expr, Func, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    Set, Statement,
};

/// An event to append, with the ids it is indexed by.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub body: DomainEvent,
    pub thread_id: Option<String>,
    pub run_id: Option<String>,
}

impl WriteTx {
    /// Append `events` to `stream_id`, which must be at `expected_version`.
    /// A concurrent writer on the same stream version turns into `CONFLICT`.
    pub async fn append(
        &mut self,
        stream_id: &str,
        expected_version: i64,
        meta: &EventMeta,
        events: Vec<NewEvent>,
    ) -> Result<Vec<StoredEvent>, AppError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let first_sequence = self.log_head().await? + 1;
        let occurred_at = time::now();
        let mut stored = Vec::with_capacity(events.len());
        let mut models = Vec::with_capacity(events.len());
        for (i, new) in events.into_iter().enumerate() {
            let sequence = first_sequence + i as i64;
            let (event_type, payload) = new.body.to_parts()?;
            let ev = StoredEvent {
                sequence,
                event_id: ids::generate("evt-"),
                stream_id: stream_id.to_string(),
                stream_version: expected_version + 1 + i as i64,
                actor: meta.actor.clone(),
                thread_id: new.thread_id,
                run_id: new.run_id,
                correlation_id: meta.correlation_id.clone(),
                causation_id: meta.causation_id.clone(),
                occurred_at: occurred_at.clone(),
                body: new.body,
            };
            models.push(event_model(&ev, event_type, &payload));
            stored.push(ev);
        }
        // A concurrent writer on the same stream version makes this fail at the latest at
        // commit (unique index on stream and version), as `CONFLICT`. Inserted with the
        // projection's writes, in one insert with the events of this writer's next appends.
        self.defer(|d| d.events(models));
        let count = stored.len();
        self.appended_up_to(first_sequence + count as i64 - 1, count);
        self.keep_for_bus(&stored);
        Ok(stored)
    }
}

pub(crate) fn to_stored(m: event::Model) -> Result<StoredEvent, AppError> {
    let payload: serde_json::Value = serde_json::from_str(&m.payload)?;
    let body = DomainEvent::from_parts(&m.event_type, payload)?;
    Ok(StoredEvent {
        sequence: m.sequence,
        event_id: m.event_id,
        stream_id: m.stream_id,
        stream_version: m.stream_version,
        actor: Actor {
            kind: m.actor_type,
            id: m.actor_id,
        },
        thread_id: m.thread_id,
        run_id: m.run_id,
        correlation_id: m.correlation_id,
        causation_id: m.causation_id,
        occurred_at: m.occurred_at,
        body,
    })
}

/// The stream a run's events are appended to: every event with a run is in it.
pub fn run_stream(run_id: &str) -> String {
    format!("run:{run_id}")
}

/// Events with `sequence > after`, in sequence order, at most `limit`.
pub async fn read_after(
    conn: &impl ConnectionTrait,
    after: i64,
    filter: &EventFilter,
    limit: u64,
) -> Result<Vec<StoredEvent>, AppError> {
    select_after(after, filter, limit)
        .all(conn)
        .await?
        .into_iter()
        .map(to_stored)
        .collect()
}

/// The select of [`read_after`].
pub(crate) fn select_after(
    after: i64,
    filter: &EventFilter,
    limit: u64,
) -> sea_orm::Select<event::Entity> {
    let mut q = event::Entity::find().filter(event::Column::Sequence.gt(after));
    if let Some(run) = &filter.run_id {
        // A run's events are its stream's (`run_stream`), found by `ux_events_stream_version`.
        q = q
            .filter(event::Column::StreamId.eq(run_stream(run)))
            .filter(event::Column::RunId.eq(run.clone()));
    }
    if let Some(thread) = &filter.thread_id {
        q = q.filter(event::Column::ThreadId.eq(thread.clone()));
    }
    q.order_by_asc(event::Column::Sequence).limit(limit)
}

/// Every event of one stream, in order.
pub async fn read_stream(
    conn: &impl ConnectionTrait,
    stream_id: &str,
) -> Result<Vec<StoredEvent>, AppError> {
    event::Entity::find()
        .filter(event::Column::StreamId.eq(stream_id))
        .order_by_asc(event::Column::StreamVersion)
        .all(conn)
        .await?
        .into_iter()
        .map(to_stored)
        .collect()
}

/// The highest committed sequence (0 for an empty log).
pub async fn head(conn: &impl ConnectionTrait) -> Result<i64, AppError> {
    let row = conn
        .query_one_raw(head_read(conn.get_database_backend()))
        .await?;
    let max = row
        .map(|r| r.try_get_by_index::<Option<i64>>(0))
        .transpose()?;
    Ok(max.flatten().unwrap_or(0))
}

/// The read of the log's highest sequence (see [`head_of`]).
pub(crate) fn head_read(backend: DbBackend) -> Statement {
    backend.build(
        Query::select()
            .expr(Func::max(Expr::col(event::Column::Sequence)))
            .from(event::Entity),
    )
}

/// The answer of [`head_read`]: 0 for an empty log.
pub(crate) fn head_of(rows: &[super::Row]) -> Result<i64, AppError> {
    let max = super::first_value::<Option<i64>>(rows)?;
    Ok(max.flatten().unwrap_or(0))
}

/// The row of a stored event (its body already split into type and payload).
pub(crate) fn event_model(
    ev: &StoredEvent,
    event_type: &str,
    payload: &serde_json::Value,
) -> event::ActiveModel {
    event::ActiveModel {
        sequence: Set(ev.sequence),
        event_id: Set(ev.event_id.clone()),
        stream_id: Set(ev.stream_id.clone()),
        stream_version: Set(ev.stream_version),
        event_type: Set(event_type.to_string()),
        actor_type: Set(ev.actor.kind.clone()),
        actor_id: Set(ev.actor.id.clone()),
        thread_id: Set(ev.thread_id.clone()),
        run_id: Set(ev.run_id.clone()),
        correlation_id: Set(ev.correlation_id.clone()),
        causation_id: Set(ev.causation_id.clone()),
        occurred_at: Set(ev.occurred_at.clone()),
        payload: Set(payload.to_string()),
    }
}
