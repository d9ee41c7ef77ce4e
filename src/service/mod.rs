//! Use cases: load → decide → append + project in one transaction → commit → wake.

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

pub struct Services {
    pub store: Arc<Store>,
    pub profiles: Arc<ProfileSet>,
    pub settings: ResolveSettings,
    pub artifacts: ArtifactStore,
    /// Wakes the runtime's workers when a run becomes runnable.
    pub wake: Arc<Notify>,
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
        }
    }
}
