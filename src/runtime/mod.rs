//! The background runtime: a bounded pool of workers inside `serve` that claim runnable runs
//! (a lease in the store, compare-and-set, so one run has one worker across processes), execute
//! their stages through the runner with timeout and retries, and stop at gates.

use crate::domain::run::{RunState, StageFailure, Step};
use crate::domain::time;
use crate::error::AppError;
use crate::runner::{StageContext, StageError, StageRunner, STAGE_TIMEOUT};
use crate::service::Services;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
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
    /// Nothing left for now (gate, terminal).
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
        let scan = self.config.workers as u64 * 2;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self
                .services
                .store
                .claim_run(&self.owner, self.config.lease_seconds, scan)
                .await
            {
                Ok(Some(run_id)) => {
                    let span = tracing::info_span!("run", run_id = %run_id, worker = index);
                    self.drive_claimed(&run_id, &mut shutdown)
                        .instrument(span)
                        .await;
                }
                Ok(None) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep(self.config.poll_interval) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = ?e, "claiming runs failed");
                    tokio::select! {
                        _ = tokio::time::sleep(self.config.poll_interval) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        }
    }

    /// Drive a claimed run while a heartbeat keeps the lease.
    async fn drive_claimed(&self, run_id: &str, shutdown: &mut watch::Receiver<bool>) {
        let lost = Arc::new(AtomicBool::new(false));
        let (lost_tx, mut lost_rx) = watch::channel(false);
        let heartbeat = {
            let store = self.services.store.clone();
            let owner = self.owner.clone();
            let run_id = run_id.to_string();
            let lease = self.config.lease_seconds;
            let lost = lost.clone();
            tokio::spawn(async move {
                let every = Duration::from_secs_f64((lease / 3.0).max(0.05));
                loop {
                    tokio::time::sleep(every).await;
                    match store.renew_lease(&run_id, &owner, lease).await {
                        Ok(true) => {}
                        Ok(false) => {
                            lost.store(true, Ordering::SeqCst);
                            let _ = lost_tx.send(true);
                            return;
                        }
                        Err(e) => tracing::warn!(error = ?e, "lease renewal failed"),
                    }
                }
            })
        };
        let outcome = tokio::select! {
            r = self.drive(run_id, &lost) => r,
            _ = lost_rx.changed() => Ok(Drive::Release),
            _ = shutdown.changed() => Ok(Drive::Release),
        };
        heartbeat.abort();
        match outcome {
            Ok(Drive::Done) => {}
            Ok(Drive::Release) => {}
            Err(e) => tracing::error!(error = ?e, "run execution failed; it will be retried"),
        }
        // Still queued only if runnable: give the lease back so any worker can continue.
        if let Err(e) = self.services.store.release_lease(run_id, &self.owner).await {
            tracing::warn!(error = ?e, "could not release lease");
        }
    }

    async fn drive(&self, run_id: &str, lost: &AtomicBool) -> Result<Drive, AppError> {
        let services = &self.services;
        let Some(mut state) = services.store.run_state(run_id).await? else {
            return Ok(Drive::Done);
        };
        let mut conflicts = 0;
        loop {
            if lost.load(Ordering::SeqCst) {
                return Ok(Drive::Release);
            }
            let step = state.next_step();
            let result = match &step {
                Step::Idle => return Ok(Drive::Done),
                Step::Start => services.advance(run_id, |s| s.start()).await,
                Step::Gate { stage_key } => {
                    let key = stage_key.clone();
                    let r = services.advance(run_id, |s| s.stop_at_gate(&key)).await;
                    if r.is_ok() {
                        tracing::info!(stage_key = %stage_key, "waiting for approval");
                    }
                    r
                }
                Step::Complete => services.advance(run_id, |s| s.complete()).await,
                Step::Execute { stage_key, attempt } => {
                    self.execute(&state, stage_key, *attempt).await
                }
            };
            match result {
                Ok(next) => {
                    conflicts = 0;
                    state = next;
                }
                Err(AppError::Conflict(reason)) => {
                    conflicts += 1;
                    tracing::debug!(%reason, "run changed meanwhile; reloading");
                    if conflicts > 3 {
                        return Ok(Drive::Release);
                    }
                    match services.store.run_state(run_id).await? {
                        Some(s) => state = s,
                        None => return Ok(Drive::Done),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt of one stage: started event, runner under timeout, artifacts, result event.
    async fn execute(
        &self,
        state: &RunState,
        stage_key: &str,
        attempt: u32,
    ) -> Result<RunState, AppError> {
        let services = &self.services;
        let key = stage_key.to_string();
        let state = services
            .advance(&state.run.id, |s| s.start_attempt(&key, attempt))
            .await?;
        let Some(stage) = state.stage(stage_key).cloned() else {
            return Err(AppError::internal(anyhow::anyhow!(
                "stage {stage_key} vanished"
            )));
        };
        let ctx = StageContext {
            run_id: state.run.id.clone(),
            thread_id: state.run.thread_id.clone(),
            project_id: state.run.project_id.clone(),
            brand_id: state.run.brand_id.clone(),
            stage_key: stage_key.to_string(),
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
        };
        let span = tracing::info_span!("stage", stage_key = %stage_key, attempt);
        let started_at = time::now();
        let outcome = async {
            let timeout = Duration::from_secs_f64(stage.timeout_seconds);
            match tokio::time::timeout(timeout, self.runner.execute(&ctx)).await {
                Ok(Ok(output)) => services.artifacts.write_stage(&ctx, &output, &started_at),
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
                let next = services
                    .advance(&state.run.id, |s| {
                        s.complete_attempt(&key, attempt, artifacts)
                    })
                    .await?;
                tracing::info!(stage_key = %stage_key, attempt, artifacts = count, "stage completed");
                Ok(next)
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
                let next = services
                    .advance(&state.run.id, |s| s.fail_attempt(&key, attempt, failure))
                    .await?;
                if let Some(s) = next.stage(stage_key) {
                    if s.status == crate::domain::run::StageStatus::Running
                        && s.backoff_seconds > 0.0
                    {
                        tokio::time::sleep(Duration::from_secs_f64(s.backoff_seconds)).await;
                    }
                }
                Ok(next)
            }
        }
    }
}
