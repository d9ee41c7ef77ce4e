//! The timeline read from the log, and one index fewer on it.
//!
//! A thread's timeline item is every column of an event that has a thread, nothing else: the
//! table was a copy of those events, two more B-trees written for each event (the table and its
//! thread index) and a statement in every write turn. It becomes a view over `events`, served
//! by `ix_events_thread`; rebuilding it needs nothing, and it cannot differ from the log.
//!
//! `ix_events_run (run_id, sequence)` goes too: every event with a run is in that run's stream
//! (`run:<id>`), so `ux_events_stream_version` finds a run's events (see
//! `event_log::read_after`).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveIden)]
enum TimelineItems {
    Table,
    Sequence,
    ThreadId,
    EventId,
    EventType,
    ActorType,
    ActorId,
    RunId,
    OccurredAt,
}

#[derive(DeriveMigrationName)]
pub struct Migration;

const VIEW: &str = "CREATE VIEW timeline_items AS \
     SELECT sequence, thread_id, event_id, event_type, actor_type, actor_id, run_id, occurred_at \
     FROM events WHERE thread_id IS NOT NULL";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let db = m.get_connection();
        db.execute_unprepared("DROP INDEX ix_events_run").await?;
        db.execute_unprepared("DROP TABLE timeline_items").await?;
        db.execute_unprepared(VIEW).await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let db = m.get_connection();
        db.execute_unprepared("DROP VIEW timeline_items").await?;
        m.create_table(
            Table::create()
                .table(TimelineItems::Table)
                .col(big_integer(TimelineItems::Sequence).primary_key())
                .col(string(TimelineItems::ThreadId))
                .col(string(TimelineItems::EventId))
                .col(string(TimelineItems::EventType))
                .col(string(TimelineItems::ActorType))
                .col(string(TimelineItems::ActorId))
                .col(string_null(TimelineItems::RunId))
                .col(string(TimelineItems::OccurredAt))
                .to_owned(),
        )
        .await?;
        db.execute_unprepared(
            "INSERT INTO timeline_items \
             SELECT sequence, thread_id, event_id, event_type, actor_type, actor_id, run_id, \
                    occurred_at \
             FROM events WHERE thread_id IS NOT NULL",
        )
        .await?;
        db.execute_unprepared(
            "CREATE INDEX ix_timeline_thread ON timeline_items (thread_id, sequence)",
        )
        .await?;
        db.execute_unprepared("CREATE INDEX ix_events_run ON events (run_id, sequence)")
            .await?;
        Ok(())
    }
}
