//! GraphQL object types: thin views over the store's rows, resolving relations on demand.

use super::inputs::{decode_cursor, encode_cursor, page_size};
use super::services;
use crate::domain::events::StoredEvent;
use crate::domain::run::{self as run_domain, Run, Stage};
use crate::domain::time;
use crate::error::AppError;
use crate::store::{ArtifactRow, BrandRow, Page, ProjectRow, ThreadRow, TimelineRow};
use async_graphql::connection::{Connection, Edge};
use async_graphql::{Context, Enum, Object, Result, SimpleObject, ID};
use chrono::{DateTime, Utc};

pub fn ts(text: &str) -> DateTime<Utc> {
    time::parse(text).unwrap_or_default()
}

pub fn ts_opt(text: &Option<String>) -> Option<DateTime<Utc>> {
    text.as_deref().and_then(time::parse)
}

pub fn connection<R, T>(
    page: Page<R>,
    key: impl Fn(&R) -> i64,
    wrap: impl Fn(R) -> T,
    has_previous: bool,
) -> Connection<String, T>
where
    T: async_graphql::OutputType,
{
    let mut conn = Connection::new(has_previous, page.has_next);
    conn.edges = page
        .items
        .into_iter()
        .map(|r| Edge::new(encode_cursor(key(&r)), wrap(r)))
        .collect();
    conn
}

pub fn after_seq(after: Option<String>) -> Result<i64, AppError> {
    after
        .as_deref()
        .map(decode_cursor)
        .transpose()
        .map(|a| a.unwrap_or(0))
}

macro_rules! gql_enum {
    ($name:ident, $domain:ty { $($variant:ident),+ }) => {
        #[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
        pub enum $name { $($variant),+ }
        impl From<$domain> for $name {
            fn from(s: $domain) -> Self {
                match s { $(<$domain>::$variant => $name::$variant),+ }
            }
        }
        impl From<$name> for $domain {
            fn from(s: $name) -> Self {
                match s { $($name::$variant => <$domain>::$variant),+ }
            }
        }
    };
}

gql_enum!(
    RunStatus,
    run_domain::RunStatus {
        Queued,
        Running,
        WaitingApproval,
        Completed,
        Failed,
        Canceled
    }
);
gql_enum!(
    StageStatus,
    run_domain::StageStatus {
        Pending,
        Running,
        WaitingApproval,
        Completed,
        Failed,
        Canceled
    }
);
gql_enum!(
    ApprovalStatus,
    run_domain::ApprovalStatus {
        Pending,
        Granted,
        Rejected,
        Canceled
    }
);
gql_enum!(
    TaskStatus,
    run_domain::TaskStatus {
        Open,
        Completed,
        Canceled
    }
);

// ---- workspace -----------------------------------------------------------------------------------

pub struct Brand(pub BrandRow);

#[Object]
impl Brand {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn created_at(&self) -> DateTime<Utc> {
        ts(&self.0.created_at)
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        ts(&self.0.updated_at)
    }
    async fn projects(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Connection<String, Project>> {
        let first = page_size(first)?;
        let has_prev = after.is_some();
        let page = services(ctx)
            .store
            .projects(&self.0.id, after_seq(after)?, first)
            .await?;
        Ok(connection(page, |p| p.created_seq, Project, has_prev))
    }
}

pub struct Project(pub ProjectRow);

#[Object]
impl Project {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    async fn brand_id(&self) -> ID {
        ID(self.0.brand_id.clone())
    }
    async fn brand(&self, ctx: &Context<'_>) -> Result<Option<Brand>> {
        Ok(services(ctx)
            .store
            .brand(&self.0.brand_id)
            .await?
            .map(Brand))
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn objective(&self) -> &str {
        &self.0.objective
    }
    async fn channels(&self) -> &[String] {
        &self.0.channels
    }
    async fn due_date(&self) -> Option<&str> {
        self.0.due_date.as_deref()
    }
    async fn created_at(&self) -> DateTime<Utc> {
        ts(&self.0.created_at)
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        ts(&self.0.updated_at)
    }
    async fn threads(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Connection<String, Thread>> {
        let first = page_size(first)?;
        let has_prev = after.is_some();
        let page = services(ctx)
            .store
            .threads(&self.0.id, after_seq(after)?, first)
            .await?;
        Ok(connection(page, |t| t.created_seq, Thread, has_prev))
    }
}

pub struct Thread(pub ThreadRow);

#[Object]
impl Thread {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    async fn project_id(&self) -> ID {
        ID(self.0.project_id.clone())
    }
    async fn brand_id(&self) -> ID {
        ID(self.0.brand_id.clone())
    }
    async fn project(&self, ctx: &Context<'_>) -> Result<Option<Project>> {
        Ok(services(ctx)
            .store
            .project(&self.0.project_id)
            .await?
            .map(Project))
    }
    async fn brand(&self, ctx: &Context<'_>) -> Result<Option<Brand>> {
        Ok(services(ctx)
            .store
            .brand(&self.0.brand_id)
            .await?
            .map(Brand))
    }
    async fn title(&self) -> &str {
        &self.0.title
    }
    async fn status(&self) -> &str {
        &self.0.status
    }
    async fn modes(&self) -> &[String] {
        &self.0.modes
    }
    async fn created_at(&self) -> DateTime<Utc> {
        ts(&self.0.created_at)
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        ts(&self.0.updated_at)
    }
    async fn last_activity_at(&self) -> DateTime<Utc> {
        ts(&self.0.last_activity_at)
    }
    /// Runs of this thread, newest first.
    async fn runs(
        &self,
        ctx: &Context<'_>,
        status: Option<RunStatus>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Connection<String, WorkflowRun>> {
        runs_connection(ctx, Some(&self.0.id), status, first, after).await
    }
    async fn approvals(
        &self,
        ctx: &Context<'_>,
        status: Option<ApprovalStatus>,
    ) -> Result<Vec<Approval>> {
        let status = status.map(|s| run_domain::ApprovalStatus::from(s).as_str());
        let rows = services(ctx)
            .store
            .approvals_of_thread(&self.0.id, status)
            .await?;
        Ok(rows.into_iter().map(Approval).collect())
    }
    async fn tasks(&self, ctx: &Context<'_>, status: Option<TaskStatus>) -> Result<Vec<Task>> {
        let status = status.map(|s| run_domain::TaskStatus::from(s).as_str());
        let rows = services(ctx)
            .store
            .tasks_of_thread(&self.0.id, status)
            .await?;
        Ok(rows.into_iter().map(Task).collect())
    }
    /// Every event of the thread, oldest first.
    async fn timeline(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Connection<String, TimelineItem>> {
        let first = page_size(first)?;
        let has_prev = after.is_some();
        let page = services(ctx)
            .store
            .timeline(&self.0.id, after_seq(after)?, first)
            .await?;
        Ok(connection(page, |t| t.sequence, TimelineItem, has_prev))
    }
}

pub async fn runs_connection(
    ctx: &Context<'_>,
    thread_id: Option<&str>,
    status: Option<RunStatus>,
    first: Option<i32>,
    after: Option<String>,
) -> Result<Connection<String, WorkflowRun>> {
    let first = page_size(first)?;
    let has_prev = after.is_some();
    let after = after.as_deref().map(decode_cursor).transpose()?;
    let page = services(ctx)
        .store
        .runs(thread_id, status.map(Into::into), after, first)
        .await?;
    Ok(connection(page, |r| r.created_seq, WorkflowRun, has_prev))
}

pub struct TimelineItem(pub TimelineRow);

#[Object]
impl TimelineItem {
    async fn sequence(&self) -> i64 {
        self.0.sequence
    }
    async fn event_id(&self) -> ID {
        ID(self.0.event_id.clone())
    }
    #[graphql(name = "type")]
    async fn event_type(&self) -> &str {
        &self.0.event_type
    }
    async fn actor_type(&self) -> &str {
        &self.0.actor_type
    }
    async fn actor_id(&self) -> &str {
        &self.0.actor_id
    }
    async fn run_id(&self) -> Option<ID> {
        self.0.run_id.clone().map(ID)
    }
    async fn occurred_at(&self) -> DateTime<Utc> {
        ts(&self.0.occurred_at)
    }
}

// ---- runs ----------------------------------------------------------------------------------------

#[derive(SimpleObject, Clone)]
pub struct RetryPolicy {
    pub max_attempts: i32,
    pub backoff_seconds: f64,
}

#[derive(SimpleObject, Clone)]
pub struct SkillOverride {
    pub stage_key: String,
    pub skills: Vec<String>,
}

pub struct WorkflowRun(pub Run);

#[Object]
impl WorkflowRun {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    async fn thread_id(&self) -> ID {
        ID(self.0.thread_id.clone())
    }
    async fn thread(&self, ctx: &Context<'_>) -> Result<Option<Thread>> {
        Ok(services(ctx)
            .store
            .thread(&self.0.thread_id)
            .await?
            .map(Thread))
    }
    async fn status(&self) -> RunStatus {
        self.0.status.into()
    }
    async fn request_text(&self) -> &str {
        &self.0.request_text
    }
    async fn requested_mode(&self) -> &str {
        &self.0.plan.requested_mode
    }
    async fn effective_mode(&self) -> &str {
        &self.0.plan.effective_mode
    }
    async fn fallback_applied(&self) -> bool {
        self.0.plan.fallback_applied
    }
    async fn profile_version(&self) -> &str {
        &self.0.plan.profile_version
    }
    async fn profile_digest(&self) -> &str {
        &self.0.plan.profile_digest
    }
    async fn skill_overrides(&self) -> Vec<SkillOverride> {
        self.0
            .plan
            .skill_overrides
            .iter()
            .map(|(k, v)| SkillOverride {
                stage_key: k.clone(),
                skills: v.clone(),
            })
            .collect()
    }
    /// The stage the run is at (executing or waiting), if any.
    async fn current_stage(&self) -> Option<&str> {
        self.0.current_stage.as_deref()
    }
    async fn stages(&self, ctx: &Context<'_>) -> Result<Vec<WorkflowStage>> {
        let stages = services(ctx).store.stages(&self.0.id).await?;
        Ok(stages.into_iter().map(WorkflowStage).collect())
    }
    async fn approvals(&self, ctx: &Context<'_>) -> Result<Vec<Approval>> {
        let rows = services(ctx).store.approvals_of_run(&self.0.id).await?;
        Ok(rows.into_iter().map(Approval).collect())
    }
    async fn pending_approvals(&self, ctx: &Context<'_>) -> Result<Vec<Approval>> {
        let rows = services(ctx).store.approvals_of_run(&self.0.id).await?;
        Ok(rows
            .into_iter()
            .filter(|a| a.status == run_domain::ApprovalStatus::Pending)
            .map(Approval)
            .collect())
    }
    /// The run's events, oldest first.
    async fn events(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Connection<String, WorkflowEvent>> {
        let first = page_size(first)?;
        let has_prev = after.is_some();
        let filter = crate::store::EventFilter {
            run_id: Some(self.0.id.clone()),
            thread_id: None,
        };
        let mut items = services(ctx)
            .store
            .read_events(after_seq(after)?, &filter, first + 1)
            .await?;
        let has_next = items.len() as u64 > first;
        items.truncate(first as usize);
        Ok(connection(
            Page { items, has_next },
            |e| e.sequence,
            |e| WorkflowEvent(std::sync::Arc::new(e)),
            has_prev,
        ))
    }
    async fn created_at(&self) -> DateTime<Utc> {
        ts(&self.0.created_at)
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        ts(&self.0.updated_at)
    }
    async fn started_at(&self) -> Option<DateTime<Utc>> {
        ts_opt(&self.0.started_at)
    }
    async fn finished_at(&self) -> Option<DateTime<Utc>> {
        ts_opt(&self.0.finished_at)
    }
}

pub struct WorkflowStage(pub Stage);

#[Object]
impl WorkflowStage {
    async fn key(&self) -> &str {
        &self.0.key
    }
    /// 1-based position in the plan.
    async fn position(&self) -> i32 {
        self.0.position
    }
    async fn status(&self) -> StageStatus {
        self.0.status.into()
    }
    async fn attempts(&self) -> i32 {
        self.0.attempts as i32
    }
    async fn approval_required(&self) -> bool {
        self.0.approval_required
    }
    async fn skills(&self) -> &[String] {
        &self.0.skills
    }
    async fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.0.max_attempts as i32,
            backoff_seconds: self.0.backoff_seconds,
        }
    }
    async fn timeout_seconds(&self) -> f64 {
        self.0.timeout_seconds
    }
    /// Of the latest failed attempt; null when none failed.
    async fn error_code(&self) -> Option<&str> {
        self.0.error_code.as_deref()
    }
    async fn error_message(&self) -> Option<&str> {
        self.0.error_message.as_deref()
    }
    async fn retryable(&self) -> bool {
        self.0.retryable
    }
    async fn approval(&self, ctx: &Context<'_>) -> Result<Option<Approval>> {
        if !self.0.approval_required {
            return Ok(None);
        }
        let rows = services(ctx).store.approvals_of_run(&self.0.run_id).await?;
        Ok(rows
            .into_iter()
            .find(|a| a.stage_key == self.0.key)
            .map(Approval))
    }
    async fn artifacts(&self, ctx: &Context<'_>) -> Result<Vec<StageArtifact>> {
        let rows = services(ctx)
            .store
            .artifacts(&self.0.run_id, &self.0.key)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| StageArtifact {
                row: r,
                position: self.0.position,
            })
            .collect())
    }
    async fn started_at(&self) -> Option<DateTime<Utc>> {
        ts_opt(&self.0.started_at)
    }
    async fn finished_at(&self) -> Option<DateTime<Utc>> {
        ts_opt(&self.0.finished_at)
    }
}

pub struct StageArtifact {
    pub row: ArtifactRow,
    pub position: i32,
}

#[Object]
impl StageArtifact {
    /// Path relative to the stage's `artifacts/` directory.
    async fn path(&self) -> &str {
        &self.row.path
    }
    async fn kind(&self) -> &str {
        &self.row.kind
    }
    async fn sha256(&self) -> &str {
        &self.row.sha256
    }
    async fn size(&self) -> i64 {
        self.row.size
    }
    async fn attempt(&self) -> i32 {
        self.row.attempt
    }
    /// The file's content (only files listed in the stage's manifest can be read).
    async fn content(&self, ctx: &Context<'_>) -> Result<String> {
        let r = &self.row;
        Ok(services(ctx)
            .artifacts
            .read(&r.run_id, self.position, &r.stage_key, &r.path)
            .await?)
    }
}

pub struct Approval(pub run_domain::Approval);

#[Object]
impl Approval {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    async fn run_id(&self) -> ID {
        ID(self.0.run_id.clone())
    }
    async fn thread_id(&self) -> ID {
        ID(self.0.thread_id.clone())
    }
    async fn stage_key(&self) -> &str {
        &self.0.stage_key
    }
    async fn status(&self) -> ApprovalStatus {
        self.0.status.into()
    }
    async fn reason(&self) -> &str {
        &self.0.reason
    }
    async fn required_role(&self) -> &str {
        &self.0.required_role
    }
    async fn decided_by(&self) -> Option<&str> {
        self.0.decided_by.as_deref()
    }
    async fn comment(&self) -> Option<&str> {
        self.0.comment.as_deref()
    }
    async fn requested_at(&self) -> Option<DateTime<Utc>> {
        ts_opt(&self.0.requested_at)
    }
    async fn decided_at(&self) -> Option<DateTime<Utc>> {
        ts_opt(&self.0.decided_at)
    }
    async fn run(&self, ctx: &Context<'_>) -> Result<Option<WorkflowRun>> {
        Ok(services(ctx)
            .store
            .run(&self.0.run_id)
            .await?
            .map(WorkflowRun))
    }
}

pub struct Task(pub run_domain::Task);

#[Object]
impl Task {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    async fn run_id(&self) -> ID {
        ID(self.0.run_id.clone())
    }
    async fn thread_id(&self) -> ID {
        ID(self.0.thread_id.clone())
    }
    async fn stage_key(&self) -> &str {
        &self.0.stage_key
    }
    async fn title(&self) -> &str {
        &self.0.title
    }
    async fn status(&self) -> TaskStatus {
        self.0.status.into()
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        ts(&self.0.updated_at)
    }
}

// ---- events --------------------------------------------------------------------------------------

#[derive(SimpleObject, Clone)]
pub struct EventActor {
    #[graphql(name = "type")]
    pub kind: String,
    pub id: String,
}

/// An event of the log (SPEC §7 envelope).
pub struct WorkflowEvent(pub std::sync::Arc<StoredEvent>);

#[Object]
impl WorkflowEvent {
    async fn sequence(&self) -> i64 {
        self.0.sequence
    }
    async fn event_id(&self) -> ID {
        ID(self.0.event_id.clone())
    }
    async fn stream_id(&self) -> &str {
        &self.0.stream_id
    }
    async fn stream_version(&self) -> i64 {
        self.0.stream_version
    }
    #[graphql(name = "type")]
    async fn event_type(&self) -> &str {
        self.0.body.event_type()
    }
    async fn actor(&self) -> EventActor {
        EventActor {
            kind: self.0.actor.kind.clone(),
            id: self.0.actor.id.clone(),
        }
    }
    async fn thread_id(&self) -> Option<ID> {
        self.0.thread_id.clone().map(ID)
    }
    async fn run_id(&self) -> Option<ID> {
        self.0.run_id.clone().map(ID)
    }
    async fn correlation_id(&self) -> Option<&str> {
        self.0.correlation_id.as_deref()
    }
    async fn causation_id(&self) -> Option<&str> {
        self.0.causation_id.as_deref()
    }
    async fn occurred_at(&self) -> DateTime<Utc> {
        ts(&self.0.occurred_at)
    }
    async fn payload(&self) -> Result<async_graphql::Json<serde_json::Value>> {
        let (_, payload) = self.0.body.to_parts().map_err(AppError::from)?;
        Ok(async_graphql::Json(payload))
    }
}
