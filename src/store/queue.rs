//! The work queue: one row per runnable run, claimed with a lease (compare-and-set), so a run is
//! executed by one worker at a time, in one process or several.

use super::entities::{run, run_queue};
use super::{Store, WriteTx};
use crate::domain::time;
use crate::error::AppError;
use sea_orm::sea_query::{Condition, Expr, ExprTrait, IntoCondition, Order, Query};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryTrait, UpdateMany};

fn claimable(now: &str) -> Condition {
    Condition::any()
        .add(run_queue::Column::LeaseUntil.is_null())
        .add(run_queue::Column::LeaseUntil.lt(now))
}

impl Store {
    /// Whether any run is claimable now: a look outside the write lock, so that a worker that
    /// finds nothing to do does not cost a turn in the write batch. (A run queued after this look
    /// wakes the worker, which registers for the wake-up before looking.)
    pub async fn has_claimable_run(&self) -> Result<bool, AppError> {
        let anything = run_queue::Entity::find()
            .filter(claimable(&time::now()))
            .one(self.conn())
            .await?;
        Ok(anything.is_some())
    }

    /// Claim one runnable run for `owner` until `lease_seconds` from now, in a write turn of its
    /// own (see [`WriteTx::claim_oldest_run`]); callers look first ([`Store::has_claimable_run`]).
    pub async fn claim_run(
        &self,
        owner: &str,
        lease_seconds: f64,
    ) -> Result<Option<String>, AppError> {
        // A writer like any other: it rides in the write batch (SQLite has one writer), as the
        // runtime's work, after clients' requests.
        let w = self.write_background().await?;
        let claimed = w
            .claim_oldest_run(owner, lease_seconds)
            .await?
            .map(|(id, _)| id);
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
        // In the write batch like every local write: on SQLite a write from outside it would
        // wait for the batch's lock on the file. A request's turn: a lease must not run out
        // while its renewal waits behind the runtime's other work.
        let w = self.write().await?;
        let renew = run_queue::Entity::update_many()
            .col_expr(
                run_queue::Column::LeaseUntil,
                Expr::value(time::after_seconds(lease_seconds)),
            )
            .filter(run_queue::Column::RunId.eq(run_id))
            .filter(run_queue::Column::LeaseOwner.eq(owner))
            .into_query()
            .returning_col(run_queue::Column::RunId)
            .to_owned();
        let renewed: Option<String> =
            super::first_value(&w.query(self.backend().build(&renew)).await?)?;
        w.commit().await?;
        Ok(renewed.is_some())
    }

    /// Give back every run leased to `owner`: a worker that stops driving its run also gives
    /// back a next run the turn that was cut short may have claimed for it.
    pub async fn release_leases_of(&self, owner: &str) -> Result<(), AppError> {
        self.release_where(run_queue::Column::LeaseOwner.eq(owner))
            .await
    }

    /// Give a claimed run back (it stays queued if it is still runnable).
    pub async fn release_lease(&self, run_id: &str, owner: &str) -> Result<(), AppError> {
        self.release_where(
            Condition::all()
                .add(run_queue::Column::RunId.eq(run_id))
                .add(run_queue::Column::LeaseOwner.eq(owner)),
        )
        .await
    }

    /// Clear the leases of the queue rows that match `which`, in a write turn of its own.
    async fn release_where(&self, which: impl IntoCondition) -> Result<(), AppError> {
        let w = self.write_background().await?;
        w.exec(&leased(None, None).filter(which).into_query())
            .await?;
        w.commit().await
    }
}

/// An update of queue rows that sets their lease: `owner` until `until` (`None`s: no lease).
fn leased(owner: Option<&str>, until: Option<String>) -> UpdateMany<run_queue::Entity> {
    run_queue::Entity::update_many()
        .col_expr(
            run_queue::Column::LeaseOwner,
            Expr::value(owner.map(str::to_string)),
        )
        .col_expr(run_queue::Column::LeaseUntil, Expr::value(until))
}

impl WriteTx {
    /// Lease a run this same turn made runnable to `owner` until `lease_seconds` from now (see
    /// `service::handoff`): its queue row is this turn's own, and no other claim can come
    /// between while the turn holds the write lock, so no compare-and-set is needed. The lease
    /// goes into the row's deferred write when there is one (see [`super::projector::Deferred`]).
    pub async fn lease_run(
        &self,
        run_id: &str,
        owner: &str,
        lease_seconds: f64,
    ) -> Result<(), AppError> {
        let until = time::after_seconds(lease_seconds);
        let mut deferred = false;
        self.defer(|d| deferred = d.lease(run_id, owner, until.clone()));
        if deferred {
            return Ok(());
        }
        self.exec(
            &leased(Some(owner), Some(until))
                .filter(run_queue::Column::RunId.eq(run_id))
                .into_query(),
        )
        .await
    }

    /// Claim the oldest claimable run for `owner` until `lease_seconds` from now: one
    /// compare-and-set statement (`UPDATE … WHERE run_id = (oldest claimable) AND still claimable
    /// RETURNING`), atomic on its own on both backends, so two workers never get the same run; a
    /// lost race just returns `None`. The lease is taken when this writer's batch commits. With
    /// the run id it returns the run's stored version, read by the same statement, for a caller
    /// that checks a cached copy (one send instead of two).
    pub async fn claim_oldest_run(
        &self,
        owner: &str,
        lease_seconds: f64,
    ) -> Result<Option<(String, Option<i64>)>, AppError> {
        let version = Query::select()
            .column(run::Column::Version)
            .from(run::Entity)
            .and_where(
                Expr::col((run::Entity, run::Column::Id))
                    .equals((run_queue::Entity, run_queue::Column::RunId)),
            )
            .to_owned();
        let claim = claim_oldest(owner, lease_seconds)
            .returning(Query::returning().exprs([
                Expr::col((run_queue::Entity, run_queue::Column::RunId)),
                Expr::SubQuery(None, Box::new(version.into())),
            ]))
            .to_owned();
        let rows = self.query(self.backend().build(&claim)).await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let run_id: String = row.get(0)?;
        let version: Option<i64> = row.get(1)?;
        Ok(Some((run_id, version)))
    }
}

/// The claim of the oldest claimable run for `owner` (see [`WriteTx::claim_oldest_run`]),
/// without its `RETURNING`.
fn claim_oldest(owner: &str, lease_seconds: f64) -> sea_orm::sea_query::UpdateStatement {
    let now = time::now();
    let oldest = Query::select()
        .column(run_queue::Column::RunId)
        .from(run_queue::Entity)
        .cond_where(claimable(&now))
        .order_by(run_queue::Column::ReadyAt, Order::Asc)
        .limit(1)
        .to_owned();
    leased(Some(owner), Some(time::after_seconds(lease_seconds)))
        .filter(run_queue::Column::RunId.in_subquery(oldest))
        .filter(claimable(&now))
        .into_query()
}
