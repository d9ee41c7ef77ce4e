//! Storage: the only code that talks to the database (through sea-orm).
//!
//! Every write goes through [`Store::write`]: serialized (an in-process lock, plus a
//! transaction-scoped advisory lock on Postgres so several instances serialize too), each writer
//! in a savepoint of a shared transaction that commits once for a burst of writers (group
//! commit, see [`Batch`]). Appends number events with `MAX(sequence) + 1` inside that critical
//! section, so the global sequence is gap-free and equals commit order on both backends. A
//! writer's writes are sent together, before its next read and before its commit: on SQLite
//! executed by the turn's holder on the batch's own connection ([`sqlite_writer`]), on Postgres
//! one round trip on the writers' own connection ([`pg_writer`], see [`WriteTx`]).

mod checkpoint;
mod entities;
pub mod event_log;
pub mod idempotency;
mod pg_connect;
mod pg_writer;
pub mod projector;
pub mod queries;
pub mod queue;
pub mod rebuild;
mod rows;
pub mod seed;
pub mod sqlite_memory;
mod sqlite_writer;
pub mod turns;
mod write_rows;

use crate::domain::events::StoredEvent;
use crate::error::AppError;
use pg_writer::PgWriter;
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, SqlErr,
    Statement, StatementBuilder,
};
use sqlite_writer::SqliteWriter;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use turns::{Turn, TurnGuard, TurnLock};

pub use rows::{
    ApprovalRow, ArtifactRow, BrandRow, EventFilter, Page, ProjectRow, ThreadRow, TimelineRow,
};
pub(crate) use write_rows::{first_value, Row};

/// Channel used with `LISTEN/NOTIFY` on Postgres to announce committed events.
pub const PG_CHANNEL: &str = "vm_workflow_events";
const PG_WRITE_LOCK_KEY: i64 = 0x766d_776f_726b;
/// SQLite: bytes the WAL file keeps when the log starts over (`journal_size_limit`).
const WAL_FILE_LIMIT: u64 = 64 << 20;

impl From<DbErr> for AppError {
    fn from(err: DbErr) -> Self {
        match err.sql_err() {
            Some(SqlErr::UniqueConstraintViolation(_)) => {
                AppError::Conflict("a record with this identity already exists".into())
            }
            _ => AppError::internal(err),
        }
    }
}

/// The write batch that is open, shared by the writers that take turns in it (group commit).
///
/// Writers are serialized by the mutex around this. Each writer works in a savepoint of the
/// batch's transaction; when it commits and another writer is already queued for the lock, it
/// leaves the transaction open for that writer and waits for the batch's commit. The last writer
/// of a burst (nobody queued, or the batch is full) commits for everyone: one `COMMIT` (one fsync
/// on Postgres) for many commands, and every writer's `commit()` returns only once its writes are
/// durable, so nothing a client was told is lost on a crash.
struct Batch {
    backend: DbBackend,
    /// Postgres: the writers' connection (see [`pg_writer`]). The batch's transaction is begun
    /// on it by the batch's first send (`BEGIN` and the advisory write lock before the
    /// `SAVEPOINT`), and ended by its commit, which may go with its last writer's send.
    pg: Option<tokio::sync::Mutex<PgWriter>>,
    /// SQLite: the writer's connection, driven by the turn's holder (see [`sqlite_writer`]).
    /// The batch's transaction is begun on it by the batch's first send that opens a savepoint
    /// (`BEGIN` before the `SAVEPOINT`) and ended by its commit; between batches it has none
    /// open.
    sqlite: Option<std::sync::Mutex<SqliteWriter>>,
    /// Writers whose savepoint is released into `tx` and who wait for its commit.
    waiters: Vec<oneshot::Sender<Result<(), ()>>>,
    /// Events appended in `tx` so far.
    appended: usize,
    /// The log's highest sequence inside `tx`, once read (nobody else can append until it
    /// commits: the lock here, plus the advisory lock on Postgres).
    head: Option<i64>,
    /// Writers whose savepoint is released into `tx`.
    writers: u64,
    /// Since when the first of `waiters` waits: past [`max_batch_age`] the batch commits,
    /// however many writers queue.
    waiting_since: Option<Instant>,
    /// The events of `waiters`' savepoints, for the bus once `tx` commits.
    events: Vec<StoredEvent>,
    /// A writer left without committing after its savepoint was opened: the next user of `tx`
    /// rolls back to it first (see [`Batch::settle`]).
    rollback_pending: bool,
    /// Postgres: a `pg_notify` is sent in the batch's transaction, at its top level (after a
    /// writer's release, so no later rollback to a savepoint takes it back). Postgres delivers one per
    /// transaction and payload at commit, so one is enough for every writer of the batch.
    notified: AtomicBool,
    /// SQLite: the last writer's savepoint is still open and is released by the commit, right
    /// before its `COMMIT`: a writer whose last send was a read, and who commits the batch
    /// itself, has nothing else to send (see [`WriteTx::finish`]).
    release_at_commit: bool,
    /// Whether a writer about to commit yields first (see [`Yields`]).
    yields: Yields,
    feed: Arc<CommittedFeed>,
    committed: Arc<Notify>,
    stats: Arc<WriteStats>,
}

/// A writer about to commit the batch because nobody is queued first lets the tasks that are
/// ready run once: a writer among them that asks for a turn joins the batch instead of waiting
/// for the next one. Under load this halves the commits, each a write of every page changed to
/// SQLite's log (BENCHMARKS.md, "One yield before a commit"). When the last yields found nobody
/// (a lone client), the yield would only make the commit wait for the other tasks (deliveries
/// to subscribers, say): it is skipped, and tried again every [`Yields::PROBE`]th commit.
#[derive(Debug)]
struct Yields {
    /// The last 8 yields, newest in the lowest bit: 1 where a writer came.
    recent: u8,
    /// Commits since the last yield.
    skipped: u32,
}

impl Default for Yields {
    fn default() -> Self {
        Yields {
            recent: u8::MAX,
            skipped: 0,
        }
    }
}

impl Yields {
    const PROBE: u32 = 8;

    /// Whether to yield before this commit (counted as skipped if not).
    fn worth_it(&mut self) -> bool {
        if self.recent != 0 || self.skipped + 1 >= Self::PROBE {
            self.skipped = 0;
            true
        } else {
            self.skipped += 1;
            false
        }
    }

    fn record(&mut self, came: bool) {
        self.recent = (self.recent << 1) | u8::from(came);
    }
}

/// Where committed events go, in commit order, when the event bus listens (see
/// [`Store::committed_events`]): the bus publishes them without reading them back from the log.
#[derive(Debug)]
struct CommittedFeed {
    /// This store's name in `NOTIFY` payloads, so its own feeder can skip them.
    instance: String,
    sink: std::sync::Mutex<Option<mpsc::UnboundedSender<Vec<StoredEvent>>>>,
    listening: AtomicBool,
}

impl CommittedFeed {
    fn send(&self, events: Vec<StoredEvent>) {
        let mut sink = crate::sync::lock(&self.sink);
        if let Some(tx) = sink.as_ref() {
            if tx.send(events).is_err() {
                *sink = None;
                self.listening.store(false, Ordering::SeqCst);
            }
        }
    }
}

/// How well writes are grouped: writers committed, and the commits that carried them.
#[derive(Debug, Default)]
pub struct WriteStats {
    writers: AtomicU64,
    commits: AtomicU64,
    sends: AtomicU64,
    statements: AtomicU64,
    /// Postgres: texts prepared on the writers' connection (see [`pg_writer`]).
    prepares: AtomicU64,
    /// SQLite: passive checkpoints taken beside the writers (see [`checkpoint`]).
    checkpoints: AtomicU64,
    /// SQLite: write turns the checkpoint task took to copy the rest of a long log.
    wal_turns: AtomicU64,
    /// SQLite: checkpoints that copied the whole log in a write turn (the log starts over).
    wal_restarts: AtomicU64,
    /// SQLite: times the checkpoint task panicked (and was started again).
    checkpoint_panics: Arc<AtomicU64>,
    /// Nanoseconds writers waited for their sends (a batch's `BEGIN` goes with its first
    /// send) and batches for their `COMMIT` (on Postgres, when it did not go with the last
    /// writer's send), all inside write turns.
    send_ns: AtomicU64,
    commit_ns: AtomicU64,
}

/// Where the write turns' time went since start (see [`Store::write_timings`]): what bounds
/// throughput when the turns hold the lock most of the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteTimings {
    /// Turns taken on the write lock (writers, commits of a batch left open, checkpoints).
    pub turns: u64,
    /// The time those turns held the lock.
    pub held: Duration,
    /// Inside them: writers' sends (on SQLite their statements executed by the holder, on
    /// Postgres round trips; a batch's `BEGIN` goes with its first) and `COMMIT`s sent on
    /// their own. The rest of `held` is the holders' own work.
    pub sends: Duration,
    pub commits: Duration,
}

/// Add the time since `since` to `counter` (nanoseconds).
fn add_elapsed(counter: &AtomicU64, since: Instant) {
    let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
    counter.fetch_add(ns, Ordering::Relaxed);
}

/// What the SQLite checkpoint task has done since start (see [`checkpoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpointing {
    /// Passive checkpoints taken beside the writers.
    pub passes: u64,
    /// Write turns taken to copy the rest of a long log.
    pub turns: u64,
    /// Of those, the ones that copied every frame: the log started over.
    pub restarts: u64,
    /// Times the task panicked and was started again.
    pub panics: u64,
}

impl WriteStats {
    /// `(writers, commits)` so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.writers.load(Ordering::SeqCst),
            self.commits.load(Ordering::SeqCst),
        )
    }

    /// How many times writers' statements went to the database (on SQLite executed by the
    /// turn's holder, a round trip to Postgres): each writer's writes go together, before its
    /// next read and with its commit.
    pub fn sends(&self) -> u64 {
        self.sends.load(Ordering::SeqCst)
    }

    /// How many statements writers sent (not the batch's `BEGIN` and `COMMIT`).
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::SeqCst)
    }

    /// Postgres: how many statement texts were prepared on the writers' connection; every
    /// statement with values after that is executed by name (see [`pg_writer`]).
    pub fn prepares(&self) -> u64 {
        self.prepares.load(Ordering::SeqCst)
    }

    /// SQLite: what the checkpoint task has done (see [`Checkpointing`]).
    pub fn checkpoints(&self) -> Checkpointing {
        Checkpointing {
            passes: self.checkpoints.load(Ordering::SeqCst),
            turns: self.wal_turns.load(Ordering::SeqCst),
            restarts: self.wal_restarts.load(Ordering::SeqCst),
            panics: self.checkpoint_panics.load(Ordering::SeqCst),
        }
    }
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field(
                "open",
                &(self
                    .pg
                    .as_ref()
                    .is_some_and(|w| w.try_lock().map_or(true, |w| w.began()))
                    || self.sqlite_began()),
            )
            .field("waiters", &self.waiters.len())
            .field("appended", &self.appended)
            .finish()
    }
}

/// Most writers one transaction carries before it commits even though more are queued
/// (`VM_WRITE_BATCH_MAX`, default 64).
fn max_batch() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| env_number("VM_WRITE_BATCH_MAX").unwrap_or(64.0).max(1.0) as usize)
}

/// Longest the first writer of a batch waits while writers keep coming
/// (`VM_WRITE_BATCH_MAX_MS`, default 2: at 4, a start under load waited ~4 ms for its commit,
/// most of its latency; BENCHMARKS.md).
fn max_batch_age() -> Duration {
    static V: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        Duration::from_secs_f64(env_number("VM_WRITE_BATCH_MAX_MS").unwrap_or(2.0).max(0.0) / 1e3)
    })
}

fn env_number(name: &str) -> Option<f64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// Every writer's savepoint has this name: writers take turns, one savepoint at a time.
const SAVEPOINT: &str = "SAVEPOINT vm_writer";

/// Postgres: the lock that serializes writers across instances, held until the batch ends.
fn pg_write_lock() -> String {
    format!("SELECT pg_advisory_xact_lock({PG_WRITE_LOCK_KEY})")
}
const RELEASE: &str = "RELEASE SAVEPOINT vm_writer";
const ROLLBACK_TO: &str = "ROLLBACK TO SAVEPOINT vm_writer";

/// A pooled connection idle this long is pinged before it is handed out.
const POOL_PING_AFTER_IDLE: Duration = Duration::from_secs(5);

/// How the store connects: `max_connections` at most, one kept open.
fn connect_options(url: &str, max_connections: u32) -> ConnectOptions {
    let mut opts = ConnectOptions::new(url.to_string());
    opts.max_connections(max_connections)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(30))
        .sqlx_logging(false)
        // A pooled connection is checked (a round trip to Postgres, a hand-over to sqlx's
        // thread on SQLite) only when it has been idle long enough to have been dropped by the
        // server or the network, not at every checkout.
        .test_before_acquire_if_idle_for(POOL_PING_AFTER_IDLE)
        // A pooled connection on which sqlx still counts a transaction is discarded at its next
        // checkout rather than reused: a `ROLLBACK` sqlx sent when a handle was dropped
        // failed, because SQLite had none open (it rolls a transaction back by itself after
        // some errors). On such a connection sqlx would begin the next transaction with a
        // savepoint, and rolling that back would leave a transaction open.
        .map_sqlx_sqlite_before_acquire(|conn, _| {
            Box::pin(async move { Ok(!sea_orm::sqlx::Connection::is_in_transaction(conn)) })
        })
        .map_sqlx_sqlite_opts(|o| {
            o.create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                // Savepoint journals (every writer's turn has one) stay in memory instead of
                // spilling to a temporary file past 64 KiB.
                .pragma("temp_store", "memory")
                // Checkpoints are taken by a task of the store's, not inside a commit (see
                // `checkpoint`).
                .pragma("wal_autocheckpoint", "0")
                // A log file that grew past this (a long reader held its frames) is cut
                // back when the log starts over.
                .pragma("journal_size_limit", WAL_FILE_LIMIT.to_string())
        });
    opts
}

impl Batch {
    /// SQLite: whether the batch's transaction is begun on the writer's connection.
    fn sqlite_began(&self) -> bool {
        self.sqlite
            .as_ref()
            .is_some_and(|w| crate::sync::lock(w).began())
    }

    /// Whether the batch needs a transaction begun before its next savepoint.
    fn needs_tx(&mut self) -> bool {
        match (&self.sqlite, &mut self.pg) {
            (Some(_), _) => !self.sqlite_began(),
            (None, Some(w)) => !w.get_mut().began(),
            (None, None) => true,
        }
    }

    /// Roll back to the savepoint of a writer that left without committing (if one did). On
    /// failure the batch is abandoned: nothing else can be trusted to be in it.
    async fn settle(&mut self) -> Result<(), AppError> {
        if !self.rollback_pending {
            return Ok(());
        }
        let rolled_back = match (&self.sqlite, &mut self.pg) {
            (Some(w), _) => {
                let mut w = crate::sync::lock(w);
                if !w.began() && !w.in_transaction() {
                    // The writer's `BEGIN` failed: nothing of it, nor of anyone's, is open.
                    Ok(())
                } else {
                    w.run(ROLLBACK_TO, &[]).and_then(|()| w.run(RELEASE, &[]))
                }
            }
            (None, Some(w)) => {
                let w = w.get_mut();
                if w.began() {
                    let undo = format!("{ROLLBACK_TO};\n{RELEASE}");
                    w.send(false, undo).await.map(|_| ())
                } else {
                    Ok(())
                }
            }
            (None, None) => Ok(()),
        };
        self.rollback_pending = false;
        if let Err(e) = rolled_back {
            self.abandon().await;
            return Err(e);
        }
        Ok(())
    }

    /// Roll the whole batch back and tell every waiting writer it failed.
    async fn abandon(&mut self) {
        if let Some(w) = &mut self.pg {
            w.get_mut().rollback().await;
        }
        self.forget();
    }

    /// The bookkeeping of [`Batch::abandon`], and SQLite's rollback; on Postgres the caller
    /// rolls back (or drops the connection, which Postgres rolls back).
    fn forget(&mut self) {
        if let Some(w) = &self.sqlite {
            crate::sync::lock(w).rollback();
        }
        self.notified.store(false, Ordering::SeqCst);
        self.release_at_commit = false;
        self.rollback_pending = false;
        self.appended = 0;
        self.writers = 0;
        self.head = None;
        self.waiting_since = None;
        self.events.clear();
        for w in self.waiters.drain(..) {
            let _ = w.send(Err(()));
        }
    }

    /// Commit the open transaction (if any) and tell every waiting writer how it went.
    async fn flush(&mut self) -> Result<(), AppError> {
        self.settle().await?;
        if self.needs_tx() && self.writers == 0 && self.waiters.is_empty() {
            // Nothing begun since the last commit.
            return Ok(());
        }
        let appended = std::mem::take(&mut self.appended);
        let writers = std::mem::take(&mut self.writers);
        self.waiting_since = None;
        let head = self.head.take();
        let waiters = std::mem::take(&mut self.waiters);
        let events = std::mem::take(&mut self.events);
        // On Postgres the batch's first appending writer sent a `pg_notify` after its release
        // (see `Batch::notified`); Postgres delivers it at commit.
        let began = Instant::now();
        let release = std::mem::take(&mut self.release_at_commit);
        let result = match (&self.sqlite, &mut self.pg) {
            (Some(w), _) => commit_sqlite(&mut crate::sync::lock(w), release),
            // Nothing begun (its writers sent nothing) or committed already (with the last
            // writer's send): nothing to commit.
            (None, Some(w)) => w.get_mut().commit().await,
            (None, None) => Ok(()),
        };
        self.notified.store(false, Ordering::SeqCst);
        add_elapsed(&self.stats.commit_ns, began);
        let ok = result.is_ok();
        // On SQLite this process is the only writer (every write takes the lock above), so the
        // committed head stays right for the next batch: one `SELECT MAX(sequence)` less per
        // batch. On Postgres other instances append too: read it again.
        if ok && self.backend == DbBackend::Sqlite {
            self.head = head;
        }
        if ok && !events.is_empty() {
            self.feed.send(events);
        }
        for w in waiters {
            let _ = w.send(if ok { Ok(()) } else { Err(()) });
        }
        if ok {
            self.stats.writers.fetch_add(writers, Ordering::SeqCst);
            self.stats.commits.fetch_add(1, Ordering::SeqCst);
        }
        if ok && appended > 0 {
            self.committed.notify_waiters();
        }
        result
    }
}

/// SQLite: commit the batch's transaction (releasing the last writer's savepoint first when it
/// is still open, see [`Batch::release_at_commit`]). Nothing begun: nothing to commit (its
/// writers sent nothing). A transaction SQLite rolled back by itself fails the batch.
fn commit_sqlite(w: &mut SqliteWriter, release: bool) -> Result<(), AppError> {
    if w.lost_transaction() {
        w.rollback();
        return Err(AppError::internal(anyhow::anyhow!(
            "SQLite rolled the write batch back by itself after an error"
        )));
    }
    if !w.began() {
        return Ok(());
    }
    if release {
        if let Err(e) = w.run(RELEASE, &[]) {
            w.rollback();
            return Err(e);
        }
    }
    w.commit()
}

/// Counts a writer as queued for the batch lock until it holds it; a writer that gives up
/// waiting (its future dropped) makes sure the batch it leaves behind still commits.
struct Queued {
    queued: Arc<AtomicUsize>,
    batch: TurnLock<Batch>,
    done: bool,
}

impl Queued {
    fn new(store: &Store) -> Self {
        Queued::with(store.queued.clone(), store.batch.clone())
    }

    fn with(queued: Arc<AtomicUsize>, batch: TurnLock<Batch>) -> Self {
        queued.fetch_add(1, Ordering::SeqCst);
        Queued {
            queued,
            batch,
            done: false,
        }
    }

    /// The lock is ours.
    fn arrived(mut self) {
        self.done = true;
        self.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.queued.fetch_sub(1, Ordering::SeqCst);
        // Someone may have left the batch open for us: commit it if nobody else is coming.
        let batch = self.batch.clone();
        let queued = self.queued.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(flush_if_idle(batch, queued));
        }
    }
}

async fn flush_if_idle(batch: TurnLock<Batch>, queued: Arc<AtomicUsize>) {
    queued.fetch_add(1, Ordering::SeqCst);
    let mut guard = batch.lock(Turn::Request).await;
    queued.fetch_sub(1, Ordering::SeqCst);
    if queued.load(Ordering::SeqCst) == 0 {
        if let Err(e) = guard.flush().await {
            tracing::error!(error = ?e, "committing a write batch failed");
        }
    }
}

#[derive(Debug)]
pub struct Store {
    /// The pool: reads, and on Postgres the write batches' transactions (on SQLite writes go
    /// through the batch's own connection, see [`Batch::sqlite`]).
    db: DatabaseConnection,
    backend: DbBackend,
    batch: TurnLock<Batch>,
    /// Writers waiting for the batch lock.
    queued: Arc<AtomicUsize>,
    /// Woken after every commit that appended events.
    committed: Arc<Notify>,
    feed: Arc<CommittedFeed>,
    stats: Arc<WriteStats>,
    /// See [`Store::planner_is_stable`] (read once, at connect).
    planner_stable: bool,
    /// SQLite: pages the WAL may hold before the checkpoint task makes it start over.
    wal_limit: Arc<AtomicU64>,
    /// SQLite: stops the checkpoint task when set, or when the store is dropped.
    stop_checkpoints: watch::Sender<bool>,
    /// SQLite: the checkpoint task, awaited by [`Store::close`].
    checkpoint_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Store {
    /// Connect to `url` (`sqlite://…` or `postgres://…`).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, AppError> {
        // Postgres on this host over TCP: without TLS unless the URL asks for it (see
        // `pg_connect`).
        let url = &if url.starts_with("postgres") {
            pg_connect::plain_on_loopback(url).await
        } else {
            url.to_string()
        };
        if url.starts_with("sqlite:") {
            if let Err(rc) = sqlite_memory::install() {
                tracing::warn!(
                    code = rc,
                    "SQLite had started before the store (another connection opened first): it \
                     allocates with the system's malloc, not mimalloc, which costs throughput"
                );
            }
        }
        // SQLite: the checkpoint task holds a pool connection while it waits for a write turn,
        // and the readers need another one meanwhile (see `checkpoint`).
        let least = if url.starts_with("sqlite:") { 2 } else { 1 };
        let db = Database::connect(connect_options(url, max_connections.max(least)))
            .await
            .map_err(AppError::internal)?;
        let backend = db.get_database_backend();
        // SQLite: every write goes through one connection of its own, kept open (a connection
        // drops its page cache whenever another one has written since its last transaction:
        // BENCHMARKS.md, "One writer connection"), driven by the write turn's holder.
        let sqlite = if backend == DbBackend::Sqlite {
            Some(std::sync::Mutex::new(open_sqlite_writer(url)?))
        } else {
            None
        };
        // Postgres: the write batches' transactions run on a connection of their own, kept
        // open (see `pg_writer`).
        let pg = if backend == DbBackend::Postgres {
            Some(tokio::sync::Mutex::new(PgWriter::connect(url).await?))
        } else {
            None
        };
        let planner_stable = backend != DbBackend::Sqlite || planner_is_stable(&db).await;
        if !planner_stable {
            tracing::warn!(
                "SQLite was built without SQLITE_ENABLE_QPSG (build from the repository, where \
                 .cargo/config.toml sets it): statements with a bound LIMIT are planned again \
                 at every execution, which costs throughput"
            );
        }
        let committed = Arc::new(Notify::new());
        let feed = Arc::new(CommittedFeed {
            instance: crate::domain::ids::generate("store-"),
            sink: Default::default(),
            listening: AtomicBool::new(false),
        });
        let stats = Arc::new(WriteStats::default());
        let batch = TurnLock::new(Batch {
            backend,
            pg,
            sqlite,
            waiters: Vec::new(),
            appended: 0,
            head: None,
            writers: 0,
            waiting_since: None,
            events: Vec::new(),
            rollback_pending: false,
            notified: AtomicBool::new(false),
            release_at_commit: false,
            yields: Yields::default(),
            feed: feed.clone(),
            committed: committed.clone(),
            stats: stats.clone(),
        });
        let queued = Arc::new(AtomicUsize::new(0));
        let wal_limit = Arc::new(AtomicU64::new(checkpoint::default_limit()));
        let (stop_checkpoints, stop) = watch::channel(false);
        let checkpoint_task = (backend == DbBackend::Sqlite).then(|| {
            checkpoint::Checkpoints {
                db: db.clone(),
                batch: batch.clone(),
                queued: queued.clone(),
                stats: stats.clone(),
                limit: wal_limit.clone(),
            }
            .spawn(stop)
        });
        Ok(Store {
            db,
            backend,
            batch,
            queued,
            committed,
            feed,
            stats,
            planner_stable,
            wal_limit,
            stop_checkpoints,
            checkpoint_task: std::sync::Mutex::new(checkpoint_task),
        })
    }

    pub async fn migrate(&self) -> Result<(), AppError> {
        use migration::MigratorTrait;
        migration::Migrator::up(&self.db, None)
            .await
            .map_err(AppError::internal)
    }

    /// On SQLite, whether the library was built with `SQLITE_ENABLE_QPSG` (statements with a
    /// bound `LIMIT` planned once, not at every execution); always true on Postgres.
    pub fn planner_is_stable(&self) -> bool {
        self.planner_stable
    }

    pub fn backend(&self) -> DbBackend {
        self.backend
    }

    /// SQLite: the value of a connection setting (`PRAGMA name`), for diagnostics and tests;
    /// `None` on Postgres or for a name that is not a plain identifier.
    pub async fn sqlite_pragma(&self, name: &str) -> Result<Option<String>, AppError> {
        let plain = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if self.is_postgres() || !plain {
            return Ok(None);
        }
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                format!("PRAGMA {name}"),
            ))
            .await?;
        Ok(match row {
            Some(r) => r
                .try_get_by_index::<i64>(0)
                .map(|n| n.to_string())
                .or_else(|_| r.try_get_by_index::<String>(0))
                .ok(),
            None => None,
        })
    }

    pub fn is_postgres(&self) -> bool {
        self.backend == DbBackend::Postgres
    }

    pub(crate) fn conn(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Postgres pool, for `LISTEN` (None on SQLite).
    pub fn pg_pool(&self) -> Option<sea_orm::sqlx::PgPool> {
        self.is_postgres()
            .then(|| self.db.get_postgres_connection_pool().clone())
    }

    pub fn committed_notify(&self) -> Arc<Notify> {
        self.committed.clone()
    }

    /// The payload of this store's `NOTIFY`s (its feeder has their events already).
    pub fn notify_payload(&self) -> &str {
        &self.feed.instance
    }

    /// Every batch of events this process commits from now on, in commit order (the event bus's
    /// feeder). A second call takes the feed over: the earlier receiver ends.
    pub fn committed_events(&self) -> mpsc::UnboundedReceiver<Vec<StoredEvent>> {
        let (tx, rx) = mpsc::unbounded_channel();
        *crate::sync::lock(&self.feed.sink) = Some(tx);
        self.feed.listening.store(true, Ordering::SeqCst);
        rx
    }

    /// Writers committed and the commits that carried them, since start.
    pub fn write_stats(&self) -> &WriteStats {
        &self.stats
    }

    /// SQLite: pages the WAL may hold before it is made to start over (see [`checkpoint`]).
    pub fn set_wal_limit(&self, pages: u64) {
        self.wal_limit.store(pages.max(1), Ordering::SeqCst);
    }

    /// Where the write turns' time went since start (see [`WriteTimings`]).
    pub fn write_timings(&self) -> WriteTimings {
        let (turns, held) = self.batch.held();
        let ns = |c: &AtomicU64| Duration::from_nanos(c.load(Ordering::Relaxed));
        WriteTimings {
            turns,
            held,
            sends: ns(&self.stats.send_ns),
            commits: ns(&self.stats.commit_ns),
        }
    }

    /// Writers in line for a write turn right now: `(requests, background)` (see [`turns`]).
    pub fn waiting_turns(&self) -> (usize, usize) {
        self.batch.waiting()
    }

    /// Writers waiting for their turn right now.
    pub fn queued_writers(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// On a graceful stop, once nothing writes any more: commit the open batch and, on SQLite,
    /// stop the checkpoint task, copy the whole WAL into the database file and truncate it (the
    /// next start reads no log). Call it last: the store still reads and writes afterwards, but
    /// nothing checkpoints its WAL any more.
    pub async fn close(&self) -> Result<(), AppError> {
        let t = self.write_timings();
        tracing::info!(
            turns = t.turns,
            held_ms = t.held.as_millis() as u64,
            sends_ms = t.sends.as_millis() as u64,
            commits_ms = t.commits.as_millis() as u64,
            sends = self.stats.sends(),
            commits = self.stats.get().1,
            statements = self.stats.statements(),
            prepares = self.stats.prepares(),
            "write turns since start"
        );
        let _ = self.stop_checkpoints.send(true);
        // Before taking a turn: a pass of the task's may be waiting for one. Once it has ended,
        // no other checkpoint runs, and the one below cannot find SQLite's checkpointer busy.
        let task = crate::sync::lock(&self.checkpoint_task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let mut guard = self.batch.lock(Turn::Request).await;
        guard.flush().await?;
        if let Some(w) = &mut guard.pg {
            w.get_mut().close().await;
        }
        if self.backend == DbBackend::Sqlite {
            let row = self
                .db
                .query_one_raw(Statement::from_string(
                    DbBackend::Sqlite,
                    "PRAGMA wal_checkpoint(TRUNCATE)",
                ))
                .await?;
            let busy = row.and_then(|r| r.try_get_by_index::<i64>(0).ok());
            if busy != Some(0) {
                tracing::warn!(
                    "the WAL could not be emptied at shutdown (a reader or another process \
                     held it); the next start replays it"
                );
            }
        }
        drop(guard);
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), AppError> {
        Ok(self.db.ping().await?)
    }

    /// Begin a serialized write for a client's command: a savepoint in the open write batch
    /// (opened here if none is). The savepoint is opened with the writer's first send (see
    /// [`WriteTx`]). Requests take their turn before the runtime's waiting writes (see
    /// [`turns`]).
    pub async fn write(&self) -> Result<WriteTx, AppError> {
        self.write_as(Turn::Request).await
    }

    /// Begin a serialized write for the runtime's own work (claims, stage steps, lease
    /// releases): after the clients' requests that wait, within [`turns::MAX_REQUEST_STREAK`].
    pub async fn write_background(&self) -> Result<WriteTx, AppError> {
        self.write_as(Turn::Background).await
    }

    async fn write_as(&self, turn: Turn) -> Result<WriteTx, AppError> {
        let queued = Queued::new(self);
        let guard = self.batch.lock(turn).await;
        queued.arrived();
        let setup = guard.rollback_pending;
        let w = WriteTx {
            backend: self.backend,
            guard: Some(guard),
            queued: self.queued.clone(),
            appended: 0,
            events: Vec::new(),
            unsent: Default::default(),
            deferred: Default::default(),
            opened: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        };
        if !setup {
            return Ok(w);
        }
        // A rollback left by the previous writer runs in a task of its own: a caller that goes
        // away meanwhile cannot cut it short and leave the batch not knowing what ran.
        tokio::spawn(w.open())
            .await
            .unwrap_or_else(|e| Err(AppError::internal(e)))
    }
}

/// SQLite: the writer's connection to the file `url` names (see [`sqlite_writer`]).
fn open_sqlite_writer(url: &str) -> Result<SqliteWriter, AppError> {
    use std::str::FromStr;
    let opts =
        sea_orm::sqlx::sqlite::SqliteConnectOptions::from_str(url).map_err(AppError::internal)?;
    if url.contains(":memory:") || url.contains("mode=memory") {
        return Err(AppError::internal(anyhow::anyhow!(
            "an in-memory SQLite database cannot be shared by the readers and the writer: give a \
             file (sqlite://path/to/file.sqlite3?mode=rwc)"
        )));
    }
    SqliteWriter::open(opts.get_filename(), WAL_FILE_LIMIT)
}

/// Whether the SQLite library was built with the query planner stability guarantee (see
/// `.cargo/config.toml`).
async fn planner_is_stable(db: &DatabaseConnection) -> bool {
    let Ok(rows) = db
        .query_all_raw(Statement::from_string(
            DbBackend::Sqlite,
            "PRAGMA compile_options",
        ))
        .await
    else {
        return false;
    };
    rows.iter().any(|r| {
        r.try_get_by_index::<String>(0)
            .is_ok_and(|o| o == "ENABLE_QPSG")
    })
}

/// One writer's turn: a savepoint in the write batch, holding the batch lock until it commits
/// or drops (a drop rolls back to the savepoint and leaves the rest of the batch intact).
///
/// A writer's writes wait (see [`WriteTx::exec`]) and go together before its next read
/// ([`WriteTx::query`]) or with its commit; its savepoint is opened by its first send and
/// released by its last. A writer that only writes is one send: `SAVEPOINT; writes…; RELEASE`.
///
/// On SQLite a send is the statements executed one after another by the turn's holder on the
/// batch's connection (see [`sqlite_writer`]), no thread hand-over. On Postgres a send is a
/// round trip: several statements go in one message only by the simple query protocol, which
/// binds no parameters, so each write is prepared once on the connection and then executed by
/// name with its values as literals, and a read goes last in the same message, its rows being
/// those of the message's last statement (see [`pg_writer`]). The batch's first send
/// also begins its transaction and takes the advisory write lock; the writer that commits the
/// batch sends its `COMMIT` with its release.
pub struct WriteTx {
    backend: DbBackend,
    guard: Option<TurnGuard<Batch>>,
    queued: Arc<AtomicUsize>,
    appended: usize,
    /// This writer's events, kept for the bus only while it listens.
    events: Vec<StoredEvent>,
    /// Writes not sent yet.
    unsent: std::sync::Mutex<Unsent>,
    /// Read-model writes of this writer's appends not built yet: consecutive appends to a run
    /// write its rows once (see [`projector::Deferred`]).
    deferred: std::sync::Mutex<projector::Deferred>,
    /// Whether this writer's savepoint may exist: its `SAVEPOINT` was sent (with its first send).
    opened: AtomicBool,
    /// A send failed: part of this writer's writes may be missing, so it can only roll back.
    failed: AtomicBool,
}

/// Writes of a [`WriteTx`] waiting to be sent together, in order, each with its values (on
/// Postgres written in as literals when sent, see [`send_postgres`]).
#[derive(Default)]
struct Unsent {
    list: Vec<(String, Vec<sea_orm::Value>)>,
}

impl Unsent {
    fn push(&mut self, sql: impl Into<String>, values: Option<sea_orm::Values>) {
        self.list
            .push((sql.into(), values.map(|v| v.0).unwrap_or_default()));
    }

    fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The statements' texts, one after the other (for the sends' trace).
    fn joined(&self) -> String {
        let mut sql = String::new();
        for (s, _) in &self.list {
            if !sql.is_empty() {
                sql.push_str(";\n");
            }
            sql.push_str(s);
        }
        sql
    }
}

/// Most writes sent together (a rebuild projects thousands before its next read).
const MAX_UNSENT: usize = 32;

/// Whether every value of `stmt` has a Postgres literal that means the same (see
/// [`pg_writer::write_pg_literal`]): such a statement goes in a multi-statement message,
/// executed by name (see [`pg_writer`]); another is sent prepared, in a round trip of its own.
fn has_literals(stmt: &Statement) -> bool {
    stmt.values
        .as_ref()
        .is_none_or(|v| v.0.iter().all(pg_writer::has_literal))
}

/// Adds the time a send waited to the send counter when it ends, however it ends.
struct SendTimer<'a>(&'a AtomicU64, Instant);

impl Drop for SendTimer<'_> {
    fn drop(&mut self) {
        add_elapsed(self.0, self.1);
    }
}

/// A unique-index violation among a writer's statements: the data it decided on changed.
fn conflict(e: AppError) -> AppError {
    match e {
        AppError::Conflict(_) => AppError::Conflict(
            "the data changed concurrently (a record with this identity already exists); retry"
                .into(),
        ),
        other => other,
    }
}

impl WriteTx {
    /// The write batch whose turn this writer holds.
    fn batch(&self) -> &Batch {
        self.guard
            .as_ref()
            .expect("a writer holds its turn until it commits")
    }

    /// Postgres: the writers' connection, on which this writer's savepoint lives.
    async fn pg(&self) -> tokio::sync::MutexGuard<'_, PgWriter> {
        self.batch()
            .pg
            .as_ref()
            .expect("a Postgres store has a writers' connection")
            .lock()
            .await
    }

    pub(crate) fn backend(&self) -> DbBackend {
        self.backend
    }

    /// Count one send of this writer's statements to the database.
    fn count_send(&self) {
        if let Some(g) = self.guard.as_ref() {
            g.stats.sends.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Count statements sent.
    fn count_statements(&self, n: usize) {
        if let Some(g) = self.guard.as_ref() {
            g.stats.statements.fetch_add(n as u64, Ordering::SeqCst);
        }
    }

    /// Every row of `E` that `select` finds, as models, read in this writer's transaction
    /// (after its unsent writes).
    pub(crate) async fn models<E>(
        &self,
        select: sea_orm::Select<E>,
    ) -> Result<Vec<E::Model>, AppError>
    where
        E: sea_orm::EntityTrait,
        E::ActiveModel: sea_orm::TryIntoModel<E::Model>,
    {
        use sea_orm::QueryTrait;
        let rows = self.query(select.build(self.backend)).await?;
        rows.iter().map(Row::model::<E>).collect()
    }

    /// The first row of `E` that `select` finds (see [`WriteTx::models`]).
    pub(crate) async fn model<E>(
        &self,
        select: sea_orm::Select<E>,
    ) -> Result<Option<E::Model>, AppError>
    where
        E: sea_orm::EntityTrait,
        E::ActiveModel: sea_orm::TryIntoModel<E::Model>,
    {
        use sea_orm::QuerySelect;
        Ok(self.models(select.limit(1)).await?.into_iter().next())
    }

    /// Run a read (or a write with `RETURNING`) and return its rows, after this writer's unsent
    /// writes (and its savepoint, if this is the writer's first send): on SQLite executed right
    /// after them by the turn's holder, on Postgres in a round trip after theirs.
    pub(crate) async fn query(&self, stmt: Statement) -> Result<Vec<Row>, AppError> {
        self.queue_deferred().await?;
        self.send(Some(stmt), true).await
    }

    /// Tests: execute `sql` now, after this writer's unsent writes.
    #[cfg(test)]
    pub(crate) async fn run_now(&self, sql: &str) -> Result<(), AppError> {
        self.queue_deferred().await?;
        self.queue(Statement::from_string(self.backend, sql))
            .await?;
        self.send(None, true).await.map(|_| ())
    }

    /// Execute a write (insert, update, delete) built with sea-orm or sea-query. It is sent with
    /// this writer's other writes, with its next read or its commit (an error, such as a
    /// conflict, surfaces there, and the writer's savepoint is rolled back all the same). A
    /// unique-index violation (for events: the same stream version written concurrently) is
    /// `CONFLICT`.
    pub(crate) async fn exec(&self, stmt: &impl StatementBuilder) -> Result<(), AppError> {
        self.usable()?;
        self.queue_deferred().await?;
        self.queue(self.backend.build(stmt)).await
    }

    /// Defer read-model writes of an append (see [`projector::Deferred`]); they go before this
    /// writer's next statement.
    pub(crate) fn defer(&self, add: impl FnOnce(&mut projector::Deferred)) {
        add(&mut crate::sync::lock(&self.deferred));
    }

    /// Queue the deferred read-model writes, in order, before anything else this writer does.
    async fn queue_deferred(&self) -> Result<(), AppError> {
        self.usable()?;
        let built = {
            let mut deferred = crate::sync::lock(&self.deferred);
            if deferred.is_empty() {
                return Ok(());
            }
            // A writer whose projection could not be built can only roll back.
            deferred
                .build(self.backend)
                .inspect_err(|_| self.failed.store(true, Ordering::SeqCst))?
        };
        for stmt in built {
            self.queue(stmt).await?;
        }
        Ok(())
    }

    /// Add a built write to the unsent ones (sending them once there are enough).
    async fn queue(&self, built: Statement) -> Result<(), AppError> {
        if self.backend == DbBackend::Postgres && !has_literals(&built) {
            return self.exec_prepared(built).await;
        }
        let full = {
            let mut unsent = crate::sync::lock(&self.unsent);
            unsent.push(built.sql, built.values);
            unsent.list.len() >= MAX_UNSENT
        };
        if full {
            self.send(None, false).await?;
        }
        Ok(())
    }

    /// Postgres: a write with a value that has no literal, sent as a prepared statement after
    /// the unsent writes.
    async fn exec_prepared(&self, stmt: Statement) -> Result<(), AppError> {
        self.send(None, true).await?;
        self.failed.store(true, Ordering::SeqCst);
        self.count_send();
        self.count_statements(1);
        let values = stmt.values.map(|v| v.0).unwrap_or_default();
        self.pg()
            .await
            .prepared(&stmt.sql, &values)
            .await
            .map_err(conflict)?;
        self.failed.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// An error once a send failed: this writer can only roll back.
    fn usable(&self) -> Result<(), AppError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(AppError::internal(anyhow::anyhow!(
                "an earlier write of this writer failed; it can only roll back"
            )));
        }
        Ok(())
    }

    /// Send the unsent writes, followed by `then` if given (opening the savepoint first if it
    /// is not yet); `then`'s rows. Nothing to send: nothing done, unless `open` asks for the
    /// savepoint to be opened all the same. On SQLite the holder executes them all; on
    /// Postgres they go in one round trip (see [`WriteTx`]).
    async fn send(&self, then: Option<Statement>, open: bool) -> Result<Vec<Row>, AppError> {
        self.send_as(then, open, false).await
    }

    /// [`WriteTx::send`]; on Postgres with the batch's `COMMIT` last when `commit`.
    async fn send_as(
        &self,
        then: Option<Statement>,
        open: bool,
        commit: bool,
    ) -> Result<Vec<Row>, AppError> {
        self.usable()?;
        let pending = std::mem::take(&mut *crate::sync::lock(&self.unsent));
        let sqlite = self.backend == DbBackend::Sqlite;
        let opening = !self.opened.load(Ordering::SeqCst);
        let mut batch = Unsent::default();
        let mut begin = false;
        if opening && (open || then.is_some() || !pending.is_empty()) {
            self.opened.store(true, Ordering::SeqCst);
            // SQLite: the batch's transaction begins with its first savepoint (on Postgres
            // `send_postgres` sees to it). If this send fails, whether it began is known by the
            // savepoint: the next user of the batch rolls back to it, and abandons the batch
            // when it is not there.
            begin = sqlite && !self.batch().sqlite_began();
            batch.push(SAVEPOINT, None);
        }
        self.count_statements(batch.list.len() + pending.list.len() + usize::from(then.is_some()));
        batch.list.extend(pending.list);
        if batch.is_empty() && then.is_none() {
            return Ok(Vec::new());
        }
        // Marked failed until the send returns: a send that errs or is cancelled midway may
        // have applied only some of these writes.
        self.failed.store(true, Ordering::SeqCst);
        let _timed = SendTimer(&self.batch().stats.send_ns, Instant::now());
        self.count_send();
        let rows = match &self.batch().sqlite {
            Some(w) => send_sqlite(&mut crate::sync::lock(w), begin, batch, then)?,
            None => {
                let mut w = self.pg().await;
                let stats = &self.batch().stats;
                let sent = send_postgres(&mut w, batch, then, commit, &stats.prepares).await?;
                if sent.round_trips > 1 {
                    self.count_send();
                }
                if sent.locked {
                    self.count_statements(1);
                }
                sent.rows
            }
        };
        self.failed.store(false, Ordering::SeqCst);
        Ok(rows)
    }

    /// Whether this writer would commit the batch if it left now (see [`commits_the_batch`]).
    fn commits_the_batch(&self) -> bool {
        self.guard
            .as_ref()
            .is_some_and(|g| commits_the_batch(g, &self.queued))
    }

    /// The log's highest sequence as this transaction sees it.
    pub(crate) async fn log_head(&mut self) -> Result<i64, AppError> {
        let cached = self.guard.as_ref().and_then(|g| g.head);
        if let Some(h) = cached {
            return Ok(h);
        }
        let rows = self.query(event_log::head_read(self.backend)).await?;
        let h = event_log::head_of(&rows)?;
        if let Some(g) = self.guard.as_mut() {
            g.head = Some(h);
        }
        Ok(h)
    }

    /// Record that events up to `head` were appended in this transaction.
    pub(crate) fn appended_up_to(&mut self, head: i64, count: usize) {
        if let Some(g) = self.guard.as_mut() {
            g.head = Some(head);
        }
        self.appended += count;
    }

    /// Keep appended events for the bus, which publishes them once the batch commits.
    pub(crate) fn keep_for_bus(&mut self, events: &[StoredEvent]) {
        let listening = self
            .guard
            .as_ref()
            .is_some_and(|g| g.feed.listening.load(Ordering::Relaxed));
        if listening {
            self.events.extend_from_slice(events);
        }
    }

    /// Settle what the previous writer left. If that fails, the batch is abandoned (its waiting
    /// writers are told it failed); nothing of this writer's is in it, so it goes on in a new
    /// transaction, begun by its first send.
    async fn open(mut self) -> Result<WriteTx, AppError> {
        if let Some(guard) = self.guard.as_mut() {
            if let Err(e) = guard.settle().await {
                tracing::warn!(error = ?e, "rolled a write batch back: its last writer's changes could not be undone alone");
            }
        }
        Ok(self)
    }

    /// Make this writer's changes part of the batch, and return once the batch has committed.
    /// The unsent writes and the savepoint's release go in one send (on Postgres with a
    /// `pg_notify` when this writer is the batch's first to append). An error leaves the
    /// writer to its drop, which rolls its savepoint back.
    ///
    /// The commit runs in a task of its own: a caller that goes away midway (a request whose
    /// client left, a lease heartbeat stopped) cannot cut the release short and leave a
    /// savepoint the batch would then roll back to in vain. Its writes commit with the batch.
    pub async fn commit(self) -> Result<(), AppError> {
        tokio::spawn(self.finish())
            .await
            .unwrap_or_else(|e| Err(AppError::internal(e)))
    }

    async fn finish(mut self) -> Result<(), AppError> {
        self.usable()?;
        self.queue_deferred().await?;
        // The batch's first appending writer notifies, after its release (see
        // `Batch::notified`).
        let notify = self.backend == DbBackend::Postgres
            && self.appended > 0
            && !self.batch().notified.load(Ordering::SeqCst);
        let wrote = !crate::sync::lock(&self.unsent).is_empty();
        let opened = self.opened.load(Ordering::SeqCst);
        // Nobody is queued for a turn, so this writer would commit the batch: first the ready
        // tasks run once, if that has been bringing writers lately (see [`Yields`]).
        if self.queued.load(Ordering::SeqCst) == 0 {
            let guard = self
                .guard
                .as_mut()
                .expect("a writer holds its turn until it commits");
            if guard.yields.worth_it() {
                tokio::task::yield_now().await;
                guard.yields.record(self.queued.load(Ordering::SeqCst) > 0);
            }
        }
        // SQLite, nothing left to send but the release, and this writer commits the batch: the
        // release goes with the `COMMIT` (at low load, a turn that ends with a claim finding
        // nothing).
        let release_at_commit =
            !wrote && opened && self.backend == DbBackend::Sqlite && self.commits_the_batch();
        // Postgres, and this writer commits the batch: the `COMMIT` goes with its release.
        let commit_with_release =
            (wrote || opened) && self.backend == DbBackend::Postgres && self.commits_the_batch();
        if release_at_commit {
            self.count_statements(1);
            if let Some(g) = self.guard.as_mut() {
                g.release_at_commit = true;
            }
        } else if wrote || opened {
            {
                let mut unsent = crate::sync::lock(&self.unsent);
                unsent.push(RELEASE, None);
                if notify {
                    let instance = &self.batch().feed.instance;
                    unsent.push(
                        format!("SELECT pg_notify('{PG_CHANNEL}', '{instance}')"),
                        None,
                    );
                }
            }
            self.send_as(None, false, commit_with_release).await?;
            if notify {
                self.batch().notified.store(true, Ordering::SeqCst);
            }
        }
        self.opened.store(false, Ordering::SeqCst);
        let mut guard = self.guard.take().expect("commit once");
        guard.appended += self.appended;
        guard.events.append(&mut self.events);
        guard.writers += 1;
        if guard.release_at_commit || commit_with_release || commits_the_batch(&guard, &self.queued)
        {
            return guard.flush().await;
        }
        let (done_tx, done_rx) = oneshot::channel();
        guard.waiting_since.get_or_insert_with(Instant::now);
        guard.waiters.push(done_tx);
        drop(guard);
        match done_rx.await {
            Ok(Ok(())) => Ok(()),
            _ => Err(AppError::internal(anyhow::anyhow!(
                "the write batch this change was part of failed to commit"
            ))),
        }
    }
}

/// SQLite: a writer's send, executed here: the batch's `BEGIN` if `begin`, the statements of
/// `batch` in order, then `then`, whose rows are returned.
fn send_sqlite(
    w: &mut SqliteWriter,
    begin: bool,
    batch: Unsent,
    then: Option<Statement>,
) -> Result<Vec<Row>, AppError> {
    if tracing::enabled!(target: "vm_workflow::store::sends", tracing::Level::TRACE) {
        let mut all = batch.joined();
        if let Some(then) = &then {
            all.push_str(";\n");
            all.push_str(&then.sql);
        }
        tracing::trace!(target: "vm_workflow::store::sends", sql = %all, "send");
    }
    if begin {
        w.begin()?;
    }
    for (sql, values) in &batch.list {
        w.run(sql, values).map_err(conflict)?;
    }
    let Some(then) = then else {
        return Ok(Vec::new());
    };
    let values = then.values.map(|v| v.0).unwrap_or_default();
    Ok(w.read(&then.sql, &values)
        .map_err(conflict)?
        .into_iter()
        .map(Row::Sqlite)
        .collect())
}

/// Postgres: a writer's send, in one round trip on the writers' connection: the batch's `BEGIN`
/// and the advisory write lock first if no transaction is open, the statements of `batch` in
/// order, then `then`, whose rows are returned (see [`PgSent`]), or the batch's `COMMIT` when
/// `commit`. The texts it prepares are counted in `prepares`, whether it succeeds or not.
async fn send_postgres(
    w: &mut PgWriter,
    mut batch: Unsent,
    then: Option<Statement>,
    commit: bool,
    prepares: &AtomicU64,
) -> Result<PgSent, AppError> {
    let begin = !w.began();
    if begin {
        // At the transaction's top level, before the savepoint: a lock taken inside a
        // savepoint would go when a writer's changes are rolled back to it.
        batch.list.insert(0, (pg_write_lock(), Vec::new()));
    }
    let reads = then.is_some();
    let prepared = match then {
        Some(read) if has_literals(&read) => {
            batch.push(read.sql, read.values);
            None
        }
        other => other,
    };
    if commit {
        debug_assert!(!reads, "a commit comes last");
        batch.push("COMMIT", None);
    }
    let mut sent = PgSent {
        rows: Vec::new(),
        round_trips: 0,
        locked: begin,
    };
    let mut rows = Vec::new();
    if !batch.is_empty() {
        rows = w
            .send_statements(begin, &batch.list, prepares)
            .await
            .map_err(conflict)?;
        sent.round_trips += 1;
        if commit {
            w.committed();
        }
    }
    if let Some(read) = prepared {
        let values = read.values.map(|v| v.0).unwrap_or_default();
        rows = w.prepared(&read.sql, &values).await.map_err(conflict)?;
        sent.round_trips += 1;
    }
    if reads {
        sent.rows = rows
            .into_iter()
            .map(|r| Row::Postgres(sea_orm::QueryResult::from(r)))
            .collect();
    }
    Ok(sent)
}

/// What [`send_postgres`] did.
struct PgSent {
    /// `then`'s rows.
    rows: Vec<Row>,
    /// Two when `then` has a value without a literal and goes prepared after the rest.
    round_trips: usize,
    /// It began the batch's transaction and took the write lock.
    locked: bool,
}

/// Whether a writer that leaves the batch now commits it: nobody else waits for a turn, or the
/// batch is full or old enough.
fn commits_the_batch(batch: &Batch, queued: &AtomicUsize) -> bool {
    queued.load(Ordering::SeqCst) == 0
        || batch.waiters.len() + 1 >= max_batch()
        || batch
            .waiting_since
            .is_some_and(|t| t.elapsed() >= max_batch_age())
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else {
            return;
        };
        // Read the head again after a rollback: a cached one may be what failed (another
        // process appending to the same SQLite file, say), or this writer may have moved it for
        // appends now gone. A writer that neither sent nor appended anything leaves it.
        if self.opened.load(Ordering::SeqCst) || self.appended > 0 {
            guard.head = None;
        }
        if self.opened.load(Ordering::SeqCst) {
            // Rolled back by whoever uses the batch next (a writer, or its commit).
            guard.rollback_pending = true;
        }
        if self.queued.load(Ordering::SeqCst) > 0 {
            // The next writer in line carries on in the batch and settles it.
            return;
        }
        if guard.waiters.is_empty() {
            // Nothing of anyone's is in the batch: roll it back rather than leave it open
            // (unless nothing is open: on SQLite nothing was begun since the last commit, whose
            // log head stays right).
            if guard.needs_tx() {
                return;
            }
            match (&mut guard.pg, tokio::runtime::Handle::try_current()) {
                (None, _) => guard.forget(),
                // Postgres: the `ROLLBACK` is a round trip, in a task that holds the turn.
                (Some(_), Ok(handle)) => {
                    handle.spawn(async move { guard.abandon().await });
                }
                // No runtime to send it on: a connection closed rolls back all the same.
                (Some(w), Err(_)) => {
                    w.get_mut().disconnect();
                    guard.forget();
                }
            }
            return;
        }
        // Writers wait on this batch and nobody else is coming: commit it for them.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = guard.flush().await {
                    tracing::error!(error = ?e, "committing a write batch failed");
                }
            });
        }
    }
}

/// A migrated SQLite store in `dir`, for unit tests.
#[cfg(test)]
pub(crate) async fn test_store(dir: &std::path::Path) -> Store {
    let url = format!("sqlite://{}?mode=rwc", dir.join("test.sqlite3").display());
    let store = Store::connect(&url, 4).await.expect("connect");
    store.migrate().await.expect("migrate");
    store
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::TransactionTrait;

    /// Yields go on while they bring writers, stop after 8 that brought none, and are tried
    /// again every 8th commit after that.
    #[test]
    fn yields_stop_when_they_bring_nobody_and_are_probed() {
        let mut y = Yields::default();
        for _ in 0..8 {
            assert!(y.worth_it());
            y.record(false);
        }
        let tried: Vec<bool> = (0..16).map(|_| y.worth_it()).collect();
        let probes: Vec<usize> = (0..16).filter(|&i| tried[i]).collect();
        assert_eq!(probes, [7, 15], "every 8th commit");
        assert!(!y.worth_it());
        y.record(true);
        assert!(y.worth_it(), "a writer came: yield again");
    }

    /// The rows of `probe` as another connection sees them (committed ones only).
    async fn committed_probe_rows(store: &Store) -> Vec<String> {
        store
            .conn()
            .query_all_raw(Statement::from_string(
                DbBackend::Sqlite,
                "SELECT x FROM probe ORDER BY x",
            ))
            .await
            .expect("read the probe")
            .iter()
            .map(|r| r.try_get_by_index::<String>(0).expect("x"))
            .collect()
    }

    async fn probe_store(dir: &std::path::Path) -> Store {
        let store = test_store(dir).await;
        store
            .conn()
            .execute_unprepared("CREATE TABLE probe (x TEXT NOT NULL)")
            .await
            .expect("probe table");
        store
    }

    /// sqlx counts transactions on a connection and begins by savepoint when it thinks one is
    /// open. When SQLite has none open (it rolled one back by itself after an error, here
    /// ended by hand), sqlx's `ROLLBACK` on a dropped handle fails and the count stays off.
    /// Reused, such a connection would roll back to a savepoint and leave a transaction open,
    /// in which later "committed" writes are never committed. The pool discards it instead.
    #[tokio::test]
    async fn a_connection_sqlx_miscounts_is_not_used_again() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = probe_store(dir.path()).await;
        // One connection, so that every transaction below is begun on it unless it is discarded.
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("test.sqlite3").display()
        );
        let pool = Database::connect(connect_options(&url, 1))
            .await
            .expect("pool");
        let tx = pool.begin().await.expect("begin");
        tx.execute_unprepared("COMMIT")
            .await
            .expect("ended under sqlx");
        drop(tx);
        let tx = pool.begin().await.expect("begin");
        tx.execute_unprepared("INSERT INTO probe VALUES ('rolled back')")
            .await
            .expect("insert");
        drop(tx);
        let tx = pool.begin().await.expect("begin");
        tx.execute_unprepared("INSERT INTO probe VALUES ('committed')")
            .await
            .expect("insert");
        tx.commit().await.expect("commit");
        assert_eq!(committed_probe_rows(&store).await, ["committed"]);
    }

    /// A writer's multi-row insert that fails on a later row leaves none of its rows, and the
    /// batch goes on: the writer's savepoint is rolled back whole.
    #[tokio::test]
    async fn a_failed_insert_leaves_none_of_its_rows() {
        use crate::domain::events::{Actor, DomainEvent, EventMeta};
        let dir = tempfile::tempdir().expect("tmp");
        let store = probe_store(dir.path()).await;
        // Version 3 of stream `u`, written by hand: an append of versions 1-3 fails on its
        // third row, after the first two.
        write_by_hand(
            &store,
            "INSERT INTO events (sequence, event_id, stream_id, stream_version, event_type, \
             actor_type, actor_id, occurred_at, payload) VALUES (1000, 'evt-by-hand', 'u', 3, \
             'BrandCreated', 'user', 'ana', '2026-01-01T00:00:00Z', '{}')",
            true,
        )
        .await;
        let mut w = store.write().await.expect("writer");
        let brand = |n: i32| event_log::NewEvent {
            body: DomainEvent::BrandCreated {
                brand_id: format!("b-{n}"),
                name: format!("B{n}"),
            },
            thread_id: None,
            run_id: None,
        };
        let meta = EventMeta {
            actor: Actor::user("ana"),
            correlation_id: None,
            causation_id: None,
        };
        w.append("u", 0, &meta, (1..=3).map(brand).collect())
            .await
            .expect("deferred");
        let failed = w.commit().await;
        assert!(matches!(failed, Err(AppError::Conflict(_))), "{failed:?}");
        probe_write(&store, "after", true).await;
        let versions: Vec<i64> = store
            .conn()
            .query_all_raw(Statement::from_string(
                DbBackend::Sqlite,
                "SELECT stream_version FROM events WHERE stream_id = 'u' ORDER BY stream_version",
            ))
            .await
            .expect("read")
            .iter()
            .map(|r| r.try_get_by_index::<i64>(0).expect("version"))
            .collect();
        assert_eq!(versions, [3]);
        assert_eq!(committed_probe_rows(&store).await, ["after"]);
    }

    /// A write through the store's writer: a row in `probe`, then a commit or a drop.
    async fn probe_write(store: &Store, x: &str, commit: bool) {
        write_by_hand(store, &format!("INSERT INTO probe VALUES ('{x}')"), commit).await;
    }

    /// A write turn of `sql`, run on the writer's transaction, then a commit or a drop.
    async fn write_by_hand(store: &Store, sql: &str, commit: bool) {
        let w = store.write().await.expect("writer");
        w.run_now(sql).await.expect("write by hand");
        if commit {
            w.commit().await.expect("commit");
        }
    }

    /// SQLite: batches follow one another on the writer's connection. A writer whose
    /// transaction SQLite rolled back under it (here by hand, as SQLite does after some errors)
    /// and that then gives up abandons the batch. Every batch after that still commits exactly
    /// its committed writers: nothing of an abandoned writer is committed by a later batch,
    /// nothing committed is lost.
    #[tokio::test]
    async fn abandoned_batches_leave_nothing_to_the_next() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = probe_store(dir.path()).await;
        probe_write(&store, "a committed", true).await;
        let w = store.write().await.expect("writer");
        w.run_now("INSERT INTO probe VALUES ('b rolled back by SQLite')")
            .await
            .expect("insert");
        w.run_now("ROLLBACK")
            .await
            .expect("rolled back under the writer");
        drop(w);
        probe_write(&store, "c committed", true).await;
        probe_write(&store, "d dropped", false).await;
        probe_write(&store, "e committed", true).await;
        probe_write(&store, "f dropped", false).await;
        probe_write(&store, "g committed", true).await;
        assert_eq!(
            committed_probe_rows(&store).await,
            ["a committed", "c committed", "e committed", "g committed"]
        );
        store.close().await.expect("close");
        assert_eq!(
            committed_probe_rows(&store).await,
            ["a committed", "c committed", "e committed", "g committed"]
        );
        probe_write(&store, "h after close", true).await;
        let reopened = test_store(dir.path()).await;
        assert_eq!(
            committed_probe_rows(&reopened).await,
            [
                "a committed",
                "c committed",
                "e committed",
                "g committed",
                "h after close"
            ]
        );
    }

    /// SQLite: a writer whose batch transaction SQLite rolled back under it (by hand here, as
    /// SQLite does after some errors) cannot commit: its commit fails, nothing of it is
    /// committed, and the next writer begins a new transaction.
    #[tokio::test]
    async fn a_writer_whose_transaction_sqlite_rolled_back_cannot_commit() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = probe_store(dir.path()).await;
        let w = store.write().await.expect("writer");
        w.run_now("INSERT INTO probe VALUES ('lost')")
            .await
            .expect("insert");
        w.run_now("ROLLBACK")
            .await
            .expect("rolled back under the writer");
        let committed = w.commit().await;
        assert!(committed.is_err(), "{committed:?}");
        probe_write(&store, "next", true).await;
        assert_eq!(committed_probe_rows(&store).await, ["next"]);
    }

    /// SQLite: the writer's connection and the readers' must reach the same database, which an
    /// in-memory one is not; the store refuses it with a clear error instead of losing writes.
    #[tokio::test]
    async fn an_in_memory_sqlite_database_is_refused() {
        for url in ["sqlite::memory:", "sqlite://x.sqlite3?mode=memory"] {
            let refused = Store::connect(url, 4).await.expect_err("refused");
            assert!(
                format!("{refused:?}").contains("in-memory SQLite database"),
                "{url}: {refused:?}"
            );
        }
    }

    /// On SQLite every write turn runs on the same connection, whatever the readers do: its
    /// page cache stays valid from one turn to the next (a connection's cache is dropped when
    /// another connection wrote). A temporary table lives on one connection only, so a turn
    /// that sees the one an earlier turn made ran on the same connection.
    #[tokio::test]
    async fn sqlite_write_turns_share_one_connection() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = test_store(dir.path()).await;
        let w = store.write().await.expect("writer");
        w.run_now("CREATE TEMP TABLE writer_mark (x INTEGER)")
            .await
            .expect("mark the writer's connection");
        w.commit().await.expect("commit");
        for turn in 0..6 {
            // Readers open every connection of the pool, then give them back.
            let readers: Vec<_> = futures::future::join_all((0..4).map(|_| store.conn().begin()))
                .await
                .into_iter()
                .collect::<Result<_, _>>()
                .expect("readers");
            drop(readers);
            let w = store.write().await.expect("writer");
            let seen: Option<i64> = first_value(
                &w.query(Statement::from_string(
                    DbBackend::Sqlite,
                    "SELECT COUNT(*) FROM temp.sqlite_master WHERE name = 'writer_mark'",
                ))
                .await
                .expect("look"),
            )
            .expect("count");
            w.commit().await.expect("commit");
            assert_eq!(seen, Some(1), "write turn {turn} ran on another connection");
        }
    }
}
