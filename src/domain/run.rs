//! The workflow run aggregate: its state, how events change it (`apply`), and what a command or a
//! runtime step produces (`decide`-style functions). Pure: no IO.

use super::events::{ArtifactMeta, DomainEvent, StoredEvent};
use super::ids;
use super::profiles::PlanSnapshot;
use crate::error::AppError;

macro_rules! status_enum {
    ($name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }
        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }
    };
}

status_enum!(RunStatus { Queued => "queued", Running => "running", WaitingApproval => "waiting_approval",
    Completed => "completed", Failed => "failed", Canceled => "canceled" });
status_enum!(StageStatus { Pending => "pending", Running => "running", WaitingApproval => "waiting_approval",
    Completed => "completed", Failed => "failed", Canceled => "canceled" });
status_enum!(ApprovalStatus { Pending => "pending", Granted => "granted", Rejected => "rejected", Canceled => "canceled" });
status_enum!(TaskStatus { Open => "open", Completed => "completed", Canceled => "canceled" });

impl DomainEvent {
    /// The run status change this event records: (from, to, stage).
    pub fn status_transition(&self) -> Option<(RunStatus, RunStatus, Option<&str>)> {
        use DomainEvent::*;
        use RunStatus::*;
        let parse = |s: &str| RunStatus::parse(s).unwrap_or(Running);
        match self {
            WorkflowRunStarted { .. } => Some((Queued, Running, None)),
            WorkflowRunWaitingApproval { stage_key, .. } => {
                Some((Running, WaitingApproval, Some(stage_key)))
            }
            WorkflowRunResumed { stage_key, .. } => {
                Some((WaitingApproval, Running, stage_key.as_deref()))
            }
            WorkflowRunCompleted { .. } => Some((Running, Completed, None)),
            WorkflowRunFailed {
                stage_key,
                from_status,
                ..
            } => Some((parse(from_status), Failed, stage_key.as_deref())),
            WorkflowRunCanceled { from_status, .. } => Some((parse(from_status), Canceled, None)),
            _ => None,
        }
    }
}

impl RunStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Canceled
        )
    }

    /// Statuses a worker may claim.
    pub fn is_runnable(self) -> bool {
        matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

pub const APPROVAL_REJECTED: &str = "APPROVAL_REJECTED";

#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub id: String,
    pub thread_id: String,
    pub project_id: String,
    pub brand_id: String,
    pub status: RunStatus,
    pub request_text: String,
    /// Immutable once the run is queued, so every copy of the run's state shares it (a copy is
    /// taken at each step, and at each write and read of the run cache).
    pub plan: std::sync::Arc<PlanSnapshot>,
    pub current_stage: Option<String>,
    pub version: i64,
    pub created_seq: i64,
    pub correlation_id: String,
    pub last_event_id: String,
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub run_id: String,
    pub position: i32,
    pub key: String,
    pub status: StageStatus,
    pub skills: Vec<String>,
    pub approval_required: bool,
    pub max_attempts: u32,
    pub backoff_seconds: f64,
    pub timeout_seconds: f64,
    pub attempts: u32,
    pub failures: u32,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub retryable: bool,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Approval {
    pub id: String,
    pub run_id: String,
    pub thread_id: String,
    pub stage_key: String,
    pub status: ApprovalStatus,
    pub reason: String,
    pub required_role: String,
    pub decided_by: Option<String>,
    pub comment: Option<String>,
    pub requested_at: Option<String>,
    pub decided_at: Option<String>,
    pub created_seq: i64,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: String,
    pub run_id: String,
    pub thread_id: String,
    pub stage_key: String,
    pub title: String,
    pub status: TaskStatus,
    pub created_seq: i64,
    pub updated_at: String,
}

/// A run with everything that belongs to it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunState {
    pub run: Run,
    pub stages: Vec<Stage>,
    pub approvals: Vec<Approval>,
    pub tasks: Vec<Task>,
}

/// What the runtime should do next with a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Queued: record that it started.
    Start,
    /// Run this stage's next attempt.
    Execute { stage_key: String, attempt: u32 },
    /// Stop at this stage's gate until it is approved.
    Gate { stage_key: String },
    /// Every stage is done.
    Complete,
    /// Nothing to do: waiting for an approval, or terminal.
    Idle,
}

/// Outcome of a stage attempt, as the runner reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct StageFailure {
    pub error_code: String,
    pub error_message: String,
    pub retryable: bool,
}

fn stale(msg: impl Into<String>) -> AppError {
    AppError::Conflict(msg.into())
}

impl RunState {
    /// The state a `WorkflowRunQueued` event creates.
    pub fn from_queued(ev: &StoredEvent) -> Option<RunState> {
        let DomainEvent::WorkflowRunQueued {
            run_id,
            thread_id,
            project_id,
            brand_id,
            request_text,
            plan,
        } = &ev.body
        else {
            return None;
        };
        let stages = plan
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| Stage {
                run_id: run_id.clone(),
                position: i as i32 + 1,
                key: s.key.clone(),
                status: StageStatus::Pending,
                skills: s.skills.clone(),
                approval_required: s.approval_required,
                max_attempts: s.retry_policy.max_attempts,
                backoff_seconds: s.retry_policy.backoff_seconds,
                timeout_seconds: s.timeout_seconds,
                attempts: 0,
                failures: 0,
                error_code: None,
                error_message: None,
                retryable: false,
                started_at: None,
                finished_at: None,
            })
            .collect();
        Some(RunState {
            run: Run {
                id: run_id.clone(),
                thread_id: thread_id.clone(),
                project_id: project_id.clone(),
                brand_id: brand_id.clone(),
                status: RunStatus::Queued,
                request_text: request_text.clone(),
                plan: std::sync::Arc::new(plan.clone()),
                current_stage: None,
                version: ev.stream_version,
                created_seq: ev.sequence,
                correlation_id: ev
                    .correlation_id
                    .clone()
                    .unwrap_or_else(|| ev.event_id.clone()),
                last_event_id: ev.event_id.clone(),
                created_at: ev.occurred_at.clone(),
                updated_at: ev.occurred_at.clone(),
                started_at: None,
                finished_at: None,
            },
            stages,
            approvals: Vec::new(),
            tasks: Vec::new(),
        })
    }

    pub fn stage(&self, key: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.key == key)
    }

    fn stage_mut(&mut self, key: &str) -> Option<&mut Stage> {
        self.stages.iter_mut().find(|s| s.key == key)
    }

    pub fn approval_for(&self, stage_key: &str) -> Option<&Approval> {
        self.approvals.iter().find(|a| a.stage_key == stage_key)
    }

    fn gate_granted(&self, stage_key: &str) -> bool {
        self.approval_for(stage_key)
            .is_some_and(|a| a.status == ApprovalStatus::Granted)
    }

    fn upsert_approval(
        &mut self,
        ev: &StoredEvent,
        approval_id: &str,
        stage_key: &str,
    ) -> &mut Approval {
        if let Some(i) = self.approvals.iter().position(|a| a.id == approval_id) {
            return &mut self.approvals[i];
        }
        self.approvals.push(Approval {
            id: approval_id.to_string(),
            run_id: self.run.id.clone(),
            thread_id: self.run.thread_id.clone(),
            stage_key: stage_key.to_string(),
            status: ApprovalStatus::Pending,
            reason: format!("workflow_gate:{}:{}", self.run.id, stage_key),
            required_role: "editor".into(),
            decided_by: None,
            comment: None,
            requested_at: None,
            decided_at: None,
            created_seq: ev.sequence,
            updated_at: ev.occurred_at.clone(),
        });
        let last = self.approvals.len() - 1;
        &mut self.approvals[last]
    }

    /// Fold one event of this run's stream into the state.
    pub fn apply(&mut self, ev: &StoredEvent) {
        let at = ev.occurred_at.clone();
        self.run.version = ev.stream_version;
        self.run.updated_at = at.clone();
        self.run.last_event_id = ev.event_id.clone();
        use DomainEvent::*;
        match &ev.body {
            WorkflowRunStarted { .. } => {
                self.run.status = RunStatus::Running;
                self.run.started_at = Some(at);
            }
            WorkflowRunStageStarted {
                stage_key, attempt, ..
            } => {
                self.run.current_stage = Some(stage_key.clone());
                if let Some(s) = self.stage_mut(stage_key) {
                    s.status = StageStatus::Running;
                    s.attempts = *attempt;
                    s.started_at = Some(at);
                    s.finished_at = None;
                }
            }
            WorkflowRunStageCompleted { stage_key, .. } => {
                if let Some(s) = self.stage_mut(stage_key) {
                    s.status = StageStatus::Completed;
                    s.finished_at = Some(at);
                }
            }
            WorkflowRunStageFailed {
                stage_key,
                error_code,
                error_message,
                retryable,
                will_retry,
                ..
            } => {
                if let Some(s) = self.stage_mut(stage_key) {
                    s.failures += 1;
                    s.error_code = Some(error_code.clone());
                    s.error_message = Some(error_message.clone());
                    s.retryable = *retryable;
                    if *will_retry {
                        s.status = StageStatus::Running;
                    } else {
                        s.status = StageStatus::Failed;
                        s.finished_at = Some(at);
                    }
                }
            }
            WorkflowRunWaitingApproval { stage_key, .. } => {
                self.run.status = RunStatus::WaitingApproval;
                self.run.current_stage = Some(stage_key.clone());
                if let Some(s) = self.stage_mut(stage_key) {
                    s.status = StageStatus::WaitingApproval;
                }
            }
            TaskCreated {
                task_id,
                stage_key,
                title,
                ..
            } => {
                if !self.tasks.iter().any(|t| &t.id == task_id) {
                    self.tasks.push(Task {
                        id: task_id.clone(),
                        run_id: self.run.id.clone(),
                        thread_id: self.run.thread_id.clone(),
                        stage_key: stage_key.clone(),
                        title: title.clone(),
                        status: TaskStatus::Open,
                        created_seq: ev.sequence,
                        updated_at: at,
                    });
                }
            }
            ApprovalRequested {
                approval_id,
                stage_key,
                reason,
                required_role,
                ..
            } => {
                let a = self.upsert_approval(ev, approval_id, stage_key);
                a.reason = reason.clone();
                a.required_role = required_role.clone();
                a.requested_at = Some(at.clone());
                a.updated_at = at;
            }
            ApprovalGranted {
                approval_id,
                stage_key,
                granted_by,
                comment,
                ..
            } => {
                let a = self.upsert_approval(ev, approval_id, stage_key);
                a.status = ApprovalStatus::Granted;
                a.decided_by = Some(granted_by.clone());
                a.comment = comment.clone();
                a.decided_at = Some(at.clone());
                a.updated_at = at;
            }
            ApprovalRejected {
                approval_id,
                stage_key,
                rejected_by,
                comment,
                ..
            } => {
                let a = self.upsert_approval(ev, approval_id, stage_key);
                a.status = ApprovalStatus::Rejected;
                a.decided_by = Some(rejected_by.clone());
                a.comment = comment.clone();
                a.decided_at = Some(at.clone());
                a.updated_at = at;
            }
            TaskCompleted { task_id, .. } => {
                if let Some(t) = self.tasks.iter_mut().find(|t| &t.id == task_id) {
                    t.status = TaskStatus::Completed;
                    t.updated_at = at;
                }
            }
            WorkflowRunResumed { stage_key, .. } => {
                self.run.status = RunStatus::Running;
                if let Some(s) = stage_key.as_deref().and_then(|k| self.stage_mut(k)) {
                    if s.status == StageStatus::WaitingApproval {
                        s.status = StageStatus::Pending;
                    }
                }
            }
            WorkflowRunFailed { .. } => {
                self.run.status = RunStatus::Failed;
                self.run.finished_at = Some(at);
            }
            WorkflowRunCompleted { .. } => {
                self.run.status = RunStatus::Completed;
                self.run.current_stage = None;
                self.run.finished_at = Some(at);
            }
            WorkflowRunCanceled { .. } => {
                self.run.status = RunStatus::Canceled;
                self.run.finished_at = Some(at.clone());
                for s in &mut self.stages {
                    if !matches!(s.status, StageStatus::Completed | StageStatus::Failed) {
                        s.status = StageStatus::Canceled;
                    }
                }
                for a in &mut self.approvals {
                    if a.status == ApprovalStatus::Pending {
                        a.status = ApprovalStatus::Canceled;
                        a.updated_at = at.clone();
                    }
                }
                for t in &mut self.tasks {
                    if t.status == TaskStatus::Open {
                        t.status = TaskStatus::Canceled;
                        t.updated_at = at.clone();
                    }
                }
            }
            // Workspace events and the queue event do not touch an existing run.
            WorkflowRunQueued { .. }
            | BrandCreated { .. }
            | BrandUpdated { .. }
            | ProjectCreated { .. }
            | ProjectUpdated { .. }
            | ThreadCreated { .. }
            | ThreadRenamed { .. }
            | ThreadModeAdded { .. }
            | ThreadModeRemoved { .. } => {}
        }
    }

    // ---- runtime steps -------------------------------------------------------------------------

    pub fn next_step(&self) -> Step {
        match self.run.status {
            RunStatus::Queued => return Step::Start,
            RunStatus::Running => {}
            _ => return Step::Idle,
        }
        for stage in &self.stages {
            match stage.status {
                StageStatus::Completed => continue,
                StageStatus::Failed | StageStatus::Canceled => return Step::Idle,
                _ => {}
            }
            if stage.approval_required && !self.gate_granted(&stage.key) {
                return Step::Gate {
                    stage_key: stage.key.clone(),
                };
            }
            return Step::Execute {
                stage_key: stage.key.clone(),
                attempt: stage.attempts + 1,
            };
        }
        Step::Complete
    }

    pub fn start(&self) -> Result<Vec<DomainEvent>, AppError> {
        if self.run.status != RunStatus::Queued {
            return Err(stale("run is not queued"));
        }
        Ok(vec![DomainEvent::WorkflowRunStarted {
            run_id: self.run.id.clone(),
            mode: self.run.plan.effective_mode.clone(),
        }])
    }

    pub fn stop_at_gate(&self, stage_key: &str) -> Result<Vec<DomainEvent>, AppError> {
        if self.next_step()
            != (Step::Gate {
                stage_key: stage_key.to_string(),
            })
        {
            return Err(stale("run is not at this gate"));
        }
        let run_id = self.run.id.clone();
        let approval_id = ids::approval_id(&run_id, stage_key);
        let task_id = ids::task_id(&run_id, stage_key);
        let mut events = vec![DomainEvent::WorkflowRunWaitingApproval {
            run_id: run_id.clone(),
            stage_key: stage_key.to_string(),
            approval_id: approval_id.clone(),
            task_id: task_id.clone(),
        }];
        if !self.tasks.iter().any(|t| t.id == task_id) {
            events.push(DomainEvent::TaskCreated {
                task_id,
                run_id: run_id.clone(),
                stage_key: stage_key.to_string(),
                title: format!("Review stage {stage_key}"),
            });
        }
        if self.approval_for(stage_key).is_none() {
            events.push(DomainEvent::ApprovalRequested {
                approval_id,
                run_id: run_id.clone(),
                stage_key: stage_key.to_string(),
                reason: format!("workflow_gate:{run_id}:{stage_key}"),
                required_role: "editor".into(),
            });
        }
        Ok(events)
    }

    pub fn start_attempt(
        &self,
        stage_key: &str,
        attempt: u32,
    ) -> Result<Vec<DomainEvent>, AppError> {
        let expected = Step::Execute {
            stage_key: stage_key.to_string(),
            attempt,
        };
        if self.next_step() != expected {
            return Err(stale("stage attempt is not next"));
        }
        let skills = self
            .stage(stage_key)
            .map(|s| s.skills.clone())
            .unwrap_or_default();
        Ok(vec![DomainEvent::WorkflowRunStageStarted {
            run_id: self.run.id.clone(),
            stage_key: stage_key.to_string(),
            attempt,
            skills,
        }])
    }

    fn attempt_in_flight(&self, stage_key: &str, attempt: u32) -> Result<&Stage, AppError> {
        if self.run.status != RunStatus::Running {
            return Err(stale(format!("run is {}", self.run.status.as_str())));
        }
        match self.stage(stage_key) {
            Some(s) if s.status == StageStatus::Running && s.attempts == attempt => Ok(s),
            _ => Err(stale("stage attempt is no longer in flight")),
        }
    }

    pub fn complete_attempt(
        &self,
        stage_key: &str,
        attempt: u32,
        artifacts: Vec<ArtifactMeta>,
    ) -> Result<Vec<DomainEvent>, AppError> {
        self.attempt_in_flight(stage_key, attempt)?;
        Ok(vec![DomainEvent::WorkflowRunStageCompleted {
            run_id: self.run.id.clone(),
            stage_key: stage_key.to_string(),
            attempt,
            artifact_count: artifacts.len() as u32,
            artifacts,
        }])
    }

    /// A failed attempt; the run fails with it unless the stage retries.
    pub fn fail_attempt(
        &self,
        stage_key: &str,
        attempt: u32,
        failure: StageFailure,
    ) -> Result<Vec<DomainEvent>, AppError> {
        let stage = self.attempt_in_flight(stage_key, attempt)?;
        let will_retry = failure.retryable && stage.failures + 1 < stage.max_attempts;
        let mut events = vec![DomainEvent::WorkflowRunStageFailed {
            run_id: self.run.id.clone(),
            stage_key: stage_key.to_string(),
            attempt,
            error_code: failure.error_code.clone(),
            error_message: failure.error_message,
            retryable: failure.retryable,
            will_retry,
        }];
        if !will_retry {
            events.push(DomainEvent::WorkflowRunFailed {
                run_id: self.run.id.clone(),
                stage_key: Some(stage_key.to_string()),
                error_code: failure.error_code,
                from_status: self.run.status.as_str().into(),
            });
        }
        Ok(events)
    }

    pub fn complete(&self) -> Result<Vec<DomainEvent>, AppError> {
        if self.next_step() != Step::Complete {
            return Err(stale("run has stages left"));
        }
        Ok(vec![DomainEvent::WorkflowRunCompleted {
            run_id: self.run.id.clone(),
        }])
    }

    // ---- commands ------------------------------------------------------------------------------

    /// The gate a command addresses: the given stage, or the one the run waits at.
    fn gate_key(&self, stage_key: Option<&str>) -> Result<String, AppError> {
        match stage_key {
            Some(key) => match self.stage(key) {
                None => Err(AppError::validation(format!(
                    "run {} has no stage `{key}`",
                    self.run.id
                ))),
                Some(s) if !s.approval_required => Err(AppError::validation(format!(
                    "stage `{key}` has no approval gate"
                ))),
                Some(_) => Ok(key.to_string()),
            },
            None if self.run.status == RunStatus::WaitingApproval => self
                .run
                .current_stage
                .clone()
                .ok_or_else(|| AppError::internal(anyhow::anyhow!("waiting run without stage"))),
            None => Err(AppError::validation(format!(
                "stageKey is required: run {} is {}, not waiting at a gate",
                self.run.id,
                self.run.status.as_str()
            ))),
        }
    }

    /// Approve a gate. Returns the events and whether the run resumed.
    pub fn approve(
        &self,
        stage_key: Option<&str>,
        by: &str,
        comment: Option<String>,
    ) -> Result<(Vec<DomainEvent>, bool), AppError> {
        let key = self.gate_key(stage_key)?;
        match self.approval_for(&key).map(|a| a.status) {
            Some(ApprovalStatus::Granted) => return Ok((Vec::new(), false)),
            Some(ApprovalStatus::Rejected) => {
                return Err(AppError::InvalidTransition(format!(
                    "gate `{key}` of run {} was rejected",
                    self.run.id
                )))
            }
            _ => {}
        }
        if self.run.status.is_terminal() {
            return Err(AppError::InvalidTransition(format!(
                "run {} is {}",
                self.run.id,
                self.run.status.as_str()
            )));
        }
        let run_id = self.run.id.clone();
        let mut events = vec![DomainEvent::ApprovalGranted {
            approval_id: ids::approval_id(&run_id, &key),
            run_id: run_id.clone(),
            stage_key: key.clone(),
            granted_by: by.to_string(),
            comment,
        }];
        let task_id = ids::task_id(&run_id, &key);
        if self
            .tasks
            .iter()
            .any(|t| t.id == task_id && t.status == TaskStatus::Open)
        {
            events.push(DomainEvent::TaskCompleted {
                task_id,
                run_id: run_id.clone(),
            });
        }
        let waiting_here = self.run.status == RunStatus::WaitingApproval
            && self.run.current_stage.as_deref() == Some(key.as_str());
        if waiting_here {
            events.push(DomainEvent::WorkflowRunResumed {
                run_id,
                stage_key: Some(key),
                trigger: "approval".into(),
            });
        }
        Ok((events, waiting_here))
    }

    /// Reject the gate the run waits at: the stage and the run fail.
    pub fn reject(
        &self,
        stage_key: Option<&str>,
        by: &str,
        comment: Option<String>,
    ) -> Result<Vec<DomainEvent>, AppError> {
        let key = self.gate_key(stage_key)?;
        match self.approval_for(&key).map(|a| a.status) {
            Some(ApprovalStatus::Rejected) => return Ok(Vec::new()),
            Some(ApprovalStatus::Granted) => {
                return Err(AppError::InvalidTransition(format!(
                    "gate `{key}` of run {} was already granted",
                    self.run.id
                )))
            }
            _ => {}
        }
        let waiting_here = self.run.status == RunStatus::WaitingApproval
            && self.run.current_stage.as_deref() == Some(key.as_str());
        if !waiting_here {
            return Err(AppError::InvalidTransition(format!(
                "run {} is not waiting at gate `{key}`",
                self.run.id
            )));
        }
        let run_id = self.run.id.clone();
        let attempt = self.stage(&key).map(|s| s.attempts).unwrap_or(0);
        let message = match &comment {
            Some(c) if !c.trim().is_empty() => format!("approval rejected by {by}: {c}"),
            _ => format!("approval rejected by {by}"),
        };
        let mut events = vec![DomainEvent::ApprovalRejected {
            approval_id: ids::approval_id(&run_id, &key),
            run_id: run_id.clone(),
            stage_key: key.clone(),
            rejected_by: by.to_string(),
            comment,
        }];
        let task_id = ids::task_id(&run_id, &key);
        if self
            .tasks
            .iter()
            .any(|t| t.id == task_id && t.status == TaskStatus::Open)
        {
            events.push(DomainEvent::TaskCompleted {
                task_id,
                run_id: run_id.clone(),
            });
        }
        events.push(DomainEvent::WorkflowRunStageFailed {
            run_id: run_id.clone(),
            stage_key: key.clone(),
            attempt,
            error_code: APPROVAL_REJECTED.into(),
            error_message: message,
            retryable: false,
            will_retry: false,
        });
        events.push(DomainEvent::WorkflowRunFailed {
            run_id,
            stage_key: Some(key),
            error_code: APPROVAL_REJECTED.into(),
            from_status: self.run.status.as_str().into(),
        });
        Ok(events)
    }

    /// Idempotent resume: only a run waiting at an already granted gate moves.
    pub fn resume(&self) -> (Vec<DomainEvent>, bool) {
        if self.run.status != RunStatus::WaitingApproval {
            return (Vec::new(), false);
        }
        match self.run.current_stage.as_deref() {
            Some(key) if self.gate_granted(key) => (
                vec![DomainEvent::WorkflowRunResumed {
                    run_id: self.run.id.clone(),
                    stage_key: Some(key.to_string()),
                    trigger: "manual".into(),
                }],
                true,
            ),
            _ => (Vec::new(), false),
        }
    }

    pub fn cancel(&self, reason: Option<String>) -> Vec<DomainEvent> {
        if self.run.status.is_terminal() {
            return Vec::new();
        }
        vec![DomainEvent::WorkflowRunCanceled {
            run_id: self.run.id.clone(),
            reason,
            from_status: self.run.status.as_str().into(),
        }]
    }

    pub fn complete_task(&self, task_id: &str) -> Result<Vec<DomainEvent>, AppError> {
        let task = self
            .tasks
            .iter()
            .find(|t| t.id == task_id)
            .ok_or_else(|| AppError::not_found("task", task_id))?;
        match task.status {
            TaskStatus::Completed => Ok(Vec::new()),
            TaskStatus::Canceled => Err(AppError::InvalidTransition(format!(
                "task {task_id} was canceled"
            ))),
            TaskStatus::Open => Ok(vec![DomainEvent::TaskCompleted {
                task_id: task_id.to_string(),
                run_id: self.run.id.clone(),
            }]),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::events::Actor;
    use crate::domain::profiles::{ProfileSet, ResolveSettings, SkillOverrides};

    struct Harness {
        state: RunState,
        seq: i64,
        log: Vec<String>,
    }

    fn stored(seq: i64, version: i64, body: DomainEvent) -> StoredEvent {
        StoredEvent {
            sequence: seq,
            event_id: format!("evt-{seq}"),
            stream_id: "run:run-1".into(),
            stream_version: version,
            actor: Actor::runtime(),
            thread_id: Some("t-1".into()),
            run_id: Some("run-1".into()),
            correlation_id: None,
            causation_id: None,
            occurred_at: format!("2026-01-01T00:00:{seq:02}.000000Z"),
            body,
        }
    }

    /// The first event of run "run-1" on thread "t-1": `mode` resolved against the shipped
    /// profiles (with the Foundation fallback forced when `force`).
    pub(crate) fn queued(force: bool, mode: &str) -> StoredEvent {
        let set = ProfileSet::parse(include_str!("../../profiles/workflow_profiles.yaml"), "p")
            .expect("profiles");
        let settings = ResolveSettings {
            force_foundation_fallback: force,
            ..ResolveSettings::default()
        };
        let plan = set
            .resolve(&settings, mode, &SkillOverrides::new())
            .expect("plan");
        stored(
            1,
            1,
            DomainEvent::WorkflowRunQueued {
                run_id: "run-1".into(),
                thread_id: "t-1".into(),
                project_id: "p-1".into(),
                brand_id: "b-1".into(),
                request_text: "crm for clinics".into(),
                plan,
            },
        )
    }

    impl Harness {
        fn new(force: bool, mode: &str) -> Self {
            Harness {
                state: RunState::from_queued(&queued(force, mode)).expect("queued"),
                seq: 1,
                log: vec!["WorkflowRunQueued".into()],
            }
        }

        fn feed(&mut self, events: Vec<DomainEvent>) {
            for body in events {
                self.seq += 1;
                self.log.push(body.event_type().into());
                let ev = stored(self.seq, self.state.run.version + 1, body);
                self.state.apply(&ev);
            }
        }

        /// Drive the runtime until it has nothing to do; every attempt succeeds.
        fn drive(&mut self) {
            loop {
                let events = match self.state.next_step() {
                    Step::Start => self.state.start(),
                    Step::Execute { stage_key, attempt } => {
                        let mut evs = self
                            .state
                            .start_attempt(&stage_key, attempt)
                            .expect("start");
                        self.feed(std::mem::take(&mut evs));
                        self.state.complete_attempt(&stage_key, attempt, vec![])
                    }
                    Step::Gate { stage_key } => {
                        let evs = self.state.stop_at_gate(&stage_key).expect("gate");
                        self.feed(evs);
                        return;
                    }
                    Step::Complete => self.state.complete(),
                    Step::Idle => return,
                }
                .expect("step");
                self.feed(events);
            }
        }

        fn approve(&mut self, key: Option<&str>) -> bool {
            let (events, resumed) = self
                .state
                .approve(key, "ana", Some("ok".into()))
                .expect("approve");
            self.feed(events);
            resumed
        }
    }

    #[test]
    fn foundation_run_stops_at_three_gates_and_completes_on_approvals() {
        let mut h = Harness::new(true, "content_calendar");
        h.drive();
        assert_eq!(h.state.run.status, RunStatus::WaitingApproval);
        assert_eq!(h.state.run.current_stage.as_deref(), Some("brand-voice"));
        assert_eq!(
            h.state.stage("research").expect("s").status,
            StageStatus::Completed
        );
        for _ in 0..3 {
            assert!(h.approve(None));
            assert_eq!(h.state.run.status, RunStatus::Running);
            h.drive();
        }
        assert_eq!(h.state.run.status, RunStatus::Completed);
        assert!(h
            .state
            .stages
            .iter()
            .all(|s| s.status == StageStatus::Completed && s.attempts == 1));
        assert_eq!(h.state.approvals.len(), 3);
        assert!(h
            .state
            .tasks
            .iter()
            .all(|t| t.status == TaskStatus::Completed));
        assert_eq!(
            &h.log[..8],
            [
                "WorkflowRunQueued",
                "WorkflowRunStarted",
                "WorkflowRunStageStarted",
                "WorkflowRunStageCompleted",
                "WorkflowRunWaitingApproval",
                "TaskCreated",
                "ApprovalRequested",
                "ApprovalGranted"
            ]
        );
        assert_eq!(
            h.log.last().map(String::as_str),
            Some("WorkflowRunCompleted")
        );
    }

    #[test]
    fn repeated_approval_is_a_no_op() {
        let mut h = Harness::new(true, "x");
        h.drive();
        assert!(h.approve(Some("brand-voice")));
        let (events, resumed) = h
            .state
            .approve(Some("brand-voice"), "bob", None)
            .expect("ok");
        assert!(events.is_empty() && !resumed);
    }

    #[test]
    fn early_approval_lets_the_run_pass_the_gate() {
        let mut h = Harness::new(true, "x");
        assert!(!h.approve(Some("positioning")));
        h.drive();
        assert_eq!(h.state.run.current_stage.as_deref(), Some("brand-voice"));
        assert!(h.approve(None));
        h.drive();
        // positioning was approved early: the next stop is keywords.
        assert_eq!(h.state.run.current_stage.as_deref(), Some("keywords"));
        assert_eq!(
            h.state.stage("positioning").expect("s").status,
            StageStatus::Completed
        );
    }

    #[test]
    fn resume_is_idempotent_and_never_flips_an_ungranted_gate() {
        let mut h = Harness::new(true, "x");
        h.drive();
        let (events, applied) = h.state.resume();
        assert!(events.is_empty() && !applied);
        assert_eq!(h.state.run.status, RunStatus::WaitingApproval);
        // A granted gate whose resume was lost (crash) does resume.
        let granted = h.state.clone();
        let (mut evs, _) = granted.approve(None, "ana", None).expect("approve");
        evs.retain(|e| !matches!(e, DomainEvent::WorkflowRunResumed { .. }));
        let mut h2 = Harness {
            state: granted,
            seq: h.seq,
            log: vec![],
        };
        h2.feed(evs);
        assert_eq!(h2.state.run.status, RunStatus::WaitingApproval);
        let (events, applied) = h2.state.resume();
        assert!(applied && events.len() == 1);
        // Terminal: nothing.
        for _ in 0..3 {
            h.approve(None);
            h.drive();
        }
        assert_eq!(h.state.resume(), (vec![], false));
    }

    #[test]
    fn reject_fails_stage_and_run() {
        let mut h = Harness::new(true, "x");
        h.drive();
        let events = h
            .state
            .reject(None, "ana", Some("off-brand".into()))
            .expect("reject");
        h.feed(events);
        assert_eq!(h.state.run.status, RunStatus::Failed);
        let s = h.state.stage("brand-voice").expect("s");
        assert_eq!(s.status, StageStatus::Failed);
        assert_eq!(s.error_code.as_deref(), Some(APPROVAL_REJECTED));
        assert!(!s.retryable);
        assert!(s
            .error_message
            .as_deref()
            .expect("msg")
            .contains("off-brand"));
        assert!(matches!(
            h.state.approve(None, "x", None),
            Err(AppError::Validation(_))
        ));
        assert!(matches!(
            h.state.approve(Some("brand-voice"), "x", None),
            Err(AppError::InvalidTransition(_))
        ));
        assert!(matches!(
            h.state.approve(Some("keywords"), "x", None),
            Err(AppError::InvalidTransition(_))
        ));
    }

    #[test]
    fn reject_needs_the_run_at_that_gate() {
        let mut h = Harness::new(true, "x");
        h.drive();
        assert!(matches!(
            h.state.reject(Some("keywords"), "a", None),
            Err(AppError::InvalidTransition(_))
        ));
        assert!(matches!(
            h.state.reject(Some("research"), "a", None),
            Err(AppError::Validation(_))
        ));
        assert!(matches!(
            h.state.reject(Some("nope"), "a", None),
            Err(AppError::Validation(_))
        ));
    }

    #[test]
    fn retryable_failure_retries_until_max_attempts() {
        let mut h = Harness::new(true, "x");
        h.feed(h.state.start().expect("start"));
        let failure = StageFailure {
            error_code: "STAGE_EXECUTION_ERROR".into(),
            error_message: "boom".into(),
            retryable: true,
        };
        h.feed(h.state.start_attempt("research", 1).expect("a1"));
        h.feed(
            h.state
                .fail_attempt("research", 1, failure.clone())
                .expect("f1"),
        );
        assert_eq!(h.state.run.status, RunStatus::Running);
        assert_eq!(
            h.state.next_step(),
            Step::Execute {
                stage_key: "research".into(),
                attempt: 2
            }
        );
        h.feed(h.state.start_attempt("research", 2).expect("a2"));
        h.feed(h.state.fail_attempt("research", 2, failure).expect("f2"));
        assert_eq!(h.state.run.status, RunStatus::Failed);
        let s = h.state.stage("research").expect("s");
        assert_eq!(
            (s.status, s.attempts, s.failures),
            (StageStatus::Failed, 2, 2)
        );
        assert_eq!(h.state.next_step(), Step::Idle);
    }

    #[test]
    fn fatal_failure_does_not_retry() {
        let mut h = Harness::new(true, "x");
        h.feed(h.state.start().expect("start"));
        h.feed(h.state.start_attempt("research", 1).expect("a1"));
        let evs = h
            .state
            .fail_attempt(
                "research",
                1,
                StageFailure {
                    error_code: "X".into(),
                    error_message: "m".into(),
                    retryable: false,
                },
            )
            .expect("f");
        assert_eq!(evs.len(), 2);
        h.feed(evs);
        assert_eq!(h.state.run.status, RunStatus::Failed);
    }

    #[test]
    fn stale_attempt_results_are_refused() {
        let mut h = Harness::new(true, "x");
        h.feed(h.state.start().expect("start"));
        h.feed(h.state.start_attempt("research", 1).expect("a1"));
        // A second worker took over (crash recovery) and started attempt 2.
        h.feed(vec![DomainEvent::WorkflowRunStageStarted {
            run_id: "run-1".into(),
            stage_key: "research".into(),
            attempt: 2,
            skills: vec![],
        }]);
        assert!(matches!(
            h.state.complete_attempt("research", 1, vec![]),
            Err(AppError::Conflict(_))
        ));
        h.feed(h.state.complete_attempt("research", 2, vec![]).expect("ok"));
        assert!(matches!(
            h.state.complete_attempt("research", 2, vec![]),
            Err(AppError::Conflict(_))
        ));
    }

    #[test]
    fn cancel_discards_in_flight_attempt_and_is_terminal() {
        let mut h = Harness::new(true, "x");
        h.feed(h.state.start().expect("start"));
        h.feed(h.state.start_attempt("research", 1).expect("a1"));
        h.feed(h.state.cancel(Some("user".into())));
        assert_eq!(h.state.run.status, RunStatus::Canceled);
        assert!(h.state.complete_attempt("research", 1, vec![]).is_err());
        assert!(h.state.cancel(None).is_empty());
        assert_eq!(h.state.next_step(), Step::Idle);
        assert!(h
            .state
            .stages
            .iter()
            .all(|s| s.status == StageStatus::Canceled));
    }

    #[test]
    fn native_profiles_run_every_stage() {
        let mut h = Harness::new(false, "plan_90d");
        h.drive();
        assert_eq!(h.state.run.current_stage.as_deref(), Some("strategy_draft"));
        assert!(h.approve(None));
        h.drive();
        assert_eq!(h.state.run.status, RunStatus::Completed);
        let mut h = Harness::new(false, "content_calendar");
        h.drive();
        assert_eq!(h.state.run.status, RunStatus::Completed);
    }

    #[test]
    fn approve_without_stage_needs_a_waiting_run() {
        let h = Harness::new(true, "x");
        assert!(matches!(
            h.state.approve(None, "a", None),
            Err(AppError::Validation(_))
        ));
    }

    #[test]
    fn tasks_complete_once() {
        let mut h = Harness::new(true, "x");
        h.drive();
        let task = ids::task_id("run-1", "brand-voice");
        h.feed(h.state.complete_task(&task).expect("complete"));
        assert!(h.state.complete_task(&task).expect("noop").is_empty());
        assert!(matches!(
            h.state.complete_task("task-x"),
            Err(AppError::NotFound(_))
        ));
        // Approving still works and does not complete the task twice.
        let (events, _) = h.state.approve(None, "a", None).expect("approve");
        assert!(!events
            .iter()
            .any(|e| matches!(e, DomainEvent::TaskCompleted { .. })));
    }
}
