//! The work queue: one row per runnable run, claimed with a lease (compare-and-set), so a run is
//! executed by one worker at a time, in one process or several.

use super::entities::run_queue;
use super::Store;
use crate::domain::time;
use crate::error::AppError;
use sea_orm::sea_query::{Condition, Expr, Order, Query};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

fn claimable(now: &str) -> Condition {
    Condition::any()
        .add(run_queue::Column::LeaseUntil.is_null())
        .add(run_queue::Column::LeaseUntil.lt(now))
}

impl Store {
    /// Claim one runnable run for `owner` until `lease_seconds` from now: one compare-and-set
    /// statement (`UPDATE … WHERE run_id = (oldest claimable) AND still claimable RETURNING`),
    /// atomic on its own on both backends: it takes the oldest claimable run, and a lost race
    /// just returns `None`.
    pub async fn claim_run(
        &self,
        owner: &str,
        lease_seconds: f64,
    ) -> Result<Option<String>, AppError> {
        let now = time::now();
        let oldest = Query::select()
            .column(run_queue::Column::RunId)
            .from(run_queue::Entity)
            .cond_where(claimable(&now))
            .order_by(run_queue::Column::ReadyAt, Order::Asc)
            .limit(1)
            .to_owned();
        let update = run_queue::Entity::update_many()
            .col_expr(
                run_queue::Column::LeaseOwner,
                Expr::value(owner.to_string()),
            )
            .col_expr(
                run_queue::Column::LeaseUntil,
                Expr::value(time::after_seconds(lease_seconds)),
            )
            .filter(run_queue::Column::RunId.in_subquery(oldest))
            .filter(claimable(&now));
        // Look first, outside the write lock: most claims after a run stops at a gate find
        // nothing, and a miss must not cost a turn in the write batch. (A run queued after this
        // look wakes the worker, which registered for the wake-up before claiming.)
        let anything = run_queue::Entity::find()
            .filter(claimable(&now))
            .one(self.conn())
            .await?;
        if anything.is_none() {
            return Ok(None);
        }
        // A writer like any other: it rides in the write batch (SQLite has one writer).
        let w = self.write().await?;
        let claimed = update.exec_with_returning(w.tx()).await?;
        w.commit().await?;
        Ok(claimed.into_iter().next().map(|m| m.run_id))
    }

    /// Extend a lease; false when the lease is no longer ours (or the run left the queue).
    pub async fn renew_lease(
        &self,
        run_id: &str,
        owner: &str,
        lease_seconds: f64,
    ) -> Result<bool, AppError> {
        // In the write batch like every local write: on SQLite a write from outside it would
        // wait for the batch's lock on the file.
        let w = self.write().await?;
        let res = run_queue::Entity::update_many()
            .col_expr(
                run_queue::Column::LeaseUntil,
                Expr::value(time::after_seconds(lease_seconds)),
            )
            .filter(run_queue::Column::RunId.eq(run_id))
            .filter(run_queue::Column::LeaseOwner.eq(owner))
            .exec(w.tx())
            .await?;
        w.commit().await?;
        Ok(res.rows_affected == 1)
    }

    /// Give a claimed run back (it stays queued if it is still runnable).
    pub async fn release_lease(&self, run_id: &str, owner: &str) -> Result<(), AppError> {
        let w = self.write().await?;
        run_queue::Entity::update_many()
            .col_expr(
                run_queue::Column::LeaseOwner,
                Expr::value(Option::<String>::None),
            )
            .col_expr(
                run_queue::Column::LeaseUntil,
                Expr::value(Option::<String>::None),
            )
            .filter(run_queue::Column::RunId.eq(run_id))
            .filter(run_queue::Column::LeaseOwner.eq(owner))
            .exec(w.tx())
            .await?;
        w.commit().await
    }
}
