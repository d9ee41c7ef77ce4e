//! Read models are projections of the log, updated in the same transaction as the append.

use super::entities::{
    approval, artifact, brand, project, run, run_queue, stage, task, thread, timeline_item,
};
use super::WriteTx;
use crate::domain::events::{DomainEvent, StoredEvent};
use crate::domain::run::{
    Approval, ApprovalStatus, Run, RunState, RunStatus, Stage, StageStatus, Task, TaskStatus,
};
use crate::error::AppError;
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    sea_query::IntoCondition, ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait,
    EntityTrait, IntoActiveModel, QueryFilter, QueryOrder, QuerySelect, QueryTrait, Set,
};

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
    let stages = stage::Entity::find()
        .filter(stage::Column::RunId.eq(run_id))
        .order_by_asc(stage::Column::Position)
        .all(conn)
        .await?
        .into_iter()
        .map(stage_from_model)
        .collect::<Result<_, _>>()?;
    let approvals = approval::Entity::find()
        .filter(approval::Column::RunId.eq(run_id))
        .order_by_asc(approval::Column::CreatedSeq)
        .all(conn)
        .await?
        .into_iter()
        .map(approval_from_model)
        .collect::<Result<_, _>>()?;
    let tasks = task::Entity::find()
        .filter(task::Column::RunId.eq(run_id))
        .order_by_asc(task::Column::CreatedSeq)
        .all(conn)
        .await?
        .into_iter()
        .map(task_from_model)
        .collect::<Result<_, _>>()?;
    Ok(Some(RunState {
        run: run_from_model(model)?,
        stages,
        approvals,
        tasks,
    }))
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
    w.exec(
        &<A::Entity as EntityTrait>::update_many()
            .set(row)
            .filter(which)
            .into_query(),
    )
    .await
}

/// Write the rows of `after` that differ from `before`.
async fn save_run(
    w: &WriteTx,
    before: Option<&RunState>,
    after: &RunState,
) -> Result<(), AppError> {
    match before {
        None => insert_row(w, run_to_model(&after.run)?.into_active_model().reset_all()).await?,
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
            update_row(w, changes, run::Column::Id.eq(r.id.clone())).await?
        }
        Some(_) => {}
    }
    for s in &after.stages {
        let old = before.and_then(|b| b.stages.iter().find(|o| o.position == s.position));
        let row = stage_to_model(s).into_active_model().reset_all();
        match old {
            None => insert_row(w, row).await?,
            Some(o) if o != s => {
                let which = Condition::all()
                    .add(stage::Column::RunId.eq(s.run_id.clone()))
                    .add(stage::Column::Position.eq(s.position));
                update_row(w, row, which).await?
            }
            Some(_) => {}
        }
    }
    for a in &after.approvals {
        let row = approval_to_model(a).into_active_model().reset_all();
        match before.and_then(|b| b.approvals.iter().find(|o| o.id == a.id)) {
            None => insert_row(w, row).await?,
            Some(o) if o != a => update_row(w, row, approval::Column::Id.eq(a.id.clone())).await?,
            Some(_) => {}
        }
    }
    for t in &after.tasks {
        let row = task_to_model(t).into_active_model().reset_all();
        match before.and_then(|b| b.tasks.iter().find(|o| o.id == t.id)) {
            None => insert_row(w, row).await?,
            Some(o) if o != t => update_row(w, row, task::Column::Id.eq(t.id.clone())).await?,
            Some(_) => {}
        }
    }
    // The work queue follows the run status: runnable runs have a row, others none.
    let was_runnable = before.is_some_and(|b| b.run.status.is_runnable());
    let is_runnable = after.run.status.is_runnable();
    if is_runnable && !was_runnable {
        w.exec(
            &run_queue::Entity::insert(run_queue::ActiveModel {
                run_id: Set(after.run.id.clone()),
                ready_at: Set(after.run.updated_at.clone()),
                lease_owner: Set(None),
                lease_until: Set(None),
            })
            .on_conflict(
                OnConflict::column(run_queue::Column::RunId)
                    .update_columns([
                        run_queue::Column::ReadyAt,
                        run_queue::Column::LeaseOwner,
                        run_queue::Column::LeaseUntil,
                    ])
                    .to_owned(),
            )
            .into_query(),
        )
        .await?;
    } else if !is_runnable && was_runnable {
        w.exec(
            &run_queue::Entity::delete_many()
                .filter(run_queue::Column::RunId.eq(after.run.id.clone()))
                .into_query(),
        )
        .await?;
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
            let Some(current) = thread::Entity::find_by_id(thread_id.clone())
                .one(w.conn().await?)
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

async fn touch_thread(w: &WriteTx, thread_id: &str, at: &str) -> Result<(), AppError> {
    w.exec(
        &thread::Entity::update_many()
            .col_expr(
                thread::Column::LastActivityAt,
                sea_orm::sea_query::Expr::value(at.to_string()),
            )
            .filter(thread::Column::Id.eq(thread_id))
            .into_query(),
    )
    .await
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
    let mut timeline = Vec::new();
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
                before = None;
                touch_thread(w, thread_id, &ev.occurred_at).await?;
            }
            body => {
                if state.is_none() {
                    let run_id = ev.run_id.as_deref().unwrap_or_default();
                    state = load_run_state(w.conn().await?, run_id).await?;
                    before = state.clone();
                }
                let Some(s) = state.as_mut() else {
                    return Err(AppError::internal(anyhow::anyhow!(
                        "event {} for unknown run {:?}",
                        ev.event_id,
                        ev.run_id
                    )));
                };
                s.apply(ev);
                if let DomainEvent::WorkflowRunStageCompleted {
                    run_id,
                    stage_key,
                    attempt,
                    artifacts,
                    ..
                } = body
                {
                    // Written after the run's rows: the run may be new in this batch (a replay
                    // groups a run's consecutive events), and artifacts reference it.
                    completed.push((run_id, stage_key, *attempt, artifacts));
                }
            }
        }
        if let Some(thread_id) = &ev.thread_id {
            timeline.push(timeline_item::ActiveModel {
                sequence: Set(ev.sequence),
                thread_id: Set(thread_id.clone()),
                event_id: Set(ev.event_id.clone()),
                event_type: Set(ev.body.event_type().to_string()),
                actor_type: Set(ev.actor.kind.clone()),
                actor_id: Set(ev.actor.id.clone()),
                run_id: Set(ev.run_id.clone()),
                occurred_at: Set(ev.occurred_at.clone()),
            });
        }
    }
    if !timeline.is_empty() {
        w.exec(&timeline_item::Entity::insert_many(timeline).into_query())
            .await?;
    }
    if let Some(after) = &state {
        save_run(w, before.as_ref(), after).await?;
    }
    for (run_id, stage_key, attempt, artifacts) in completed {
        w.exec(
            &artifact::Entity::delete_many()
                .filter(artifact::Column::RunId.eq(run_id.clone()))
                .filter(artifact::Column::StageKey.eq(stage_key.clone()))
                .into_query(),
        )
        .await?;
        if !artifacts.is_empty() {
            let rows = artifacts.iter().map(|a| artifact::ActiveModel {
                run_id: Set(run_id.clone()),
                stage_key: Set(stage_key.clone()),
                path: Set(a.path.clone()),
                kind: Set(a.kind.clone()),
                sha256: Set(a.sha256.clone()),
                size: Set(a.size),
                attempt: Set(attempt as i32),
            });
            w.exec(&artifact::Entity::insert_many(rows).into_query())
                .await?;
        }
    }
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

    pub async fn load_run_state(&self, run_id: &str) -> Result<Option<RunState>, AppError> {
        load_run_state(self.conn().await?, run_id).await
    }

    /// The run's state, or `NOT_FOUND`.
    pub async fn run_state(&self, run_id: &str) -> Result<RunState, AppError> {
        self.load_run_state(run_id)
            .await?
            .ok_or_else(|| AppError::not_found("run", run_id))
    }
}
