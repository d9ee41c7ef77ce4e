//! Replay the log into empty read models (`vm-workflow rebuild-projections`).

use super::entities::{
    approval, artifact, brand, project, run, run_queue, stage, task, thread, timeline_item,
};
use super::{event_log, projector, EventFilter, Store, WriteTx};
use crate::domain::events::StoredEvent;
use crate::error::AppError;
use sea_orm::{EntityTrait, QueryOrder, QueryTrait};
use std::collections::BTreeMap;

const BATCH: u64 = 2_000;

async fn clear(w: &WriteTx) -> Result<(), AppError> {
    // Children before parents (foreign keys). The timeline is a view over the log.
    w.exec(&run_queue::Entity::delete_many().into_query())
        .await?;
    w.exec(&artifact::Entity::delete_many().into_query())
        .await?;
    w.exec(&task::Entity::delete_many().into_query()).await?;
    w.exec(&approval::Entity::delete_many().into_query())
        .await?;
    w.exec(&stage::Entity::delete_many().into_query()).await?;
    w.exec(&run::Entity::delete_many().into_query()).await?;
    w.exec(&thread::Entity::delete_many().into_query()).await?;
    w.exec(&project::Entity::delete_many().into_query()).await?;
    w.exec(&brand::Entity::delete_many().into_query()).await?;
    Ok(())
}

impl Store {
    /// Empty every read model and replay the whole log; returns the number of events replayed.
    /// Runs in one transaction: a failure leaves the previous read models in place.
    pub async fn rebuild_projections(&self) -> Result<u64, AppError> {
        let w = self.write().await?;
        clear(&w).await?;
        let mut after = 0;
        let mut count = 0u64;
        loop {
            let events = w
                .models(event_log::select_after(
                    after,
                    &EventFilter::default(),
                    BATCH,
                ))
                .await?
                .into_iter()
                .map(event_log::to_stored)
                .collect::<Result<Vec<_>, _>>()?;
            let Some(last) = events.last() else { break };
            after = last.sequence;
            count += events.len() as u64;
            // Consecutive events of one stream are projected together, as they were appended.
            let mut group: Vec<StoredEvent> = Vec::new();
            for ev in events {
                if group.first().is_some_and(|g| g.stream_id != ev.stream_id) {
                    projector::project(&w, &std::mem::take(&mut group), None).await?;
                }
                group.push(ev);
            }
            if !group.is_empty() {
                projector::project(&w, &group, None).await?;
            }
        }
        w.commit().await?;
        Ok(count)
    }

    /// A canonical dump of every read model, for comparing a rebuild with the live tables.
    pub async fn dump_read_models(&self) -> Result<BTreeMap<&'static str, Vec<String>>, AppError> {
        let c = self.conn();
        let mut out = BTreeMap::new();
        macro_rules! dump {
            ($name:literal, $entity:path, $($order:expr),+) => {{
                let rows = <$entity>::find()$(.order_by_asc($order))+.all(c).await?;
                out.insert($name, rows.into_iter().map(|r| format!("{r:?}")).collect());
            }};
        }
        dump!("brands", brand::Entity, brand::Column::Id);
        dump!("projects", project::Entity, project::Column::Id);
        dump!("threads", thread::Entity, thread::Column::Id);
        dump!(
            "timeline_items",
            timeline_item::Entity,
            timeline_item::Column::Sequence
        );
        dump!("runs", run::Entity, run::Column::Id);
        dump!(
            "stages",
            stage::Entity,
            stage::Column::RunId,
            stage::Column::Position
        );
        dump!("approvals", approval::Entity, approval::Column::Id);
        dump!("tasks", task::Entity, task::Column::Id);
        dump!(
            "artifacts",
            artifact::Entity,
            artifact::Column::RunId,
            artifact::Column::StageKey,
            artifact::Column::Path
        );
        let queued = run_queue::Entity::find()
            .order_by_asc(run_queue::Column::RunId)
            .all(c)
            .await?;
        // Leases are the workers' state, not the log's: not compared.
        out.insert(
            "run_queue",
            queued
                .into_iter()
                .map(|r| format!("{} ready at {}", r.run_id, r.ready_at))
                .collect(),
        );
        Ok(out)
    }
}
