//! Bulk history for benchmarks (`vm-workflow seed-history`): many completed Foundation runs,
//! written fast, before a server starts.
//!
//! The events are the real ones: every run is driven through the domain's own decisions
//! (`start`, `stop_at_gate`, `approve`, `start_attempt`, `complete_attempt`, `complete`), each
//! event folded into the run state exactly as the projector folds it, with the artifact metadata
//! of the Foundation runner's content. Only the writing is batched: hundreds of runs per
//! transaction, multi-row inserts, and each run's read-model rows written once in their final
//! state (what projecting its events one command at a time ends with; the unit test below checks
//! that `rebuild-projections` reproduces them exactly). Artifact files are not written to disk.

use super::entities::artifact;
use super::projector::{approval_to_model, run_to_model, stage_to_model, task_to_model};
use super::{event_log, Store, ThreadRow, WriteTx};
use crate::domain::events::{Actor, ArtifactMeta, DomainEvent, StoredEvent};
use crate::domain::profiles::PlanSnapshot;
use crate::domain::run::{RunState, RunStatus, Step};
use crate::domain::{ids, time};
use crate::error::AppError;
use crate::runner::StageContext;
use sea_orm::{ActiveModelTrait, EntityTrait, IntoActiveModel, QueryTrait, Set};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// Rows per multi-row INSERT (kept under SQLite's 32,766 bound parameters for the widest table).
const ROWS_PER_INSERT: usize = 1000;

/// What a seeding pass wrote.
#[derive(Debug, Clone, Copy, Default)]
pub struct SeedReport {
    pub runs: u64,
    pub events: u64,
}

/// One run's history: its events in order and its final state.
struct RunHistory {
    events: Vec<StoredEvent>,
    state: RunState,
    artifacts: Vec<(String, u32, ArtifactMeta)>,
}

struct Sim<'a> {
    next_sequence: i64,
    thread: &'a ThreadRow,
}

impl Sim<'_> {
    /// Append one command's events to the run, as `Services::advance` / `run_command` do.
    fn emit(
        &mut self,
        h: &mut RunHistory,
        actor: &Actor,
        bodies: Vec<DomainEvent>,
    ) -> Result<(), AppError> {
        let occurred_at = time::now();
        let causation = h.state.run.last_event_id.clone();
        let base_version = h.state.run.version;
        for (i, body) in bodies.into_iter().enumerate() {
            let ev = StoredEvent {
                sequence: self.next_sequence,
                event_id: ids::generate("evt-"),
                stream_id: event_log::run_stream(&h.state.run.id),
                stream_version: base_version + 1 + i as i64,
                actor: actor.clone(),
                thread_id: Some(self.thread.id.clone()),
                run_id: Some(h.state.run.id.clone()),
                correlation_id: Some(h.state.run.correlation_id.clone()),
                causation_id: Some(causation.clone()),
                occurred_at: occurred_at.clone(),
                body,
            };
            self.next_sequence += 1;
            h.state.apply(&ev);
            if let DomainEvent::WorkflowRunStageCompleted {
                stage_key,
                attempt,
                artifacts,
                ..
            } = &ev.body
            {
                h.artifacts.retain(|(k, _, _)| k != stage_key);
                for a in artifacts {
                    h.artifacts.push((stage_key.clone(), *attempt, a.clone()));
                }
            }
            h.events.push(ev);
        }
        Ok(())
    }

    /// A complete run: queued, started, every stage executed, every gate approved, completed.
    fn run(&mut self, plan: &PlanSnapshot, index: u64) -> Result<RunHistory, AppError> {
        let run_id = ids::generate("run-");
        let user = Actor::user("seed");
        let runtime = Actor::runtime();
        let queued = StoredEvent {
            sequence: self.next_sequence,
            event_id: ids::generate("evt-"),
            stream_id: event_log::run_stream(&run_id),
            stream_version: 1,
            actor: user.clone(),
            thread_id: Some(self.thread.id.clone()),
            run_id: Some(run_id.clone()),
            correlation_id: Some(ids::generate("req-")),
            causation_id: None,
            occurred_at: time::now(),
            body: DomainEvent::WorkflowRunQueued {
                run_id: run_id.clone(),
                thread_id: self.thread.id.clone(),
                project_id: self.thread.project_id.clone(),
                brand_id: self.thread.brand_id.clone(),
                request_text: format!("Seeded history run {index}: CRM for clinics"),
                plan: plan.clone(),
            },
        };
        self.next_sequence += 1;
        let state = RunState::from_queued(&queued)
            .ok_or_else(|| AppError::internal(anyhow::anyhow!("queued event without a run")))?;
        let mut h = RunHistory {
            events: vec![queued],
            state,
            artifacts: Vec::new(),
        };
        for _ in 0..1000 {
            let step = h.state.next_step();
            match step {
                Step::Start => {
                    let e = h.state.start()?;
                    self.emit(&mut h, &runtime, e)?;
                }
                Step::Gate { stage_key } => {
                    let e = h.state.stop_at_gate(&stage_key)?;
                    self.emit(&mut h, &runtime, e)?;
                }
                Step::Execute { stage_key, attempt } => {
                    let e = h.state.start_attempt(&stage_key, attempt)?;
                    self.emit(&mut h, &runtime, e)?;
                    let metas = foundation_artifacts(&h.state, &stage_key, attempt);
                    let e = h.state.complete_attempt(&stage_key, attempt, metas)?;
                    self.emit(&mut h, &runtime, e)?;
                }
                Step::Complete => {
                    let e = h.state.complete()?;
                    self.emit(&mut h, &runtime, e)?;
                }
                Step::Idle if h.state.run.status == RunStatus::WaitingApproval => {
                    let (e, _) = h.state.approve(None, "seed", None)?;
                    self.emit(&mut h, &user, e)?;
                }
                Step::Idle => break,
            }
        }
        if h.state.run.status != RunStatus::Completed {
            return Err(AppError::internal(anyhow::anyhow!(
                "seeded run ended {}",
                h.state.run.status.as_str()
            )));
        }
        Ok(h)
    }
}

/// The metadata of what the Foundation runner produces for this stage (content not stored).
fn foundation_artifacts(state: &RunState, stage_key: &str, attempt: u32) -> Vec<ArtifactMeta> {
    let Some(stage) = state.stage(stage_key) else {
        return Vec::new();
    };
    let ctx = StageContext::for_attempt(state, stage, attempt);
    crate::runner::foundation::artifacts_for(&ctx)
        .into_iter()
        .map(|(path, content)| ArtifactMeta {
            kind: std::path::Path::new(&path)
                .extension()
                .map(|e| e.to_string_lossy().to_lowercase())
                .unwrap_or_else(|| "file".into()),
            sha256: hex::encode(Sha256::digest(content.as_bytes())),
            size: content.len() as i64,
            path,
        })
        .collect()
}

async fn insert_chunked<A, E>(w: &WriteTx, rows: Vec<A>) -> Result<(), AppError>
where
    A: sea_orm::ActiveModelTrait<Entity = E> + Send,
    E: EntityTrait,
{
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<A> = rows.by_ref().take(ROWS_PER_INSERT).collect();
        w.exec(&E::insert_many(chunk).into_query()).await?;
    }
    Ok(())
}

impl Store {
    /// Append at least `min_events` events of completed runs spread over `threads`, `runs_per_tx`
    /// runs per transaction. `progress` is called after every transaction.
    pub async fn seed_completed_runs(
        &self,
        plan: &PlanSnapshot,
        threads: &[ThreadRow],
        min_events: u64,
        runs_per_tx: usize,
        mut progress: impl FnMut(SeedReport),
    ) -> Result<SeedReport, AppError> {
        if threads.is_empty() {
            return Err(AppError::validation("seeding needs at least one thread"));
        }
        let mut report = SeedReport::default();
        while report.events < min_events {
            let mut w = self.write().await?;
            let head = w.log_head().await?;
            let mut sim = Sim {
                next_sequence: head + 1,
                thread: &threads[0],
            };
            let mut histories = Vec::with_capacity(runs_per_tx);
            let mut events_in_tx = 0u64;
            while histories.len() < runs_per_tx.max(1) && report.events + events_in_tx < min_events
            {
                sim.thread = &threads[(report.runs as usize + histories.len()) % threads.len()];
                let h = sim.run(plan, report.runs + histories.len() as u64)?;
                events_in_tx += h.events.len() as u64;
                histories.push(h);
            }
            let n_runs = histories.len() as u64;
            write_histories(&w, histories).await?;
            w.appended_up_to(head + events_in_tx as i64, events_in_tx as usize);
            w.commit().await?;
            report.runs += n_runs;
            report.events += events_in_tx;
            progress(report);
        }
        Ok(report)
    }
}

async fn write_histories(w: &WriteTx, histories: Vec<RunHistory>) -> Result<(), AppError> {
    let mut events = Vec::new();
    let mut runs = Vec::new();
    let mut stages = Vec::new();
    let mut approvals = Vec::new();
    let mut tasks = Vec::new();
    let mut artifacts = Vec::new();
    let mut last_activity: HashMap<String, String> = HashMap::new();
    for h in histories {
        for ev in &h.events {
            let (event_type, payload) = ev.body.to_parts()?;
            events.push(event_log::event_model(ev, event_type, &payload));
        }
        // The projector touches the thread when a run is queued.
        last_activity.insert(
            h.state.run.thread_id.clone(),
            h.state.run.created_at.clone(),
        );
        runs.push(run_to_model(&h.state.run)?.into_active_model().reset_all());
        stages.extend(
            h.state
                .stages
                .iter()
                .map(|s| stage_to_model(s).into_active_model().reset_all()),
        );
        approvals.extend(
            h.state
                .approvals
                .iter()
                .map(|a| approval_to_model(a).into_active_model().reset_all()),
        );
        tasks.extend(
            h.state
                .tasks
                .iter()
                .map(|t| task_to_model(t).into_active_model().reset_all()),
        );
        artifacts.extend(
            h.artifacts
                .iter()
                .map(|(key, attempt, a)| artifact::ActiveModel {
                    run_id: Set(h.state.run.id.clone()),
                    stage_key: Set(key.clone()),
                    path: Set(a.path.clone()),
                    kind: Set(a.kind.clone()),
                    sha256: Set(a.sha256.clone()),
                    size: Set(a.size),
                    attempt: Set(*attempt as i32),
                }),
        );
    }
    insert_chunked(w, events).await?;
    insert_chunked(w, runs).await?;
    insert_chunked(w, stages).await?;
    insert_chunked(w, approvals).await?;
    insert_chunked(w, tasks).await?;
    insert_chunked(w, artifacts).await?;
    for (thread_id, at) in last_activity {
        w.exec(&super::projector::touch_thread(thread_id, at))
            .await?;
    }
    Ok(())
}

/// A brand, one project and `threads` threads, created through the normal commands.
pub async fn create_workspace(
    services: &crate::service::Services,
    threads: usize,
) -> Result<Vec<ThreadRow>, AppError> {
    use crate::service::workspace::{CreateBrand, CreateProject, CreateThread};
    use crate::service::Caller;
    let caller = Caller::user("seed");
    let brand = services
        .create_brand(
            &caller,
            CreateBrand {
                brand_id: None,
                name: "Seeded history".into(),
            },
            None,
        )
        .await?;
    let project = services
        .create_project(
            &caller,
            CreateProject {
                project_id: None,
                brand_id: brand.id,
                name: "Seeded history".into(),
                objective: None,
                channels: None,
                due_date: None,
            },
            None,
        )
        .await?;
    let mut out = Vec::with_capacity(threads);
    for i in 0..threads.max(1) {
        out.push(
            services
                .create_thread(
                    &caller,
                    CreateThread {
                        thread_id: None,
                        project_id: project.id.clone(),
                        title: format!("Seeded thread {i}"),
                        modes: None,
                    },
                    None,
                )
                .await?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::profiles::{ProfileSet, ResolveSettings, SkillOverrides};

    /// Services on a fresh SQLite store in `dir`, and the plan seeded runs follow (the
    /// Foundation fallback of `content_calendar`).
    async fn seeding(dir: &std::path::Path) -> (crate::service::Services, PlanSnapshot) {
        let store = crate::store::test_store(dir).await;
        let profiles =
            ProfileSet::parse(crate::startup::SHIPPED_PROFILES, "shipped").expect("profiles");
        let settings = ResolveSettings {
            force_foundation_fallback: true,
            foundation_mode: "foundation_stack".into(),
        };
        let plan = profiles
            .resolve(&settings, "content_calendar", &SkillOverrides::default())
            .expect("plan");
        let services = crate::service::Services::new(
            std::sync::Arc::new(store),
            std::sync::Arc::new(profiles),
            settings,
            crate::runner::artifacts::ArtifactStore::new(dir),
        );
        (services, plan)
    }

    /// One write turn whose savepoint journal holds megabytes (500 runs in one transaction, as
    /// `seed-history` writes them) commits. With SQLite built with `SQLITE_STMTJRNL_SPILL=1048576`
    /// and `temp_store` at its default (17e12ce, reverted), a journal past the spill size moved
    /// to a temporary file and the write failed with `SQLITE_FULL` ("database or disk is
    /// full"); the store keeps `temp_store = memory`.
    #[tokio::test]
    async fn a_turn_with_a_large_savepoint_journal_commits() {
        let dir = tempfile::tempdir().expect("tmp");
        let (services, plan) = seeding(dir.path()).await;
        let threads = create_workspace(&services, 2).await.expect("workspace");
        let store = &services.store;
        // Twice: the second transaction changes pages the first one wrote, so they are journaled.
        for _ in 0..2 {
            let report = store
                .seed_completed_runs(&plan, &threads, 14_000, 500, |_| {})
                .await
                .expect("a large turn commits");
            assert!(report.events >= 14_000, "{report:?}");
        }
        assert!(store.head_sequence().await.expect("head") >= 28_000);
    }

    /// A writer reads whole rows by position (on SQLite through its own connection, see
    /// `store::write_rows`): every table's models read in a write turn equal the readers'
    /// (sea-orm's own mapping by column name), text, integers, booleans, floats and NULLs.
    #[tokio::test]
    async fn a_writer_reads_every_model_as_the_readers_do() {
        use super::super::entities::{
            approval, artifact, brand, event, project, run, stage, task, thread, timeline_item,
        };
        use sea_orm::{EntityTrait, QueryOrder};
        let dir = tempfile::tempdir().expect("tmp");
        let (services, plan) = seeding(dir.path()).await;
        let threads = create_workspace(&services, 2).await.expect("workspace");
        let store = &services.store;
        store
            .seed_completed_runs(&plan, &threads, 120, 2, |_| {})
            .await
            .expect("seed");
        let w = store.write().await.expect("writer");
        macro_rules! same {
            ($entity:ident, $($order:expr),+) => {{
                let read = || $entity::Entity::find()$(.order_by_asc($order))+;
                let written = w.models(read()).await.expect("writer's read");
                let seen = read().all(store.conn()).await.expect("reader's read");
                assert!(!seen.is_empty(), "{}: no rows to compare", stringify!($entity));
                assert_eq!(written, seen, "{}", stringify!($entity));
                let first = w.model(read()).await.expect("one row");
                assert_eq!(first.as_ref(), seen.first(), "{}", stringify!($entity));
            }};
        }
        same!(brand, brand::Column::Id);
        same!(project, project::Column::Id);
        same!(thread, thread::Column::Id);
        same!(event, event::Column::Sequence);
        same!(timeline_item, timeline_item::Column::Sequence);
        same!(run, run::Column::Id);
        same!(stage, stage::Column::RunId, stage::Column::Position);
        same!(approval, approval::Column::Id);
        same!(task, task::Column::Id);
        same!(
            artifact,
            artifact::Column::RunId,
            artifact::Column::StageKey,
            artifact::Column::Path
        );
        let nothing = w
            .model(run::Entity::find_by_id("run-none".to_string()))
            .await
            .expect("no row");
        assert_eq!(nothing, None);
        w.commit().await.expect("commit");
    }

    #[tokio::test]
    async fn seeded_history_equals_its_replay() {
        let dir = tempfile::tempdir().expect("tmp");
        let (services, plan) = seeding(dir.path()).await;
        let threads = create_workspace(&services, 3).await.expect("workspace");
        let report = services
            .store
            .seed_completed_runs(&plan, &threads, 200, 3, |_| {})
            .await
            .expect("seed");
        assert!(report.events >= 200 && report.runs >= 7, "{report:?}");
        let live = services.store.dump_read_models().await.expect("dump");
        services.store.rebuild_projections().await.expect("rebuild");
        let rebuilt = services.store.dump_read_models().await.expect("dump");
        assert_eq!(live, rebuilt);
        assert_eq!(
            services.store.head_sequence().await.expect("head") as u64,
            report.events + 1 + 1 + 3
        );
    }
}
