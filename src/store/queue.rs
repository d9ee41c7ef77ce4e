//! The work queue: one row per runnable run, claimed with a lease (compare-and-set), so a run is
//! executed by one worker at a time, in one process or several.

use super::entities::run_queue;
use super::Store;
use crate::domain::time;
use crate::error::AppError;
use sea_orm::sea_query::{Condition, Expr};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

fn claimable(now: &str) -> Condition {
    Condition::any()
        .add(run_queue::Column::LeaseUntil.is_null())
        .add(run_queue::Column::LeaseUntil.lt(now))
}

impl Store {
    /// Claim one runnable run for `owner` until `lease_seconds` from now, trying up to `scan`
    /// candidates (other workers may win some of them).
    pub async fn claim_run(
        &self,
        owner: &str,
        lease_seconds: f64,
        scan: u64,
    ) -> Result<Option<String>, AppError> {
        let now = time::now();
        let candidates: Vec<String> = run_queue::Entity::find()
            .select_only()
            .column(run_queue::Column::RunId)
            .filter(claimable(&now))
            .order_by_asc(run_queue::Column::ReadyAt)
            .limit(scan)
            .into_tuple()
            .all(self.conn())
            .await?;
        if candidates.is_empty() {
            return Ok(None);
        }
        let until = time::after_seconds(lease_seconds);
        let mut claimed = None;
        let w = self.write().await?;
        for run_id in candidates {
            let res = run_queue::Entity::update_many()
                .col_expr(
                    run_queue::Column::LeaseOwner,
                    Expr::value(owner.to_string()),
                )
                .col_expr(run_queue::Column::LeaseUntil, Expr::value(until.clone()))
                .filter(run_queue::Column::RunId.eq(run_id.clone()))
                .filter(claimable(&now))
                .exec(w.tx())
                .await?;
            if res.rows_affected == 1 {
                claimed = Some(run_id);
                break;
            }
        }
        w.commit().await?;
        Ok(claimed)
    }

    /// Extend a lease; false when the lease is no longer ours (or the run left the queue).
    pub async fn renew_lease(
        &self,
        run_id: &str,
        owner: &str,
        lease_seconds: f64,
    ) -> Result<bool, AppError> {
        let res = run_queue::Entity::update_many()
            .col_expr(
                run_queue::Column::LeaseUntil,
                Expr::value(time::after_seconds(lease_seconds)),
            )
            .filter(run_queue::Column::RunId.eq(run_id))
            .filter(run_queue::Column::LeaseOwner.eq(owner))
            .exec(self.conn())
            .await?;
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
