//! The background runtime: a bounded pool of workers inside `serve` that claim runnable runs
//! (a lease in the store, compare-and-set, so one run has one worker across processes), execute
//! their stages through the runner with timeout and retries, and stop at gates.

use crate::domain::run::{RunState, RunStatus, StageFailure, Step};
use crate::domain::time;
use crate::error::AppError;
use crate::runner::{StageContext, StageError, StageRunner, STAGE_TIMEOUT};
use crate::service::runs::Claimed;
use crate::service::Services;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub workers: usize,
    pub lease_seconds: f64,
    /// Fallback scan for work the wake-up did not announce (expired leases, other instances).
    pub poll_interval: Duration,
}

pub struct Runtime {
    services: Arc<Services>,
    runner: Arc<dyn StageRunner>,
    config: RuntimeConfig,
    /// This process's name in leases; each worker adds its index, so that a run whose lease
    /// ran out is never renewed by one worker while another drives it.
    owner: String,
}

/// Stops the workers: they finish the step in progress, then exit.
pub struct RuntimeHandle {
    shutdown: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
}

impl RuntimeHandle {
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for w in self.workers {
            let _ = w.await;
        }
    }
}

/// How a claimed run's drive ended.
enum Drive {
    /// Nothing left for now (gate, terminal): the run left the work queue with its last write.
    Done,
    /// The run is no longer ours (lease lost, or it changed under us): give it back.
    Release,
}

impl Runtime {
    pub fn new(
        services: Arc<Services>,
        runner: Arc<dyn StageRunner>,
        config: RuntimeConfig,
    ) -> Self {
        Runtime {
            services,
            runner,
            config,
            owner: crate::domain::ids::generate("worker-"),
        }
    }

    pub fn spawn(self) -> RuntimeHandle {
        let (tx, rx) = watch::channel(false);
        let this = Arc::new(self);
        let workers = (0..this.config.workers)
            .map(|i| {
                let this = this.clone();
                let rx = rx.clone();
                tokio::spawn(async move { this.worker(i, rx).await })
            })
            .collect();
        RuntimeHandle {
            shutdown: tx,
            workers,
        }
    }

    async fn worker(self: Arc<Self>, index: usize, mut shutdown: watch::Receiver<bool>) {
        let wake = self.services.wake.clone();
        let owner = format!("{}-{index}", self.owner);
        // A run claimed by the turn that left the previous one at rest.
        let mut pending: Option<Claimed> = None;
        loop {
            if *shutdown.borrow() && pending.is_none() {
                return;
            }
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let claimed = match pending.take() {
                Some(next) => Some(next),
                None => match self.claim(&owner).await {
                    Ok(Some(claimed)) => Some(claimed),
                    Ok(None) => {
                        // Idle: in line for a run a request makes runnable (`service::handoff`),
                        // besides the wake-up and the poll.
                        let handoffs = &self.services.handoffs;
                        let mut ticket = handoffs.wait(&owner, self.config.lease_seconds);
                        let (handed, woken) = tokio::select! {
                            run = &mut ticket.run => (Some(run.ok()), false),
                            _ = &mut notified => (None, true),
                            _ = tokio::time::sleep(self.config.poll_interval) => (None, false),
                            _ = shutdown.changed() => (None, false),
                        };
                        match handed {
                            Some(run) => run,
                            None => {
                                let run = handoffs.withdraw(ticket).await;
                                if woken && run.is_some() {
                                    // A request took this worker meanwhile: the wake-up was
                                    // for another run, and another worker.
                                    self.services.wake.notify_one();
                                }
                                run
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = ?e, "claiming runs failed");
                        tokio::select! {
                            _ = tokio::time::sleep(self.config.poll_interval) => {}
                            _ = shutdown.changed() => {}
                        }
                        None
                    }
                },
            };
            if let Some(claimed) = claimed {
                if *shutdown.borrow() {
                    // Claimed as the runtime stops (handed over, or by the turn that left the
                    // previous run at rest): give it back to whoever runs next.
                    let store = &self.services.store;
                    if let Err(e) = store.release_lease(&claimed.run_id, &owner).await {
                        tracing::warn!(error = ?e, "could not release lease");
                    }
                    return;
                }
                let span = tracing::info_span!("run", run_id = %claimed.run_id, worker = index);
                pending = self
                    .drive_claimed(&owner, claimed, &mut shutdown)
                    .instrument(span)
                    .await;
            }
        }
    }

    /// Claim the oldest claimable run, with its next step in the same write turn when this
    /// process has a current copy of it; after a failed combined claim (a stale copy), a plain
    /// claim.
    async fn claim(&self, owner: &str) -> Result<Option<Claimed>, AppError> {
        let store = &self.services.store;
        if !store.has_claimable_run().await? {
            return Ok(None);
        }
        let lease = self.config.lease_seconds;
        match self.services.claim_and_step(owner, lease).await {
            Ok(claimed) => Ok(claimed),
            Err(e) => {
                if matches!(e, AppError::Conflict(_)) {
                    tracing::debug!(error = ?e, "the run changed meanwhile; claiming alone");
                } else {
                    tracing::warn!(error = ?e, "claiming with a step failed; claiming alone");
                }
                Ok(store.claim_run(owner, lease).await?.map(Claimed::alone))
            }
        }
    }

    /// Drive a claimed run while a heartbeat keeps the lease. Renewals that fail for two thirds
    /// of the lease (two in a row) count as losing it: the lease may run out before the next,
    /// and another worker may take the run.
    async fn drive_claimed(
        &self,
        owner: &str,
        claimed: Claimed,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Claimed> {
        let run_id = claimed.run_id.as_str();
        let lost = Arc::new(AtomicBool::new(false));
        let (lost_tx, mut lost_rx) = watch::channel(false);
        let heartbeat = {
            let store = self.services.store.clone();
            let owner = owner.to_string();
            let run_id = run_id.to_string();
            let lease = self.config.lease_seconds;
            let lost = lost.clone();
            tokio::spawn(async move {
                let every = Duration::from_secs_f64((lease / 3.0).max(0.05));
                let mut renewed = Instant::now();
                loop {
                    tokio::time::sleep(every).await;
                    let held = match store.renew_lease(&run_id, &owner, lease).await {
                        Ok(true) => {
                            renewed = Instant::now();
                            true
                        }
                        Ok(false) => false,
                        Err(e) => {
                            tracing::warn!(error = ?e, "lease renewal failed");
                            renewed.elapsed().as_secs_f64() < lease * 0.6
                        }
                    };
                    if !held {
                        lost.store(true, Ordering::SeqCst);
                        let _ = lost_tx.send(true);
                        return;
                    }
                }
            })
        };
        // The next run, when the turn that left this one at rest claimed it.
        let mut next = None;
        let outcome = tokio::select! {
            r = self.drive(run_id, claimed.stepped, &lost, owner, &mut next) => r,
            _ = lost_rx.changed() => Ok(Drive::Release),
            _ = shutdown.changed() => Ok(Drive::Release),
        };
        heartbeat.abort();
        let release = match outcome {
            // A gate or the end: the run's queue row went away in that same transaction.
            Ok(Drive::Done) => false,
            Ok(Drive::Release) => true,
            Err(e) => {
                tracing::error!(error = ?e, "run execution failed; it will be retried");
                true
            }
        };
        // Still queued only if runnable: give the lease back so any worker can continue. With
        // it every other run leased to this worker: the drive may have been cut short (a stop,
        // a lost lease) after a turn of it claimed the next run, before it could say so.
        if release {
            if let Err(e) = self.services.store.release_leases_of(owner).await {
                tracing::warn!(error = ?e, "could not release leases");
            }
            self.services.wake.notify_one();
            return None;
        }
        next
    }

    /// Drive a claimed run from `stepped` (the state its claim committed, and the attempt that
    /// turn started) or, without it, from this process's last copy or the store.
    async fn drive(
        &self,
        run_id: &str,
        stepped: Option<(RunState, Option<(String, u32)>)>,
        lost: &AtomicBool,
        owner: &str,
        next: &mut Option<Claimed>,
    ) -> Result<Drive, AppError> {
        let services = &self.services;
        // This process's last committed state of the run saves loading it; a stale copy cannot
        // write (see `advance_run`), and "nothing to do" is checked against the store unless
        // this drive committed the state itself (a later change re-queues the run).
        let mut fresh = false;
        // An attempt this worker has just started (its StageStarted is committed).
        let mut in_flight: Option<(String, u32)> = None;
        let mut state = match (stepped, services.runs.get(run_id)) {
            (Some((s, started)), _) => {
                fresh = true;
                in_flight = started;
                s
            }
            (None, Some(s)) => s,
            (None, None) => {
                fresh = true;
                match services.store.run_state(run_id).await? {
                    Some(s) => s,
                    None => return Ok(Drive::Done),
                }
            }
        };
        let mut conflicts = 0;
        loop {
            if lost.load(Ordering::SeqCst) {
                return Ok(Drive::Release);
            }
            let known = Some(state.clone());
            let result = match in_flight.take() {
                Some((stage_key, attempt)) => {
                    self.execute(&state, &stage_key, attempt, owner, next).await
                }
                None => match state.next_step() {
                    Step::Idle if !fresh => {
                        fresh = true;
                        match services.store.run_state(run_id).await? {
                            Some(s) => state = s,
                            None => return Ok(Drive::Done),
                        }
                        continue;
                    }
                    Step::Idle => {
                        // Not runnable any more: the queue row is gone, unless the run is
                        // somehow still runnable (then give the lease back).
                        return Ok(if state.run.status.is_runnable() {
                            Drive::Release
                        } else {
                            Drive::Done
                        });
                    }
                    Step::Start => {
                        services
                            .advance_run(run_id, known, |s| s.start(), true)
                            .await
                    }
                    Step::Gate { stage_key } => {
                        services
                            .advance_run(run_id, known, |s| s.stop_at_gate(&stage_key), true)
                            .await
                    }
                    Step::Complete => {
                        services
                            .advance_run(run_id, known, |s| s.complete(), true)
                            .await
                    }
                    Step::Execute { stage_key, attempt } => {
                        services
                            .advance_run(
                                run_id,
                                known,
                                |s| s.start_attempt(&stage_key, attempt),
                                false,
                            )
                            .await
                    }
                },
            };
            match result {
                Ok((next, started)) => {
                    conflicts = 0;
                    if next.run.status == RunStatus::WaitingApproval
                        && state.run.status != RunStatus::WaitingApproval
                    {
                        tracing::info!(stage_key = ?next.run.current_stage, "waiting for approval");
                    }
                    state = next;
                    // Just committed by this worker: the store's state, no need to read it
                    // back when it turns out to be idle (4 queries per drive).
                    fresh = true;
                    in_flight = started;
                }
                Err(AppError::Conflict(reason)) => {
                    conflicts += 1;
                    tracing::debug!(%reason, "run changed meanwhile; reloading");
                    if conflicts > 3 {
                        return Ok(Drive::Release);
                    }
                    services.runs.forget(run_id);
                    match services.store.run_state(run_id).await? {
                        Some(s) => state = s,
                        None => return Ok(Drive::Done),
                    }
                    fresh = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt of one stage, already started (its `WorkflowRunStageStarted` is committed):
    /// runner under timeout, artifacts, result event (with the steps that follow it).
    async fn execute(
        &self,
        state: &RunState,
        stage_key: &str,
        attempt: u32,
        owner: &str,
        next: &mut Option<Claimed>,
    ) -> Result<(RunState, Option<(String, u32)>), AppError> {
        let services = &self.services;
        let Some(stage) = state.stage(stage_key).cloned() else {
            return Err(AppError::internal(anyhow::anyhow!(
                "stage {stage_key} vanished"
            )));
        };
        let ctx = StageContext::for_attempt(state, &stage, attempt);
        let span = tracing::info_span!("stage", stage_key = %stage_key, attempt);
        let started_at = time::now();
        let outcome = async {
            let timeout = Duration::from_secs_f64(stage.timeout_seconds);
            match tokio::time::timeout(timeout, self.runner.execute(&ctx)).await {
                Ok(Ok(output)) => {
                    // File work on the blocking pool: it must not stall the async workers
                    // (one of them may be holding the write lock).
                    let artifacts = services.artifacts.clone();
                    let ctx = ctx.clone();
                    let started_at = started_at.clone();
                    tokio::task::spawn_blocking(move || {
                        artifacts.write_stage(&ctx, &output, &started_at)
                    })
                    .await
                    .unwrap_or_else(|e| {
                        Err(StageError {
                            code: crate::runner::ARTIFACT_WRITE_ERROR.into(),
                            message: format!("writing the artifacts stopped: {e}"),
                            retryable: true,
                        })
                    })
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(StageError {
                    code: STAGE_TIMEOUT.into(),
                    message: format!(
                        "stage {stage_key} exceeded its timeout of {}s",
                        stage.timeout_seconds
                    ),
                    retryable: true,
                }),
            }
        }
        .instrument(span)
        .await;
        match outcome {
            Ok(artifacts) => {
                let key = stage_key.to_string();
                let count = artifacts.len();
                // If this leaves the run at rest, the same turn claims this worker's next run.
                let (after, started, claimed) = services
                    .advance_run_claiming(
                        &state.run.id,
                        Some(state.clone()),
                        |s| s.complete_attempt(&key, attempt, artifacts.clone()),
                        true,
                        Some((owner, self.config.lease_seconds)),
                    )
                    .await?;
                tracing::info!(stage_key = %stage_key, attempt, artifacts = count, "stage completed");
                if claimed.is_some() {
                    *next = claimed;
                }
                Ok((after, started))
            }
            Err(err) => {
                if let Err(e) =
                    services
                        .artifacts
                        .write_attempt(&ctx, "failed", Some(&err), &started_at)
                {
                    tracing::warn!(error = ?e, "could not record the failed attempt");
                }
                tracing::warn!(stage_key = %stage_key, attempt, code = %err.code, message = %err.message, "stage attempt failed");
                let key = stage_key.to_string();
                let failure = StageFailure {
                    error_code: err.code,
                    error_message: err.message,
                    retryable: err.retryable,
                };
                // No chaining here: a retry starts after the backoff.
                let (next, _) = services
                    .advance_run(
                        &state.run.id,
                        Some(state.clone()),
                        |s| s.fail_attempt(&key, attempt, failure.clone()),
                        false,
                    )
                    .await?;
                if let Some(s) = next.stage(stage_key) {
                    if s.status == crate::domain::run::StageStatus::Running
                        && s.backoff_seconds > 0.0
                    {
                        tokio::time::sleep(Duration::from_secs_f64(s.backoff_seconds)).await;
                    }
                }
                Ok((next, None))
            }
        }
    }
}
