//! SQLite's WAL checkpoints, out of the commits.
//!
//! By default SQLite copies its write-ahead log back into the database file (a checkpoint) inside
//! the commit that takes the log past 1,000 pages. With group commit that commit holds the write
//! lock while it copies and syncs: 6-7 ms, the p99 of every commit (BENCHMARKS.md). Here
//! automatic checkpoints are off (`wal_autocheckpoint = 0` on every connection) and a task of the
//! store's does them:
//!
//! - every [`INTERVAL`] after commits, a `PASSIVE` checkpoint on a pool connection, beside the
//!   writers: it copies what no reader still needs and blocks nobody;
//! - SQLite starts the log over only when a write transaction begins with every frame copied,
//!   which a batch writer that almost always has a transaction open rarely sees (the log grew
//!   without bound with passive checkpoints alone). So once the log holds the store's limit of
//!   pages, the task takes a write turn, commits the open batch, and checkpoints again: only the
//!   frames since its last pass are left to copy, and the next writer starts the log over.

use super::turns::{Turn, TurnLock};
use super::{Batch, Queued, WriteStats};
use sea_orm::sqlx::{self, pool::PoolConnection, Sqlite};
use sea_orm::DatabaseConnection;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the task looks for new commits to checkpoint.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// Pages the log may hold before the task makes it start over (`VM_SQLITE_WAL_PAGES`,
/// default 4,096: 16 MiB with 4 KiB pages).
pub fn default_limit() -> u64 {
    super::env_number("VM_SQLITE_WAL_PAGES")
        .map(|n| n.max(1.0) as u64)
        .unwrap_or(4096)
}

/// `(log frames, frames copied)` after a passive checkpoint on `conn`.
async fn passive(conn: &mut PoolConnection<Sqlite>) -> Result<(i64, i64), sqlx::Error> {
    let (_, log, copied): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(&mut **conn)
        .await?;
    Ok((log, copied))
}

/// What the checkpoint task shares with the store.
pub(super) struct Checkpoints {
    pub db: DatabaseConnection,
    pub batch: TurnLock<Batch>,
    pub queued: Arc<AtomicUsize>,
    pub stats: Arc<WriteStats>,
    pub limit: Arc<AtomicU64>,
}

impl Checkpoints {
    /// Run until aborted (when the store is dropped).
    pub async fn run(self) {
        let mut seen = 0;
        loop {
            tokio::time::sleep(INTERVAL).await;
            let commits = self.stats.commits.load(Ordering::SeqCst);
            if commits == seen {
                continue;
            }
            seen = commits;
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "a WAL checkpoint failed");
            }
        }
    }

    async fn pass(&self) -> Result<(), sqlx::Error> {
        // A connection of its own, held throughout: the write turn below must not wait for one.
        let mut conn = self.db.get_sqlite_connection_pool().acquire().await?;
        let (log, _) = passive(&mut conn).await?;
        self.stats.checkpoints.fetch_add(1, Ordering::SeqCst);
        if log < self.limit.load(Ordering::SeqCst) as i64 {
            return Ok(());
        }
        // The log is long. Copy what was committed during that pass (a short one), then the
        // rest while nobody writes, so the next writer starts the log over: what is left to copy
        // in the write turn is what was committed meanwhile, a few batches.
        passive(&mut conn).await?;
        let queued = Queued::with(self.queued.clone(), self.batch.clone());
        let mut guard = self.batch.lock(Turn::Request).await;
        queued.arrived();
        if let Err(e) = guard.flush().await {
            tracing::warn!(error = ?e, "committing a write batch before a checkpoint failed");
            return Ok(());
        }
        let (log, copied) = passive(&mut conn).await?;
        drop(guard);
        if copied >= log {
            self.stats.wal_restarts.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}
