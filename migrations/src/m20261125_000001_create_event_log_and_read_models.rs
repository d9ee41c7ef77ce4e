use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Events {
    Table,
    Sequence,
    EventId,
    StreamId,
    StreamVersion,
    EventType,
    ActorType,
    ActorId,
    ThreadId,
    RunId,
    CorrelationId,
    CausationId,
    OccurredAt,
    Payload,
}

#[derive(DeriveIden)]
enum IdempotencyKeys {
    Table,
    Mutation,
    Key,
    RequestHash,
    Response,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Brands {
    Table,
    Id,
    Name,
    Version,
    CreatedSeq,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Projects {
    Table,
    Id,
    BrandId,
    Name,
    Objective,
    Channels,
    DueDate,
    Version,
    CreatedSeq,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Threads {
    Table,
    Id,
    ProjectId,
    BrandId,
    Title,
    Status,
    Modes,
    Version,
    CreatedSeq,
    CreatedAt,
    UpdatedAt,
    LastActivityAt,
}

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

#[derive(DeriveIden)]
enum Runs {
    Table,
    Id,
    ThreadId,
    ProjectId,
    BrandId,
    Status,
    RequestText,
    RequestedMode,
    EffectiveMode,
    FallbackApplied,
    ProfileVersion,
    ProfileDigest,
    Plan,
    CurrentStage,
    Version,
    CreatedSeq,
    CorrelationId,
    LastEventId,
    CreatedAt,
    UpdatedAt,
    StartedAt,
    FinishedAt,
}

#[derive(DeriveIden)]
enum Stages {
    Table,
    RunId,
    Position,
    Key,
    Status,
    Skills,
    ApprovalRequired,
    MaxAttempts,
    BackoffSeconds,
    TimeoutSeconds,
    Attempts,
    Failures,
    ErrorCode,
    ErrorMessage,
    Retryable,
    StartedAt,
    FinishedAt,
}

#[derive(DeriveIden)]
enum Approvals {
    Table,
    Id,
    RunId,
    ThreadId,
    StageKey,
    Status,
    Reason,
    RequiredRole,
    DecidedBy,
    Comment,
    RequestedAt,
    DecidedAt,
    CreatedSeq,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Tasks {
    Table,
    Id,
    RunId,
    ThreadId,
    StageKey,
    Title,
    Status,
    CreatedSeq,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Artifacts {
    Table,
    RunId,
    StageKey,
    Path,
    Kind,
    Sha256,
    Size,
    Attempt,
}

#[derive(DeriveIden)]
enum RunQueue {
    Table,
    RunId,
    ReadyAt,
    LeaseOwner,
    LeaseUntil,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Events::Table)
                .col(big_integer(Events::Sequence).primary_key())
                .col(string_uniq(Events::EventId))
                .col(string(Events::StreamId))
                .col(big_integer(Events::StreamVersion))
                .col(string(Events::EventType))
                .col(string(Events::ActorType))
                .col(string(Events::ActorId))
                .col(string_null(Events::ThreadId))
                .col(string_null(Events::RunId))
                .col(string_null(Events::CorrelationId))
                .col(string_null(Events::CausationId))
                .col(string(Events::OccurredAt))
                .col(text(Events::Payload))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ux_events_stream_version")
                .table(Events::Table)
                .col(Events::StreamId)
                .col(Events::StreamVersion)
                .unique()
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_events_run")
                .table(Events::Table)
                .col(Events::RunId)
                .col(Events::Sequence)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_events_thread")
                .table(Events::Table)
                .col(Events::ThreadId)
                .col(Events::Sequence)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(IdempotencyKeys::Table)
                .col(string(IdempotencyKeys::Mutation))
                .col(string(IdempotencyKeys::Key))
                .col(string(IdempotencyKeys::RequestHash))
                .col(text(IdempotencyKeys::Response))
                .col(string(IdempotencyKeys::CreatedAt))
                .primary_key(
                    Index::create()
                        .col(IdempotencyKeys::Mutation)
                        .col(IdempotencyKeys::Key),
                )
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Brands::Table)
                .col(string(Brands::Id).primary_key())
                .col(text(Brands::Name))
                .col(big_integer(Brands::Version))
                .col(big_integer_uniq(Brands::CreatedSeq))
                .col(string(Brands::CreatedAt))
                .col(string(Brands::UpdatedAt))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Projects::Table)
                .col(string(Projects::Id).primary_key())
                .col(string(Projects::BrandId))
                .col(text(Projects::Name))
                .col(text(Projects::Objective))
                .col(text(Projects::Channels))
                .col(string_null(Projects::DueDate))
                .col(big_integer(Projects::Version))
                .col(big_integer_uniq(Projects::CreatedSeq))
                .col(string(Projects::CreatedAt))
                .col(string(Projects::UpdatedAt))
                .foreign_key(
                    ForeignKey::create()
                        .from(Projects::Table, Projects::BrandId)
                        .to(Brands::Table, Brands::Id),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_projects_brand")
                .table(Projects::Table)
                .col(Projects::BrandId)
                .col(Projects::CreatedSeq)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Threads::Table)
                .col(string(Threads::Id).primary_key())
                .col(string(Threads::ProjectId))
                .col(string(Threads::BrandId))
                .col(text(Threads::Title))
                .col(string(Threads::Status))
                .col(text(Threads::Modes))
                .col(big_integer(Threads::Version))
                .col(big_integer_uniq(Threads::CreatedSeq))
                .col(string(Threads::CreatedAt))
                .col(string(Threads::UpdatedAt))
                .col(string(Threads::LastActivityAt))
                .foreign_key(
                    ForeignKey::create()
                        .from(Threads::Table, Threads::ProjectId)
                        .to(Projects::Table, Projects::Id),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_threads_project")
                .table(Threads::Table)
                .col(Threads::ProjectId)
                .col(Threads::CreatedSeq)
                .to_owned(),
        )
        .await?;

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
        m.create_index(
            Index::create()
                .name("ix_timeline_thread")
                .table(TimelineItems::Table)
                .col(TimelineItems::ThreadId)
                .col(TimelineItems::Sequence)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Runs::Table)
                .col(string(Runs::Id).primary_key())
                .col(string(Runs::ThreadId))
                .col(string(Runs::ProjectId))
                .col(string(Runs::BrandId))
                .col(string(Runs::Status))
                .col(text(Runs::RequestText))
                .col(string(Runs::RequestedMode))
                .col(string(Runs::EffectiveMode))
                .col(boolean(Runs::FallbackApplied))
                .col(string(Runs::ProfileVersion))
                .col(string(Runs::ProfileDigest))
                .col(text(Runs::Plan))
                .col(string_null(Runs::CurrentStage))
                .col(big_integer(Runs::Version))
                .col(big_integer_uniq(Runs::CreatedSeq))
                .col(string(Runs::CorrelationId))
                .col(string(Runs::LastEventId))
                .col(string(Runs::CreatedAt))
                .col(string(Runs::UpdatedAt))
                .col(string_null(Runs::StartedAt))
                .col(string_null(Runs::FinishedAt))
                .foreign_key(
                    ForeignKey::create()
                        .from(Runs::Table, Runs::ThreadId)
                        .to(Threads::Table, Threads::Id),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_runs_thread")
                .table(Runs::Table)
                .col(Runs::ThreadId)
                .col(Runs::CreatedSeq)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_runs_status")
                .table(Runs::Table)
                .col(Runs::Status)
                .col(Runs::CreatedSeq)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Stages::Table)
                .col(string(Stages::RunId))
                .col(integer(Stages::Position))
                .col(string(Stages::Key))
                .col(string(Stages::Status))
                .col(text(Stages::Skills))
                .col(boolean(Stages::ApprovalRequired))
                .col(integer(Stages::MaxAttempts))
                .col(double(Stages::BackoffSeconds))
                .col(double(Stages::TimeoutSeconds))
                .col(integer(Stages::Attempts))
                .col(integer(Stages::Failures))
                .col(string_null(Stages::ErrorCode))
                .col(text_null(Stages::ErrorMessage))
                .col(boolean(Stages::Retryable))
                .col(string_null(Stages::StartedAt))
                .col(string_null(Stages::FinishedAt))
                .primary_key(Index::create().col(Stages::RunId).col(Stages::Position))
                .foreign_key(
                    ForeignKey::create()
                        .from(Stages::Table, Stages::RunId)
                        .to(Runs::Table, Runs::Id),
                )
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Approvals::Table)
                .col(string(Approvals::Id).primary_key())
                .col(string(Approvals::RunId))
                .col(string(Approvals::ThreadId))
                .col(string(Approvals::StageKey))
                .col(string(Approvals::Status))
                .col(text(Approvals::Reason))
                .col(string(Approvals::RequiredRole))
                .col(string_null(Approvals::DecidedBy))
                .col(text_null(Approvals::Comment))
                .col(string_null(Approvals::RequestedAt))
                .col(string_null(Approvals::DecidedAt))
                .col(big_integer(Approvals::CreatedSeq))
                .col(string(Approvals::UpdatedAt))
                .foreign_key(
                    ForeignKey::create()
                        .from(Approvals::Table, Approvals::RunId)
                        .to(Runs::Table, Runs::Id),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ux_approvals_run_stage")
                .table(Approvals::Table)
                .col(Approvals::RunId)
                .col(Approvals::StageKey)
                .unique()
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_approvals_thread")
                .table(Approvals::Table)
                .col(Approvals::ThreadId)
                .col(Approvals::CreatedSeq)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Tasks::Table)
                .col(string(Tasks::Id).primary_key())
                .col(string(Tasks::RunId))
                .col(string(Tasks::ThreadId))
                .col(string(Tasks::StageKey))
                .col(text(Tasks::Title))
                .col(string(Tasks::Status))
                .col(big_integer(Tasks::CreatedSeq))
                .col(string(Tasks::UpdatedAt))
                .foreign_key(
                    ForeignKey::create()
                        .from(Tasks::Table, Tasks::RunId)
                        .to(Runs::Table, Runs::Id),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_tasks_thread")
                .table(Tasks::Table)
                .col(Tasks::ThreadId)
                .col(Tasks::CreatedSeq)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_tasks_run")
                .table(Tasks::Table)
                .col(Tasks::RunId)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Artifacts::Table)
                .col(string(Artifacts::RunId))
                .col(string(Artifacts::StageKey))
                .col(string(Artifacts::Path))
                .col(string(Artifacts::Kind))
                .col(string(Artifacts::Sha256))
                .col(big_integer(Artifacts::Size))
                .col(integer(Artifacts::Attempt))
                .primary_key(
                    Index::create()
                        .col(Artifacts::RunId)
                        .col(Artifacts::StageKey)
                        .col(Artifacts::Path),
                )
                .foreign_key(
                    ForeignKey::create()
                        .from(Artifacts::Table, Artifacts::RunId)
                        .to(Runs::Table, Runs::Id),
                )
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(RunQueue::Table)
                .col(string(RunQueue::RunId).primary_key())
                .col(string(RunQueue::ReadyAt))
                .col(string_null(RunQueue::LeaseOwner))
                .col(string_null(RunQueue::LeaseUntil))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_run_queue_ready")
                .table(RunQueue::Table)
                .col(RunQueue::ReadyAt)
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            RunQueue::Table.into_iden(),
            Artifacts::Table.into_iden(),
            Tasks::Table.into_iden(),
            Approvals::Table.into_iden(),
            Stages::Table.into_iden(),
            Runs::Table.into_iden(),
            TimelineItems::Table.into_iden(),
            Threads::Table.into_iden(),
            Projects::Table.into_iden(),
            Brands::Table.into_iden(),
            IdempotencyKeys::Table.into_iden(),
            Events::Table.into_iden(),
        ] {
            m.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        Ok(())
    }
}
