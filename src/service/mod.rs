//! Use cases: load → decide → append + project in one transaction → commit → wake.

pub mod handoff;
pub mod runs;
pub mod workspace;

use crate::domain::events::{Actor, EventMeta};
use crate::domain::ids;
use crate::domain::profiles::{ProfileSet, ResolveSettings};
use crate::runner::artifacts::ArtifactStore;
use crate::store::Store;
use std::sync::Arc;
use tokio::sync::Notify;

/// Who is calling, and the correlation id their events share.
#[derive(Debug, Clone)]
pub struct Caller {
    pub actor: Actor,
    pub correlation_id: String,
}

impl Caller {
    pub fn user(id: impl Into<String>) -> Self {
        Caller {
            actor: Actor::user(id),
            correlation_id: ids::generate("req-"),
        }
    }

    fn meta(&self) -> EventMeta {
        EventMeta {
            actor: self.actor.clone(),
            correlation_id: Some(self.correlation_id.clone()),
            causation_id: None,
        }
    }
}

/// The last committed state of recently changed runs, kept after each commit of this process.
/// A copy may be stale (another instance, or a write that failed after it): every user either
/// checks its version in the write transaction or relies on the stream-version index, which
/// refuses events decided on a stale state (`CONFLICT`).
#[derive(Default)]
pub struct RunCache {
    runs: std::sync::Mutex<std::collections::HashMap<String, crate::domain::run::RunState>>,
}

/// Runs the cache keeps at most (active runs; finished ones leave it).
const RUN_CACHE_CAPACITY: usize = 10_000;

/// The project and brand of threads runs were started on: a thread is never deleted and never
/// moves, so a start on a known thread reads nothing before its write turn.
#[derive(Default)]
pub struct ThreadCache {
    threads: std::sync::Mutex<std::collections::HashMap<String, ThreadIds>>,
}

/// What a run takes from its thread.
#[derive(Debug, Clone)]
pub struct ThreadIds {
    pub project_id: String,
    pub brand_id: String,
}

/// Threads the cache keeps at most.
const THREAD_CACHE_CAPACITY: usize = 10_000;

impl ThreadCache {
    pub fn get(&self, thread_id: &str) -> Option<ThreadIds> {
        crate::sync::lock(&self.threads).get(thread_id).cloned()
    }

    pub fn put(&self, thread_id: &str, ids: ThreadIds) {
        let mut threads = crate::sync::lock(&self.threads);
        if threads.len() >= THREAD_CACHE_CAPACITY && !threads.contains_key(thread_id) {
            threads.clear();
        }
        threads.insert(thread_id.to_string(), ids);
    }
}

impl RunCache {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, crate::domain::run::RunState>>
    {
        crate::sync::lock(&self.runs)
    }

    pub fn get(&self, run_id: &str) -> Option<crate::domain::run::RunState> {
        self.lock().get(run_id).cloned()
    }

    pub fn put(&self, state: &crate::domain::run::RunState) {
        let mut runs = self.lock();
        if state.run.status.is_terminal() {
            runs.remove(&state.run.id);
            return;
        }
        if runs.len() >= RUN_CACHE_CAPACITY && !runs.contains_key(&state.run.id) {
            runs.clear();
        }
        runs.insert(state.run.id.clone(), state.clone());
    }

    /// Whether a copy of the run is kept.
    pub fn has(&self, run_id: &str) -> bool {
        self.lock().contains_key(run_id)
    }

    pub fn forget(&self, run_id: &str) {
        self.lock().remove(run_id);
    }
}

pub struct Services {
    pub store: Arc<Store>,
    pub profiles: Arc<ProfileSet>,
    pub settings: ResolveSettings,
    pub artifacts: ArtifactStore,
    /// Wakes the runtime's workers when a run becomes runnable.
    pub wake: Arc<Notify>,
    pub runs: RunCache,
    pub threads: ThreadCache,
    /// Idle workers, for requests that make a run runnable (see [`handoff`]).
    pub handoffs: handoff::HandOffs,
}

impl Services {
    pub fn new(
        store: Arc<Store>,
        profiles: Arc<ProfileSet>,
        settings: ResolveSettings,
        artifacts: ArtifactStore,
    ) -> Self {
        Services {
            store,
            profiles,
            settings,
            artifacts,
            wake: Arc::new(Notify::new()),
            runs: RunCache::default(),
            threads: ThreadCache::default(),
            handoffs: handoff::HandOffs::default(),
        }
    }
}
