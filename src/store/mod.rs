//! Storage: the only code that talks to the database (through sea-orm).
//!
//! Every write goes through [`Store::write`]: one transaction, serialized (an in-process lock, plus
//! a transaction-scoped advisory lock on Postgres so several instances serialize too). Appends
//! number events with `MAX(sequence) + 1` inside that critical section, so the global sequence is
//! gap-free and equals commit order on both backends.

mod entities;
pub mod event_log;
pub mod idempotency;
pub mod projector;
pub mod queries;
pub mod queue;
pub mod rebuild;
mod rows;
pub mod seed;

use crate::error::AppError;
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, SqlErr, Statement, TransactionTrait,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};

pub use rows::{
    ApprovalRow, ArtifactRow, BrandRow, EventFilter, Page, ProjectRow, ThreadRow, TimelineRow,
};

/// Channel used with `LISTEN/NOTIFY` on Postgres to announce committed events.
pub const PG_CHANNEL: &str = "vm_workflow_events";
const PG_WRITE_LOCK_KEY: i64 = 0x766d_776f_726b;

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

#[derive(Debug)]
pub struct Store {
    db: DatabaseConnection,
    backend: DbBackend,
    write_lock: Arc<Mutex<()>>,
    /// Woken after every commit that appended events.
    committed: Arc<Notify>,
}

impl Store {
    /// Connect to `url` (`sqlite://…` or `postgres://…`).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, AppError> {
        let mut opts = ConnectOptions::new(url.to_string());
        opts.max_connections(max_connections)
            .min_connections(1)
            .connect_timeout(Duration::from_secs(10))
            .acquire_timeout(Duration::from_secs(30))
            .sqlx_logging(false)
            .map_sqlx_sqlite_opts(|o| {
                o.create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10))
                    .foreign_keys(true)
            });
        let db = Database::connect(opts).await.map_err(AppError::internal)?;
        let backend = db.get_database_backend();
        Ok(Store {
            db,
            backend,
            write_lock: Arc::new(Mutex::new(())),
            committed: Arc::new(Notify::new()),
        })
    }

    pub async fn migrate(&self) -> Result<(), AppError> {
        use migration::MigratorTrait;
        migration::Migrator::up(&self.db, None)
            .await
            .map_err(AppError::internal)
    }

    pub fn backend(&self) -> DbBackend {
        self.backend
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

    pub async fn ping(&self) -> Result<(), AppError> {
        Ok(self.db.ping().await?)
    }

    /// Begin a serialized write transaction.
    pub async fn write(&self) -> Result<WriteTx, AppError> {
        let guard = self.write_lock.clone().lock_owned().await;
        let tx = self.db.begin().await?;
        if self.is_postgres() {
            tx.query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT pg_advisory_xact_lock({PG_WRITE_LOCK_KEY})"),
            ))
            .await?;
        }
        Ok(WriteTx {
            tx,
            _guard: guard,
            appended: 0,
            committed: self.committed.clone(),
            backend: self.backend,
        })
    }
}

/// A write transaction holding the store's write lock until it commits or drops.
pub struct WriteTx {
    tx: DatabaseTransaction,
    _guard: OwnedMutexGuard<()>,
    appended: usize,
    committed: Arc<Notify>,
    backend: DbBackend,
}

impl WriteTx {
    pub(crate) fn tx(&self) -> &DatabaseTransaction {
        &self.tx
    }

    pub async fn commit(self) -> Result<(), AppError> {
        let WriteTx {
            tx,
            _guard,
            appended,
            committed,
            backend,
        } = self;
        if appended > 0 && backend == DbBackend::Postgres {
            tx.execute_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT pg_notify('{PG_CHANNEL}', '')"),
            ))
            .await?;
        }
        tx.commit().await?;
        drop(_guard);
        if appended > 0 {
            committed.notify_waiters();
        }
        Ok(())
    }
}
