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
//!   frames since its last pass are left to copy, and the next writer starts the log over;
//! - a reader that keeps an old snapshot open holds the frames after it: no checkpoint can copy
//!   them, so a write turn taken for them is wasted. After such a turn the task waits 1, 2, 4 …
//!   up to [`MAX_BACKOFF`] passes before it takes another, and warns when the log grows far past
//!   its limit;
//! - the task stops with the store (or at [`super::Store::close`], which waits for it); if it
//!   panics it is logged, counted and started again.

use super::turns::{Turn, TurnLock};
use super::{Batch, Queued, WriteStats};
use sea_orm::sqlx::{self, pool::PoolConnection, Sqlite};
use sea_orm::DatabaseConnection;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often the task looks for new commits to checkpoint.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// Most passes the task lets go by without a write turn after one that a reader made useless.
pub const MAX_BACKOFF: u32 = 16;

/// How many times its limit the log may hold before the task warns.
const WARN_FACTOR: i64 = 4;

/// Pages the log may hold before the task makes it start over (`VM_SQLITE_WAL_PAGES`,
/// default 4,096: 16 MiB with 4 KiB pages).
pub fn default_limit() -> u64 {
    super::env_number("VM_SQLITE_WAL_PAGES")
        .map(|n| n.max(1.0) as u64)
        .unwrap_or(4096)
}

/// `(log frames, frames copied)` after a passive checkpoint on `conn`; `None` when SQLite could
/// not run one (another connection was checkpointing, or the database is not in WAL mode).
async fn passive(conn: &mut PoolConnection<Sqlite>) -> Result<Option<(i64, i64)>, sqlx::Error> {
    let (_, log, copied): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(&mut **conn)
        .await?;
    Ok((log >= 0 && copied >= 0).then_some((log, copied)))
}

/// What one pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// The log is under its limit (or no checkpoint could run).
    Short,
    /// The log was long and is waiting for a write turn (backing off).
    Deferred,
    /// A write turn copied every frame: the next writer starts the log over.
    Restarted,
    /// A write turn left frames a reader still needs.
    Held,
}

/// What the checkpoint task shares with the store.
#[derive(Clone)]
pub(super) struct Checkpoints {
    pub db: DatabaseConnection,
    pub batch: TurnLock<Batch>,
    pub queued: Arc<AtomicUsize>,
    pub stats: Arc<WriteStats>,
    pub limit: Arc<AtomicU64>,
}

impl Checkpoints {
    /// Start the task; it stops when `stop` changes or its sender is dropped.
    pub fn spawn(self, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let panics = self.stats.checkpoint_panics.clone();
        tokio::spawn(supervise(move || self.clone().run(stop.clone()), panics))
    }

    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut seen = 0;
        // Passes left before the next write turn, and the wait after the next useless one.
        let (mut skip, mut backoff): (u32, u32) = (0, 1);
        let mut warned_at: i64 = 0;
        loop {
            // A stop sent at any time (during a pass too) makes `changed` return at once.
            tokio::select! {
                _ = tokio::time::sleep(INTERVAL) => {}
                _ = stop.changed() => return,
            }
            let commits = self.stats.commits.load(Ordering::SeqCst);
            if commits == seen {
                continue;
            }
            seen = commits;
            let limit = self.limit.load(Ordering::SeqCst).min(i64::MAX as u64) as i64;
            let may_take_turn = skip == 0;
            skip = skip.saturating_sub(1);
            match self.pass(limit, may_take_turn).await {
                Ok((pass, log)) => {
                    match pass {
                        Pass::Held => {
                            skip = backoff;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                        Pass::Restarted | Pass::Short => backoff = 1,
                        Pass::Deferred => {}
                    }
                    if log < limit {
                        warned_at = 0;
                    } else if log >= limit.saturating_mul(WARN_FACTOR)
                        && log >= warned_at.saturating_mul(2)
                    {
                        warned_at = log;
                        tracing::warn!(
                            frames = log,
                            limit,
                            "the SQLite WAL is far past its limit: a reader keeps an old \
                             snapshot open, or checkpoints fail"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "a WAL checkpoint failed"),
            }
        }
    }

    /// One pass: a passive checkpoint, and when the log holds `limit` frames or more (and
    /// `may_take_turn`), another one in a write turn. Returns what it did and the log's length.
    async fn pass(&self, limit: i64, may_take_turn: bool) -> Result<(Pass, i64), sqlx::Error> {
        // A connection of its own, held throughout: the write turn below must not wait for one
        // (the store keeps at least two pool connections, so the readers find another).
        let mut conn = self.db.get_sqlite_connection_pool().acquire().await?;
        let Some((log, _)) = passive(&mut conn).await? else {
            return Ok((Pass::Short, 0));
        };
        self.stats.checkpoints.fetch_add(1, Ordering::SeqCst);
        if log < limit {
            return Ok((Pass::Short, log));
        }
        if !may_take_turn {
            return Ok((Pass::Deferred, log));
        }
        // The log is long. Copy what was committed during that pass (a short one), then the
        // rest while nobody writes, so the next writer starts the log over: what is left to copy
        // in the write turn is what was committed meanwhile, a few batches.
        passive(&mut conn).await?;
        let queued = Queued::with(self.queued.clone(), self.batch.clone());
        let mut guard = self.batch.lock(Turn::Request).await;
        queued.arrived();
        self.stats.wal_turns.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = guard.flush().await {
            tracing::warn!(error = ?e, "committing a write batch before a checkpoint failed");
            return Ok((Pass::Short, log));
        }
        let after = passive(&mut conn).await?;
        drop(guard);
        Ok(match after {
            Some((log, copied)) if copied >= log => {
                self.stats.wal_restarts.fetch_add(1, Ordering::SeqCst);
                (Pass::Restarted, log)
            }
            Some((log, _)) => (Pass::Held, log),
            None => (Pass::Short, log),
        })
    }
}

/// Longest pause before a task that keeps panicking is started again.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

/// Run the task `start` makes until it returns. One that panics is logged, counted in `panics`
/// and started again, after [`INTERVAL`] and twice as long each time it panics again soon (up to
/// [`MAX_RESTART_DELAY`]): checkpoints must not stop without a word, nor a broken task flood the
/// log.
async fn supervise<F, Fut>(mut start: F, panics: Arc<AtomicU64>)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut delay = INTERVAL;
    loop {
        let started = tokio::time::Instant::now();
        match tokio::spawn(start()).await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                panics.fetch_add(1, Ordering::SeqCst);
                if started.elapsed() > MAX_RESTART_DELAY * 2 {
                    delay = INTERVAL;
                }
                tracing::error!(
                    restart_in_ms = delay.as_millis() as u64,
                    "the WAL checkpoint task panicked; starting it again"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RESTART_DELAY);
            }
            // Cancelled: the runtime is shutting down.
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_is_started_again_later_each_time() {
        let runs = Arc::new(AtomicU64::new(0));
        let panics = Arc::new(AtomicU64::new(0));
        let counted = runs.clone();
        let started = std::time::Instant::now();
        supervise(
            move || {
                let run = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    if run < 2 {
                        panic!("checkpoint task run {run} fails");
                    }
                }
            },
            panics.clone(),
        )
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 3, "started three times");
        assert_eq!(panics.load(Ordering::SeqCst), 2, "two panics counted");
        // Restarted after 100 ms, then after twice that: a task that keeps failing does not
        // flood the log (a lower bound, which sleeping guarantees).
        assert!(started.elapsed() >= INTERVAL * 3, "{:?}", started.elapsed());
    }
}
