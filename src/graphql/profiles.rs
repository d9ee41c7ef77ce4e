//! Profiles and plan preview.

use super::inputs::{overrides, SkillOverrideInput};
use super::services;
use super::types::{RetryPolicy, SkillOverride};
use crate::domain::profiles::{PlanSnapshot, StageDef};
use async_graphql::{Context, Object, Result, SimpleObject};

#[derive(SimpleObject)]
pub struct ProfileStage {
    pub key: String,
    pub skills: Vec<String>,
    pub approval_required: bool,
    pub retry_policy: RetryPolicy,
    pub timeout_seconds: f64,
}

impl From<&StageDef> for ProfileStage {
    fn from(s: &StageDef) -> Self {
        ProfileStage {
            key: s.key.clone(),
            skills: s.skills.clone(),
            approval_required: s.approval_required,
            retry_policy: RetryPolicy {
                max_attempts: s.retry_policy.max_attempts as i32,
                backoff_seconds: s.retry_policy.backoff_seconds,
            },
            timeout_seconds: s.timeout_seconds,
        }
    }
}

#[derive(SimpleObject)]
pub struct WorkflowProfile {
    pub mode: String,
    pub description: String,
    pub stages: Vec<ProfileStage>,
}

#[derive(SimpleObject)]
pub struct WorkflowProfiles {
    pub version: String,
    pub foundation_mode: String,
    pub force_foundation_fallback: bool,
    /// Sorted by mode.
    pub profiles: Vec<WorkflowProfile>,
}

/// A resolved plan (what a run started now would execute).
#[derive(SimpleObject)]
pub struct WorkflowPlan {
    pub requested_mode: String,
    pub effective_mode: String,
    pub fallback_applied: bool,
    pub profile_version: String,
    pub profile_digest: String,
    pub description: String,
    pub skill_overrides: Vec<SkillOverride>,
    pub stages: Vec<ProfileStage>,
}

impl From<PlanSnapshot> for WorkflowPlan {
    fn from(p: PlanSnapshot) -> Self {
        WorkflowPlan {
            stages: p.stages.iter().map(ProfileStage::from).collect(),
            skill_overrides: p
                .skill_overrides
                .into_iter()
                .map(|(stage_key, skills)| SkillOverride { stage_key, skills })
                .collect(),
            requested_mode: p.requested_mode,
            effective_mode: p.effective_mode,
            fallback_applied: p.fallback_applied,
            profile_version: p.profile_version,
            profile_digest: p.profile_digest,
            description: p.description,
        }
    }
}

#[derive(Default)]
pub struct ProfileQuery;

#[Object]
impl ProfileQuery {
    async fn workflow_profiles(&self, ctx: &Context<'_>) -> WorkflowProfiles {
        let s = services(ctx);
        WorkflowProfiles {
            version: s.profiles.version.clone(),
            foundation_mode: s.settings.foundation_mode.clone(),
            force_foundation_fallback: s.settings.force_foundation_fallback,
            profiles: s
                .profiles
                .profiles
                .iter()
                .map(|p| WorkflowProfile {
                    mode: p.mode.clone(),
                    description: p.description.clone(),
                    stages: p.stages.iter().map(ProfileStage::from).collect(),
                })
                .collect(),
        }
    }

    /// Resolve a mode and overrides without starting anything.
    async fn preview_workflow_run(
        &self,
        ctx: &Context<'_>,
        mode: String,
        skill_overrides: Option<Vec<SkillOverrideInput>>,
    ) -> Result<WorkflowPlan> {
        let plan = services(ctx).preview(&mode, &overrides(skill_overrides)?)?;
        Ok(plan.into())
    }
}
