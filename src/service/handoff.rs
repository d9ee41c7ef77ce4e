//! Runs handed straight to an idle worker by the request that made them runnable.
//!
//! Without this, a start or an approval commits the run as queued, wakes a worker, and the
//! worker claims the run and starts its next stage attempt in a write turn of its own. Under load
//! write turns are the bottleneck (SQLite has one writer; BENCHMARKS.md, "Where the write lock's
//! time goes"), and those claims were 4 of a Foundation run's 12 turns. Here an idle worker
//! waits in [`HandOffs`]; a request that makes a run runnable takes the longest-waiting one, and
//! in its own write turn leases the run to that worker and takes the steps the worker's claim
//! would have taken. Once the turn commits, the worker gets the run as if it had claimed it.
//!
//! The lease is written without a compare-and-set: the run's queue row was written by the same
//! turn, and every write turn holds the store's write lock (on Postgres an advisory lock too), so
//! no other claim can come between. If the request fails, nothing of it commits and the worker
//! goes back to waiting; if the worker is gone when the run arrives (shutdown), the lease is given
//! back.

use super::runs::Claimed;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::oneshot;

/// Idle workers waiting for a run, longest-waiting first.
#[derive(Default)]
pub struct HandOffs {
    idle: Mutex<VecDeque<IdleWorker>>,
    next_ticket: AtomicU64,
}

/// A worker waiting for a run, as a request takes it: lease the run to `owner` for
/// `lease_seconds`, then [`Taken::give`] it the claimed run.
///
/// Dropped unused, it sends the worker back to its loop.
pub struct Taken {
    pub owner: String,
    pub lease_seconds: f64,
    to: oneshot::Sender<Claimed>,
}

struct IdleWorker {
    ticket: u64,
    owner: String,
    lease_seconds: f64,
    to: oneshot::Sender<Claimed>,
}

/// A worker's place in line, until a run arrives or it withdraws.
pub struct Ticket {
    ticket: u64,
    pub run: oneshot::Receiver<Claimed>,
}

impl Taken {
    /// Give the worker its run, once the turn that leased it committed; false when the worker
    /// is gone.
    pub fn give(self, claimed: Claimed) -> bool {
        self.to.send(claimed).is_ok()
    }
}

impl HandOffs {
    /// Wait in line as `owner`, whose leases last `lease_seconds`.
    pub fn wait(&self, owner: &str, lease_seconds: f64) -> Ticket {
        let (to, run) = oneshot::channel();
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        crate::sync::lock(&self.idle).push_back(IdleWorker {
            ticket,
            owner: owner.to_string(),
            lease_seconds,
            to,
        });
        Ticket { ticket, run }
    }

    /// Leave the line. `None` if the worker was still in it; otherwise a request took it, and
    /// this waits for that request's run (`None` if the request failed).
    pub async fn withdraw(&self, ticket: Ticket) -> Option<Claimed> {
        let removed = {
            let mut idle = crate::sync::lock(&self.idle);
            let at = idle.iter().position(|w| w.ticket == ticket.ticket);
            at.and_then(|at| idle.remove(at)).is_some()
        };
        if removed {
            return None;
        }
        ticket.run.await.ok()
    }

    /// The longest-waiting worker whose receiver is still there, if any.
    pub fn take(&self) -> Option<Taken> {
        let mut idle = crate::sync::lock(&self.idle);
        while let Some(w) = idle.pop_front() {
            if !w.to.is_closed() {
                return Some(Taken {
                    owner: w.owner,
                    lease_seconds: w.lease_seconds,
                    to: w.to,
                });
            }
        }
        None
    }

    /// Workers waiting now.
    pub fn idle(&self) -> usize {
        crate::sync::lock(&self.idle).len()
    }
}
