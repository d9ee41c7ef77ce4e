//! sea-orm entities: the tables as the store sees them. Never exposed past `store/`.

macro_rules! entity {
    ($module:ident, $table:literal, { $($body:tt)* }) => {
        pub mod $module {
            use sea_orm::entity::prelude::*;

            #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
            #[sea_orm(table_name = $table)]
            pub struct Model { $($body)* }

            #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
            pub enum Relation {}

            impl ActiveModelBehavior for ActiveModel {}
        }
    };
}

entity!(event, "events", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub sequence: i64,
    pub event_id: String,
    pub stream_id: String,
    pub stream_version: i64,
    pub event_type: String,
    pub actor_type: String,
    pub actor_id: String,
    pub thread_id: Option<String>,
    pub run_id: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub occurred_at: String,
    #[sea_orm(column_type = "Text")]
    pub payload: String,
});

entity!(idempotency_key, "idempotency_keys", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub mutation: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub key: String,
    pub request_hash: String,
    #[sea_orm(column_type = "Text")]
    pub response: String,
    pub created_at: String,
});

entity!(brand, "brands", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    #[sea_orm(column_type = "Text")]
    pub name: String,
    pub version: i64,
    pub created_seq: i64,
    pub created_at: String,
    pub updated_at: String,
});

entity!(project, "projects", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub brand_id: String,
    #[sea_orm(column_type = "Text")]
    pub name: String,
    #[sea_orm(column_type = "Text")]
    pub objective: String,
    #[sea_orm(column_type = "Text")]
    pub channels: String,
    pub due_date: Option<String>,
    pub version: i64,
    pub created_seq: i64,
    pub created_at: String,
    pub updated_at: String,
});

entity!(thread, "threads", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub project_id: String,
    pub brand_id: String,
    #[sea_orm(column_type = "Text")]
    pub title: String,
    pub status: String,
    #[sea_orm(column_type = "Text")]
    pub modes: String,
    pub version: i64,
    pub created_seq: i64,
    pub created_at: String,
    pub updated_at: String,
    pub last_activity_at: String,
});

entity!(timeline_item, "timeline_items", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub sequence: i64,
    pub thread_id: String,
    pub event_id: String,
    pub event_type: String,
    pub actor_type: String,
    pub actor_id: String,
    pub run_id: Option<String>,
    pub occurred_at: String,
});

entity!(run, "runs", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub thread_id: String,
    pub project_id: String,
    pub brand_id: String,
    pub status: String,
    #[sea_orm(column_type = "Text")]
    pub request_text: String,
    pub requested_mode: String,
    pub effective_mode: String,
    pub fallback_applied: bool,
    pub profile_version: String,
    pub profile_digest: String,
    #[sea_orm(column_type = "Text")]
    pub plan: String,
    pub current_stage: Option<String>,
    pub version: i64,
    pub created_seq: i64,
    pub correlation_id: String,
    pub last_event_id: String,
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
});

entity!(stage, "stages", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub run_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub position: i32,
    pub key: String,
    pub status: String,
    #[sea_orm(column_type = "Text")]
    pub skills: String,
    pub approval_required: bool,
    pub max_attempts: i32,
    #[sea_orm(column_type = "Double")]
    pub backoff_seconds: f64,
    #[sea_orm(column_type = "Double")]
    pub timeout_seconds: f64,
    pub attempts: i32,
    pub failures: i32,
    pub error_code: Option<String>,
    #[sea_orm(column_type = "Text", nullable)]
    pub error_message: Option<String>,
    pub retryable: bool,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
});

entity!(approval, "approvals", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub run_id: String,
    pub thread_id: String,
    pub stage_key: String,
    pub status: String,
    #[sea_orm(column_type = "Text")]
    pub reason: String,
    pub required_role: String,
    pub decided_by: Option<String>,
    #[sea_orm(column_type = "Text", nullable)]
    pub comment: Option<String>,
    pub requested_at: Option<String>,
    pub decided_at: Option<String>,
    pub created_seq: i64,
    pub updated_at: String,
});

entity!(task, "tasks", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub run_id: String,
    pub thread_id: String,
    pub stage_key: String,
    #[sea_orm(column_type = "Text")]
    pub title: String,
    pub status: String,
    pub created_seq: i64,
    pub updated_at: String,
});

entity!(artifact, "artifacts", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub run_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub stage_key: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub path: String,
    pub kind: String,
    pub sha256: String,
    pub size: i64,
    pub attempt: i32,
});

entity!(run_queue, "run_queue", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub run_id: String,
    pub ready_at: String,
    pub lease_owner: Option<String>,
    pub lease_until: Option<String>,
});
