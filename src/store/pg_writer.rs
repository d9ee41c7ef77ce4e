//! Postgres: the writers' own connection, on which the write batches' transactions run.
//!
//! Through sea-orm, a batch was a pooled connection checked out, `BEGIN`, each writer's sends,
//! a read as a prepared statement of its own, and `COMMIT`: each a round trip under the write
//! lock (7.5 ms of the lock per run at C=50 for ~8 write turns, BENCHMARKS.md, "What bounds
//! them"). Here the write batches share one connection the store keeps, and a send is one
//! simple-query message that may begin the transaction, carry a writer's writes and end with
//! a read, whose rows come back (the rows of the message's last statement), or end with the
//! batch's `COMMIT`.
//!
//! The connection is used only by the holder of the write turn. If it breaks, every later use
//! fails until the next batch, which connects again: nothing written after the break can
//! land outside the batch's transaction (a pool would hand out a new connection instead, on
//! which a writer's later writes would commit on their own).

use crate::error::AppError;
use futures::TryStreamExt;
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection, PgRow};
use sea_orm::sqlx::{AssertSqlSafe, Connection, Either};
use sea_orm::{DbErr, RuntimeErr, Value};
use std::str::FromStr;
use std::sync::Arc;

/// The connection's `application_name` (in `pg_stat_activity`, say).
const WRITER_NAME: &str = "vm-workflow writer";

/// The writers' connection (see the module's documentation).
pub(crate) struct PgWriter {
    options: PgConnectOptions,
    conn: Option<PgConnection>,
    /// `BEGIN` was sent and the transaction has not been ended by us since.
    began: bool,
}

impl std::fmt::Debug for PgWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgWriter")
            .field("began", &self.began)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl PgWriter {
    /// Connect to `url` (so that a wrong URL fails at start, not at the first write).
    pub(crate) async fn connect(url: &str) -> Result<PgWriter, AppError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(AppError::internal)?
            .application_name(WRITER_NAME);
        let conn = PgConnection::connect_with(&options)
            .await
            .map_err(AppError::internal)?;
        Ok(PgWriter {
            options,
            conn: Some(conn),
            began: false,
        })
    }

    /// Whether we began a transaction that has not ended.
    pub(crate) fn began(&self) -> bool {
        self.began
    }

    /// The connection, connected again if an earlier failure dropped it. Only between
    /// transactions: one that breaks midway fails the batch (see [`PgWriter::rollback`]).
    async fn conn(&mut self) -> Result<&mut PgConnection, AppError> {
        if self.conn.is_none() {
            if self.began {
                return Err(AppError::internal(anyhow::anyhow!(
                    "the Postgres writer's connection broke during a write batch"
                )));
            }
            let conn = PgConnection::connect_with(&self.options)
                .await
                .map_err(AppError::internal)?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Execute `sql` (statements separated by `;`, values written in as literals) in one round
    /// trip, after `BEGIN` when `begin`; the rows of its last statement. A failure may leave
    /// some of its statements applied: the caller rolls back (to a savepoint, or all).
    pub(crate) async fn send(&mut self, begin: bool, sql: &str) -> Result<Vec<PgRow>, AppError> {
        self.conn().await?;
        let text = if begin {
            // Counted as begun before it is sent: if the message fails midway, whether `BEGIN`
            // ran is unknown, and a `ROLLBACK` of nothing is harmless.
            self.began = true;
            format!("BEGIN;\n{sql}")
        } else {
            sql.to_string()
        };
        let conn = self.conn.as_mut().expect("connected above");
        let mut results = sea_orm::sqlx::raw_sql(AssertSqlSafe(text)).fetch_many(conn);
        let mut rows = Vec::new();
        let mut last = Vec::new();
        loop {
            match results.try_next().await {
                Ok(Some(Either::Right(row))) => rows.push(row),
                // A statement's end: its rows (none for most) are the last ones so far.
                Ok(Some(Either::Left(_))) => last = std::mem::take(&mut rows),
                Ok(None) => return Ok(last),
                Err(e) => {
                    drop(results);
                    return Err(self.failed(e));
                }
            }
        }
    }

    /// Execute one statement with `values` bound (a value that has no literal, see
    /// `inline_postgres`), inside the open transaction; its rows.
    pub(crate) async fn prepared(
        &mut self,
        sql: &str,
        values: &[Value],
    ) -> Result<Vec<PgRow>, AppError> {
        let mut query = sea_orm::sqlx::query(AssertSqlSafe(sql.to_string()));
        for value in values {
            query = bind(query, value)?;
        }
        let conn = self.conn().await?;
        match query.fetch_all(conn).await {
            Ok(rows) => Ok(rows),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Commit the open transaction (nothing to do when none is: its last writer's send
    /// committed it). A `COMMIT` that fails leaves none open.
    pub(crate) async fn commit(&mut self) -> Result<(), AppError> {
        if !self.began {
            return Ok(());
        }
        let committed = self.send(false, "COMMIT").await;
        if committed.is_err() {
            self.rollback().await;
        }
        self.began = false;
        committed.map(|_| ())
    }

    /// Record that the last send ended the transaction with its `COMMIT`.
    pub(crate) fn committed(&mut self) {
        self.began = false;
    }

    /// Roll back whatever is open. If even that fails, the connection is dropped (Postgres
    /// rolls back what it had open) and the next batch connects again.
    pub(crate) async fn rollback(&mut self) {
        self.began = false;
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if let Err(e) = sea_orm::sqlx::raw_sql(AssertSqlSafe("ROLLBACK"))
            .execute(conn)
            .await
        {
            tracing::warn!(error = %e, "rolling the Postgres write batch back failed; reconnecting");
            self.conn = None;
        }
    }

    /// Drop the connection: Postgres rolls back what was open on it. The next batch connects
    /// again.
    pub(crate) fn disconnect(&mut self) {
        self.conn = None;
        self.began = false;
    }

    /// Close the connection (at a graceful stop).
    pub(crate) async fn close(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
    }

    /// A failed statement's error. A connection that failed for any other reason than the
    /// database refusing a statement (I/O, protocol) is dropped: what it had open is gone.
    fn failed(&mut self, e: sea_orm::sqlx::Error) -> AppError {
        if !matches!(e, sea_orm::sqlx::Error::Database(_)) {
            self.conn = None;
        }
        AppError::from(DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e))))
    }
}

type PgQuery = sea_orm::sqlx::query::Query<
    'static,
    sea_orm::sqlx::Postgres,
    sea_orm::sqlx::postgres::PgArguments,
>;

/// Bind `value` as the next parameter, as sea-orm binds it.
fn bind(query: PgQuery, value: &Value) -> Result<PgQuery, AppError> {
    Ok(match value {
        Value::Bool(v) => query.bind(*v),
        Value::TinyInt(v) => query.bind(v.map(i16::from)),
        Value::SmallInt(v) => query.bind(*v),
        Value::Int(v) => query.bind(*v),
        Value::BigInt(v) => query.bind(*v),
        Value::TinyUnsigned(v) => query.bind(v.map(i16::from)),
        Value::SmallUnsigned(v) => query.bind(v.map(i32::from)),
        Value::Unsigned(v) => query.bind(v.map(i64::from)),
        Value::Float(v) => query.bind(*v),
        Value::Double(v) => query.bind(*v),
        Value::String(v) => query.bind(v.clone()),
        other => {
            return Err(AppError::internal(anyhow::anyhow!(
                "the Postgres writer cannot bind a value of this type: {other:?}"
            )))
        }
    })
}
