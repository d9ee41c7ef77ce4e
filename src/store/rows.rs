//! Plain read types handed out by the store (never sea-orm models).

#[derive(Debug, Clone, PartialEq)]
pub struct BrandRow {
    pub id: String,
    pub name: String,
    pub version: i64,
    pub created_seq: i64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProjectRow {
    pub id: String,
    pub brand_id: String,
    pub name: String,
    pub objective: String,
    pub channels: Vec<String>,
    pub due_date: Option<String>,
    pub version: i64,
    pub created_seq: i64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ThreadRow {
    pub id: String,
    pub project_id: String,
    pub brand_id: String,
    pub title: String,
    pub status: String,
    pub modes: Vec<String>,
    pub version: i64,
    pub created_seq: i64,
    pub created_at: String,
    pub updated_at: String,
    pub last_activity_at: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TimelineRow {
    pub sequence: i64,
    pub thread_id: String,
    pub event_id: String,
    pub event_type: String,
    pub actor_type: String,
    pub actor_id: String,
    pub run_id: Option<String>,
    pub occurred_at: String,
}

pub use crate::domain::run::Approval as ApprovalRow;

#[derive(Debug, Clone, PartialEq)]
pub struct ArtifactRow {
    pub run_id: String,
    pub stage_key: String,
    pub path: String,
    pub kind: String,
    pub sha256: String,
    pub size: i64,
    pub attempt: i32,
}

/// A page of a list ordered by an increasing key; `has_next` tells whether more follow.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_next: bool,
}

/// Which events a log read returns.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub run_id: Option<String>,
    pub thread_id: Option<String>,
}
