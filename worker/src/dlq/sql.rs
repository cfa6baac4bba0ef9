//! SQL dead-letter store (PostgreSQL, MySQL/MariaDB, SQLite) and the redrive of its rows.
//!
//! Two kinds of table. A dead-letter table (created when missing) holds one row per dead
//! letter. The original's outbox table (the application's own event table, recognised by
//! its `dlq` column) holds one row per event: delivered rows are deleted (see
//! `outbox.rs`), dead letters are marked `dlq = 1`, replays clear the mark.
//!
//! A dead letter is committed (and the source row deleted when `EVENT_DB_TABLE` is set, in
//! the same transaction) before its stream entry is acknowledged.

use std::time::Duration;

use std::collections::HashMap;

use base64::Engine;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use tokio::sync::OnceCell;

use super::DeadLetter;
use crate::config::DbMode;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    MySql,
    Sqlite,
}

/// Turn the original worker's SQLAlchemy-style URLs into sqlx ones: `+driver` is dropped;
/// `sqlite+aiosqlite:///rel.db` / `sqlite+aiosqlite:////abs.db` keep SQLAlchemy's path rule.
pub fn normalize_url(url: &str) -> Result<(Dialect, String)> {
    let bad = |msg: String| Error::Config { var: "DLQ_DB_CONNECTION", msg };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("not a database URL (scheme://...)".into()))?;
    let (base, driver) = match scheme.split_once('+') {
        Some((b, d)) => (b.to_ascii_lowercase(), Some(d)),
        None => (scheme.to_ascii_lowercase(), None),
    };
    match base.as_str() {
        "postgres" | "postgresql" => Ok((Dialect::Postgres, format!("postgres://{rest}"))),
        "mysql" | "mariadb" => Ok((Dialect::MySql, format!("mysql://{rest}"))),
        "sqlite" => {
            // SQLAlchemy: sqlite:///relative.db, sqlite:////absolute.db. sqlx: sqlite://path.
            let path = match driver {
                Some(_) => rest.strip_prefix('/').unwrap_or(rest).to_string(),
                None => rest.to_string(),
            };
            if path.is_empty() {
                return Err(bad("sqlite URL has no file path".into()));
            }
            // A file whose directory does not exist can never be created: every dead letter
            // would wait forever. Refused now, with where a relative path points.
            let file = path.split('?').next().unwrap_or_default();
            if let Some(dir) = std::path::Path::new(file).parent().filter(|d| !d.as_os_str().is_empty()) {
                if file != ":memory:" && !dir.is_dir() {
                    let cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
                    return Err(bad(format!(
                        "the directory {} of the SQLite file does not exist (relative paths start at {cwd}; \
                         sqlite:////abs/dlq.db or sqlite:///abs/dlq.db is absolute, sqlite+aiosqlite:///rel.db relative)",
                        dir.display()
                    )));
                }
            }
            let sep = if path.contains('?') { '&' } else { '?' };
            let opts = if path.contains("mode=") { String::new() } else { format!("{sep}mode=rwc") };
            Ok((Dialect::Sqlite, format!("sqlite://{path}{opts}")))
        }
        other => Err(bad(format!("unsupported database scheme {other:?} (postgresql, mysql, mariadb, sqlite)"))),
    }
}

/// One stored dead letter, as listed (without the payload).
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct DlqRow {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub reason: String,
    pub stream: Option<String>,
    pub attempts: Option<i64>,
    pub last_failed_at: Option<String>,
    /// Where the letter is kept: `sql` (the configured table) or `redis` (the `events:dlq`
    /// stream, for letters no sink would take).
    pub store: &'static str,
    /// The `events:dlq` entry id of a letter kept in Redis.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
}

/// A stored dead letter with everything needed to put it back into a stream.
#[derive(Debug, Clone)]
pub struct FullRow {
    pub row: DlqRow,
    pub payload: String,
    pub meta: Option<String>,
}

/// How the table is used, learned from its columns (`DLQ_DB_MODE=auto`) or set.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A dead-letter table: the original's four columns (`extended` false) or ours.
    DeadLetter { extended: bool },
    /// The application's event table: rows are deleted once delivered, `dlq` marks the
    /// dead letters. Used as it is, never created or altered.
    Outbox(Outbox),
}

/// What the outbox table offers.
#[derive(Debug, Clone, PartialEq)]
pub struct Outbox {
    /// The id column is an integer type: ids are bound as integers (an id that is not a
    /// number cannot have a row).
    pub numeric_id: bool,
    /// How the id column is compared with a bound id: `id`, or `CAST(id AS TEXT)` for a
    /// PostgreSQL column that is neither an integer nor text (uuid, numeric).
    pub id_expr: String,
    /// SQL literals for the `dlq` flag (BOOLEAN or an integer column).
    pub flag_true: &'static str,
    pub flag_false: &'static str,
    pub stream: bool,
    pub reason: bool,
    pub created_at: bool,
}

/// An id as the table's id column wants it.
enum IdValue {
    Int(i64),
    Text(String),
}

pub struct SqlSink {
    pool: AnyPool,
    dialect: Dialect,
    table: String,
    event_table: Option<String>,
    mode: DbMode,
    shape: OnceCell<Shape>,
}

const EXTRA_COLUMNS: [&str; 6] = ["stream", "meta", "attempts", "dead_lettered", "first_failed_at", "last_failed_at"];

/// Whether a database error is about this record (a value the table refuses: too long, a
/// NUL byte, a constraint) rather than about the database being unreachable or busy.
/// PostgreSQL and MySQL: SQLSTATE classes 22 (data exception) and 23 (integrity
/// constraint), plus MySQL's value errors that come with a generic SQLSTATE; SQLite: the
/// CONSTRAINT, TOOBIG and MISMATCH result codes.
pub fn is_permanent(dialect: Dialect, e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
            match dialect {
                Dialect::Sqlite => code.parse::<i64>().is_ok_and(|c| matches!(c & 0xff, 18..=20)),
                Dialect::Postgres => code.starts_with("22") || code.starts_with("23"),
                Dialect::MySql => {
                    // 1366 incorrect string value (HY000), 1265 data truncated (01000).
                    let number = d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().map(|m| m.number());
                    code.starts_with("22")
                        || code.starts_with("23")
                        || matches!(number, Some(1366 | 1265 | 1264 | 1292 | 1406))
                }
            }
        }
        sqlx::Error::Encode(_) | sqlx::Error::TypeNotFound { .. } => true,
        _ => false,
    }
}

impl SqlSink {
    /// Connects lazily: the worker starts (not ready) while the database is down.
    pub fn new(url: &str, table: &str, event_table: Option<&str>, mode: DbMode) -> Result<Self> {
        let (dialect, url) = normalize_url(url)?;
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(&url)
            .map_err(|e| Error::Config { var: "DLQ_DB_CONNECTION", msg: crate::redact(&e.to_string()) })?;
        Ok(Self {
            pool,
            dialect,
            table: table.to_string(),
            event_table: event_table.map(str::to_string),
            mode,
            shape: OnceCell::new(),
        })
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    fn err(e: impl std::fmt::Display) -> Error {
        Error::DeadLetter { sink: "sql", msg: crate::redact(&e.to_string()) }
    }

    /// A refusal of this record, or a failure to retry.
    fn classify(&self, e: sqlx::Error) -> Error {
        if is_permanent(self.dialect, &e) {
            Error::Rejected { sink: "sql", msg: e.to_string() }
        } else {
            Self::err(e)
        }
    }

    /// The table's shape when it is known already (the database answered once).
    pub fn known_shape(&self) -> Option<&Shape> {
        self.shape.get()
    }

    /// Whether delivered events may have rows to delete: an outbox table, or one whose
    /// shape is not known yet (the database has not answered) in `auto` mode.
    pub fn may_be_outbox(&self) -> bool {
        match self.shape.get() {
            Some(s) => matches!(s, Shape::Outbox(_)),
            None => self.mode != DbMode::Deadletter,
        }
    }

    /// The table's columns and their types (lower case); None when there is no such table.
    async fn columns(&self) -> Result<Option<HashMap<String, String>>> {
        let (schema, name) = match self.table.split_once('.') {
            Some((s, n)) => (Some(s), n),
            None => (None, self.table.as_str()),
        };
        let rows = match self.dialect {
            Dialect::Postgres => sqlx::query(
                "SELECT CAST(a.attname AS TEXT) AS name, format_type(a.atttypid, a.atttypmod) AS type \
                 FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            )
            .bind(&self.table)
            .fetch_all(&self.pool)
            .await
            .map_err(Self::err)?,
            Dialect::MySql => {
                let sql = format!(
                    "SELECT COLUMN_NAME AS name, DATA_TYPE AS type FROM information_schema.COLUMNS \
                     WHERE TABLE_SCHEMA = {} AND TABLE_NAME = ?",
                    if schema.is_some() { "?" } else { "DATABASE()" }
                );
                let mut q = sqlx::query(&sql);
                if let Some(s) = schema {
                    q = q.bind(s);
                }
                q.bind(name).fetch_all(&self.pool).await.map_err(Self::err)?
            }
            Dialect::Sqlite => {
                let sql = match schema {
                    Some(_) => "SELECT name, type FROM pragma_table_info(?, ?)",
                    None => "SELECT name, type FROM pragma_table_info(?)",
                };
                let mut q = sqlx::query(sql).bind(name);
                if let Some(s) = schema {
                    q = q.bind(s);
                }
                q.fetch_all(&self.pool).await.map_err(Self::err)?
            }
        };
        if rows.is_empty() {
            return Ok(None);
        }
        let mut out = HashMap::new();
        for r in &rows {
            let name = text(r, "name")?.unwrap_or_default().to_ascii_lowercase();
            out.insert(name, text(r, "type")?.unwrap_or_default().to_ascii_lowercase());
        }
        Ok(Some(out))
    }

    /// Learn the table's shape (creating a dead-letter table when there is none), check the
    /// source table exists. Runs once successfully; until then every call tries again.
    pub async fn prepare(&self) -> Result<Shape> {
        self.shape.get_or_try_init(|| self.learn_shape()).await.cloned()
    }

    async fn learn_shape(&self) -> Result<Shape> {
        let bad = |msg: String| Error::Config { var: "DLQ_DB_TABLE", msg };
        let mut cols = self.columns().await?;
        let outbox = match self.mode {
            DbMode::Outbox => match &cols {
                None => {
                    return Err(bad(format!(
                        "{}: no such table (DLQ_DB_MODE=outbox uses the application's event table as it is)",
                        self.table
                    )))
                }
                Some(c) if !c.contains_key("dlq") => {
                    return Err(bad(format!("{}: no dlq column, needed by DLQ_DB_MODE=outbox", self.table)))
                }
                Some(_) => true,
            },
            DbMode::Auto => cols.as_ref().is_some_and(|c| c.contains_key("dlq")),
            DbMode::Deadletter => false,
        };
        let shape = if outbox {
            let c = cols.unwrap_or_default();
            for needed in ["id", "type", "payload"] {
                if !c.contains_key(needed) {
                    return Err(bad(format!("{}: the outbox table has no {needed} column", self.table)));
                }
            }
            let id_type = c["id"].as_str();
            let numeric_id = id_type.contains("int") || id_type.contains("serial");
            let textual = ["char", "text", "clob", "string"].iter().any(|t| id_type.contains(t));
            let id_expr = if self.dialect == Dialect::Postgres && !numeric_id && !textual {
                "CAST(id AS TEXT)".to_string()
            } else {
                "id".to_string()
            };
            let boolean = c["dlq"].starts_with("bool");
            let (flag_true, flag_false) =
                if self.dialect == Dialect::Postgres && !boolean { ("1", "0") } else { ("TRUE", "FALSE") };
            let o = Outbox {
                numeric_id,
                id_expr,
                flag_true,
                flag_false,
                stream: c.contains_key("stream"),
                reason: c.contains_key("reason"),
                created_at: c.contains_key("created_at"),
            };
            tracing::info!(table = %self.table, "the dead-letter table is the application's event table (dlq column): delivered rows are deleted, dead letters marked dlq = 1");
            Shape::Outbox(o)
        } else {
            if cols.is_none() {
                let (key, payload, ts) = match self.dialect {
                    Dialect::MySql => ("VARCHAR(255)", "LONGTEXT", "VARCHAR(32)"),
                    _ => ("VARCHAR(255)", "TEXT", "VARCHAR(32)"),
                };
                let ddl = format!(
                    "CREATE TABLE IF NOT EXISTS {t} (id {key} PRIMARY KEY, type VARCHAR(255) NOT NULL, reason TEXT NOT NULL, \
                     payload {payload} NOT NULL, stream VARCHAR(255), meta {payload}, attempts INTEGER NOT NULL DEFAULT 0, \
                     dead_lettered INTEGER NOT NULL DEFAULT 1, first_failed_at {ts}, last_failed_at {ts})",
                    t = self.table
                );
                sqlx::query(&ddl).execute(&self.pool).await.map_err(Self::err)?;
                cols = self.columns().await?;
            }
            let c = cols.unwrap_or_default();
            for needed in ["id", "type", "reason", "payload"] {
                if !c.is_empty() && !c.contains_key(needed) {
                    return Err(bad(format!(
                        "{}: no {needed} column; a dead-letter table needs id, type, reason, payload \
                         (an application's event table needs a dlq column: DLQ_DB_MODE=outbox)",
                        self.table
                    )));
                }
            }
            let extended = EXTRA_COLUMNS.iter().all(|x| c.contains_key(*x));
            if !extended {
                tracing::info!(table = %self.table, "dead-letter table has only the original columns; storing id, type, reason, payload");
            }
            Shape::DeadLetter { extended }
        };
        if let Some(et) = &self.event_table {
            sqlx::query(&format!("SELECT event_id FROM {et} WHERE 1 = 0")).fetch_all(&self.pool).await.map_err(
                |e| Error::Config {
                    var: "EVENT_DB_TABLE",
                    msg: format!("{et}: no table with an event_id column: {e}"),
                },
            )?;
        }
        Ok(shape)
    }

    fn param(&self, n: usize) -> String {
        param(self.dialect, n)
    }

    /// `col` as text, whatever its type (ids, timestamps).
    fn as_text(&self, col: &str) -> String {
        match self.dialect {
            Dialect::MySql => format!("CAST({col} AS CHAR)"),
            _ => format!("CAST({col} AS TEXT)"),
        }
    }

    fn source_delete_sql(&self, event_table: &str) -> String {
        match self.dialect {
            // The id is bound as text; compare as text whatever the column's type.
            Dialect::Postgres => format!("DELETE FROM {event_table} WHERE CAST(event_id AS TEXT) = $1"),
            _ => format!("DELETE FROM {event_table} WHERE event_id = ?"),
        }
    }

    /// Store the dead letter and delete its source row (`EVENT_DB_TABLE`), in one
    /// transaction. A record the table refuses for good is `Error::Rejected`; a payload
    /// the table refuses is stored once more in base64 before that.
    pub async fn send(&self, r: &DeadLetter) -> Result<()> {
        match self.send_once(r).await {
            Err(Error::Rejected { .. }) if !r.payload.starts_with("base64:") => {
                let encoded = format!("base64:{}", base64::engine::general_purpose::STANDARD.encode(&r.payload));
                let again = DeadLetter { payload: encoded, ..r.clone() };
                self.send_once(&again).await
            }
            other => other,
        }
    }

    async fn send_once(&self, r: &DeadLetter) -> Result<()> {
        let shape = self.prepare().await?;
        let mut tx = self.pool.begin().await.map_err(Self::err)?;
        match &shape {
            Shape::Outbox(o) => self.mark_dead(&mut tx, o, r).await?,
            Shape::DeadLetter { extended } => self.upsert(&mut tx, *extended, r).await?,
        }
        if let Some(et) = &self.event_table {
            sqlx::query(&self.source_delete_sql(et))
                .bind(&r.id)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.classify(e))?;
        }
        tx.commit().await.map_err(|e| self.classify(e))
    }

    /// The dead-letter table is keyed by id. A row of the same id from another stream is a
    /// different event: this one is stored as `<id>@<stream>` instead of overwriting it
    /// (the upsert only updates a row of the same stream; a read-back tells which happened).
    async fn upsert(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>, extended: bool, r: &DeadLetter) -> Result<()> {
        let mut key = r.id.clone();
        for _ in 0..2 {
            let now = crate::event::iso_now();
            let sql = upsert_sql(self.dialect, &self.table, extended);
            let mut q = sqlx::query(&sql).bind(&key).bind(&r.event_type).bind(&r.reason).bind(&r.payload);
            if extended {
                q = q.bind(&r.stream).bind(r.meta.clone()).bind(r.attempts as i32).bind(now.clone()).bind(now);
            }
            q.execute(&mut **tx).await.map_err(|e| self.classify(e))?;
            if !extended {
                break;
            }
            let sql = format!("SELECT stream FROM {} WHERE id = {}", self.table, self.param(1));
            let row = sqlx::query(&sql).bind(&key).fetch_optional(&mut **tx).await.map_err(|e| self.classify(e))?;
            let stored = match row {
                Some(row) => text(&row, "stream")?,
                None => None,
            };
            if stored.as_deref().is_none_or(|s| s == r.stream) {
                break;
            }
            key = format!("{}@{}", r.id, r.stream);
        }
        Ok(())
    }

    fn id_value(&self, o: &Outbox, id: &str) -> Option<IdValue> {
        if o.numeric_id {
            id.trim().parse::<i64>().ok().map(IdValue::Int)
        } else {
            Some(IdValue::Text(id.to_string()))
        }
    }

    /// The original's outbox dead letter: `UPDATE ... SET dlq = 1`, or insert the row. A
    /// row of the same id that belongs to another stream is another event's: this letter
    /// is refused (and kept in `events:dlq`) rather than marking it.
    async fn mark_dead(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>, o: &Outbox, r: &DeadLetter) -> Result<()> {
        let Some(id) = self.id_value(o, &r.id) else {
            return Err(Error::Rejected {
                sink: "sql",
                msg: format!("id {:?} is not a number and {}.id is an integer column", r.id, self.table),
            });
        };
        let t = &self.table;
        let idx = &o.id_expr;
        let stream_col = if o.stream { "stream" } else { "1 AS stream" };
        let sql = format!("SELECT {stream_col} FROM {t} WHERE {idx} = {}", self.param(1));
        let existing = bind_id(sqlx::query(&sql), &id).fetch_optional(&mut **tx).await.map_err(|e| self.classify(e))?;
        if let Some(row) = existing {
            let theirs = if o.stream { text(&row, "stream")? } else { None };
            let key = |s: &str| s.strip_prefix(crate::config::STREAM_PREFIX).unwrap_or(s).to_string();
            if let Some(theirs) = theirs.filter(|s| !s.is_empty() && key(s) != key(&r.stream)) {
                return Err(Error::Rejected {
                    sink: "sql",
                    msg: format!("row {} of {t} is an event of {theirs}, not of {}", r.id, r.stream),
                });
            }
            let set_reason = if o.reason { format!(", reason = {}", self.param(1)) } else { String::new() };
            let id_param = self.param(if o.reason { 2 } else { 1 });
            let sql = format!("UPDATE {t} SET dlq = {}{set_reason} WHERE {idx} = {id_param}", o.flag_true);
            let mut q = sqlx::query(&sql);
            if o.reason {
                q = q.bind(&r.reason);
            }
            bind_id(q, &id).execute(&mut **tx).await.map_err(|e| self.classify(e))?;
            return Ok(());
        }
        let mut cols = vec!["id", "type", "payload"];
        if o.stream {
            cols.push("stream");
        }
        if o.reason {
            cols.push("reason");
        }
        let params: Vec<String> = (1..=cols.len()).map(|i| self.param(i)).collect();
        let sql = format!("INSERT INTO {t} ({}, dlq) VALUES ({}, {})", cols.join(", "), params.join(", "), o.flag_true);
        let mut q = bind_id(sqlx::query(&sql), &id).bind(&r.event_type).bind(&r.payload);
        if o.stream {
            q = q.bind(&r.stream);
        }
        if o.reason {
            q = q.bind(&r.reason);
        }
        q.execute(&mut **tx).await.map_err(|e| self.classify(e))?;
        Ok(())
    }

    /// Delete the rows of delivered events from an outbox table. Ids that cannot have a
    /// row (not a number for an integer id column) are skipped, and so are rows marked as
    /// dead letters meanwhile (another event of the same id failed after this one was
    /// delivered: its mark must survive).
    pub async fn delete_delivered(&self, ids: &[String]) -> Result<u64> {
        let Shape::Outbox(o) = self.prepare().await? else { return Ok(0) };
        let values: Vec<IdValue> = ids.iter().filter_map(|id| self.id_value(&o, id)).collect();
        if values.is_empty() {
            return Ok(0);
        }
        let params: Vec<String> = (1..=values.len()).map(|i| self.param(i)).collect();
        let sql = format!(
            "DELETE FROM {} WHERE {} IN ({}) AND (dlq IS NULL OR dlq = {})",
            self.table,
            o.id_expr,
            params.join(", "),
            o.flag_false
        );
        let mut q = sqlx::query(&sql);
        for v in &values {
            q = bind_id(q, v);
        }
        Ok(q.execute(&self.pool).await.map_err(Self::err)?.rows_affected())
    }

    /// Condition for outbox rows created more than `older_than` ago, by the database's
    /// clock (the one that filled `created_at`), and its bound value.
    fn older_than_sql(&self, older_than: Duration) -> (String, OlderThan) {
        let secs = older_than.as_secs();
        match self.dialect {
            Dialect::Postgres => {
                ("created_at < CURRENT_TIMESTAMP - make_interval(secs => $1)".into(), OlderThan::Float(secs as f64))
            }
            Dialect::MySql => {
                ("created_at < CURRENT_TIMESTAMP - INTERVAL ? SECOND".into(), OlderThan::Int(secs as i64))
            }
            Dialect::Sqlite => {
                ("julianday(created_at) < julianday('now', ?)".into(), OlderThan::Text(format!("-{secs} seconds")))
            }
        }
    }

    /// Rows of an outbox table that were neither delivered (deleted) nor dead-lettered
    /// `older_than` after they were created: events that never reached the stream, or are stuck.
    pub async fn undelivered(&self, older_than: Duration, limit: Option<usize>) -> Result<Vec<DlqRow>> {
        let o = self.outbox_with_created_at().await?;
        let (cond, v) = self.older_than_sql(older_than);
        let stream = if o.stream { ", stream" } else { "" };
        let mut sql = format!(
            "SELECT {} AS id, type{stream}, {} AS created_at FROM {} WHERE COALESCE(dlq, {f}) = {f} AND {cond} ORDER BY created_at",
            self.as_text("id"),
            self.as_text("created_at"),
            self.table,
            f = o.flag_false
        );
        if let Some(n) = limit {
            sql.push_str(&format!(" LIMIT {n}"));
        }
        let rows = v.bind(sqlx::query(&sql)).fetch_all(&self.pool).await.map_err(Self::err)?;
        rows.iter()
            .map(|r| {
                Ok(DlqRow {
                    id: text(r, "id")?.unwrap_or_default(),
                    event_type: text(r, "type")?.unwrap_or_default(),
                    reason: "undelivered".into(),
                    stream: if o.stream { text(r, "stream")? } else { None },
                    attempts: None,
                    last_failed_at: text(r, "created_at")?,
                    store: "sql",
                    entry: None,
                })
            })
            .collect()
    }

    /// How many rows [`undelivered`](Self::undelivered) would list.
    pub async fn count_undelivered(&self, older_than: Duration) -> Result<i64> {
        let o = self.outbox_with_created_at().await?;
        let (cond, v) = self.older_than_sql(older_than);
        let sql = format!(
            "SELECT COUNT(*) AS n FROM {} WHERE COALESCE(dlq, {f}) = {f} AND {cond}",
            self.table,
            f = o.flag_false
        );
        let row = v.bind(sqlx::query(&sql)).fetch_one(&self.pool).await.map_err(Self::err)?;
        Ok(int(&row, "n")?.unwrap_or(0))
    }

    async fn outbox_with_created_at(&self) -> Result<Outbox> {
        match self.prepare().await? {
            Shape::Outbox(o) if o.created_at => Ok(o),
            Shape::Outbox(_) => Err(Error::Invalid(format!("{} has no created_at column", self.table))),
            Shape::DeadLetter { .. } => Err(Error::Invalid(format!(
                "{} is a dead-letter table, not an application's event table (no dlq column)",
                self.table
            ))),
        }
    }

    /// Stored dead letters (without payloads), oldest id first.
    pub async fn list(&self) -> Result<Vec<DlqRow>> {
        let shape = self.prepare().await?;
        let sql = match &shape {
            Shape::DeadLetter { extended: true } => {
                format!("SELECT id, type, reason, stream, attempts, last_failed_at FROM {}", self.table)
            }
            Shape::DeadLetter { extended: false } => format!("SELECT id, type, reason FROM {}", self.table),
            Shape::Outbox(o) => format!(
                "SELECT {} AS id, type{}{}{} FROM {} WHERE dlq = {}",
                self.as_text("id"),
                if o.reason { ", reason" } else { "" },
                if o.stream { ", stream" } else { "" },
                if o.created_at {
                    format!(", {} AS last_failed_at", self.as_text("created_at"))
                } else {
                    String::new()
                },
                self.table,
                o.flag_true
            ),
        };
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await.map_err(Self::err)?;
        let mut out: Vec<DlqRow> = rows.iter().map(|r| to_row(r, &shape)).collect::<Result<_>>()?;
        out.sort_by(|a, b| id_order(&a.id, &b.id));
        Ok(out)
    }

    /// One dead letter with its payload and meta, changing nothing; None when there is none.
    pub async fn get(&self, id: &str) -> Result<Option<FullRow>> {
        let shape = self.prepare().await?;
        let Some((select, _, id_value)) = self.full_row_sql(&shape, id, false) else { return Ok(None) };
        let row = bind_id(sqlx::query(&select), &id_value).fetch_optional(&self.pool).await.map_err(Self::err)?;
        row.map(|row| self.full_row(&row, &shape)).transpose()
    }

    /// Delete one dead letter for good (an outbox table's row too: it must never be sent);
    /// false when there is none.
    pub async fn discard(&self, id: &str) -> Result<bool> {
        let shape = self.prepare().await?;
        let Some((_, _, id_value)) = self.full_row_sql(&shape, id, false) else { return Ok(false) };
        let t = &self.table;
        let p = self.param(1);
        let delete = match &shape {
            Shape::DeadLetter { .. } => format!("DELETE FROM {t} WHERE id = {p}"),
            Shape::Outbox(o) => format!("DELETE FROM {t} WHERE {} = {p} AND dlq = {}", o.id_expr, o.flag_true),
        };
        let done = bind_id(sqlx::query(&delete), &id_value).execute(&self.pool).await.map_err(Self::err)?;
        Ok(done.rows_affected() > 0)
    }

    /// The statements that read one full dead letter (and clear it, for `take`), and the id
    /// as bound; None when `id` cannot be a row of this table.
    fn full_row_sql(&self, shape: &Shape, id: &str, lock: bool) -> Option<(String, String, IdValue)> {
        let t = &self.table;
        let lock = if lock && self.dialect != Dialect::Sqlite { " FOR UPDATE" } else { "" };
        let p = self.param(1);
        match shape {
            Shape::DeadLetter { extended } => {
                let cols = if *extended {
                    "id, type, reason, stream, attempts, last_failed_at, payload, meta"
                } else {
                    "id, type, reason, payload"
                };
                Some((
                    format!("SELECT {cols} FROM {t} WHERE id = {p}{lock}"),
                    format!("DELETE FROM {t} WHERE id = {p}"),
                    IdValue::Text(id.to_string()),
                ))
            }
            Shape::Outbox(o) => Some((
                format!(
                    "SELECT {} AS id, type{}{}, payload FROM {t} WHERE {idx} = {p} AND dlq = {}{lock}",
                    self.as_text("id"),
                    if o.reason { ", reason" } else { "" },
                    if o.stream { ", stream" } else { "" },
                    o.flag_true,
                    idx = o.id_expr
                ),
                format!(
                    "UPDATE {t} SET dlq = {} WHERE {idx} = {p} AND dlq = {}",
                    o.flag_false,
                    o.flag_true,
                    idx = o.id_expr
                ),
                self.id_value(o, id)?,
            )),
        }
    }

    fn full_row(&self, row: &AnyRow, shape: &Shape) -> Result<FullRow> {
        let extended = matches!(shape, Shape::DeadLetter { extended: true });
        Ok(FullRow {
            row: to_row(row, shape)?,
            payload: text(row, "payload")?.unwrap_or_default(),
            meta: if extended { text(row, "meta")? } else { None },
        })
    }

    /// Take one dead letter out of the table and hand it to `put`; the change (row deleted,
    /// or an outbox row's `dlq` cleared) is committed only if `put` succeeds. None when
    /// another replay took the row first.
    pub async fn take<F, Fut>(&self, id: &str, put: F) -> Result<Option<FullRow>>
    where
        F: FnOnce(FullRow) -> Fut,
        Fut: std::future::Future<Output = Result<FullRow>>,
    {
        let shape = self.prepare().await?;
        let Some((select, change, id_value)) = self.full_row_sql(&shape, id, true) else { return Ok(None) };
        let mut tx = self.pool.begin().await.map_err(Self::err)?;
        let row = bind_id(sqlx::query(&select), &id_value).fetch_optional(&mut *tx).await.map_err(Self::err)?;
        let Some(row) = row else { return Ok(None) };
        let full = self.full_row(&row, &shape)?;
        let changed = bind_id(sqlx::query(&change), &id_value).execute(&mut *tx).await.map_err(Self::err)?;
        if changed.rows_affected() != 1 {
            return Ok(None);
        }
        let full = put(full).await?;
        tx.commit().await.map_err(Self::err)?;
        Ok(Some(full))
    }
}

/// A bound value of an age condition.
enum OlderThan {
    Int(i64),
    Float(f64),
    Text(String),
}

impl OlderThan {
    fn bind<'q>(self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        match self {
            OlderThan::Int(v) => q.bind(v),
            OlderThan::Float(v) => q.bind(v),
            OlderThan::Text(v) => q.bind(v),
        }
    }
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

fn bind_id<'q>(q: AnyQuery<'q>, id: &IdValue) -> AnyQuery<'q> {
    match id {
        IdValue::Int(v) => q.bind(*v),
        IdValue::Text(v) => q.bind(v.clone()),
    }
}

fn param(dialect: Dialect, n: usize) -> String {
    match dialect {
        Dialect::Postgres => format!("${n}"),
        _ => "?".into(),
    }
}

fn upsert_sql(dialect: Dialect, t: &str, extended: bool) -> String {
    let cols: &[&str] = if extended {
        &["id", "type", "reason", "payload", "stream", "meta", "attempts", "first_failed_at", "last_failed_at"]
    } else {
        &["id", "type", "reason", "payload"]
    };
    // `stream` last: MySQL evaluates the assignments in order, and the guard reads it.
    let mut updated: Vec<&str> =
        cols.iter().copied().filter(|c| !matches!(*c, "id" | "first_failed_at" | "stream")).collect();
    let params: Vec<String> = (1..=cols.len()).map(|i| param(dialect, i)).collect();
    let insert = format!("INSERT INTO {t} ({}) VALUES ({})", cols.join(", "), params.join(", "));
    match dialect {
        Dialect::MySql => {
            let set: Vec<String> = if extended {
                updated.push("stream");
                // Only a row of the same stream is this event's: another's stays as it is.
                let same = "(stream IS NULL OR stream = VALUES(stream))";
                let mut set: Vec<String> =
                    vec![format!("dead_lettered = IF({same}, dead_lettered + 1, dead_lettered)")];
                set.extend(updated.iter().map(|c| format!("{c} = IF({same}, VALUES({c}), {c})")));
                set
            } else {
                updated.iter().map(|c| format!("{c} = VALUES({c})")).collect()
            };
            format!("{insert} ON DUPLICATE KEY UPDATE {}", set.join(", "))
        }
        _ => {
            if extended {
                updated.push("stream");
            }
            let mut set: Vec<String> = updated.iter().map(|c| format!("{c} = excluded.{c}")).collect();
            if extended {
                set.push(format!("dead_lettered = {t}.dead_lettered + 1"));
                return format!(
                    "{insert} ON CONFLICT (id) DO UPDATE SET {} WHERE {t}.stream IS NULL OR {t}.stream = excluded.stream",
                    set.join(", ")
                );
            }
            format!("{insert} ON CONFLICT (id) DO UPDATE SET {}", set.join(", "))
        }
    }
}

/// A text column. MySQL's TEXT columns reach the Any driver as blobs, so bytes are
/// accepted too.
fn text(r: &AnyRow, col: &str) -> Result<Option<String>> {
    match r.try_get::<Option<String>, _>(col) {
        Ok(v) => Ok(v),
        Err(_) => r
            .try_get::<Option<Vec<u8>>, _>(col)
            .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
            .map_err(SqlSink::err),
    }
}

fn int(r: &AnyRow, col: &str) -> Result<Option<i64>> {
    r.try_get::<Option<i64>, _>(col)
        .or_else(|_| r.try_get::<Option<i32>, _>(col).map(|v| v.map(i64::from)))
        .map_err(SqlSink::err)
}

fn to_row(r: &AnyRow, shape: &Shape) -> Result<DlqRow> {
    let (extended, outbox) = match shape {
        Shape::DeadLetter { extended } => (*extended, None),
        Shape::Outbox(o) => (false, Some(o)),
    };
    let reason = match outbox {
        Some(o) if !o.reason => "dead_letter".to_string(),
        _ => text(r, "reason")?.unwrap_or_default(),
    };
    Ok(DlqRow {
        id: text(r, "id")?.unwrap_or_default(),
        event_type: text(r, "type")?.unwrap_or_default(),
        reason,
        stream: if extended || outbox.is_some_and(|o| o.stream) { text(r, "stream")? } else { None },
        attempts: if extended { int(r, "attempts")? } else { None },
        last_failed_at: if extended || outbox.is_some_and(|o| o.created_at) {
            text(r, "last_failed_at").ok().flatten()
        } else {
            None
        },
        store: "sql",
        entry: None,
    })
}

/// Ids compare as numbers when both are integers, else as text.
pub fn id_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<i128>(), b.parse::<i128>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlalchemy_urls_are_accepted() {
        let n = |u: &str| normalize_url(u).unwrap();
        assert_eq!(n("postgresql+asyncpg://u:p@h:5432/db"), (Dialect::Postgres, "postgres://u:p@h:5432/db".into()));
        assert_eq!(n("mysql+aiomysql://u:p@h/db"), (Dialect::MySql, "mysql://u:p@h/db".into()));
        assert_eq!(n("mariadb://u@h/db"), (Dialect::MySql, "mysql://u@h/db".into()));
        assert_eq!(n("sqlite+aiosqlite:///dlq.db"), (Dialect::Sqlite, "sqlite://dlq.db?mode=rwc".into()));
        assert_eq!(n("sqlite+aiosqlite:////var/x.db"), (Dialect::Sqlite, "sqlite:///var/x.db?mode=rwc".into()));
        assert_eq!(n("sqlite:///var/x.db"), (Dialect::Sqlite, "sqlite:///var/x.db?mode=rwc".into()));
        assert!(normalize_url("oracle://x").is_err());
        let err = normalize_url("sqlite:///nonexistent/dir/x.db").unwrap_err().to_string();
        assert!(err.contains("DLQ_DB_CONNECTION") && err.contains("/nonexistent/dir"), "{err}");
        assert!(normalize_url("nonsense").is_err());
    }

    #[test]
    fn upserts_per_dialect() {
        let pg = upsert_sql(Dialect::Postgres, "dlq", false);
        assert_eq!(pg, "INSERT INTO dlq (id, type, reason, payload) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET type = excluded.type, reason = excluded.reason, payload = excluded.payload");
        let my = upsert_sql(Dialect::MySql, "dlq", true);
        assert!(my.starts_with("INSERT INTO dlq (id, type, reason, payload, stream, meta, attempts, first_failed_at, last_failed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE"), "{my}");
        assert!(
            my.contains(
                "dead_lettered = IF((stream IS NULL OR stream = VALUES(stream)), dead_lettered + 1, dead_lettered)"
            ),
            "{my}"
        );
        assert!(
            my.ends_with("stream = IF((stream IS NULL OR stream = VALUES(stream)), VALUES(stream), stream)"),
            "{my}"
        );
        assert!(!my.contains("first_failed_at = "), "{my}");
        let lite = upsert_sql(Dialect::Sqlite, "s.dlq", true);
        assert!(lite.contains("dead_lettered = s.dlq.dead_lettered + 1"), "{lite}");
        assert!(lite.ends_with("WHERE s.dlq.stream IS NULL OR s.dlq.stream = excluded.stream"), "{lite}");
    }

    #[test]
    fn numeric_ids_sort_as_numbers() {
        let mut ids = vec!["10", "9", "b", "a", "100"];
        ids.sort_by(|a, b| id_order(a, b));
        assert_eq!(ids, ["9", "10", "100", "a", "b"]);
    }
}
