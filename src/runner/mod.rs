//! Stage execution: the runner trait, the default Foundation runner, fault injection, artifacts.

pub mod artifacts;
pub mod faults;
pub mod foundation;

use futures::future::BoxFuture;

/// Everything a runner may know about the attempt it executes.
#[derive(Debug, Clone)]
pub struct StageContext {
    pub run_id: String,
    pub thread_id: String,
    pub project_id: String,
    pub brand_id: String,
    pub stage_key: String,
    pub position: i32,
    pub attempt: u32,
    pub skills: Vec<String>,
    pub requested_mode: String,
    pub effective_mode: String,
    pub fallback_applied: bool,
    pub request_text: String,
    /// Stage keys of the run, in order, and which of them are completed.
    pub stage_keys: Vec<String>,
    pub completed_stages: Vec<String>,
}

impl StageContext {
    /// The context of attempt `attempt` of `stage` of the run `state`.
    pub fn for_attempt(
        state: &crate::domain::run::RunState,
        stage: &crate::domain::run::Stage,
        attempt: u32,
    ) -> StageContext {
        StageContext {
            run_id: state.run.id.clone(),
            thread_id: state.run.thread_id.clone(),
            project_id: state.run.project_id.clone(),
            brand_id: state.run.brand_id.clone(),
            stage_key: stage.key.clone(),
            position: stage.position,
            attempt,
            skills: stage.skills.clone(),
            requested_mode: state.run.plan.requested_mode.clone(),
            effective_mode: state.run.plan.effective_mode.clone(),
            fallback_applied: state.run.plan.fallback_applied,
            request_text: state.run.request_text.clone(),
            stage_keys: state.stages.iter().map(|s| s.key.clone()).collect(),
            completed_stages: state
                .stages
                .iter()
                .filter(|s| s.status == crate::domain::run::StageStatus::Completed)
                .map(|s| s.key.clone())
                .collect(),
        }
    }
}

impl StageContext {
    /// Per-run isolation key: two runs on one thread never share state.
    pub fn isolation_key(&self) -> String {
        format!("{}--{}", self.thread_id, self.run_id)
    }
}

/// A successful attempt: a summary and the artifacts it produced (path → content).
#[derive(Debug, Clone, PartialEq)]
pub struct StageOutput {
    pub summary: String,
    pub pipeline_status: String,
    pub artifacts: Vec<(String, String)>,
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct StageError {
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

pub const STAGE_EXECUTION_ERROR: &str = "STAGE_EXECUTION_ERROR";
pub const STAGE_TIMEOUT: &str = "STAGE_TIMEOUT";
pub const ARTIFACT_WRITE_ERROR: &str = "ARTIFACT_WRITE_ERROR";

/// Executes one stage attempt. Implementations must be safe to call for many runs at once.
pub trait StageRunner: Send + Sync {
    fn name(&self) -> &'static str;
    fn execute<'a>(
        &'a self,
        ctx: &'a StageContext,
    ) -> BoxFuture<'a, Result<StageOutput, StageError>>;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A stage context for tests: stage `key` (position 1, attempt 1) of run `run`.
    pub(crate) fn context(run: &str, key: &str) -> StageContext {
        StageContext {
            run_id: run.into(),
            thread_id: "t-shared".into(),
            project_id: "p".into(),
            brand_id: "b".into(),
            stage_key: key.into(),
            position: 1,
            attempt: 1,
            skills: vec!["03-strategy/x".into()],
            requested_mode: "content_calendar".into(),
            effective_mode: "foundation_stack".into(),
            fallback_applied: true,
            request_text: "CRM for clinics".into(),
            stage_keys: ["research", "brand-voice", "positioning", "keywords"]
                .map(String::from)
                .to_vec(),
            completed_stages: ["research", "brand-voice", "positioning"]
                .map(String::from)
                .to_vec(),
        }
    }
}
