//! Read models are projections of the log, updated in the same transaction as the append.

use super::entities::{
    approval, artifact, brand, event, project, run, run_queue, stage, task, thread,
};
use super::WriteTx;
use crate::domain::events::{DomainEvent, StoredEvent};
use crate::domain::run::{
    Approval, ApprovalStatus, Run, RunState, RunStatus, Stage, StageStatus, Task, TaskStatus,
};
use crate::error::AppError;
use sea_orm::sea_query::{OnConflict, UpdateStatement};
use sea_orm::{
    sea_query::IntoCondition, ActiveModelTrait, ActiveValue, ColumnTrait, Condition,
    ConnectionTrait, DbBackend, EntityName, EntityTrait, IdenStatic, IntoActiveModel, Iterable,
    QueryFilter, QueryOrder, QuerySelect, QueryTrait, Set, Statement,
};
use std::fmt::Write as _;

fn json_list(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

pub(super) fn parse_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

fn corrupt(what: &str, value: &str) -> AppError {
    AppError::internal(anyhow::anyhow!("corrupt {what} in read model: {value}"))
}

// ---- conversions -------------------------------------------------------------------------------

pub(super) fn run_to_model(r: &Run) -> Result<run::Model, AppError> {
    Ok(run::Model {
        id: r.id.clone(),
        thread_id: r.thread_id.clone(),
        project_id: r.project_id.clone(),
        brand_id: r.brand_id.clone(),
        status: r.status.as_str().into(),
        request_text: r.request_text.clone(),
        requested_mode: r.plan.requested_mode.clone(),
        effective_mode: r.plan.effective_mode.clone(),
        fallback_applied: r.plan.fallback_applied,
        profile_version: r.plan.profile_version.clone(),
        profile_digest: r.plan.profile_digest.clone(),
        plan: serde_json::to_string(&r.plan)?,
        current_stage: r.current_stage.clone(),
        version: r.version,
        created_seq: r.created_seq,
        correlation_id: r.correlation_id.clone(),
        last_event_id: r.last_event_id.clone(),
        created_at: r.created_at.clone(),
        updated_at: r.updated_at.clone(),
        started_at: r.started_at.clone(),
        finished_at: r.finished_at.clone(),
    })
}

pub(super) fn run_from_model(m: run::Model) -> Result<Run, AppError> {
    Ok(Run {
        status: RunStatus::parse(&m.status).ok_or_else(|| corrupt("run status", &m.status))?,
        plan: serde_json::from_str(&m.plan)?,
        id: m.id,
        thread_id: m.thread_id,
        project_id: m.project_id,
        brand_id: m.brand_id,
        request_text: m.request_text,
        current_stage: m.current_stage,
        version: m.version,
        created_seq: m.created_seq,
        correlation_id: m.correlation_id,
        last_event_id: m.last_event_id,
        created_at: m.created_at,
        updated_at: m.updated_at,
        started_at: m.started_at,
        finished_at: m.finished_at,
    })
}

pub(super) fn stage_to_model(s: &Stage) -> stage::Model {
    stage::Model {
        run_id: s.run_id.clone(),
        position: s.position,
        key: s.key.clone(),
        status: s.status.as_str().into(),
        skills: json_list(&s.skills),
        approval_required: s.approval_required,
        max_attempts: s.max_attempts as i32,
        backoff_seconds: s.backoff_seconds,
        timeout_seconds: s.timeout_seconds,
        attempts: s.attempts as i32,
        failures: s.failures as i32,
        error_code: s.error_code.clone(),
        error_message: s.error_message.clone(),
        retryable: s.retryable,
        started_at: s.started_at.clone(),
        finished_at: s.finished_at.clone(),
    }
}

pub(super) fn stage_from_model(m: stage::Model) -> Result<Stage, AppError> {
    Ok(Stage {
        status: StageStatus::parse(&m.status).ok_or_else(|| corrupt("stage status", &m.status))?,
        skills: parse_list(&m.skills),
        run_id: m.run_id,
        position: m.position,
        key: m.key,
        approval_required: m.approval_required,
        max_attempts: m.max_attempts.max(1) as u32,
        backoff_seconds: m.backoff_seconds,
        timeout_seconds: m.timeout_seconds,
        attempts: m.attempts.max(0) as u32,
        failures: m.failures.max(0) as u32,
        error_code: m.error_code,
        error_message: m.error_message,
        retryable: m.retryable,
        started_at: m.started_at,
        finished_at: m.finished_at,
    })
}

pub(super) fn approval_to_model(a: &Approval) -> approval::Model {
    approval::Model {
        id: a.id.clone(),
        run_id: a.run_id.clone(),
        thread_id: a.thread_id.clone(),
        stage_key: a.stage_key.clone(),
        status: a.status.as_str().into(),
        reason: a.reason.clone(),
        required_role: a.required_role.clone(),
        decided_by: a.decided_by.clone(),
        comment: a.comment.clone(),
        requested_at: a.requested_at.clone(),
        decided_at: a.decided_at.clone(),
        created_seq: a.created_seq,
        updated_at: a.updated_at.clone(),
    }
}

pub(super) fn approval_from_model(m: approval::Model) -> Result<Approval, AppError> {
    Ok(Approval {
        status: ApprovalStatus::parse(&m.status)
            .ok_or_else(|| corrupt("approval status", &m.status))?,
        id: m.id,
        run_id: m.run_id,
        thread_id: m.thread_id,
        stage_key: m.stage_key,
        reason: m.reason,
        required_role: m.required_role,
        decided_by: m.decided_by,
        comment: m.comment,
        requested_at: m.requested_at,
        decided_at: m.decided_at,
        created_seq: m.created_seq,
        updated_at: m.updated_at,
    })
}

pub(super) fn task_to_model(t: &Task) -> task::Model {
    task::Model {
        id: t.id.clone(),
        run_id: t.run_id.clone(),
        thread_id: t.thread_id.clone(),
        stage_key: t.stage_key.clone(),
        title: t.title.clone(),
        status: t.status.as_str().into(),
        created_seq: t.created_seq,
        updated_at: t.updated_at.clone(),
    }
}

pub(super) fn task_from_model(m: task::Model) -> Result<Task, AppError> {
    Ok(Task {
        status: TaskStatus::parse(&m.status).ok_or_else(|| corrupt("task status", &m.status))?,
        id: m.id,
        run_id: m.run_id,
        thread_id: m.thread_id,
        stage_key: m.stage_key,
        title: m.title,
        created_seq: m.created_seq,
        updated_at: m.updated_at,
    })
}

/// The thread's last activity set to `at` (a run queued on it).
pub(crate) fn touch_thread(thread_id: String, at: String) -> UpdateStatement {
    thread::Entity::update_many()
        .col_expr(
            thread::Column::LastActivityAt,
            sea_orm::sea_query::Expr::value(at),
        )
        .filter(thread::Column::Id.eq(thread_id))
        .into_query()
}

/// Load a run with its stages, approvals and tasks.
pub async fn load_run_state(
    conn: &impl ConnectionTrait,
    run_id: &str,
) -> Result<Option<RunState>, AppError> {
    let Some(model) = run::Entity::find_by_id(run_id.to_string())
        .one(conn)
        .await?
    else {
        return Ok(None);
    };
    let (stages, approvals, tasks) = run_children(run_id);
    let stages = stages.all(conn).await?;
    let approvals = approvals.all(conn).await?;
    let tasks = tasks.all(conn).await?;
    run_state_from_models(model, stages, approvals, tasks).map(Some)
}

/// The selects of a run's stages, approvals and tasks, in their order.
fn run_children(
    run_id: &str,
) -> (
    sea_orm::Select<stage::Entity>,
    sea_orm::Select<approval::Entity>,
    sea_orm::Select<task::Entity>,
) {
    (
        stage::Entity::find()
            .filter(stage::Column::RunId.eq(run_id))
            .order_by_asc(stage::Column::Position),
        approval::Entity::find()
            .filter(approval::Column::RunId.eq(run_id))
            .order_by_asc(approval::Column::CreatedSeq),
        task::Entity::find()
            .filter(task::Column::RunId.eq(run_id))
            .order_by_asc(task::Column::CreatedSeq),
    )
}

fn run_state_from_models(
    run: run::Model,
    stages: Vec<stage::Model>,
    approvals: Vec<approval::Model>,
    tasks: Vec<task::Model>,
) -> Result<RunState, AppError> {
    Ok(RunState {
        run: run_from_model(run)?,
        stages: stages
            .into_iter()
            .map(stage_from_model)
            .collect::<Result<_, _>>()?,
        approvals: approvals
            .into_iter()
            .map(approval_from_model)
            .collect::<Result<_, _>>()?,
        tasks: tasks
            .into_iter()
            .map(task_from_model)
            .collect::<Result<_, _>>()?,
    })
}

async fn insert_row<A: ActiveModelTrait>(w: &WriteTx, row: A) -> Result<(), AppError> {
    w.exec(&<A::Entity as EntityTrait>::insert(row).into_query())
        .await
}

/// Update the rows `which` selects with the columns `row` sets.
async fn update_row<A: ActiveModelTrait>(
    w: &WriteTx,
    row: A,
    which: impl IntoCondition,
) -> Result<(), AppError> {
    w.exec(&update(row, which)).await
}

fn update<A: ActiveModelTrait>(row: A, which: impl IntoCondition) -> UpdateStatement {
    <A::Entity as EntityTrait>::update_many()
        .set(row)
        .filter(which)
        .into_query()
}

/// Read-model writes of a writer's appends, built when the writer next sends anything (see
/// `WriteTx::defer`): a turn that appends to a run several times (a stage completed, then the
/// next gate reached) writes its events in one insert, and each of the run's rows once, as the
/// last append left it. Built in this order, which the foreign keys need: events, threads
/// touched, run rows, artifacts. (A thread's timeline is a view over the events: nothing to
/// write.)
#[derive(Default)]
pub struct Deferred {
    events: Vec<event::ActiveModel>,
    /// Threads a run was queued on: (thread id, the queueing's time), its last activity.
    touched: Vec<(String, String)>,
    runs: Vec<RunChange>,
    artifacts: Vec<StageArtifacts>,
}

/// A run's rows to write: from `before` (as stored; `None`: not stored yet) to `after`.
struct RunChange {
    before: Option<RunState>,
    after: RunState,
    /// The last change of the run's work-queue row among the merged appends.
    queue: Option<QueueChange>,
}

enum QueueChange {
    /// Runnable again: the row is (re)placed, ready at this time, with the lease this turn gave
    /// it (owner, until; see [`Deferred::lease`]) or none.
    Ready(String, Option<(String, String)>),
    /// Not runnable any more: the row goes.
    Gone,
}

/// A stage completion's artifacts, replacing the stage's earlier ones.
struct StageArtifacts {
    run_id: String,
    stage_key: String,
    attempt: u32,
    artifacts: Vec<crate::domain::events::ArtifactMeta>,
}

impl Deferred {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.touched.is_empty()
            && self.runs.is_empty()
            && self.artifacts.is_empty()
    }

    pub(super) fn events(&mut self, rows: Vec<event::ActiveModel>) {
        self.events.extend(rows);
    }

    /// The thread's last activity is `at` (later than any deferred before it): one update
    /// per thread, however many runs were queued on it.
    fn touch(&mut self, thread_id: String, at: String) {
        match self.touched.iter_mut().find(|(t, _)| *t == thread_id) {
            Some(last) => last.1 = at,
            None => self.touched.push((thread_id, at)),
        }
    }

    /// The run went from `before` to `after`, its queue row last changed by `queue`: merged
    /// with the change deferred for the same run just before, if there is one (its `before`
    /// stays: nothing of it is stored yet).
    fn run(&mut self, before: Option<RunState>, after: RunState, queue: Option<QueueChange>) {
        if let Some(last) = self.runs.last_mut() {
            if last.after.run.id == after.run.id {
                last.after = after;
                if queue.is_some() {
                    last.queue = queue;
                }
                return;
            }
        }
        self.runs.push(RunChange {
            before,
            after,
            queue,
        });
    }

    /// Lease `run_id` to `owner` until `until` in the queue row this writer's appends (re)place,
    /// still deferred: the row is written once, leased, instead of written and then updated
    /// (and the run's rows are not split in two writes around the update). False when no
    /// deferred change places the run's row: the caller updates the stored row.
    pub(super) fn lease(&mut self, run_id: &str, owner: &str, until: String) -> bool {
        let last = self
            .runs
            .iter_mut()
            .rev()
            .find(|c| c.after.run.id == run_id);
        match last.and_then(|c| c.queue.as_mut()) {
            Some(QueueChange::Ready(_, lease)) => {
                *lease = Some((owner.to_string(), until));
                true
            }
            _ => false,
        }
    }

    /// The statements, in order; leaves nothing deferred.
    pub fn build(&mut self, backend: DbBackend) -> Result<Vec<Statement>, AppError> {
        let mut out = Vec::new();
        let events = std::mem::take(&mut self.events);
        if !events.is_empty() {
            out.push(insert_rows(backend, events));
        }
        for (thread_id, at) in std::mem::take(&mut self.touched) {
            out.push(backend.build(&touch_thread(thread_id, at)));
        }
        for change in std::mem::take(&mut self.runs) {
            run_rows(&change, backend, &mut out)?;
        }
        for a in std::mem::take(&mut self.artifacts) {
            // A stage's first completed attempt has no earlier artifacts to replace (attempts
            // count up from 1 and complete at most once each).
            if a.attempt > 1 {
                out.push(
                    backend.build(
                        &artifact::Entity::delete_many()
                            .filter(artifact::Column::RunId.eq(a.run_id.clone()))
                            .filter(artifact::Column::StageKey.eq(a.stage_key.clone()))
                            .into_query(),
                    ),
                );
            }
            if !a.artifacts.is_empty() {
                let rows: Vec<_> = a
                    .artifacts
                    .iter()
                    .map(|r| artifact::ActiveModel {
                        run_id: Set(a.run_id.clone()),
                        stage_key: Set(a.stage_key.clone()),
                        path: Set(r.path.clone()),
                        kind: Set(r.kind.clone()),
                        sha256: Set(r.sha256.clone()),
                        size: Set(r.size),
                        attempt: Set(a.attempt as i32),
                    })
                    .collect();
                out.push(insert_rows(backend, rows));
            }
        }
        Ok(out)
    }
}

/// `INSERT INTO "table" ("a", "b", …) VALUES (…), (…)` for `rows`: the SQL written here, the
/// values moved out of the rows. The same text and values as sea-orm's `insert_many` builds
/// (a test compares them); building a run's read-model writes, inside the writer's turn, takes
/// 41 % fewer instructions this way (callgrind, BENCHMARKS.md). Rows that do not all set the
/// same columns go through `insert_many`.
fn insert_rows<A: ActiveModelTrait>(backend: DbBackend, mut rows: Vec<A>) -> Statement {
    // The columns a row sets, as bits in the entity's column order (`None` past 64 columns).
    let set = |row: &A| {
        Col::<A>::iter().enumerate().try_fold(0u64, |bits, (i, c)| {
            let bit = 1u64.checked_shl(u32::try_from(i).ok()?)?;
            Some(if row.is_not_set(c) { bits } else { bits | bit })
        })
    };
    let bits = rows.first().and_then(set).filter(|bits| *bits != 0);
    let Some(bits) = bits.filter(|bits| rows.iter().all(|row| set(row) == Some(*bits))) else {
        return backend.build(&A::Entity::insert_many(rows).into_query());
    };
    let columns: Vec<Col<A>> = Col::<A>::iter()
        .enumerate()
        .filter(|(i, _)| bits >> i & 1 == 1)
        .map(|(_, c)| c)
        .collect();
    // Identifiers quoted as sea-query quotes them (no entity's name holds a quote).
    let mut sql = String::with_capacity(64 + columns.len() * (24 + 6 * rows.len()));
    sql.push_str("INSERT INTO \"");
    sql.push_str(A::Entity::default().table_name());
    sql.push_str("\" (");
    for (j, column) in columns.iter().enumerate() {
        sql.push_str(if j == 0 { "\"" } else { ", \"" });
        sql.push_str(column.as_str());
        sql.push('"');
    }
    sql.push_str(") VALUES ");
    let mut values = Vec::with_capacity(rows.len() * columns.len());
    for (i, row) in rows.iter_mut().enumerate() {
        sql.push_str(if i == 0 { "(" } else { ", (" });
        for (j, column) in columns.iter().enumerate() {
            if j > 0 {
                sql.push_str(", ");
            }
            match row.take(*column) {
                ActiveValue::Set(v) | ActiveValue::Unchanged(v) => values.push(v),
                ActiveValue::NotSet => unreachable!("checked: every row sets the column"),
            }
            placeholder(backend, &mut sql, values.len());
        }
        sql.push(')');
    }
    Statement::from_sql_and_values(backend, sql, values)
}

/// The columns of the entity of an active model `A`.
type Col<A> = <<A as ActiveModelTrait>::Entity as EntityTrait>::Column;

/// A row's key: the columns and values that select it.
type Key<A> = Vec<(Col<A>, sea_orm::Value)>;

/// The condition sea-orm writes for `key`: every column equal to its value.
fn key_condition<C: ColumnTrait>(key: Vec<(C, sea_orm::Value)>) -> Condition {
    key.into_iter()
        .fold(Condition::all(), |all, (c, v)| all.add(c.eq(v)))
}

/// The `n`th value's placeholder (from 1), as sea-query writes it: `$n` on Postgres, `?` on SQLite.
fn placeholder(backend: DbBackend, sql: &mut String, n: usize) {
    match backend {
        DbBackend::Postgres => {
            let _ = write!(sql, "${n}");
        }
        _ => sql.push('?'),
    }
}

/// `UPDATE "table" SET "a" = ?, … WHERE "table"."k" = ? AND …`: the columns `row` sets
/// (`Set`, as sea-orm's `UpdateMany::set` takes them), on the row `key` selects, written here as
/// [`insert_rows`] writes inserts: the same text and values as `update_many().set(row)
/// .filter(…)` builds (a test compares them). An empty key would select every row: that goes
/// through sea-orm, as does a row that sets nothing.
fn update_keyed<A: ActiveModelTrait>(backend: DbBackend, mut row: A, key: Key<A>) -> Statement {
    if key.is_empty() {
        return backend.build(&update(row, key_condition(key)));
    }
    let table = A::Entity::default().table_name();
    let mut sql = format!("UPDATE \"{table}\" SET ");
    let mut values = Vec::new();
    for column in Col::<A>::iter() {
        if let ActiveValue::Set(v) = row.take(column) {
            if !values.is_empty() {
                sql.push_str(", ");
            }
            let _ = write!(sql, "\"{}\" = ", column.as_str());
            values.push(v);
            placeholder(backend, &mut sql, values.len());
        }
    }
    if values.is_empty() {
        // The row set nothing: sea-orm's statement for it, from a row that sets nothing either.
        let nothing = <A as ActiveModelTrait>::default();
        return backend.build(&update(nothing, key_condition(key)));
    }
    sql.push_str(" WHERE ");
    for (i, (column, value)) in key.into_iter().enumerate() {
        if i > 0 {
            sql.push_str(" AND ");
        }
        let _ = write!(sql, "\"{table}\".\"{}\" = ", column.as_str());
        values.push(value);
        placeholder(backend, &mut sql, values.len());
    }
    Statement::from_sql_and_values(backend, sql, values)
}

/// The writes that take one kind of a run's rows (stages, approvals, tasks) from `before` to
/// `after`: new rows in one insert, changed rows updated where `key` selects them.
fn child_rows<T: PartialEq, A: ActiveModelTrait>(
    backend: DbBackend,
    statements: &mut Vec<Statement>,
    after: &[T],
    before: Option<&[T]>,
    same_row: impl Fn(&T, &T) -> bool,
    row: impl Fn(&T) -> A,
    key: impl Fn(&T) -> Key<A>,
) {
    let mut new = Vec::new();
    for item in after {
        match before.and_then(|b| b.iter().find(|old| same_row(old, item))) {
            None => new.push(row(item)),
            Some(old) if old != item => {
                statements.push(update_keyed(backend, row(item), key(item)))
            }
            Some(_) => {}
        }
    }
    if !new.is_empty() {
        statements.push(insert_rows(backend, new));
    }
}

/// The writes that take a run's rows from `change.before` to `change.after`: only the rows that
/// differ, new rows of a kind in one insert.
fn run_rows(
    change: &RunChange,
    backend: DbBackend,
    statements: &mut Vec<Statement>,
) -> Result<(), AppError> {
    macro_rules! out {
        ($stmt:expr) => {
            statements.push(backend.build($stmt))
        };
    }
    let (before, after) = (change.before.as_ref(), &change.after);
    match before {
        None => out!(&run::Entity::insert(
            run_to_model(&after.run)?.into_active_model().reset_all(),
        )
        .into_query()),
        Some(b) if b.run != after.run => {
            // Only what events change: the plan and the ids are fixed when the run is queued.
            let r = &after.run;
            let changes = run::ActiveModel {
                status: Set(r.status.as_str().into()),
                current_stage: Set(r.current_stage.clone()),
                version: Set(r.version),
                last_event_id: Set(r.last_event_id.clone()),
                updated_at: Set(r.updated_at.clone()),
                started_at: Set(r.started_at.clone()),
                finished_at: Set(r.finished_at.clone()),
                ..Default::default()
            };
            statements.push(update_keyed(
                backend,
                changes,
                vec![(run::Column::Id, r.id.clone().into())],
            ))
        }
        Some(_) => {}
    }
    child_rows(
        backend,
        statements,
        &after.stages,
        before.map(|b| b.stages.as_slice()),
        |a, b| a.position == b.position,
        |s| stage_to_model(s).into_active_model().reset_all(),
        |s| {
            vec![
                (stage::Column::RunId, s.run_id.clone().into()),
                (stage::Column::Position, s.position.into()),
            ]
        },
    );
    child_rows(
        backend,
        statements,
        &after.approvals,
        before.map(|b| b.approvals.as_slice()),
        |a, b| a.id == b.id,
        |a| approval_to_model(a).into_active_model().reset_all(),
        |a| vec![(approval::Column::Id, a.id.clone().into())],
    );
    child_rows(
        backend,
        statements,
        &after.tasks,
        before.map(|b| b.tasks.as_slice()),
        |a, b| a.id == b.id,
        |t| task_to_model(t).into_active_model().reset_all(),
        |t| vec![(task::Column::Id, t.id.clone().into())],
    );
    // The work queue follows the run status: runnable runs have a row, others none.
    match &change.queue {
        Some(QueueChange::Ready(ready_at, lease)) => {
            let (owner, until) = lease.clone().unzip();
            out!(&run_queue::Entity::insert(run_queue::ActiveModel {
                run_id: Set(after.run.id.clone()),
                ready_at: Set(ready_at.clone()),
                lease_owner: Set(owner),
                lease_until: Set(until),
            },)
            .on_conflict(
                OnConflict::column(run_queue::Column::RunId)
                    .update_columns([
                        run_queue::Column::ReadyAt,
                        run_queue::Column::LeaseOwner,
                        run_queue::Column::LeaseUntil,
                    ])
                    .to_owned(),
            )
            .into_query())
        }
        Some(QueueChange::Gone) => out!(&run_queue::Entity::delete_many()
            .filter(run_queue::Column::RunId.eq(after.run.id.clone()))
            .into_query()),
        None => {}
    }
    Ok(())
}

async fn apply_workspace(w: &WriteTx, ev: &StoredEvent) -> Result<(), AppError> {
    let at = ev.occurred_at.clone();
    match &ev.body {
        DomainEvent::BrandCreated { brand_id, name } => {
            insert_row(
                w,
                brand::ActiveModel {
                    id: Set(brand_id.clone()),
                    name: Set(name.clone()),
                    version: Set(ev.stream_version),
                    created_seq: Set(ev.sequence),
                    created_at: Set(at.clone()),
                    updated_at: Set(at),
                },
            )
            .await?
        }
        DomainEvent::BrandUpdated { brand_id, name } => {
            update_row(
                w,
                brand::ActiveModel {
                    name: Set(name.clone()),
                    version: Set(ev.stream_version),
                    updated_at: Set(at),
                    ..Default::default()
                },
                brand::Column::Id.eq(brand_id.clone()),
            )
            .await?
        }
        DomainEvent::ProjectCreated {
            project_id,
            brand_id,
            name,
            objective,
            channels,
            due_date,
        } => {
            insert_row(
                w,
                project::ActiveModel {
                    id: Set(project_id.clone()),
                    brand_id: Set(brand_id.clone()),
                    name: Set(name.clone()),
                    objective: Set(objective.clone()),
                    channels: Set(json_list(channels)),
                    due_date: Set(due_date.clone()),
                    version: Set(ev.stream_version),
                    created_seq: Set(ev.sequence),
                    created_at: Set(at.clone()),
                    updated_at: Set(at),
                },
            )
            .await?
        }
        DomainEvent::ProjectUpdated {
            project_id,
            name,
            objective,
            channels,
            due_date,
        } => {
            update_row(
                w,
                project::ActiveModel {
                    name: Set(name.clone()),
                    objective: Set(objective.clone()),
                    channels: Set(json_list(channels)),
                    due_date: Set(due_date.clone()),
                    version: Set(ev.stream_version),
                    updated_at: Set(at),
                    ..Default::default()
                },
                project::Column::Id.eq(project_id.clone()),
            )
            .await?
        }
        DomainEvent::ThreadCreated {
            thread_id,
            project_id,
            brand_id,
            title,
            modes,
        } => {
            insert_row(
                w,
                thread::ActiveModel {
                    id: Set(thread_id.clone()),
                    project_id: Set(project_id.clone()),
                    brand_id: Set(brand_id.clone()),
                    title: Set(title.clone()),
                    status: Set("open".into()),
                    modes: Set(json_list(modes)),
                    version: Set(ev.stream_version),
                    created_seq: Set(ev.sequence),
                    created_at: Set(at.clone()),
                    updated_at: Set(at.clone()),
                    last_activity_at: Set(at),
                },
            )
            .await?
        }
        DomainEvent::ThreadRenamed { thread_id, .. }
        | DomainEvent::ThreadModeAdded { thread_id, .. }
        | DomainEvent::ThreadModeRemoved { thread_id, .. } => {
            let Some(current) = w
                .model(thread::Entity::find_by_id(thread_id.clone()))
                .await?
            else {
                return Err(AppError::internal(anyhow::anyhow!(
                    "event {} for unknown thread {thread_id}",
                    ev.event_id
                )));
            };
            let mut modes = parse_list(&current.modes);
            let mut title = current.title.clone();
            match &ev.body {
                DomainEvent::ThreadRenamed { title: t, .. } => title = t.clone(),
                DomainEvent::ThreadModeAdded { mode, .. } if !modes.contains(mode) => {
                    modes.push(mode.clone());
                }
                DomainEvent::ThreadModeRemoved { mode, .. } => modes.retain(|m| m != mode),
                _ => {}
            }
            update_row(
                w,
                thread::ActiveModel {
                    title: Set(title),
                    modes: Set(json_list(&modes)),
                    version: Set(ev.stream_version),
                    updated_at: Set(at.clone()),
                    last_activity_at: Set(at),
                    ..Default::default()
                },
                thread::Column::Id.eq(thread_id.clone()),
            )
            .await?;
        }
        _ => {}
    }
    Ok(())
}

/// Project a batch of events. Run events of one batch belong to one run; `run` is its state
/// before the batch when the caller has it (else it is loaded). Returns the run's new state.
pub async fn project(
    w: &WriteTx,
    events: &[StoredEvent],
    run: Option<RunState>,
) -> Result<Option<RunState>, AppError> {
    let mut before = run.clone();
    let mut state = run;
    // The work queue follows the run status, event by event (however the events are grouped,
    // live or in a rebuild): runnable runs have a row, ready since they last became runnable.
    let mut queue = None;
    let mut touched = Vec::new();
    let mut completed = Vec::new();
    for ev in events {
        match &ev.body {
            DomainEvent::BrandCreated { .. }
            | DomainEvent::BrandUpdated { .. }
            | DomainEvent::ProjectCreated { .. }
            | DomainEvent::ProjectUpdated { .. }
            | DomainEvent::ThreadCreated { .. }
            | DomainEvent::ThreadRenamed { .. }
            | DomainEvent::ThreadModeAdded { .. }
            | DomainEvent::ThreadModeRemoved { .. } => apply_workspace(w, ev).await?,
            DomainEvent::WorkflowRunQueued { thread_id, .. } => {
                state = RunState::from_queued(ev);
                queue = state
                    .as_ref()
                    .filter(|q| q.run.status.is_runnable())
                    .map(|q| QueueChange::Ready(q.run.updated_at.clone(), None));
                before = None;
                touched.push((thread_id.clone(), ev.occurred_at.clone()));
            }
            body => {
                if state.is_none() {
                    let run_id = ev.run_id.as_deref().unwrap_or_default();
                    state = w.load_run_state(run_id).await?;
                    before = state.clone();
                }
                let Some(s) = state.as_mut() else {
                    return Err(AppError::internal(anyhow::anyhow!(
                        "event {} for unknown run {:?}",
                        ev.event_id,
                        ev.run_id
                    )));
                };
                let was_runnable = s.run.status.is_runnable();
                s.apply(ev);
                if s.run.status.is_runnable() != was_runnable {
                    queue = Some(if was_runnable {
                        QueueChange::Gone
                    } else {
                        QueueChange::Ready(s.run.updated_at.clone(), None)
                    });
                }
                if let DomainEvent::WorkflowRunStageCompleted {
                    run_id,
                    stage_key,
                    attempt,
                    artifacts,
                    ..
                } = body
                {
                    completed.push(StageArtifacts {
                        run_id: run_id.clone(),
                        stage_key: stage_key.clone(),
                        attempt: *attempt,
                        artifacts: artifacts.clone(),
                    });
                }
            }
        }
    }
    // Written when the writer next sends anything, merged with its next appends' (see
    // `Deferred`). Artifacts go after the run's rows: the run may be new in this batch (a
    // replay groups a run's consecutive events), and artifacts reference it.
    w.defer(|d| {
        for (thread_id, at) in touched {
            d.touch(thread_id, at);
        }
        if let Some(after) = &state {
            d.run(before, after.clone(), queue);
        }
        d.artifacts.extend(completed);
    });
    Ok(state)
}

impl WriteTx {
    /// Append to a stream and project in the same transaction.
    pub async fn append_and_project(
        &mut self,
        stream_id: &str,
        expected_version: i64,
        meta: &crate::domain::events::EventMeta,
        events: Vec<super::event_log::NewEvent>,
        run: Option<RunState>,
    ) -> Result<(Vec<StoredEvent>, Option<RunState>), AppError> {
        let stored = self
            .append(stream_id, expected_version, meta, events)
            .await?;
        let state = project(self, &stored, run).await?;
        Ok((stored, state))
    }

    /// The stored stream version of a run (None if there is no such run).
    pub async fn run_version(&self, run_id: &str) -> Result<Option<i64>, AppError> {
        let read = run::Entity::find_by_id(run_id.to_string())
            .select_only()
            .column(run::Column::Version)
            .build(self.backend());
        super::first_value(&self.query(read).await?)
    }

    /// The run's state as this writer's transaction sees it (None if there is no such run).
    pub async fn load_run_state(&self, run_id: &str) -> Result<Option<RunState>, AppError> {
        let Some(model) = self
            .model(run::Entity::find_by_id(run_id.to_string()))
            .await?
        else {
            return Ok(None);
        };
        let (stages, approvals, tasks) = run_children(run_id);
        let stages = self.models(stages).await?;
        let approvals = self.models(approvals).await?;
        let tasks = self.models(tasks).await?;
        run_state_from_models(model, stages, approvals, tasks).map(Some)
    }

    /// The run's state, or `NOT_FOUND`.
    pub async fn run_state(&self, run_id: &str) -> Result<RunState, AppError> {
        self.load_run_state(run_id)
            .await?
            .ok_or_else(|| AppError::not_found("run", run_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::ActiveValue::NotSet;

    fn event_row(sequence: i64, thread: Option<&str>) -> event::ActiveModel {
        event::ActiveModel {
            sequence: Set(sequence),
            event_id: Set(format!("ev-{sequence}")),
            stream_id: Set("run:r-1".into()),
            stream_version: Set(sequence),
            event_type: Set("WorkflowRunQueued".into()),
            actor_type: Set("user".into()),
            actor_id: Set("o'brien \"q\"".into()),
            thread_id: Set(thread.map(Into::into)),
            run_id: Set(Some("r-1".into())),
            correlation_id: Set(None),
            causation_id: Set(None),
            occurred_at: Set("2026-11-27T22:00:00.000000Z".into()),
            payload: Set(r#"{"a":[1,2]}"#.into()),
        }
    }

    fn stage_row(position: i32, failed: bool) -> stage::ActiveModel {
        stage::ActiveModel {
            run_id: Set("r-1".into()),
            position: Set(position),
            key: Set(format!("stage-{position}")),
            status: Set("pending".into()),
            skills: Set("[]".into()),
            approval_required: Set(position % 2 == 0),
            max_attempts: Set(3),
            backoff_seconds: Set(0.5),
            timeout_seconds: Set(30.0),
            attempts: Set(0),
            failures: Set(0),
            error_code: Set(failed.then(|| "X".to_string())),
            error_message: Set(None),
            retryable: Set(false),
            started_at: Set(None),
            finished_at: Set(None),
        }
    }

    fn same_as_sea_orm<A: ActiveModelTrait + Clone>(rows: Vec<A>) {
        for backend in [DbBackend::Sqlite, DbBackend::Postgres] {
            let ours = insert_rows(backend, rows.clone());
            let theirs = backend.build(&A::Entity::insert_many(rows.clone()).into_query());
            assert_eq!(ours.sql, theirs.sql, "{backend:?}");
            assert_eq!(ours.values, theirs.values, "{backend:?}");
        }
    }

    fn update_same_as_sea_orm<A: ActiveModelTrait + Clone>(row: A, key: Key<A>) {
        let which = key_condition(key.clone());
        for backend in [DbBackend::Sqlite, DbBackend::Postgres] {
            let ours = update_keyed(backend, row.clone(), key.clone());
            let theirs = backend.build(&update(row.clone(), which.clone()));
            assert_eq!(ours.sql, theirs.sql, "{backend:?}");
            assert_eq!(ours.values, theirs.values, "{backend:?}");
        }
    }

    #[test]
    fn updates_are_written_as_sea_orm_writes_them() {
        let key = |p: i32| {
            vec![
                (stage::Column::RunId, "r-1".into()),
                (stage::Column::Position, p.into()),
            ]
        };
        update_same_as_sea_orm(stage_row(2, true), key(2));
        let changes = run::ActiveModel {
            status: Set("waiting_approval".into()),
            current_stage: Set(Some("brand-voice".into())),
            version: Set(7),
            finished_at: Set(None),
            ..Default::default()
        };
        update_same_as_sea_orm(changes, vec![(run::Column::Id, "r-1".into())]);
        // Unchanged values are not written, as sea-orm does not write them.
        let mut partly = stage_row(3, false);
        partly.key = ActiveValue::Unchanged("stage-3".into());
        partly.skills = ActiveValue::Unchanged("[]".into());
        update_same_as_sea_orm(partly, key(3));
        // No key (every row) and nothing set go through sea-orm.
        update_same_as_sea_orm(stage_row(1, false), vec![]);
        update_same_as_sea_orm(<stage::ActiveModel as ActiveModelTrait>::default(), key(1));
    }

    #[test]
    fn inserts_are_written_as_sea_orm_writes_them() {
        same_as_sea_orm((1..=29).map(|n| event_row(n, Some("t-1"))).collect());
        same_as_sea_orm(vec![event_row(7, None)]);
        same_as_sea_orm((1..=4).map(|p| stage_row(p, p == 3)).collect());
        // Rows that set different columns take sea-orm's own path.
        let mut partial = stage_row(2, false);
        partial.started_at = NotSet;
        same_as_sea_orm(vec![stage_row(1, false), partial]);
    }
}
