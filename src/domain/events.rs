//! The event log's vocabulary: every change is one of these, wrapped in an envelope.

use super::profiles::PlanSnapshot;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactMeta {
    pub path: String,
    pub kind: String,
    pub sha256: String,
    pub size: i64,
}

/// The payload of an event, tagged by its type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload", rename_all_fields = "camelCase")]
pub enum DomainEvent {
    BrandCreated {
        brand_id: String,
        name: String,
    },
    BrandUpdated {
        brand_id: String,
        name: String,
    },
    ProjectCreated {
        project_id: String,
        brand_id: String,
        name: String,
        objective: String,
        channels: Vec<String>,
        due_date: Option<String>,
    },
    ProjectUpdated {
        project_id: String,
        name: String,
        objective: String,
        channels: Vec<String>,
        due_date: Option<String>,
    },
    ThreadCreated {
        thread_id: String,
        project_id: String,
        brand_id: String,
        title: String,
        modes: Vec<String>,
    },
    ThreadRenamed {
        thread_id: String,
        title: String,
    },
    ThreadModeAdded {
        thread_id: String,
        mode: String,
    },
    ThreadModeRemoved {
        thread_id: String,
        mode: String,
    },
    WorkflowRunQueued {
        run_id: String,
        thread_id: String,
        project_id: String,
        brand_id: String,
        request_text: String,
        plan: PlanSnapshot,
    },
    WorkflowRunStarted {
        run_id: String,
        mode: String,
    },
    WorkflowRunStageStarted {
        run_id: String,
        stage_key: String,
        attempt: u32,
        skills: Vec<String>,
    },
    WorkflowRunStageCompleted {
        run_id: String,
        stage_key: String,
        attempt: u32,
        artifact_count: u32,
        artifacts: Vec<ArtifactMeta>,
    },
    WorkflowRunStageFailed {
        run_id: String,
        stage_key: String,
        attempt: u32,
        error_code: String,
        error_message: String,
        retryable: bool,
        will_retry: bool,
    },
    WorkflowRunWaitingApproval {
        run_id: String,
        stage_key: String,
        approval_id: String,
        task_id: String,
    },
    TaskCreated {
        task_id: String,
        run_id: String,
        stage_key: String,
        title: String,
    },
    ApprovalRequested {
        approval_id: String,
        run_id: String,
        stage_key: String,
        reason: String,
        required_role: String,
    },
    ApprovalGranted {
        approval_id: String,
        run_id: String,
        stage_key: String,
        granted_by: String,
        comment: Option<String>,
    },
    ApprovalRejected {
        approval_id: String,
        run_id: String,
        stage_key: String,
        rejected_by: String,
        comment: Option<String>,
    },
    TaskCompleted {
        task_id: String,
        run_id: String,
    },
    WorkflowRunResumed {
        run_id: String,
        stage_key: Option<String>,
        trigger: String,
    },
    WorkflowRunFailed {
        run_id: String,
        stage_key: Option<String>,
        error_code: String,
        from_status: String,
    },
    WorkflowRunCompleted {
        run_id: String,
    },
    WorkflowRunCanceled {
        run_id: String,
        reason: Option<String>,
        from_status: String,
    },
}

impl DomainEvent {
    pub fn event_type(&self) -> &'static str {
        use DomainEvent::*;
        match self {
            BrandCreated { .. } => "BrandCreated",
            BrandUpdated { .. } => "BrandUpdated",
            ProjectCreated { .. } => "ProjectCreated",
            ProjectUpdated { .. } => "ProjectUpdated",
            ThreadCreated { .. } => "ThreadCreated",
            ThreadRenamed { .. } => "ThreadRenamed",
            ThreadModeAdded { .. } => "ThreadModeAdded",
            ThreadModeRemoved { .. } => "ThreadModeRemoved",
            WorkflowRunQueued { .. } => "WorkflowRunQueued",
            WorkflowRunStarted { .. } => "WorkflowRunStarted",
            WorkflowRunStageStarted { .. } => "WorkflowRunStageStarted",
            WorkflowRunStageCompleted { .. } => "WorkflowRunStageCompleted",
            WorkflowRunStageFailed { .. } => "WorkflowRunStageFailed",
            WorkflowRunWaitingApproval { .. } => "WorkflowRunWaitingApproval",
            TaskCreated { .. } => "TaskCreated",
            ApprovalRequested { .. } => "ApprovalRequested",
            ApprovalGranted { .. } => "ApprovalGranted",
            ApprovalRejected { .. } => "ApprovalRejected",
            TaskCompleted { .. } => "TaskCompleted",
            WorkflowRunResumed { .. } => "WorkflowRunResumed",
            WorkflowRunFailed { .. } => "WorkflowRunFailed",
            WorkflowRunCompleted { .. } => "WorkflowRunCompleted",
            WorkflowRunCanceled { .. } => "WorkflowRunCanceled",
        }
    }

    /// Split into (type, payload JSON) for storage.
    pub fn to_parts(&self) -> Result<(&'static str, serde_json::Value), serde_json::Error> {
        let mut value = serde_json::to_value(self)?;
        let payload = value
            .get_mut("payload")
            .map(serde_json::Value::take)
            .unwrap_or(serde_json::Value::Null);
        Ok((self.event_type(), payload))
    }

    /// Rebuild from stored (type, payload JSON).
    pub fn from_parts(
        event_type: &str,
        payload: serde_json::Value,
    ) -> Result<Self, serde_json::Error> {
        serde_json::from_value(serde_json::json!({ "type": event_type, "payload": payload }))
    }
}

/// Who caused an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub kind: String,
    pub id: String,
}

impl Actor {
    pub fn user(id: impl Into<String>) -> Self {
        Actor {
            kind: "user".into(),
            id: id.into(),
        }
    }

    pub fn runtime() -> Self {
        Actor {
            kind: "system".into(),
            id: "vm-workflow-runtime".into(),
        }
    }
}

/// Envelope data shared by the events of one command.
#[derive(Debug, Clone)]
pub struct EventMeta {
    pub actor: Actor,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
}

/// An event as stored in the log.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub sequence: i64,
    pub event_id: String,
    pub stream_id: String,
    pub stream_version: i64,
    pub actor: Actor,
    pub thread_id: Option<String>,
    pub run_id: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub occurred_at: String,
    pub body: DomainEvent,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_roundtrip() {
        let e = DomainEvent::ApprovalGranted {
            approval_id: "apr-1".into(),
            run_id: "run-1".into(),
            stage_key: "brand-voice".into(),
            granted_by: "ana".into(),
            comment: Some("ok".into()),
        };
        let (t, payload) = e.to_parts().expect("serializes");
        assert_eq!(t, "ApprovalGranted");
        assert_eq!(payload["grantedBy"], "ana");
        assert_eq!(payload["stageKey"], "brand-voice");
        assert_eq!(DomainEvent::from_parts(t, payload).expect("parses"), e);
    }
}
