//! Brands, projects, threads: queries and mutations.

use super::types::{after_seq, connection, Brand, Project, Task, Thread};
use super::{caller, inputs::page_size, services};
use crate::error::AppError;
use crate::service::workspace as cmd;
use async_graphql::connection::Connection;
use async_graphql::{Context, InputObject, MaybeUndefined, Object, Result, SimpleObject, ID};

#[derive(Default)]
pub struct WorkspaceQuery;

#[Object]
impl WorkspaceQuery {
    async fn brands(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Connection<String, Brand>> {
        let first = page_size(first)?;
        let has_prev = after.is_some();
        let page = services(ctx).store.brands(after_seq(after)?, first).await?;
        Ok(connection(page, |b| b.created_seq, Brand, has_prev))
    }

    async fn brand(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Brand>> {
        Ok(services(ctx).store.brand(&id).await?.map(Brand))
    }

    async fn project(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Project>> {
        Ok(services(ctx).store.project(&id).await?.map(Project))
    }

    async fn thread(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Thread>> {
        Ok(services(ctx).store.thread(&id).await?.map(Thread))
    }
}

#[derive(InputObject)]
pub struct CreateBrandInput {
    /// Optional client-chosen id (`[A-Za-z0-9_-]{1,64}`); generated (`b-…`) when absent.
    pub brand_id: Option<ID>,
    pub name: String,
    pub idempotency_key: Option<String>,
}

#[derive(InputObject)]
pub struct UpdateBrandInput {
    pub brand_id: ID,
    pub name: String,
    pub idempotency_key: Option<String>,
}

#[derive(InputObject)]
pub struct CreateProjectInput {
    pub project_id: Option<ID>,
    pub brand_id: ID,
    pub name: String,
    pub objective: Option<String>,
    pub channels: Option<Vec<String>>,
    /// `YYYY-MM-DD`.
    pub due_date: Option<String>,
    pub idempotency_key: Option<String>,
}

#[derive(InputObject)]
pub struct UpdateProjectInput {
    pub project_id: ID,
    pub name: Option<String>,
    pub objective: Option<String>,
    pub channels: Option<Vec<String>>,
    /// `YYYY-MM-DD`; `null` clears it, absent keeps it.
    pub due_date: MaybeUndefined<String>,
    pub idempotency_key: Option<String>,
}

#[derive(InputObject)]
pub struct CreateThreadInput {
    pub thread_id: Option<ID>,
    pub project_id: ID,
    pub title: String,
    pub modes: Option<Vec<String>>,
    pub idempotency_key: Option<String>,
}

#[derive(InputObject)]
pub struct RenameThreadInput {
    pub thread_id: ID,
    pub title: String,
    pub idempotency_key: Option<String>,
}

#[derive(InputObject)]
pub struct ThreadModeInput {
    pub thread_id: ID,
    pub mode: String,
    pub idempotency_key: Option<String>,
}

#[derive(InputObject)]
pub struct CompleteTaskInput {
    pub task_id: ID,
    pub idempotency_key: Option<String>,
}

#[derive(SimpleObject)]
pub struct BrandPayload {
    pub brand: Brand,
}

#[derive(SimpleObject)]
pub struct ProjectPayload {
    pub project: Project,
}

#[derive(SimpleObject)]
pub struct ThreadPayload {
    pub thread: Thread,
}

#[derive(SimpleObject)]
pub struct CompleteTaskPayload {
    pub task: Task,
}

#[derive(Default)]
pub struct WorkspaceMutation;

#[Object]
impl WorkspaceMutation {
    async fn create_brand(
        &self,
        ctx: &Context<'_>,
        input: CreateBrandInput,
    ) -> Result<BrandPayload> {
        let c = cmd::CreateBrand {
            brand_id: input.brand_id.map(|i| i.0),
            name: input.name,
        };
        let row = services(ctx)
            .create_brand(&caller(ctx), c, input.idempotency_key)
            .await?;
        Ok(BrandPayload { brand: Brand(row) })
    }

    async fn update_brand(
        &self,
        ctx: &Context<'_>,
        input: UpdateBrandInput,
    ) -> Result<BrandPayload> {
        let c = cmd::UpdateBrand {
            brand_id: input.brand_id.0,
            name: input.name,
        };
        let row = services(ctx)
            .update_brand(&caller(ctx), c, input.idempotency_key)
            .await?;
        Ok(BrandPayload { brand: Brand(row) })
    }

    async fn create_project(
        &self,
        ctx: &Context<'_>,
        input: CreateProjectInput,
    ) -> Result<ProjectPayload> {
        let c = cmd::CreateProject {
            project_id: input.project_id.map(|i| i.0),
            brand_id: input.brand_id.0,
            name: input.name,
            objective: input.objective,
            channels: input.channels,
            due_date: input.due_date,
        };
        let row = services(ctx)
            .create_project(&caller(ctx), c, input.idempotency_key)
            .await?;
        Ok(ProjectPayload {
            project: Project(row),
        })
    }

    async fn update_project(
        &self,
        ctx: &Context<'_>,
        input: UpdateProjectInput,
    ) -> Result<ProjectPayload> {
        let due_date = match input.due_date {
            MaybeUndefined::Undefined => None,
            MaybeUndefined::Null => Some(None),
            MaybeUndefined::Value(v) => Some(Some(v)),
        };
        let c = cmd::UpdateProject {
            project_id: input.project_id.0,
            name: input.name,
            objective: input.objective,
            channels: input.channels,
            due_date,
        };
        let row = services(ctx)
            .update_project(&caller(ctx), c, input.idempotency_key)
            .await?;
        Ok(ProjectPayload {
            project: Project(row),
        })
    }

    async fn create_thread(
        &self,
        ctx: &Context<'_>,
        input: CreateThreadInput,
    ) -> Result<ThreadPayload> {
        let c = cmd::CreateThread {
            thread_id: input.thread_id.map(|i| i.0),
            project_id: input.project_id.0,
            title: input.title,
            modes: input.modes,
        };
        let row = services(ctx)
            .create_thread(&caller(ctx), c, input.idempotency_key)
            .await?;
        Ok(ThreadPayload {
            thread: Thread(row),
        })
    }

    async fn rename_thread(
        &self,
        ctx: &Context<'_>,
        input: RenameThreadInput,
    ) -> Result<ThreadPayload> {
        let c = cmd::RenameThread {
            thread_id: input.thread_id.0,
            title: input.title,
        };
        let row = services(ctx)
            .rename_thread(&caller(ctx), c, input.idempotency_key)
            .await?;
        Ok(ThreadPayload {
            thread: Thread(row),
        })
    }

    async fn add_thread_mode(
        &self,
        ctx: &Context<'_>,
        input: ThreadModeInput,
    ) -> Result<ThreadPayload> {
        let c = cmd::ThreadMode {
            thread_id: input.thread_id.0,
            mode: input.mode,
        };
        let row = services(ctx)
            .add_thread_mode(&caller(ctx), c, input.idempotency_key)
            .await?;
        Ok(ThreadPayload {
            thread: Thread(row),
        })
    }

    async fn remove_thread_mode(
        &self,
        ctx: &Context<'_>,
        input: ThreadModeInput,
    ) -> Result<ThreadPayload> {
        let c = cmd::ThreadMode {
            thread_id: input.thread_id.0,
            mode: input.mode,
        };
        let row = services(ctx)
            .remove_thread_mode(&caller(ctx), c, input.idempotency_key)
            .await?;
        Ok(ThreadPayload {
            thread: Thread(row),
        })
    }

    async fn complete_task(
        &self,
        ctx: &Context<'_>,
        input: CompleteTaskInput,
    ) -> Result<CompleteTaskPayload> {
        let s = services(ctx);
        s.complete_task(&caller(ctx), &input.task_id, input.idempotency_key)
            .await?;
        let task = s
            .store
            .task(&input.task_id)
            .await?
            .ok_or_else(|| AppError::not_found("task", &input.task_id))?;
        Ok(CompleteTaskPayload { task: Task(task) })
    }
}
