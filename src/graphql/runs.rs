//! Workflow runs: queries and mutations.

use super::inputs::{overrides, SkillOverrideInput};
use super::types::{runs_connection, Approval, RunStatus, WorkflowRun};
use super::{caller, services};
use crate::error::AppError;
use crate::service::runs::{GateDecision, RunOutcome, StartRun};
use crate::service::Services;
use async_graphql::connection::Connection;
use async_graphql::{Context, InputObject, Object, Result, SimpleObject, ID};

#[derive(Default)]
pub struct RunQuery;

#[Object]
impl RunQuery {
    async fn workflow_run(&self, ctx: &Context<'_>, id: ID) -> Result<Option<WorkflowRun>> {
        Ok(services(ctx).store.run(&id).await?.map(WorkflowRun))
    }

    /// Runs, newest first, optionally of one thread and in one status.
    async fn workflow_runs(
        &self,
        ctx: &Context<'_>,
        thread_id: Option<ID>,
        status: Option<RunStatus>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Connection<String, WorkflowRun>> {
        runs_connection(
            ctx,
            thread_id.as_ref().map(|i| i.as_str()),
            status,
            first,
            after,
        )
        .await
    }
}

#[derive(InputObject)]
pub struct StartWorkflowRunInput {
    pub thread_id: ID,
    pub request_text: String,
    /// The requested mode; resolved against the profiles (it may fall back).
    pub mode: String,
    pub skill_overrides: Option<Vec<SkillOverrideInput>>,
    pub idempotency_key: Option<String>,
}

#[derive(InputObject)]
pub struct ApproveWorkflowRunInput {
    pub run_id: ID,
    /// The gate to approve; default: the gate the run waits at. A later gate may be approved early.
    pub stage_key: Option<String>,
    pub comment: Option<String>,
    pub idempotency_key: Option<String>,
}

#[derive(InputObject)]
pub struct RejectWorkflowRunInput {
    pub run_id: ID,
    pub stage_key: Option<String>,
    pub comment: Option<String>,
    pub idempotency_key: Option<String>,
}

#[derive(InputObject)]
pub struct ResumeWorkflowRunInput {
    pub run_id: ID,
    pub idempotency_key: Option<String>,
}

#[derive(InputObject)]
pub struct CancelWorkflowRunInput {
    pub run_id: ID,
    pub reason: Option<String>,
    pub idempotency_key: Option<String>,
}

#[derive(SimpleObject)]
pub struct StartWorkflowRunPayload {
    pub run: WorkflowRun,
}

#[derive(SimpleObject)]
pub struct ApproveWorkflowRunPayload {
    pub run: WorkflowRun,
    pub approval: Option<Approval>,
    /// True when this approval moved the run from its gate back to the workers.
    pub resume_applied: bool,
}

#[derive(SimpleObject)]
pub struct RejectWorkflowRunPayload {
    pub run: WorkflowRun,
    pub approval: Option<Approval>,
}

#[derive(SimpleObject)]
pub struct ResumeWorkflowRunPayload {
    pub run: WorkflowRun,
    /// False when nothing changed (terminal run, or waiting at a gate not granted yet).
    pub resume_applied: bool,
}

#[derive(SimpleObject)]
pub struct CancelWorkflowRunPayload {
    pub run: WorkflowRun,
}

async fn load_run(s: &Services, outcome: &RunOutcome) -> Result<WorkflowRun, AppError> {
    if let Some(state) = &outcome.state {
        return Ok(WorkflowRun(state.run.clone()));
    }
    s.store
        .run(&outcome.run_id)
        .await?
        .map(WorkflowRun)
        .ok_or_else(|| AppError::not_found("run", &outcome.run_id))
}

/// The approval of the gate a decision was about (`stage_key`, else the gate the run waited at).
async fn gate_approval(
    s: &Services,
    outcome: &RunOutcome,
    stage_key: Option<&str>,
) -> Result<Option<Approval>, AppError> {
    let key = stage_key.or(outcome.gate.as_deref());
    let approvals = match &outcome.state {
        Some(state) => state.approvals.clone(),
        None => s.store.approvals_of_run(&outcome.run_id).await?,
    };
    Ok(approvals
        .into_iter()
        .find(|a| Some(a.stage_key.as_str()) == key)
        .map(Approval))
}

#[derive(Default)]
pub struct RunMutation;

#[Object]
impl RunMutation {
    /// Queue a run; it returns at once and the runtime executes it in the background.
    async fn start_workflow_run(
        &self,
        ctx: &Context<'_>,
        input: StartWorkflowRunInput,
    ) -> Result<StartWorkflowRunPayload> {
        let s = services(ctx);
        let c = StartRun {
            thread_id: input.thread_id.0,
            request_text: input.request_text,
            mode: input.mode,
            skill_overrides: overrides(input.skill_overrides)?,
        };
        let outcome = s.start_run(&caller(ctx), c, input.idempotency_key).await?;
        Ok(StartWorkflowRunPayload {
            run: load_run(s, &outcome).await?,
        })
    }

    /// Grant a gate; a run waiting at it resumes by itself.
    async fn approve_workflow_run(
        &self,
        ctx: &Context<'_>,
        input: ApproveWorkflowRunInput,
    ) -> Result<ApproveWorkflowRunPayload> {
        let s = services(ctx);
        let stage_key = input.stage_key.clone();
        let c = GateDecision {
            run_id: input.run_id.0,
            stage_key: input.stage_key,
            comment: input.comment,
        };
        let outcome = s
            .approve_run(&caller(ctx), c, input.idempotency_key)
            .await?;
        let run = load_run(s, &outcome).await?;
        let approval = gate_approval(s, &outcome, stage_key.as_deref()).await?;
        Ok(ApproveWorkflowRunPayload {
            run,
            approval,
            resume_applied: outcome.resume_applied,
        })
    }

    /// Reject the gate the run waits at: the stage and the run fail with `APPROVAL_REJECTED`.
    async fn reject_workflow_run(
        &self,
        ctx: &Context<'_>,
        input: RejectWorkflowRunInput,
    ) -> Result<RejectWorkflowRunPayload> {
        let s = services(ctx);
        let stage_key = input.stage_key.clone();
        let c = GateDecision {
            run_id: input.run_id.0,
            stage_key: input.stage_key,
            comment: input.comment,
        };
        let outcome = s.reject_run(&caller(ctx), c, input.idempotency_key).await?;
        let run = load_run(s, &outcome).await?;
        let approval = gate_approval(s, &outcome, stage_key.as_deref()).await?;
        Ok(RejectWorkflowRunPayload { run, approval })
    }

    /// Idempotent safety control: resumes only a run waiting at an already granted gate.
    async fn resume_workflow_run(
        &self,
        ctx: &Context<'_>,
        input: ResumeWorkflowRunInput,
    ) -> Result<ResumeWorkflowRunPayload> {
        let s = services(ctx);
        let outcome = s
            .resume_run(&caller(ctx), &input.run_id, input.idempotency_key)
            .await?;
        Ok(ResumeWorkflowRunPayload {
            run: load_run(s, &outcome).await?,
            resume_applied: outcome.resume_applied,
        })
    }

    /// Cancel a run that is not finished; an attempt in flight is abandoned.
    async fn cancel_workflow_run(
        &self,
        ctx: &Context<'_>,
        input: CancelWorkflowRunInput,
    ) -> Result<CancelWorkflowRunPayload> {
        let s = services(ctx);
        let outcome = s
            .cancel_run(
                &caller(ctx),
                &input.run_id,
                input.reason,
                input.idempotency_key,
            )
            .await?;
        Ok(CancelWorkflowRunPayload {
            run: load_run(s, &outcome).await?,
        })
    }
}
