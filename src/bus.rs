//! The event bus: committed events, in sequence order, for subscribers.
//!
//! One path on both backends: a feeder task publishes this process's commits as the store hands
//! them over (in commit order, no read), and reads the log after the last event it published
//! whenever those do not follow on (another instance committed in between), whenever Postgres
//! `NOTIFY` says another instance committed, and on a slow timer as a safety net. Since appends
//! are serialized and numbered in commit order, "after the last published" never skips an event.
//! The channel is bounded; a subscriber that lags recovers from the log.

use crate::domain::events::StoredEvent;
use crate::store::{EventFilter, Store, PG_CHANNEL};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

pub const BUS_CAPACITY: usize = 4096;
const READ_BATCH: u64 = 1000;

#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<StoredEvent>>,
    head: Arc<AtomicI64>,
    /// How many times the feeder has read the log (it must sleep when nothing happens).
    reads: Arc<AtomicU64>,
}

impl EventBus {
    pub fn new(capacity: usize, head: i64) -> Self {
        let (tx, _) = broadcast::channel(capacity);
        EventBus {
            tx,
            head: Arc::new(AtomicI64::new(head)),
            reads: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StoredEvent>> {
        self.tx.subscribe()
    }

    /// The last sequence published.
    pub fn head(&self) -> i64 {
        self.head.load(Ordering::SeqCst)
    }

    /// How many times the feeder has read the log so far.
    pub fn log_reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    fn publish(&self, ev: StoredEvent) {
        self.head.store(ev.sequence, Ordering::SeqCst);
        let _ = self.tx.send(Arc::new(ev));
    }

    /// Start the feeder; it stops when `shutdown` turns true.
    pub fn spawn_feeder(
        &self,
        store: Arc<Store>,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let bus = self.clone();
        tokio::spawn(async move {
            // This process's commits arrive as events; the log is read only to fill a gap
            // (another instance's events), on NOTIFY, and on the safety timer.
            let mut local_events = store.committed_events();
            let mut local_open = true;
            let local = store.committed_notify();
            let (remote_tx, mut remote_rx) = watch::channel(0u64);
            let listener = store.pg_pool().map(|pool| {
                tokio::spawn(listen(pool, remote_tx, store.notify_payload().to_string()))
            });
            // Without Postgres there is no listener, and its sender is gone: that branch is off.
            let mut remote_open = listener.is_some();
            let mut read_log = true;
            loop {
                let notified = local.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if read_log {
                    if let Err(e) = bus.catch_up(&store).await {
                        tracing::warn!(error = ?e, "event bus could not read the log");
                    }
                }
                read_log = tokio::select! {
                    batch = local_events.recv(), if local_open => match batch {
                        Some(events) => !bus.publish_next(events),
                        None => {
                            // Another feeder took the feed over: follow commits through the log.
                            local_open = false;
                            true
                        }
                    },
                    _ = &mut notified, if !local_open => true,
                    changed = remote_rx.changed(), if remote_open => {
                        remote_open = changed.is_ok();
                        true
                    }
                    _ = tokio::time::sleep(Duration::from_millis(500)) => true,
                    _ = shutdown.changed() => break,
                };
            }
            if let Some(l) = listener {
                l.abort();
            }
        })
    }

    /// Publish committed `events` that follow the head; `false` at a gap (events committed
    /// elsewhere first: the log has them).
    fn publish_next(&self, events: Vec<StoredEvent>) -> bool {
        for ev in events {
            let head = self.head();
            if ev.sequence <= head {
                continue;
            }
            if ev.sequence != head + 1 {
                return false;
            }
            self.publish(ev);
        }
        true
    }

    async fn catch_up(&self, store: &Store) -> Result<(), crate::error::AppError> {
        loop {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let events = store
                .read_events(self.head(), &EventFilter::default(), READ_BATCH)
                .await?;
            let n = events.len() as u64;
            for ev in events {
                self.publish(ev);
            }
            if n < READ_BATCH {
                return Ok(());
            }
        }
    }
}

/// Wake the feeder on every `NOTIFY` from another instance (`own` is this one's payload: its
/// commits reach the feeder directly); reconnects on failure.
async fn listen(pool: sea_orm::sqlx::PgPool, wake: watch::Sender<u64>, own: String) {
    use sea_orm::sqlx::postgres::PgListener;
    let mut n = 0u64;
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = ?e, "LISTEN connection failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(PG_CHANNEL).await {
            tracing::warn!(error = ?e, "LISTEN failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        loop {
            match listener.recv().await {
                Ok(note) if note.payload() == own => {}
                Ok(_) => {
                    n += 1;
                    let _ = wake.send(n);
                }
                Err(e) => {
                    tracing::warn!(error = ?e, "LISTEN connection lost; reconnecting");
                    n += 1;
                    let _ = wake.send(n);
                    break;
                }
            }
        }
    }
}
