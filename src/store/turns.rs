//! The write lock's queue: one holder at a time, clients' requests ahead of background work.
//!
//! Every write takes turns on one lock (SQLite has one writer). Under load the runtime's steps
//! (claims, stage steps, lease releases) outnumber clients' commands several to one, and with a
//! first-come queue a `startWorkflowRun` waited behind all of them. Here a waiting request goes
//! before every waiting background writer, and a background writer waits for at most
//! [`MAX_REQUEST_STREAK`] request turns in a row, so the runtime keeps moving however many
//! requests arrive. Within each class, first come first served.
//!
//! The guarded value moves to the next holder through a oneshot channel; a waiter that gives up
//! (its future dropped) after the value was sent to it passes the value on, so it is never lost.

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Who is waiting for a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// A client's command: goes first.
    Request,
    /// The runtime's own work: after waiting requests, within the streak bound.
    Background,
}

/// Most request turns granted in a row while a background writer waits.
pub const MAX_REQUEST_STREAK: usize = 8;

/// A lock on a `T` with two queues (see the module's documentation).
#[derive(Debug)]
pub struct TurnLock<T> {
    inner: Arc<Mutex<Queues<T>>>,
}

impl<T> Clone for TurnLock<T> {
    fn clone(&self) -> Self {
        TurnLock {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct Queues<T> {
    /// The value while nobody holds it (and then nobody waits).
    free: Option<T>,
    requests: VecDeque<oneshot::Sender<T>>,
    background: VecDeque<oneshot::Sender<T>>,
    /// Request turns granted in a row while background writers waited.
    streak: usize,
    /// Turns taken and ended so far, and how long they held the value together.
    ended: u64,
    held: Duration,
}

/// Hand `value` to the next waiter, or keep it if nobody (still) waits; `ended`: the turn that
/// held it, and for how long (none when a waiter that gave up passes it on).
fn release<T>(queues: &Mutex<Queues<T>>, mut value: T, ended: Option<Duration>) {
    let mut q = crate::sync::lock(queues);
    if let Some(held) = ended {
        q.ended += 1;
        q.held += held;
    }
    loop {
        let background_due = q.streak >= MAX_REQUEST_STREAK && !q.background.is_empty();
        let (next, request) = match q.requests.pop_front() {
            Some(next) if !background_due => (next, true),
            popped => {
                if let Some(next) = popped {
                    q.requests.push_front(next);
                }
                match q.background.pop_front() {
                    Some(next) => (next, false),
                    None => {
                        q.free = Some(value);
                        return;
                    }
                }
            }
        };
        match next.send(value) {
            Ok(()) => {
                // The streak counts requests served while background work waits; it ends when
                // a background writer (still waiting) gets its turn.
                q.streak = if request && !q.background.is_empty() {
                    q.streak + 1
                } else {
                    0
                };
                return;
            }
            // That waiter gave up: the next one.
            Err(back) => value = back,
        }
    }
}

impl<T> TurnLock<T> {
    pub fn new(value: T) -> Self {
        TurnLock {
            inner: Arc::new(Mutex::new(Queues {
                free: Some(value),
                requests: VecDeque::new(),
                background: VecDeque::new(),
                streak: 0,
                ended: 0,
                held: Duration::ZERO,
            })),
        }
    }

    /// Wait for a turn of class `turn`; the guard gives the value back when dropped.
    pub async fn lock(&self, turn: Turn) -> TurnGuard<T> {
        let rx = {
            let mut q = crate::sync::lock(&self.inner);
            if let Some(value) = q.free.take() {
                return TurnGuard {
                    value: Some(value),
                    queues: self.inner.clone(),
                    since: Instant::now(),
                };
            }
            let (tx, rx) = oneshot::channel();
            match turn {
                Turn::Request => q.requests.push_back(tx),
                Turn::Background => q.background.push_back(tx),
            }
            rx
        };
        let mut waiting = Waiting {
            rx: Some(rx),
            queues: self.inner.clone(),
        };
        let rx = waiting.rx.as_mut().expect("set above");
        let value = rx
            .await
            .expect("a waiter's sender is only consumed by sending it the value");
        waiting.rx = None;
        TurnGuard {
            value: Some(value),
            queues: self.inner.clone(),
            since: Instant::now(),
        }
    }

    /// Turns ended so far, and the time they held the value, together (the time the value
    /// waited for its next holder is not in it).
    pub fn held(&self) -> (u64, Duration) {
        let q = crate::sync::lock(&self.inner);
        (q.ended, q.held)
    }

    /// Waiters in line right now, requests and background (one that gave up counts until its
    /// turn comes).
    pub fn waiting(&self) -> (usize, usize) {
        let q = crate::sync::lock(&self.inner);
        (q.requests.len(), q.background.len())
    }
}

/// A waiter in line; dropped before its turn came, it makes sure a value already sent to it
/// goes on to the next waiter.
struct Waiting<T> {
    rx: Option<oneshot::Receiver<T>>,
    queues: Arc<Mutex<Queues<T>>>,
}

impl<T> Drop for Waiting<T> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        rx.close();
        if let Ok(value) = rx.try_recv() {
            release(&self.queues, value, None);
        }
    }
}

/// A held turn: the value, given to the next waiter on drop.
#[derive(Debug)]
pub struct TurnGuard<T> {
    value: Option<T>,
    queues: Arc<Mutex<Queues<T>>>,
    /// When this turn began.
    since: Instant,
}

impl<T> Deref for TurnGuard<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value
            .as_ref()
            .expect("a guard holds its value until dropped")
    }
}

impl<T> DerefMut for TurnGuard<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value
            .as_mut()
            .expect("a guard holds its value until dropped")
    }
}

impl<T> Drop for TurnGuard<T> {
    fn drop(&mut self) {
        if let Some(value) = self.value.take() {
            release(&self.queues, value, Some(self.since.elapsed()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::mpsc;

    /// Queue `n` waiters of class `turn` behind the current holder; each records `label` with
    /// its turn, in the order turns are granted, and holds it until the next one is granted.
    fn queue(
        lock: &TurnLock<Vec<String>>,
        turn: Turn,
        label: &str,
        n: usize,
        done: &mpsc::UnboundedSender<()>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..n)
            .map(|i| {
                let lock = lock.clone();
                let label = format!("{label}{i}");
                let done = done.clone();
                tokio::spawn(async move {
                    let mut order = lock.lock(turn).await;
                    order.push(label);
                    let _ = done.send(());
                })
            })
            .collect()
    }

    async fn settle(lock: &TurnLock<Vec<String>>, requests: usize, background: usize) {
        for _ in 0..1000 {
            if lock.waiting() == (requests, background) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("waiters did not queue: {:?}", lock.waiting());
    }

    #[tokio::test]
    async fn requests_go_before_background_work_that_queued_earlier() {
        let lock = TurnLock::new(Vec::new());
        let held = lock.lock(Turn::Background).await;
        let (done, mut finished) = mpsc::unbounded_channel();
        let mut tasks = queue(&lock, Turn::Background, "b", 3, &done);
        settle(&lock, 0, 3).await;
        tasks.extend(queue(&lock, Turn::Request, "r", 2, &done));
        settle(&lock, 2, 3).await;
        drop(held);
        for _ in 0..5 {
            finished.recv().await.expect("every waiter gets a turn");
        }
        for t in tasks {
            t.await.expect("waiter");
        }
        let order = lock.lock(Turn::Request).await.clone();
        assert_eq!(order, ["r0", "r1", "b0", "b1", "b2"]);
    }

    #[tokio::test]
    async fn background_work_is_not_starved_by_a_stream_of_requests() {
        let lock = TurnLock::new(Vec::new());
        let held = lock.lock(Turn::Request).await;
        let (done, mut finished) = mpsc::unbounded_channel();
        let mut tasks = queue(&lock, Turn::Background, "b", 2, &done);
        settle(&lock, 0, 2).await;
        let requests = 2 * MAX_REQUEST_STREAK + 2;
        tasks.extend(queue(&lock, Turn::Request, "r", requests, &done));
        settle(&lock, requests, 2).await;
        drop(held);
        for _ in 0..requests + 2 {
            finished.recv().await.expect("every waiter gets a turn");
        }
        for t in tasks {
            t.await.expect("waiter");
        }
        let order = lock.lock(Turn::Request).await.clone();
        let at = |label: &str| order.iter().position(|l| l == label).expect(label);
        assert_eq!(at("b0"), MAX_REQUEST_STREAK, "{order:?}");
        assert_eq!(at("b1"), 2 * MAX_REQUEST_STREAK + 1, "{order:?}");
        assert_eq!(order.len(), requests + 2);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_does_not_take_the_value_with_it() {
        let lock = TurnLock::new(Vec::new());
        let held = lock.lock(Turn::Request).await;
        // Queued, then abandoned before and after its turn came.
        let gone = {
            let lock = lock.clone();
            tokio::spawn(async move { lock.lock(Turn::Request).await.push("gone".into()) })
        };
        settle(&lock, 1, 0).await;
        gone.abort();
        let _ = gone.await;
        let mut early = Box::pin(lock.lock(Turn::Request));
        assert!(futures::poll!(early.as_mut()).is_pending());
        drop(held);
        // The value was sent to `early`, which is dropped without ever taking it.
        drop(early);
        let mut guard = tokio::time::timeout(Duration::from_secs(5), lock.lock(Turn::Background))
            .await
            .expect("the value came back to the lock");
        guard.push("last".into());
        assert_eq!(*guard, ["last"]);
    }
}
