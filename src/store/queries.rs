//! Read-model queries. Lists are ordered by the creating event's sequence and paged by it.

use super::entities::{
    approval, artifact, brand, project, run, stage, task, thread, timeline_item,
};
use super::projector::{
    approval_from_model, parse_list, run_from_model, stage_from_model, task_from_model,
};
use super::{ArtifactRow, BrandRow, Page, ProjectRow, Store, ThreadRow, TimelineRow};
use crate::domain::run::{Approval, Run, RunState, RunStatus, Stage, Task};
use crate::error::AppError;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Select};

fn brand_row(m: brand::Model) -> BrandRow {
    BrandRow {
        id: m.id,
        name: m.name,
        version: m.version,
        created_seq: m.created_seq,
        created_at: m.created_at,
        updated_at: m.updated_at,
    }
}

fn project_row(m: project::Model) -> ProjectRow {
    ProjectRow {
        channels: parse_list(&m.channels),
        id: m.id,
        brand_id: m.brand_id,
        name: m.name,
        objective: m.objective,
        due_date: m.due_date,
        version: m.version,
        created_seq: m.created_seq,
        created_at: m.created_at,
        updated_at: m.updated_at,
    }
}

fn thread_row(m: thread::Model) -> ThreadRow {
    ThreadRow {
        modes: parse_list(&m.modes),
        id: m.id,
        project_id: m.project_id,
        brand_id: m.brand_id,
        title: m.title,
        status: m.status,
        version: m.version,
        created_seq: m.created_seq,
        created_at: m.created_at,
        updated_at: m.updated_at,
        last_activity_at: m.last_activity_at,
    }
}

fn timeline_row(m: timeline_item::Model) -> TimelineRow {
    TimelineRow {
        sequence: m.sequence,
        thread_id: m.thread_id,
        event_id: m.event_id,
        event_type: m.event_type,
        actor_type: m.actor_type,
        actor_id: m.actor_id,
        run_id: m.run_id,
        occurred_at: m.occurred_at,
    }
}

/// Fetch `first + 1` rows to know whether another page follows.
async fn page<E, T>(
    store: &Store,
    query: Select<E>,
    first: u64,
    map: impl Fn(E::Model) -> Result<T, AppError>,
) -> Result<Page<T>, AppError>
where
    E: EntityTrait,
    E::Model: Sync,
{
    let mut rows = query.limit(first + 1).all(store.conn()).await?;
    let has_next = rows.len() as u64 > first;
    rows.truncate(first as usize);
    let items = rows.into_iter().map(map).collect::<Result<_, _>>()?;
    Ok(Page { items, has_next })
}

impl Store {
    pub async fn brand(&self, id: &str) -> Result<Option<BrandRow>, AppError> {
        Ok(brand::Entity::find_by_id(id.to_string())
            .one(self.conn())
            .await?
            .map(brand_row))
    }

    pub async fn brands(&self, after: i64, first: u64) -> Result<Page<BrandRow>, AppError> {
        let q = brand::Entity::find()
            .filter(brand::Column::CreatedSeq.gt(after))
            .order_by_asc(brand::Column::CreatedSeq);
        page(self, q, first, |m| Ok(brand_row(m))).await
    }

    pub async fn project(&self, id: &str) -> Result<Option<ProjectRow>, AppError> {
        Ok(project::Entity::find_by_id(id.to_string())
            .one(self.conn())
            .await?
            .map(project_row))
    }

    pub async fn projects(
        &self,
        brand_id: &str,
        after: i64,
        first: u64,
    ) -> Result<Page<ProjectRow>, AppError> {
        let q = project::Entity::find()
            .filter(project::Column::BrandId.eq(brand_id))
            .filter(project::Column::CreatedSeq.gt(after))
            .order_by_asc(project::Column::CreatedSeq);
        page(self, q, first, |m| Ok(project_row(m))).await
    }

    pub async fn thread(&self, id: &str) -> Result<Option<ThreadRow>, AppError> {
        Ok(thread::Entity::find_by_id(id.to_string())
            .one(self.conn())
            .await?
            .map(thread_row))
    }

    pub async fn threads(
        &self,
        project_id: &str,
        after: i64,
        first: u64,
    ) -> Result<Page<ThreadRow>, AppError> {
        let q = thread::Entity::find()
            .filter(thread::Column::ProjectId.eq(project_id))
            .filter(thread::Column::CreatedSeq.gt(after))
            .order_by_asc(thread::Column::CreatedSeq);
        page(self, q, first, |m| Ok(thread_row(m))).await
    }

    pub async fn timeline(
        &self,
        thread_id: &str,
        after: i64,
        first: u64,
    ) -> Result<Page<TimelineRow>, AppError> {
        let q = timeline_item::Entity::find()
            .filter(timeline_item::Column::ThreadId.eq(thread_id))
            .filter(timeline_item::Column::Sequence.gt(after))
            .order_by_asc(timeline_item::Column::Sequence);
        page(self, q, first, |m| Ok(timeline_row(m))).await
    }

    pub async fn run(&self, id: &str) -> Result<Option<Run>, AppError> {
        run::Entity::find_by_id(id.to_string())
            .one(self.conn())
            .await?
            .map(run_from_model)
            .transpose()
    }

    pub async fn run_state(&self, id: &str) -> Result<Option<RunState>, AppError> {
        super::projector::load_run_state(self.conn(), id).await
    }

    /// Runs, newest first when `newest_first`, filtered by thread and status.
    pub async fn runs(
        &self,
        thread_id: Option<&str>,
        status: Option<RunStatus>,
        after: Option<i64>,
        first: u64,
    ) -> Result<Page<Run>, AppError> {
        let mut q = run::Entity::find();
        if let Some(t) = thread_id {
            q = q.filter(run::Column::ThreadId.eq(t));
        }
        if let Some(s) = status {
            q = q.filter(run::Column::Status.eq(s.as_str()));
        }
        if let Some(after) = after {
            q = q.filter(run::Column::CreatedSeq.lt(after));
        }
        let q = q.order_by_desc(run::Column::CreatedSeq);
        page(self, q, first, run_from_model).await
    }

    pub async fn stages(&self, run_id: &str) -> Result<Vec<Stage>, AppError> {
        stage::Entity::find()
            .filter(stage::Column::RunId.eq(run_id))
            .order_by_asc(stage::Column::Position)
            .all(self.conn())
            .await?
            .into_iter()
            .map(stage_from_model)
            .collect()
    }

    pub async fn approvals_of_run(&self, run_id: &str) -> Result<Vec<Approval>, AppError> {
        approval::Entity::find()
            .filter(approval::Column::RunId.eq(run_id))
            .order_by_asc(approval::Column::CreatedSeq)
            .all(self.conn())
            .await?
            .into_iter()
            .map(approval_from_model)
            .collect()
    }

    pub async fn approvals_of_thread(
        &self,
        thread_id: &str,
        status: Option<&str>,
    ) -> Result<Vec<Approval>, AppError> {
        let mut q = approval::Entity::find().filter(approval::Column::ThreadId.eq(thread_id));
        if let Some(s) = status {
            q = q.filter(approval::Column::Status.eq(s));
        }
        q.order_by_asc(approval::Column::CreatedSeq)
            .all(self.conn())
            .await?
            .into_iter()
            .map(approval_from_model)
            .collect()
    }

    pub async fn tasks_of_thread(
        &self,
        thread_id: &str,
        status: Option<&str>,
    ) -> Result<Vec<Task>, AppError> {
        let mut q = task::Entity::find().filter(task::Column::ThreadId.eq(thread_id));
        if let Some(s) = status {
            q = q.filter(task::Column::Status.eq(s));
        }
        q.order_by_asc(task::Column::CreatedSeq)
            .all(self.conn())
            .await?
            .into_iter()
            .map(task_from_model)
            .collect()
    }

    pub async fn task(&self, task_id: &str) -> Result<Option<Task>, AppError> {
        task::Entity::find_by_id(task_id.to_string())
            .one(self.conn())
            .await?
            .map(task_from_model)
            .transpose()
    }

    pub async fn artifacts(
        &self,
        run_id: &str,
        stage_key: &str,
    ) -> Result<Vec<ArtifactRow>, AppError> {
        Ok(artifact::Entity::find()
            .filter(artifact::Column::RunId.eq(run_id))
            .filter(artifact::Column::StageKey.eq(stage_key))
            .order_by_asc(artifact::Column::Path)
            .all(self.conn())
            .await?
            .into_iter()
            .map(|m| ArtifactRow {
                run_id: m.run_id,
                stage_key: m.stage_key,
                path: m.path,
                kind: m.kind,
                sha256: m.sha256,
                size: m.size,
                attempt: m.attempt,
            })
            .collect())
    }

    pub async fn read_events(
        &self,
        after: i64,
        filter: &super::EventFilter,
        limit: u64,
    ) -> Result<Vec<crate::domain::events::StoredEvent>, AppError> {
        super::event_log::read_after(self.conn(), after, filter, limit).await
    }

    pub async fn head_sequence(&self) -> Result<i64, AppError> {
        super::event_log::head(self.conn()).await
    }
}
