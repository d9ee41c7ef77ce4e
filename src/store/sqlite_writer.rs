//! SQLite: the writer's own connection, driven synchronously by whoever holds the write turn.
//!
//! Every write goes through one connection (SQLite has one writer). Through sqlx, each of a
//! writer's sends was a hand-over to that connection's thread and back: two thread wake-ups
//! inside the write lock, 58 % of the lock's time at C=50 (BENCHMARKS.md, "What bounds them").
//! Here the lock holder runs its statements itself, on a rusqlite connection to the same file:
//! the same bundled SQLite library as sqlx's (one `libsqlite3-sys`), prepared statements cached
//! by their text. The readers stay on sqlx's pool.
//!
//! The connection lives in the write batch and is used only by the holder of its turn (the
//! mutex around it is never contended). A call blocks its tokio worker for as long as SQLite
//! works: tens of microseconds for a writer's statements (a `COMMIT` does not sync the WAL at
//! `synchronous = NORMAL`; the checkpoint task does, on a pool connection), longer for the
//! seeder's and a rebuild's large turns, and up to the busy timeout when another process holds
//! the database file's write lock (it has no reason to: one server per SQLite file).

use crate::error::AppError;
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{Connection, ErrorCode, OpenFlags};
use sea_orm::Value;
use std::path::Path;
use std::time::Duration;

/// Prepared statements kept (the write path uses a few dozen distinct texts).
const CACHED_STATEMENTS: usize = 256;
/// Longer statements are prepared for one execution, not kept: the seeder's inserts of a
/// thousand rows each are megabytes of prepared program, and are few.
const CACHED_TEXT_MAX: usize = 8 << 10;

/// The writer's connection (see the module's documentation).
pub(crate) struct SqliteWriter {
    conn: Connection,
    /// A transaction was begun by [`SqliteWriter::begin`] and not yet ended by us: if SQLite
    /// shows none open, it rolled it back by itself (after an I/O error, say).
    began: bool,
}

impl std::fmt::Debug for SqliteWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteWriter")
            .field("began", &self.began)
            .field("open", &!self.conn.is_autocommit())
            .finish()
    }
}

/// A row a writer read: its columns' values in order.
pub(crate) type SqliteRow = Vec<SqlValue>;

impl SqliteWriter {
    /// Open the database file at `path` (which the readers' pool has created and set to WAL)
    /// with the settings the pool's connections have.
    pub(crate) fn open(path: &Path, wal_file_limit: u64) -> Result<SqliteWriter, AppError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags).map_err(internal)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(internal)?;
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA foreign_keys = ON;
             PRAGMA temp_store = MEMORY;
             PRAGMA wal_autocheckpoint = 0;
             PRAGMA journal_size_limit = {wal_file_limit};"
        ))
        .map_err(internal)?;
        conn.set_prepared_statement_cache_capacity(CACHED_STATEMENTS);
        Ok(SqliteWriter { conn, began: false })
    }

    /// Whether a transaction is open on the connection.
    pub(crate) fn in_transaction(&self) -> bool {
        !self.conn.is_autocommit()
    }

    /// Whether a transaction we began is gone without our `COMMIT` or `ROLLBACK`: SQLite rolled
    /// it back by itself, and every change made in it with it.
    pub(crate) fn lost_transaction(&self) -> bool {
        self.began && !self.in_transaction()
    }

    /// Whether we began a transaction that has not ended.
    pub(crate) fn began(&self) -> bool {
        self.began
    }

    pub(crate) fn begin(&mut self) -> Result<(), AppError> {
        if self.in_transaction() {
            // A `ROLLBACK` of ours failed earlier (see `commit` and `rollback`): whatever is
            // open belongs to no writer any more.
            tracing::warn!("a transaction was left open on the SQLite writer; rolling it back");
            self.roll_back_open().map_err(internal)?;
        }
        self.run("BEGIN", &[])?;
        self.began = true;
        Ok(())
    }

    /// Commit the open transaction. If the `COMMIT` fails, what is open is rolled back: the
    /// connection is left with no transaction either way.
    pub(crate) fn commit(&mut self) -> Result<(), AppError> {
        self.began = false;
        let committed = self.run("COMMIT", &[]);
        if committed.is_err() {
            let _ = self.roll_back_open();
        }
        committed
    }

    /// Roll back whatever is open (nothing to do when nothing is).
    pub(crate) fn rollback(&mut self) {
        self.began = false;
        if let Err(e) = self.roll_back_open() {
            tracing::error!(error = %e, "rolling the write batch back failed");
        }
    }

    /// `ROLLBACK` if a transaction is open.
    fn roll_back_open(&mut self) -> rusqlite::Result<()> {
        if self.in_transaction() {
            self.conn.execute_batch("ROLLBACK")?;
        }
        Ok(())
    }

    /// Execute one statement that returns no rows, with its values bound in order.
    pub(crate) fn run(&mut self, sql: &str, values: &[Value]) -> Result<(), AppError> {
        self.with_bound(sql, values, |stmt| stmt.raw_execute().map(|_| ()))
    }

    /// Execute one statement and return its rows.
    pub(crate) fn read(&mut self, sql: &str, values: &[Value]) -> Result<Vec<SqliteRow>, AppError> {
        self.with_bound(sql, values, collect_rows)
    }

    /// Prepare `sql` (kept in the statement cache unless longer than [`CACHED_TEXT_MAX`]), bind
    /// `values` to it in order, and run `f` on it.
    fn with_bound<T>(
        &self,
        sql: &str,
        values: &[Value],
        f: impl FnOnce(&mut rusqlite::Statement<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, AppError> {
        if sql.len() > CACHED_TEXT_MAX {
            let mut stmt = self.conn.prepare(sql).map_err(sql_error)?;
            bind(&mut stmt, values)?;
            f(&mut stmt).map_err(sql_error)
        } else {
            let mut stmt = self.conn.prepare_cached(sql).map_err(sql_error)?;
            bind(&mut stmt, values)?;
            f(&mut stmt).map_err(sql_error)
        }
    }
}

/// The rows of a bound statement, each its columns' values in order.
fn collect_rows(stmt: &mut rusqlite::Statement<'_>) -> rusqlite::Result<Vec<SqliteRow>> {
    let columns = stmt.column_count();
    let mut rows = stmt.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(
            (0..columns)
                .map(|i| row.get::<_, SqlValue>(i))
                .collect::<rusqlite::Result<_>>()?,
        );
    }
    Ok(out)
}

/// Bind `values` to `stmt`'s parameters, in order.
fn bind(stmt: &mut rusqlite::Statement<'_>, values: &[Value]) -> Result<(), AppError> {
    for (i, v) in values.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, to_sql(v)?)
            .map_err(sql_error)?;
    }
    Ok(())
}

/// A sea-orm value as SQLite stores it (the types the write path binds).
fn to_sql(value: &Value) -> Result<ToSqlOutput<'_>, AppError> {
    fn int(n: Option<i64>) -> ValueRef<'static> {
        n.map_or(ValueRef::Null, ValueRef::Integer)
    }
    Ok(ToSqlOutput::Borrowed(match value {
        Value::String(s) => s
            .as_deref()
            .map_or(ValueRef::Null, |s| ValueRef::Text(s.as_bytes())),
        Value::BigInt(n) => int(*n),
        Value::Int(n) => int(n.map(i64::from)),
        Value::SmallInt(n) => int(n.map(i64::from)),
        Value::TinyInt(n) => int(n.map(i64::from)),
        Value::Unsigned(n) => int(n.map(i64::from)),
        Value::SmallUnsigned(n) => int(n.map(i64::from)),
        Value::TinyUnsigned(n) => int(n.map(i64::from)),
        Value::BigUnsigned(n) => match n {
            Some(n) => ValueRef::Integer(i64::try_from(*n).map_err(AppError::internal)?),
            None => ValueRef::Null,
        },
        Value::Bool(b) => int(b.map(i64::from)),
        Value::Double(f) => f.map_or(ValueRef::Null, ValueRef::Real),
        Value::Float(f) => f.map_or(ValueRef::Null, |f| ValueRef::Real(f64::from(f))),
        Value::Bytes(b) => b.as_deref().map_or(ValueRef::Null, ValueRef::Blob),
        other => {
            return Err(AppError::internal(anyhow::anyhow!(
                "a value of a type the SQLite writer does not bind: {other:?}"
            )))
        }
    }))
}

/// A unique-index or primary-key violation is `CONFLICT` (the data a writer decided on
/// changed); anything else is internal.
fn sql_error(e: rusqlite::Error) -> AppError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e {
        if f.code == ErrorCode::ConstraintViolation
            && matches!(
                f.extended_code,
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            )
        {
            return AppError::Conflict("a record with this identity already exists".into());
        }
    }
    internal(e)
}

fn internal(e: rusqlite::Error) -> AppError {
    AppError::internal(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transaction left open on the connection without our bookkeeping (a `ROLLBACK` of ours
    /// that failed) is rolled back by the next `begin`, which then works: writes are not stuck
    /// behind "cannot start a transaction within a transaction", and what was left open is not
    /// committed by the next batch.
    #[test]
    fn begin_rolls_back_a_transaction_left_open() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut w = SqliteWriter::open(&dir.path().join("w.sqlite3"), 1 << 20).expect("open");
        w.run("CREATE TABLE t (x TEXT NOT NULL UNIQUE)", &[])
            .expect("table");
        // Left open behind the writer's back.
        w.conn
            .execute_batch("BEGIN; INSERT INTO t VALUES ('orphan')")
            .expect("orphan");
        assert!(w.in_transaction() && !w.began());
        w.begin().expect("begin after an orphan transaction");
        w.run("INSERT INTO t VALUES (?)", &[Value::from("kept")])
            .expect("insert");
        let again = w.run("INSERT INTO t VALUES (?)", &[Value::from("kept")]);
        assert!(matches!(again, Err(AppError::Conflict(_))), "{again:?}");
        w.commit().expect("commit");
        assert!(!w.in_transaction() && !w.began());
        let rows = w.read("SELECT x FROM t ORDER BY x", &[]).expect("read");
        assert_eq!(rows, vec![vec![SqlValue::Text("kept".into())]]);
    }
}
