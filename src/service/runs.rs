//! Workflow runs: start, approve, reject, resume, cancel, complete a task; and the runtime's
//! own writes (`advance`), which go through the same path.

use super::{Caller, Services};
use crate::domain::events::{Actor, DomainEvent, EventMeta};
use crate::domain::ids;
use crate::domain::profiles::{PlanSnapshot, SkillOverrides};
use crate::domain::run::{RunState, RunStatus, Step};
use crate::domain::workspace;
use crate::error::AppError;
use crate::store::event_log::NewEvent;
use crate::store::idempotency::Idempotency;
use crate::store::WriteTx;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize)]
pub struct StartRun {
    pub thread_id: String,
    pub request_text: String,
    pub mode: String,
    pub skill_overrides: SkillOverrides,
}

#[derive(Debug, Clone, Serialize)]
pub struct GateDecision {
    pub run_id: String,
    pub stage_key: Option<String>,
    pub comment: Option<String>,
}

/// What a run mutation answers (and what an idempotent replay answers again).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunOutcome {
    pub run_id: String,
    /// For approve and resume: whether the run was moved back to the worker.
    pub resume_applied: bool,
    /// The gate the run waited at when the command was decided (what approve/reject decided).
    #[serde(default)]
    pub gate: Option<String>,
    /// The run as this command committed it (absent on an idempotent replay).
    #[serde(skip)]
    pub state: Option<RunState>,
}

fn run_events(state: &RunState, events: Vec<DomainEvent>) -> Vec<NewEvent> {
    events
        .into_iter()
        .map(|body| NewEvent {
            body,
            thread_id: Some(state.run.thread_id.clone()),
            run_id: Some(state.run.id.clone()),
        })
        .collect()
}

impl Services {
    /// Turn a mode request into a plan, without starting anything.
    pub fn preview(
        &self,
        mode: &str,
        overrides: &SkillOverrides,
    ) -> Result<PlanSnapshot, AppError> {
        self.profiles.resolve(&self.settings, mode, overrides)
    }

    /// Append `events` to the run's stream and project them; returns the new state.
    async fn append_run(
        &self,
        w: &mut WriteTx,
        state: RunState,
        meta: &EventMeta,
        events: Vec<DomainEvent>,
    ) -> Result<RunState, AppError> {
        if events.is_empty() {
            return Ok(state);
        }
        let stream = crate::store::event_log::run_stream(&state.run.id);
        let version = state.run.version;
        let new = run_events(&state, events);
        let (_, after) = w
            .append_and_project(&stream, version, meta, new, Some(state))
            .await?;
        after.ok_or_else(|| AppError::internal(anyhow::anyhow!("projection lost the run")))
    }

    /// After a commit: write run.json where the run comes to rest, and wake the workers if the
    /// run is runnable.
    ///
    /// run.json is written when the run is queued (with plan.json), waits for approval, or ends,
    /// as the original system did; not when it starts running again, a state it passes through
    /// on its way to the next rest. Each write replaces the file (temporary file and rename), and
    /// on a file system without a journal every replaced file makes later file creations
    /// slower for a minute (BENCHMARKS.md), so half the replacements cost measurably.
    async fn after_run_change(&self, before: &RunState, after: &RunState) {
        self.record_run_change(before, after).await;
        if after.run.status.is_runnable() && !before.run.status.is_runnable() {
            self.wake.notify_one();
        }
    }

    /// The part of [`Services::after_run_change`] that records the change: the cache, run.json.
    async fn record_run_change(&self, before: &RunState, after: &RunState) {
        self.runs.put(after);
        if before.run.status != after.run.status && after.run.status != RunStatus::Running {
            let artifacts = self.artifacts.clone();
            let state = after.clone();
            let written =
                tokio::task::spawn_blocking(move || artifacts.write_run_json(&state)).await;
            if let Ok(Err(e)) = written {
                tracing::warn!(run_id = %after.run.id, error = ?e, "could not write run.json");
            }
        }
    }

    #[tracing::instrument(skip_all, fields(thread_id = %cmd.thread_id))]
    pub async fn start_run(
        &self,
        caller: &Caller,
        cmd: StartRun,
        key: Option<String>,
    ) -> Result<RunOutcome, AppError> {
        let idem = Idempotency::new("startWorkflowRun", key, &cmd)?;
        let request_text = workspace::parse_text("requestText", &cmd.request_text)?;
        if request_text.is_empty() {
            return Err(AppError::validation("requestText must not be empty"));
        }
        let plan = self.preview(&cmd.mode, &cmd.skill_overrides)?;
        // Threads are never deleted and never move: read it before taking the write lock, once.
        let thread = self.thread_ids(&cmd.thread_id).await?;
        let mut w = self.store.write().await?;
        if let Some(replay) = w.replayed::<RunOutcome>(&idem).await? {
            w.commit().await?;
            return Ok(replay);
        }
        let thread = thread.ok_or_else(|| AppError::not_found("thread", &cmd.thread_id))?;
        let run_id = ids::generate("run-");
        let event = NewEvent {
            body: DomainEvent::WorkflowRunQueued {
                run_id: run_id.clone(),
                thread_id: cmd.thread_id.clone(),
                project_id: thread.project_id,
                brand_id: thread.brand_id,
                request_text,
                plan,
            },
            thread_id: Some(cmd.thread_id.clone()),
            run_id: Some(run_id.clone()),
        };
        let (_, state) = w
            .append_and_project(
                &crate::store::event_log::run_stream(&run_id),
                0,
                &caller.meta(),
                vec![event],
                None,
            )
            .await?;
        let state =
            state.ok_or_else(|| AppError::internal(anyhow::anyhow!("queued run not projected")))?;
        let mut handed = self.hand_off(&mut w, &state, &state).await?;
        let outcome = RunOutcome {
            run_id: run_id.clone(),
            resume_applied: false,
            gate: None,
            state: Some(state.clone()),
        };
        w.remember(&idem, &outcome).await?;
        // plan.json and run.json are written while the commit is on its way (the batch commits
        // after the writers queued behind this one), and removed if it fails: nothing else knows
        // the run before it commits.
        let files = {
            let artifacts = self.artifacts.clone();
            let state = state.clone();
            tokio::task::spawn_blocking(move || artifacts.write_plan(&state))
        };
        let committed = commit_handing(w, &mut handed).await;
        if committed.is_ok() {
            // Before the files are awaited: the runtime may step the run meanwhile, and its
            // newer copy must not be replaced by this one.
            self.runs
                .put(handed.as_ref().map_or(&state, |h| &h.stepped.0));
        }
        let written = files.await;
        if let Err(e) = committed {
            let dir = self.artifacts.run_dir(&run_id);
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
            return Err(e);
        }
        tracing::info!(run_id = %run_id, mode = %state.run.plan.effective_mode, "run queued");
        match written {
            Ok(Err(e)) => {
                tracing::error!(run_id = %run_id, error = ?e, "could not write plan.json")
            }
            Err(e) => tracing::error!(run_id = %run_id, error = ?e, "writing plan.json stopped"),
            Ok(Ok(())) => {}
        }
        match handed {
            Some(handed) => self.give(handed).await,
            None => self.wake.notify_one(),
        }
        Ok(outcome)
    }

    /// The project and brand of a thread (`None`: no such thread), from memory once known.
    async fn thread_ids(&self, thread_id: &str) -> Result<Option<super::ThreadIds>, AppError> {
        if let Some(ids) = self.threads.get(thread_id) {
            return Ok(Some(ids));
        }
        let Some(thread) = self.store.thread(thread_id).await? else {
            return Ok(None);
        };
        let ids = super::ThreadIds {
            project_id: thread.project_id,
            brand_id: thread.brand_id,
        };
        self.threads.put(thread_id, ids.clone());
        Ok(Some(ids))
    }

    /// The shared shape of run commands: decide on the run's state in a write turn, append.
    ///
    /// The decision is taken on this process's last committed copy of the run, when it has one,
    /// without reading the stored version first (one hand-over to the database less per
    /// command). A copy that turns out stale cannot write: its events reuse a stream version
    /// that exists (`CONFLICT`, on SQLite at the latest at commit), and the command is then
    /// taken again, decided on the stored run. A decision on the copy that appends nothing, or
    /// that is refused, is checked against the stored version in the same turn.
    async fn run_command(
        &self,
        caller: &Caller,
        idem: Idempotency,
        run_id: &str,
        decide: impl Fn(&RunState) -> Result<(Vec<DomainEvent>, bool), AppError>,
    ) -> Result<RunOutcome, AppError> {
        // The copy itself is taken once the command's turn comes (see `run_command_on`).
        let cached = self.runs.has(run_id).then_some(CachedCopy);
        self.on_copy_or_stored(run_id, cached, |cached| {
            self.run_command_on(caller, &idem, run_id, cached, &decide)
        })
        .await
    }

    /// Take `attempt` on `copy` (this process's last committed copy of the run, or what stands
    /// for it) if given, and, if the copy turns out stale (`CONFLICT`), once more on the stored
    /// run (`None`); the stale copy is forgotten.
    async fn on_copy_or_stored<C, T, Attempt>(
        &self,
        run_id: &str,
        copy: Option<C>,
        attempt: impl Fn(Option<C>) -> Attempt,
    ) -> Result<T, AppError>
    where
        Attempt: std::future::Future<Output = Result<T, AppError>>,
    {
        if let Some(copy) = copy {
            match attempt(Some(copy)).await {
                Err(AppError::Conflict(reason)) => {
                    tracing::debug!(%reason, "cached run state was stale; retrying on the stored one");
                    self.runs.forget(run_id);
                }
                other => return other,
            }
        }
        attempt(None).await
    }

    /// One write turn of [`Services::run_command`]: deciding on the cache's copy of the run
    /// when `cached`, else on the stored run.
    async fn run_command_on(
        &self,
        caller: &Caller,
        idem: &Idempotency,
        run_id: &str,
        cached: Option<CachedCopy>,
        decide: &impl Fn(&RunState) -> Result<(Vec<DomainEvent>, bool), AppError>,
    ) -> Result<RunOutcome, AppError> {
        let mut w = self.store.write().await?;
        // The copy is taken now, not before the wait for the turn: meanwhile the run's last
        // turn may have been recorded. A client approves as soon as it sees a gate, and it sees
        // the gate when the worker's batch commits, before the worker has put the new state in
        // the cache: a copy taken before the wait was stale for 9 % of approvals at C=50 (each
        // a failed send and a turn again). A copy gone meanwhile (the run finished, or a turn on
        // it failed) leaves the stored run.
        let copy = cached.and_then(|CachedCopy| self.runs.get(run_id));
        if let Some(replay) = w.replayed::<RunOutcome>(idem).await? {
            w.commit().await?;
            return Ok(replay);
        }
        let on_copy = copy.map(|c| {
            let decided = decide(&c);
            (c, decided)
        });
        let (state, decided) = match on_copy {
            // Events decided on a stale copy cannot commit (see above).
            Some((c, Ok(d))) if !d.0.is_empty() => (c, Ok(d)),
            Some((c, d)) if w.run_version(run_id).await? == Some(c.run.version) => (c, d),
            _ => {
                let stored = w.run_state(run_id).await?;
                let decided = decide(&stored);
                (stored, decided)
            }
        };
        let (events, resume_applied) = decided?;
        let before = state.clone();
        let meta = EventMeta {
            actor: caller.actor.clone(),
            correlation_id: Some(state.run.correlation_id.clone()),
            causation_id: Some(state.run.last_event_id.clone()),
        };
        let state = self.append_run(&mut w, state, &meta, events).await?;
        let mut handed = if state.run.status.is_runnable() && !before.run.status.is_runnable() {
            self.hand_off(&mut w, &state, &before).await?
        } else {
            None
        };
        let outcome = RunOutcome {
            run_id: run_id.to_string(),
            resume_applied,
            gate: before.run.current_stage.clone(),
            state: Some(state.clone()),
        };
        w.remember(idem, &outcome).await?;
        commit_handing(w, &mut handed).await?;
        match handed {
            Some(handed) => self.give(handed).await,
            None => self.after_run_change(&before, &state).await,
        }
        Ok(outcome)
    }

    #[tracing::instrument(skip_all, fields(run_id = %cmd.run_id))]
    pub async fn approve_run(
        &self,
        caller: &Caller,
        cmd: GateDecision,
        key: Option<String>,
    ) -> Result<RunOutcome, AppError> {
        let idem = Idempotency::new("approveWorkflowRun", key, &cmd)?;
        let comment = cmd
            .comment
            .as_deref()
            .map(|c| workspace::parse_text("comment", c))
            .transpose()?;
        let by = caller.actor.id.clone();
        self.run_command(caller, idem, &cmd.run_id, |s| {
            s.approve(cmd.stage_key.as_deref(), &by, comment.clone())
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(run_id = %cmd.run_id))]
    pub async fn reject_run(
        &self,
        caller: &Caller,
        cmd: GateDecision,
        key: Option<String>,
    ) -> Result<RunOutcome, AppError> {
        let idem = Idempotency::new("rejectWorkflowRun", key, &cmd)?;
        let comment = cmd
            .comment
            .as_deref()
            .map(|c| workspace::parse_text("comment", c))
            .transpose()?;
        let by = caller.actor.id.clone();
        self.run_command(caller, idem, &cmd.run_id, |s| {
            Ok((
                s.reject(cmd.stage_key.as_deref(), &by, comment.clone())?,
                false,
            ))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(run_id = %run_id))]
    pub async fn resume_run(
        &self,
        caller: &Caller,
        run_id: &str,
        key: Option<String>,
    ) -> Result<RunOutcome, AppError> {
        let idem = Idempotency::new("resumeWorkflowRun", key, &run_id)?;
        let outcome = self
            .run_command(caller, idem, run_id, |s| Ok(s.resume()))
            .await?;
        // A safety control: also nudge the workers (for example after a lost wake-up).
        self.wake.notify_one();
        Ok(outcome)
    }

    #[tracing::instrument(skip_all, fields(run_id = %run_id))]
    pub async fn cancel_run(
        &self,
        caller: &Caller,
        run_id: &str,
        reason: Option<String>,
        key: Option<String>,
    ) -> Result<RunOutcome, AppError> {
        let idem = Idempotency::new("cancelWorkflowRun", key, &(run_id, &reason))?;
        let reason = reason
            .as_deref()
            .map(|r| workspace::parse_text("reason", r))
            .transpose()?;
        self.run_command(caller, idem, run_id, |s| {
            Ok((s.cancel(reason.clone()), false))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(task_id = %task_id))]
    pub async fn complete_task(
        &self,
        caller: &Caller,
        task_id: &str,
        key: Option<String>,
    ) -> Result<RunOutcome, AppError> {
        let idem = Idempotency::new("completeTask", key, &task_id)?;
        let task = self
            .store
            .task(task_id)
            .await?
            .ok_or_else(|| AppError::not_found("task", task_id))?;
        self.run_command(caller, idem, &task.run_id, |s| {
            Ok((s.complete_task(task_id)?, false))
        })
        .await
    }

    /// The runtime's writes: decide on the current state inside the write transaction.
    /// A `CONFLICT` means the run moved on (approved, canceled, taken over) meanwhile.
    pub async fn advance(
        &self,
        run_id: &str,
        decide: impl FnOnce(&RunState) -> Result<Vec<DomainEvent>, AppError>,
    ) -> Result<RunState, AppError> {
        self.advance_once(run_id, None, decide, false, None)
            .await
            .map(|(state, _, _)| state)
    }

    /// The runtime's step: apply `decide`, then, in the same transaction, every following step
    /// that needs no stage work (start, gate, completion) and, with `start_next`, the start of
    /// the next stage attempt. Returns the new state and the attempt left in flight, if any.
    ///
    /// `known` is the caller's copy of the run's last committed state; it saves loading the run
    /// in the transaction. A stale copy cannot write anything: its events would reuse a stream
    /// version that exists (unique index → `CONFLICT`), or its decision is refused; either way
    /// the step is retried once on the state loaded inside the transaction.
    pub async fn advance_run(
        &self,
        run_id: &str,
        known: Option<RunState>,
        decide: impl Fn(&RunState) -> Result<Vec<DomainEvent>, AppError>,
        start_next: bool,
    ) -> Result<(RunState, Option<(String, u32)>), AppError> {
        self.advance_run_claiming(run_id, known, decide, start_next, None)
            .await
            .map(|(state, started, _)| (state, started))
    }

    /// [`Services::advance_run`], and when the step leaves the run at rest (a gate, the end)
    /// and `claim` names a worker (`owner`, lease seconds), the claim of that worker's next run
    /// with its first step, in the same write turn (see [`Services::claim_next`]).
    pub async fn advance_run_claiming(
        &self,
        run_id: &str,
        known: Option<RunState>,
        decide: impl Fn(&RunState) -> Result<Vec<DomainEvent>, AppError>,
        start_next: bool,
        claim: Option<(&str, f64)>,
    ) -> Result<Advanced, AppError> {
        self.on_copy_or_stored(run_id, known, |known| {
            self.advance_once(run_id, known, &decide, start_next, claim)
        })
        .await
    }

    async fn advance_once(
        &self,
        run_id: &str,
        known: Option<RunState>,
        decide: impl FnOnce(&RunState) -> Result<Vec<DomainEvent>, AppError>,
        start_next: bool,
        claim: Option<(&str, f64)>,
    ) -> Result<Advanced, AppError> {
        let mut w = self.store.write_background().await?;
        let state = match known {
            Some(s) => s,
            None => w.run_state(run_id).await?,
        };
        let before = state.clone();
        let events = decide(&state)?;
        let (state, started) = self.append_steps(&mut w, state, events, start_next).await?;
        let next = match claim {
            Some((owner, lease)) if !state.run.status.is_runnable() => {
                self.claim_next(&mut w, owner, lease, true).await?
            }
            _ => None,
        };
        self.commit_claim(w, &next).await?;
        self.after_run_change(&before, &state).await;
        Ok((state, started, self.claimed(next).await))
    }

    /// Commit a turn that may hold a [`Services::claim_next`]. A failed commit forgets the
    /// claimed run's copy: a stale one may be what failed (on SQLite a conflict surfaces as late
    /// as the commit), and the next attempt claims it without a step.
    async fn commit_claim(&self, w: WriteTx, next: &Option<ClaimedNext>) -> Result<(), AppError> {
        let committed = w.commit().await;
        if let (Err(_), Some((claimed, _))) = (&committed, next) {
            self.runs.forget(&claimed.run_id);
        }
        committed
    }

    /// Once a [`Services::claim_next`] committed: record the step it took, if any.
    async fn claimed(&self, next: Option<ClaimedNext>) -> Option<Claimed> {
        let (claimed, before) = next?;
        if let (Some(before), Some((after, _))) = (&before, &claimed.stepped) {
            self.after_run_change(before, after).await;
        }
        Some(claimed)
    }

    /// In a write turn: claim the oldest claimable run for `owner` and take its next step on
    /// this process's copy of it; the claim, and the run's state before the step if one was
    /// taken. [`Services::claim_and_step`] does it in a turn of its own; a runtime turn that
    /// leaves its run at rest does it too, so that a worker's claim of its next run costs no
    /// turn of its own while runs wait (under load, 4 of a Foundation run's 12 turns were such
    /// claims). With `verify` the step is taken only on a copy whose version is the stored one
    /// (a runtime turn: a step refused on a stale copy would fail the turn, and with it the step
    /// of the run the turn was taken for); without, a stale copy fails the turn (its events
    /// reuse a stream version: `CONFLICT`). A step that fails forgets the copy, and the whole
    /// turn fails with it: its retry claims without a step.
    async fn claim_next(
        &self,
        w: &mut WriteTx,
        owner: &str,
        lease_seconds: f64,
        verify: bool,
    ) -> Result<Option<ClaimedNext>, AppError> {
        let Some((run_id, stored)) = w.claim_oldest_run(owner, lease_seconds).await? else {
            return Ok(None);
        };
        let state = match self.runs.get(&run_id) {
            Some(c) if !verify || stored == Some(c.run.version) => c,
            _ => return Ok(Some((Claimed::alone(run_id), None))),
        };
        let before = state.clone();
        let stepped = match self.append_steps(w, state, Vec::new(), true).await {
            Ok(stepped) => stepped,
            Err(e) => {
                self.runs.forget(&run_id);
                return Err(e);
            }
        };
        if stepped.0.run.version == before.run.version {
            return Ok(Some((Claimed::alone(run_id), None)));
        }
        Ok(Some((
            Claimed {
                run_id,
                stepped: Some(stepped),
            },
            Some(before),
        )))
    }

    /// The runtime's claim: take the lease of the oldest claimable run for `owner` and, in the
    /// same write turn, take its next step as [`Services::advance_run`] would (one turn in the
    /// write batch instead of two). The step is decided on this process's last committed copy of
    /// the run; a stale copy cannot write (its events reuse a stream version: `CONFLICT`, and
    /// the claim is rolled back with them; see [`Services::claim_next`]). `None` when nothing
    /// was claimable.
    pub async fn claim_and_step(
        &self,
        owner: &str,
        lease_seconds: f64,
    ) -> Result<Option<Claimed>, AppError> {
        let mut w = self.store.write_background().await?;
        let next = self.claim_next(&mut w, owner, lease_seconds, false).await?;
        self.commit_claim(w, &next).await?;
        Ok(self.claimed(next).await)
    }

    /// In a turn that made `state` runnable, with a worker idle: lease the run to that worker
    /// and take the steps its claim would take (see [`super::handoff`]). What to give it once
    /// the turn commits; nothing to give when no worker is idle (the run waits in the queue).
    async fn hand_off(
        &self,
        w: &mut WriteTx,
        state: &RunState,
        before: &RunState,
    ) -> Result<Option<HandedOff>, AppError> {
        let Some(worker) = self.handoffs.take() else {
            return Ok(None);
        };
        // Should these writes fail, nothing of the turn commits, and the worker, dropped,
        // goes back to its loop.
        w.lease_run(&state.run.id, &worker.owner, worker.lease_seconds)
            .await?;
        let stepped = self
            .append_steps(w, state.clone(), Vec::new(), true)
            .await?;
        Ok(Some(HandedOff {
            worker: Some(worker),
            may_have_committed: false,
            before: before.clone(),
            stepped,
            store: self.store.clone(),
            wake: self.wake.clone(),
        }))
    }

    /// After the turn that handed a run off committed: record the change (cache, run.json) and
    /// give the run to its worker; a worker that has gone meanwhile (the runtime stopping) gives
    /// the lease back.
    async fn give(&self, mut handed: HandedOff) {
        self.record_run_change(&handed.before, &handed.stepped.0)
            .await;
        let Some(worker) = handed.worker.take() else {
            return;
        };
        let run_id = handed.stepped.0.run.id.clone();
        let owner = worker.owner.clone();
        let claimed = Claimed {
            run_id: run_id.clone(),
            stepped: Some(handed.stepped.clone()),
        };
        if !worker.give(claimed) {
            give_back(&self.store, &self.wake, &run_id, &owner).await;
        }
    }

    /// Append `events` (if any), then every following step that needs no stage work (start, gate,
    /// completion) and, with `start_next`, the start of the next stage attempt.
    async fn append_steps(
        &self,
        w: &mut WriteTx,
        mut state: RunState,
        mut events: Vec<DomainEvent>,
        start_next: bool,
    ) -> Result<(RunState, Option<(String, u32)>), AppError> {
        let mut started = None;
        loop {
            started = started.or_else(|| started_attempt(&events));
            let meta = EventMeta {
                actor: Actor::runtime(),
                correlation_id: Some(state.run.correlation_id.clone()),
                causation_id: Some(state.run.last_event_id.clone()),
            };
            state = self.append_run(w, state, &meta, events).await?;
            if started.is_some() {
                break;
            }
            events = match state.next_step() {
                Step::Start => state.start()?,
                Step::Gate { stage_key } => state.stop_at_gate(&stage_key)?,
                Step::Complete => state.complete()?,
                Step::Execute { stage_key, attempt } if start_next => {
                    state.start_attempt(&stage_key, attempt)?
                }
                _ => break,
            };
        }
        Ok((state, started))
    }
}

/// A runtime step's result: the run's new state, the attempt left in flight, and the worker's
/// next run if the same turn claimed one ([`Services::advance_run_claiming`]).
pub type Advanced = (RunState, Option<(String, u32)>, Option<Claimed>);

/// A claim made by [`Services::claim_next`], and the run's state before the step it took.
type ClaimedNext = (Claimed, Option<RunState>);

/// A run the runtime claimed with [`Services::claim_and_step`].
#[derive(Debug)]
pub struct Claimed {
    pub run_id: String,
    /// The run as the claim's turn committed it and the attempt it started, when that turn
    /// took a step; `None` when it took none (the worker decides on the stored state).
    pub stepped: Option<(RunState, Option<(String, u32)>)>,
}

impl Claimed {
    /// A claim that took no step.
    pub fn alone(run_id: String) -> Self {
        Claimed {
            run_id,
            stepped: None,
        }
    }
}

/// A run leased to an idle worker in a request's turn, and the steps that turn took. Dropped
/// before it was given once its turn may have committed (the request was dropped during or
/// after its commit: a client that left), it gives the lease back and wakes a worker, so the
/// run does not wait for the lease to run out. Dropped when its turn did not commit, it only
/// sends the worker back to its loop: the lease was rolled back with the turn, and giving it
/// back later could take the lease a retry of the command has given the same worker since.
struct HandedOff {
    worker: Option<super::handoff::Taken>,
    /// Whether the request's turn may have committed the lease (see [`commit_handing`]).
    may_have_committed: bool,
    /// The run before the request's turn (for a start: as queued).
    before: RunState,
    stepped: (RunState, Option<(String, u32)>),
    store: std::sync::Arc<crate::store::Store>,
    wake: std::sync::Arc<tokio::sync::Notify>,
}

impl Drop for HandedOff {
    fn drop(&mut self) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        if !self.may_have_committed {
            return;
        }
        let run_id = self.before.run.id.clone();
        let owner = worker.owner.clone();
        drop(worker);
        let (store, wake) = (self.store.clone(), self.wake.clone());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { give_back(&store, &wake, &run_id, &owner).await });
        }
    }
}

/// Commit a request's turn that may have handed a run off, keeping track of whether the lease
/// may be in the store: from the moment the commit is sent (a request dropped while it waits
/// for it cannot know), unless the commit fails.
async fn commit_handing(w: WriteTx, handed: &mut Option<HandedOff>) -> Result<(), AppError> {
    if let Some(h) = handed.as_mut() {
        h.may_have_committed = true;
    }
    let committed = w.commit().await;
    if let (Err(_), Some(h)) = (&committed, handed.as_mut()) {
        h.may_have_committed = false;
    }
    committed
}

/// Stands for the run cache's copy of a run in [`Services::run_command`]: the copy itself is
/// taken once the command's write turn comes.
struct CachedCopy;

/// Give back a run leased to a worker that will not drive it, and wake a worker for it.
async fn give_back(
    store: &crate::store::Store,
    wake: &tokio::sync::Notify,
    run_id: &str,
    owner: &str,
) {
    if let Err(e) = store.release_lease(run_id, owner).await {
        tracing::warn!(run_id = %run_id, error = ?e, "could not release lease");
    }
    wake.notify_one();
}

/// The attempt a batch of events starts, if any.
fn started_attempt(events: &[DomainEvent]) -> Option<(String, u32)> {
    events.iter().find_map(|e| match e {
        DomainEvent::WorkflowRunStageStarted {
            stage_key, attempt, ..
        } => Some((stage_key.clone(), *attempt)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::profiles::{ProfileSet, ResolveSettings};
    use std::sync::Arc;
    use std::time::Duration;

    /// A queued run of a fresh store's, leased to `owner` by a committed claim (its first stage
    /// attempt started).
    async fn leased_run(dir: &std::path::Path, owner: &str) -> (Services, RunState) {
        let store = crate::store::test_store(dir).await;
        let profiles =
            ProfileSet::parse(crate::startup::SHIPPED_PROFILES, "shipped").expect("profiles");
        let settings = ResolveSettings {
            force_foundation_fallback: true,
            foundation_mode: "foundation_stack".into(),
        };
        let services = Services::new(
            Arc::new(store),
            Arc::new(profiles),
            settings,
            crate::runner::artifacts::ArtifactStore::new(dir),
        );
        let threads = crate::store::seed::create_workspace(&services, 1)
            .await
            .expect("workspace");
        let start = StartRun {
            thread_id: threads[0].id.clone(),
            request_text: "a run".into(),
            mode: "content_calendar".into(),
            skill_overrides: SkillOverrides::default(),
        };
        services
            .start_run(&Caller::user("tester"), start, None)
            .await
            .expect("start");
        let claimed = services
            .claim_and_step(owner, 30.0)
            .await
            .expect("claim")
            .expect("a claimable run");
        let (state, _) = claimed.stepped.expect("a step");
        (services, state)
    }

    /// A hand-off for `state`'s run to the worker `owner` waiting in line; the worker's ticket.
    fn hand_off_to(
        services: &Services,
        state: &RunState,
        owner: &str,
        may_have_committed: bool,
    ) -> (HandedOff, super::super::handoff::Ticket) {
        let ticket = services.handoffs.wait(owner, 30.0);
        let worker = services.handoffs.take().expect("the worker waits");
        let handed = HandedOff {
            worker: Some(worker),
            may_have_committed,
            before: state.clone(),
            stepped: (state.clone(), None),
            store: services.store.clone(),
            wake: services.wake.clone(),
        };
        (handed, ticket)
    }

    /// A hand-off dropped unused sends its worker back to its loop. It gives the lease back
    /// only if its turn may have committed: the lease of a turn that failed was rolled back
    /// with it, and the same worker may hold a lease on the run by now (a retried command gave
    /// it one), which a late release would take away.
    #[tokio::test]
    async fn a_hand_off_gives_back_only_a_lease_its_turn_may_have_committed() {
        let dir = tempfile::tempdir().expect("tmp");
        let (services, state) = leased_run(dir.path(), "worker-x").await;
        let run_id = state.run.id.clone();
        let store = services.store.clone();

        let (handed, ticket) = hand_off_to(&services, &state, "worker-x", false);
        drop(handed);
        assert!(ticket.run.await.is_err(), "the worker is sent back");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            store
                .renew_lease(&run_id, "worker-x", 30.0)
                .await
                .expect("renew"),
            "the worker's lease is still its own"
        );

        let (handed, ticket) = hand_off_to(&services, &state, "worker-x", true);
        drop(handed);
        assert!(ticket.run.await.is_err(), "the worker is sent back");
        let mut released = false;
        for _ in 0..200 {
            if !store
                .renew_lease(&run_id, "worker-x", 30.0)
                .await
                .expect("renew")
            {
                released = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(released, "a lease that may have committed is given back");
        assert!(store.has_claimable_run().await.expect("look"));
    }
}
