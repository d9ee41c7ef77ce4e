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
//! Queries and row changes are not sent as text to parse, analyse and plan each time (~40 % of
//! the writers' backend's time, BENCHMARKS.md): each text is prepared once on the connection
//! (`PREPARE vm<n> AS …`, in the message that first carries it) and executed by name with its
//! values as literals (`EXECUTE vm<n>('…', 3)`), on a generic plan. A text whose `PREPARE` went
//! in a message that failed is prepared again, under a new name, when it next comes: whether
//! that `PREPARE` ran is unknown, and names are never reused, so it is only forgotten, never
//! mistaken.
//!
//! sqlx's statement logging is off on this connection: a slow message was logged whole at
//! `WARN`, every value in it (a seeding batch: a 10 MB line of the users' text). A message
//! slower than [`SLOW_MESSAGE`] is reported by [`PgWriter::send`] with its size instead.
//!
//! The connection is used only by the holder of the write turn. If it breaks, every later use
//! fails until the next batch, which connects again: nothing written after the break can
//! land outside the batch's transaction (a pool would hand out a new connection instead, on
//! which a writer's later writes would commit on their own).

use crate::error::AppError;
use futures::TryStreamExt;
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection, PgRow};
use sea_orm::sqlx::{AssertSqlSafe, ConnectOptions as _, Connection, Either};
use sea_orm::{DbErr, RuntimeErr, Value};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The connection's `application_name` (in `pg_stat_activity`, say).
const WRITER_NAME: &str = "vm-workflow writer";

/// A message taking longer than this is reported (its size and time, never its text).
const SLOW_MESSAGE: Duration = Duration::from_secs(1);

/// Most statements kept prepared on the connection: past it, all are deallocated and prepared
/// again as they come (a workload uses a few dozen texts; multi-row inserts add one per row
/// count).
const MAX_PREPARED: usize = 256;

/// The statements prepared on the connection (see the module's documentation).
#[derive(Debug, Default)]
struct Prepared {
    /// Text → the number in its name, for texts whose `PREPARE` was in a message that succeeded,
    /// or is in the message being built.
    names: HashMap<String, u64>,
    /// Texts first prepared by the message being built or sent: forgotten if it fails.
    pending: Vec<String>,
    next: u64,
}

/// Whether `sql` is a statement `PREPARE` takes (a query or a row change), not a transaction
/// control statement such as `SAVEPOINT`, which goes as it is.
fn preparable(sql: &str) -> bool {
    ["SELECT ", "INSERT ", "UPDATE ", "DELETE ", "WITH "]
        .iter()
        .any(|start| sql.starts_with(start))
}

impl Prepared {
    /// The message carrying the pending `PREPARE`s succeeded, or failed: then whether they
    /// ran is unknown, and their texts get new names when they come again.
    fn settled(&mut self, ok: bool) {
        let pending = std::mem::take(&mut self.pending);
        if !ok {
            for text in pending {
                self.names.remove(&text);
            }
        }
    }

    /// Nothing is prepared any more (a new session, or `DEALLOCATE ALL`). Names go on from
    /// where they were: they are never reused.
    fn forget_all(&mut self) {
        self.names.clear();
        self.pending.clear();
    }
}

/// The writers' connection (see the module's documentation).
pub(crate) struct PgWriter {
    options: PgConnectOptions,
    conn: Option<PgConnection>,
    /// `BEGIN` was sent and the transaction has not been ended by us since.
    began: bool,
    prepared: Prepared,
}

impl std::fmt::Debug for PgWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgWriter")
            .field("began", &self.began)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

/// A new writers' connection. Its plans are generic from the first execution: the writes are
/// looked up by key, so a plan made for their values would be the same plan, made again five
/// times per text. (Set after connecting rather than as a startup option, which a proxy may
/// refuse; a server that does not know the setting only plans as it always does.)
async fn open(options: &PgConnectOptions) -> Result<PgConnection, AppError> {
    let mut conn = PgConnection::connect_with(options)
        .await
        .map_err(AppError::internal)?;
    if let Err(e) =
        sea_orm::sqlx::raw_sql(AssertSqlSafe("SET plan_cache_mode = force_generic_plan"))
            .execute(&mut conn)
            .await
    {
        tracing::warn!(error = %e, "the Postgres writers' connection keeps its default plan cache mode");
    }
    Ok(conn)
}

impl PgWriter {
    /// Connect to `url` (so that a wrong URL fails at start, not at the first write).
    pub(crate) async fn connect(url: &str) -> Result<PgWriter, AppError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(AppError::internal)?
            .application_name(WRITER_NAME)
            .disable_statement_logging();
        let conn = open(&options).await?;
        Ok(PgWriter {
            options,
            conn: Some(conn),
            began: false,
            prepared: Prepared::default(),
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
            let conn = open(&self.options).await?;
            // A new session: nothing is prepared on it. (Messages are built only once their
            // connection is there, see `send_statements`.)
            self.prepared.forget_all();
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Execute `sql` (statements separated by `;`, values written in as literals, see
    /// [`PgWriter::message`]) in one round trip, after `BEGIN` when `begin`; the rows of its
    /// last statement. A failure may leave some of its statements applied: the caller rolls
    /// back (to a savepoint, or all).
    pub(crate) async fn send(
        &mut self,
        begin: bool,
        mut sql: String,
    ) -> Result<Vec<PgRow>, AppError> {
        self.conn().await?;
        if begin {
            // Counted as begun before it is sent: if the message fails midway, whether `BEGIN`
            // ran is unknown, and a `ROLLBACK` of nothing is harmless.
            self.began = true;
            sql.insert_str(0, "BEGIN;\n");
        }
        // Shared with sqlx, not copied: kept for the report of a slow message.
        let text = Arc::new(sql);
        let began = Instant::now();
        let conn = self.conn.as_mut().expect("connected above");
        let mut results = sea_orm::sqlx::raw_sql(AssertSqlSafe(text.clone())).fetch_many(conn);
        let mut rows = Vec::new();
        let mut last = Vec::new();
        let result = loop {
            match results.try_next().await {
                Ok(Some(Either::Right(row))) => rows.push(row),
                // A statement's end: its rows (none for most) are the last ones so far.
                Ok(Some(Either::Left(_))) => last = std::mem::take(&mut rows),
                Ok(None) => break Ok(last),
                Err(e) => break Err(e),
            }
        };
        drop(results);
        let elapsed = began.elapsed();
        if elapsed > SLOW_MESSAGE {
            tracing::warn!(
                elapsed_ms = elapsed.as_millis() as u64,
                statements = text.matches(";\n").count() + 1,
                bytes = text.len(),
                ok = result.is_ok(),
                "a slow message on the Postgres writers' connection"
            );
        }
        result.map_err(|e| self.failed(e))
    }

    /// Send `statements` in one message (see [`PgWriter::message`] and [`PgWriter::send`]); the
    /// rows of the last. The texts it prepares are counted in `prepares`, whether it succeeds
    /// or not.
    pub(crate) async fn send_statements(
        &mut self,
        begin: bool,
        statements: &[(String, Vec<Value>)],
        prepares: &std::sync::atomic::AtomicU64,
    ) -> Result<Vec<PgRow>, AppError> {
        // Connected first: what the message prepares is for the session it goes to.
        self.conn().await?;
        let (text, prepared) = self.message(statements)?;
        prepares.fetch_add(prepared as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::trace!(target: "vm_workflow::store::sends", sql = %text, "send");
        let sent = self.send(begin, text).await;
        // Not reached if the send is cancelled: the next message settles it as failed.
        self.prepared.settled(sent.is_ok());
        sent
    }

    /// The text of one message carrying `statements` in order: queries and row changes executed
    /// by name with their values as literals (prepared first where the connection does not
    /// have them yet), the others (`SAVEPOINT`, `COMMIT`…) as they are; and how many texts it
    /// prepares. For the connection that is there (see [`PgWriter::send_statements`]).
    fn message(
        &mut self,
        statements: &[(String, Vec<Value>)],
    ) -> Result<(String, usize), AppError> {
        let p = &mut self.prepared;
        // The last message never settled (its send was cancelled midway): whether its
        // `PREPARE`s ran is unknown.
        p.settled(false);
        let mut text = String::new();
        let mut new_texts = 0;
        for (i, (sql, values)) in statements.iter().enumerate() {
            if i > 0 {
                text.push_str(";\n");
            }
            if !preparable(sql) {
                text.push_str(sql);
                continue;
            }
            let n = match p.names.get(sql) {
                Some(&n) => n,
                None => {
                    if p.names.len() >= MAX_PREPARED {
                        // Before this text's `PREPARE`: the statements before it in the message
                        // have run by then, those after it are prepared again.
                        text.push_str("DEALLOCATE ALL;\n");
                        p.forget_all();
                    }
                    new_texts += 1;
                    let n = p.next;
                    p.next += 1;
                    p.names.insert(sql.clone(), n);
                    p.pending.push(sql.clone());
                    let _ = writeln!(text, "PREPARE vm{n} AS {sql};");
                    n
                }
            };
            let _ = write!(text, "EXECUTE vm{n}");
            for (j, value) in values.iter().enumerate() {
                text.push_str(if j == 0 { "(" } else { ", " });
                // Not sent: a text it prepared is forgotten by the next message.
                if !write_pg_literal(&mut text, value) {
                    return Err(AppError::internal(anyhow::anyhow!(
                        "a Postgres write value without a literal reached a message: {value:?}"
                    )));
                }
            }
            if !values.is_empty() {
                text.push(')');
            }
        }
        Ok((text, new_texts))
    }

    /// Execute one statement with `values` bound (a value that has no literal, see
    /// `has_literal`), inside the open transaction; its rows.
    pub(crate) async fn prepared(
        &mut self,
        sql: &str,
        values: &[Value],
    ) -> Result<Vec<PgRow>, AppError> {
        // Not kept prepared by sqlx: a `DEALLOCATE ALL` (see [`PgWriter::message`]) would drop
        // it behind sqlx's back.
        let mut query = sea_orm::sqlx::query(AssertSqlSafe(sql.to_string())).persistent(false);
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
        let committed = self.send(false, "COMMIT".to_string()).await;
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

/// Whether `value` has a literal (see [`write_pg_literal`]), found without writing it.
pub(super) fn has_literal(value: &Value) -> bool {
    match value {
        Value::String(Some(s)) => !s.contains('\0'),
        Value::Double(Some(f)) => f.is_finite(),
        Value::Float(Some(f)) => f.is_finite(),
        Value::Bool(_)
        | Value::TinyInt(_)
        | Value::SmallInt(_)
        | Value::Int(_)
        | Value::BigInt(_)
        | Value::TinyUnsigned(_)
        | Value::SmallUnsigned(_)
        | Value::Unsigned(_)
        | Value::BigUnsigned(_)
        | Value::String(None)
        | Value::Double(None)
        | Value::Float(None) => true,
        _ => false,
    }
}

/// The Postgres literal of a value, as an argument of `EXECUTE`. There is none that means the
/// same as the bound value for a string with a NUL character, a float that is not finite, or a
/// type the write path does not use.
///
/// Strings are `'…'` with quotes doubled, and `E'…'` with backslashes doubled when they hold
/// one: the same whatever `standard_conforming_strings` and `backslash_quote` are. Negative
/// numbers are parenthesized, floats are typed (`'2.0'::float8`, exact and signed).
///
/// Appended to `out`, in place (a message's values are written under the write lock); false,
/// with nothing appended, when the value has none.
fn write_pg_literal(out: &mut String, value: &Value) -> bool {
    if !has_literal(value) {
        return false;
    }
    fn int(out: &mut String, n: impl std::fmt::Display + PartialOrd + Default) {
        if n < Default::default() {
            let _ = write!(out, "({n})");
        } else {
            let _ = write!(out, "{n}");
        }
    }
    match value {
        Value::String(Some(s)) => {
            if s.contains('\\') {
                out.push('E');
            }
            out.reserve(s.len() + 2);
            out.push('\'');
            for c in s.chars() {
                match c {
                    '\'' => out.push_str("''"),
                    '\\' => out.push_str("\\\\"),
                    c => out.push(c),
                }
            }
            out.push('\'');
        }
        Value::Double(Some(f)) => {
            let _ = write!(out, "'{f:?}'::float8");
        }
        Value::Float(Some(f)) => {
            let _ = write!(out, "'{f:?}'::float4");
        }
        Value::Bool(Some(b)) => out.push_str(if *b { "TRUE" } else { "FALSE" }),
        Value::TinyInt(Some(n)) => int(out, *n),
        Value::SmallInt(Some(n)) => int(out, *n),
        Value::Int(Some(n)) => int(out, *n),
        Value::BigInt(Some(n)) => int(out, *n),
        Value::TinyUnsigned(Some(n)) => int(out, *n),
        Value::SmallUnsigned(Some(n)) => int(out, *n),
        Value::Unsigned(Some(n)) => int(out, *n),
        Value::BigUnsigned(Some(n)) => int(out, *n),
        _ => out.push_str("NULL"),
    }
    true
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Postgres writes are executed by name with their values as literals; a value without a
    /// literal that means the same keeps its statement prepared, in a round trip of its own.
    #[test]
    fn postgres_values_get_literals_only_where_they_mean_the_same() {
        use sea_orm::Value;
        let lit = |value: Value| {
            let mut out = String::from("x");
            let written = write_pg_literal(&mut out, &value);
            assert_eq!(written, has_literal(&value), "{value:?}");
            if !written {
                assert_eq!(out, "x", "nothing appended");
            }
            written.then(|| out[1..].to_string())
        };
        assert_eq!(lit("plain".into()).as_deref(), Some("'plain'"));
        assert_eq!(lit("O'Brien".into()).as_deref(), Some("'O''Brien'"));
        assert_eq!(
            lit("a\\'b\n\u{1}".into()).as_deref(),
            Some("E'a\\\\''b\n\u{1}'")
        );
        assert_eq!(lit("it's $1 ?".into()).as_deref(), Some("'it''s $1 ?'"));
        assert_eq!(lit(Value::String(None)).as_deref(), Some("NULL"));
        assert_eq!(lit(2.5f64.into()).as_deref(), Some("'2.5'::float8"));
        assert_eq!(lit(2.0f64.into()).as_deref(), Some("'2.0'::float8"));
        assert_eq!(lit((-0.0f64).into()).as_deref(), Some("'-0.0'::float8"));
        assert_eq!(lit(0.1f32.into()).as_deref(), Some("'0.1'::float4"));
        assert_eq!(lit(true.into()).as_deref(), Some("TRUE"));
        assert_eq!(lit((-7i64).into()).as_deref(), Some("(-7)"));
        assert_eq!(lit(7i32.into()).as_deref(), Some("7"));
        for kept in [
            Value::from("nul\0inside"),
            Value::from(f64::NAN),
            Value::from(f64::INFINITY),
            Value::from(vec![1u8, 2]),
        ] {
            assert_eq!(lit(kept.clone()), None, "{kept:?}");
            let stmt = sea_orm::Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                "SELECT $1",
                [kept],
            );
            assert!(!super::super::has_literals(&stmt));
        }
        let stmt = sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT $1, $2",
            [Value::from(1i64), Value::from("x")],
        );
        assert!(super::super::has_literals(&stmt));
    }

    fn writer() -> PgWriter {
        PgWriter {
            // Nothing listens there: connecting is refused.
            options: PgConnectOptions::from_str("postgres://nobody@127.0.0.1:1/none").expect("url"),
            conn: None,
            began: false,
            prepared: Prepared::default(),
        }
    }

    /// A text is prepared once, in the message that first carries it, and executed by name
    /// after that; a message that failed leaves its texts to be prepared again, by new names.
    #[test]
    fn texts_are_prepared_once_and_again_after_a_failure() {
        let mut w = writer();
        let set = "UPDATE t SET a = $1 WHERE k = $2";
        let add = "INSERT INTO u (x) VALUES ($1)";
        let first = vec![
            (
                set.to_string(),
                vec![Value::from("O'Brien"), Value::from(1i64)],
            ),
            ("SAVEPOINT s".to_string(), vec![]),
            (
                set.to_string(),
                vec![Value::String(None), Value::from(-2i64)],
            ),
            ("SELECT MAX(x) FROM t".to_string(), vec![]),
        ];
        assert_eq!(
            w.message(&first).expect("message"),
            (
                "PREPARE vm0 AS UPDATE t SET a = $1 WHERE k = $2;\n\
                 EXECUTE vm0('O''Brien', 1);\nSAVEPOINT s;\nEXECUTE vm0(NULL, (-2));\n\
                 PREPARE vm1 AS SELECT MAX(x) FROM t;\nEXECUTE vm1"
                    .to_string(),
                2
            )
        );
        w.prepared.settled(true);
        let second = vec![
            (set.to_string(), vec![Value::from("b"), Value::from(3i64)]),
            (add.to_string(), vec![Value::from(2.5f64)]),
        ];
        assert_eq!(
            w.message(&second).expect("message"),
            (
                "EXECUTE vm0('b', 3);\nPREPARE vm2 AS INSERT INTO u (x) VALUES ($1);\n\
                 EXECUTE vm2('2.5'::float8)"
                    .to_string(),
                1
            )
        );
        // That message failed: vm2 may or may not exist, vm0 does.
        w.prepared.settled(false);
        let third = vec![(add.to_string(), vec![Value::from(1.0f64)])];
        assert_eq!(
            w.message(&third).expect("message").0,
            "PREPARE vm3 AS INSERT INTO u (x) VALUES ($1);\nEXECUTE vm3('1.0'::float8)"
        );
        w.prepared.settled(true);
        assert_eq!(
            w.message(&second[..1]).expect("message").0,
            "EXECUTE vm0('b', 3)"
        );
        // A message whose send never ended (cancelled) counts as failed: its new texts are
        // prepared again by the next one.
        for (k, name) in [(1i64, "vm4"), (2, "vm5")] {
            let sql = "DELETE FROM t WHERE k = $1".to_string();
            let text = w
                .message(&[(sql, vec![Value::from(k)])])
                .expect("message")
                .0;
            assert!(
                text.starts_with(&format!("PREPARE {name} AS DELETE")),
                "{text}"
            );
        }
        w.prepared.settled(true);
        // A value without a literal never reaches a message, nor does the text it came with
        // count as prepared.
        let bytes = vec![
            (
                "DELETE FROM u WHERE x = $1".to_string(),
                vec![Value::from(1i64)],
            ),
            (add.to_string(), vec![Value::from(vec![1u8])]),
        ];
        assert!(w.message(&bytes).is_err());
        assert!(w
            .message(&bytes[..1])
            .expect("message")
            .0
            .starts_with("PREPARE vm7 AS DELETE FROM u"));
    }

    /// A message is built only once the connection it goes to is there: a send that could not
    /// connect leaves nothing taken as prepared.
    #[tokio::test]
    async fn nothing_is_taken_as_prepared_by_a_send_that_could_not_connect() {
        let mut w = writer();
        let prepares = std::sync::atomic::AtomicU64::new(0);
        let statements = [("UPDATE t SET a = $1".to_string(), vec![Value::from(1i64)])];
        assert!(w
            .send_statements(false, &statements, &prepares)
            .await
            .is_err());
        assert!(w.prepared.names.is_empty() && w.prepared.pending.is_empty());
        assert_eq!(prepares.into_inner(), 0);
    }

    /// What the connection carries stays out of the log, however slow (sqlx logged a slow
    /// message whole, values and all); a slow message is reported by its size and time. On the
    /// Postgres of `VM_TEST_DATABASE_URL` (its admin database, nothing written).
    #[tokio::test]
    async fn a_slow_message_is_reported_without_its_text() {
        #[derive(Clone, Default)]
        struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                crate::sync::lock(&self.0).extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _logging = tracing::subscriber::set_default(subscriber);
        let url = std::env::var("VM_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
        let mut w = PgWriter::connect(&url)
            .await
            .expect("Postgres (VM_TEST_DATABASE_URL)");
        let slow = "SELECT pg_sleep(1.1), 'a user''s text';\nSELECT 'more of it'";
        let rows = w.send(false, slow.to_string()).await.expect("send");
        assert_eq!(rows.len(), 1);
        w.close().await;
        let log = String::from_utf8(crate::sync::lock(&sink.0).clone()).expect("utf-8");
        assert!(
            log.contains("a slow message on the Postgres writers' connection")
                && log.contains("statements=2")
                && log.contains(&format!("bytes={}", slow.len())),
            "{log}"
        );
        assert!(
            !log.contains("user''s text") && !log.contains("more of it"),
            "{log}"
        );
    }

    /// Past [`MAX_PREPARED`] texts, all are deallocated and prepared again as they come.
    #[test]
    fn prepared_texts_are_bounded() {
        let mut w = writer();
        for n in 0..MAX_PREPARED {
            let sql = format!("SELECT $1 + {n}");
            w.message(&[(sql, vec![Value::from(1i64)])])
                .expect("message");
            w.prepared.settled(true);
        }
        assert_eq!(w.prepared.names.len(), MAX_PREPARED);
        let one = |sql: &str| (sql.to_string(), vec![Value::from(1i64)]);
        // A known text is executed by name; a new one past the bound deallocates all first,
        // after which the known one is prepared again.
        let (text, prepares) = w
            .message(&[
                one("SELECT $1 + 5"),
                one("SELECT $1 + x"),
                one("SELECT $1 + 5"),
            ])
            .expect("message");
        assert_eq!(
            text,
            "EXECUTE vm5(1);\nDEALLOCATE ALL;\nPREPARE vm256 AS SELECT $1 + x;\nEXECUTE vm256(1);\n\
             PREPARE vm257 AS SELECT $1 + 5;\nEXECUTE vm257(1)"
        );
        assert_eq!(prepares, 2);
        w.prepared.settled(true);
        assert_eq!(w.prepared.names.len(), 2);
    }
}
