//! SQL dead-letter store (PostgreSQL, MySQL/MariaDB, SQLite) and the redrive of its rows.
//!
//! A dead letter is committed (upserted by id, and the source row deleted when
//! `EVENT_DB_TABLE` is set, in one transaction) before its stream entry is acknowledged.

use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use tokio::sync::OnceCell;

use super::DeadLetter;
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
}

/// A stored dead letter with everything needed to put it back into a stream.
#[derive(Debug, Clone)]
pub struct FullRow {
    pub row: DlqRow,
    pub payload: String,
    pub meta: Option<String>,
}

pub struct SqlSink {
    pool: AnyPool,
    dialect: Dialect,
    table: String,
    event_table: Option<String>,
    /// Whether the table has our extra columns (a table created by the original has only
    /// id, type, reason, payload).
    extended: OnceCell<bool>,
}

const EXTRA_COLUMNS: &str = "stream, meta, attempts, dead_lettered, first_failed_at, last_failed_at";

impl SqlSink {
    /// Connects lazily: the worker starts (not ready) while the database is down.
    pub fn new(url: &str, table: &str, event_table: Option<&str>) -> Result<Self> {
        let (dialect, url) = normalize_url(url)?;
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(&url)
            .map_err(|e| Error::Config { var: "DLQ_DB_CONNECTION", msg: e.to_string() })?;
        Ok(Self {
            pool,
            dialect,
            table: table.to_string(),
            event_table: event_table.map(str::to_string),
            extended: OnceCell::new(),
        })
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    fn err(e: impl std::fmt::Display) -> Error {
        Error::DeadLetter { sink: "sql", msg: e.to_string() }
    }

    /// Create the table when missing, learn its shape, check the source table exists.
    /// Runs once successfully; until then every call tries again.
    pub async fn prepare(&self) -> Result<bool> {
        self.extended
            .get_or_try_init(|| async {
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
                // Only a missing column means "the original's table"; any other error is
                // passing and must not decide the table's shape for the life of the process.
                let extended = match sqlx::query(&format!("SELECT {EXTRA_COLUMNS} FROM {} WHERE 1 = 0", self.table))
                    .fetch_all(&self.pool)
                    .await
                {
                    Ok(_) => true,
                    Err(e) if e.to_string().to_ascii_lowercase().contains("column") => false,
                    Err(e) => return Err(Self::err(e)),
                };
                if !extended {
                    tracing::info!(table = %self.table, "dead-letter table has only the original columns; storing id, type, reason, payload");
                }
                if let Some(et) = &self.event_table {
                    sqlx::query(&format!("SELECT event_id FROM {et} WHERE 1 = 0")).fetch_all(&self.pool).await.map_err(
                        |e| Error::Config { var: "EVENT_DB_TABLE", msg: format!("{et}: no table with an event_id column: {e}") },
                    )?;
                }
                Ok::<bool, Error>(extended)
            })
            .await
            .copied()
    }

    fn param(&self, n: usize) -> String {
        param(self.dialect, n)
    }

    fn source_delete_sql(&self, event_table: &str) -> String {
        match self.dialect {
            // The id is bound as text; compare as text whatever the column's type.
            Dialect::Postgres => format!("DELETE FROM {event_table} WHERE CAST(event_id AS TEXT) = $1"),
            _ => format!("DELETE FROM {event_table} WHERE event_id = ?"),
        }
    }

    /// Store the dead letter (upsert by id) and delete its source row, in one transaction.
    pub async fn send(&self, r: &DeadLetter) -> Result<()> {
        let extended = self.prepare().await?;
        let now = crate::event::iso_now();
        let mut tx = self.pool.begin().await.map_err(Self::err)?;
        let sql = upsert_sql(self.dialect, &self.table, extended);
        let mut q = sqlx::query(&sql).bind(&r.id).bind(&r.event_type).bind(&r.reason).bind(&r.payload);
        if extended {
            q = q.bind(&r.stream).bind(r.meta.clone()).bind(r.attempts as i32).bind(now.clone()).bind(now);
        }
        q.execute(&mut *tx).await.map_err(Self::err)?;
        if let Some(et) = &self.event_table {
            sqlx::query(&self.source_delete_sql(et)).bind(&r.id).execute(&mut *tx).await.map_err(Self::err)?;
        }
        tx.commit().await.map_err(Self::err)
    }

    /// Rows of the dead-letter table (without payloads), oldest id first.
    pub async fn list(&self) -> Result<Vec<DlqRow>> {
        let extended = self.prepare().await?;
        let cols = if extended { "id, type, reason, stream, attempts, last_failed_at" } else { "id, type, reason" };
        let rows = sqlx::query(&format!("SELECT {cols} FROM {}", self.table))
            .fetch_all(&self.pool)
            .await
            .map_err(Self::err)?;
        let mut out: Vec<DlqRow> = rows.iter().map(|r| to_row(r, extended)).collect::<Result<_>>()?;
        out.sort_by(|a, b| id_order(&a.id, &b.id));
        Ok(out)
    }

    /// Take one row out of the table and hand it to `put`; the row is deleted only if
    /// `put` succeeds. None when another replay took the row first.
    pub async fn take<F, Fut>(&self, id: &str, put: F) -> Result<Option<FullRow>>
    where
        F: FnOnce(FullRow) -> Fut,
        Fut: std::future::Future<Output = Result<FullRow>>,
    {
        let extended = self.prepare().await?;
        let cols = if extended {
            "id, type, reason, stream, attempts, last_failed_at, payload, meta"
        } else {
            "id, type, reason, payload"
        };
        let mut tx = self.pool.begin().await.map_err(Self::err)?;
        let lock = if self.dialect == Dialect::Sqlite { "" } else { " FOR UPDATE" };
        let row = sqlx::query(&format!("SELECT {cols} FROM {} WHERE id = {}{lock}", self.table, self.param(1)))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(Self::err)?;
        let Some(row) = row else { return Ok(None) };
        let full = FullRow {
            row: to_row(&row, extended)?,
            payload: text(&row, "payload")?.unwrap_or_default(),
            meta: if extended { text(&row, "meta")? } else { None },
        };
        let deleted = sqlx::query(&format!("DELETE FROM {} WHERE id = {}", self.table, self.param(1)))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(Self::err)?;
        if deleted.rows_affected() != 1 {
            return Ok(None);
        }
        let full = put(full).await?;
        tx.commit().await.map_err(Self::err)?;
        Ok(Some(full))
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
    let updated: Vec<&str> = cols.iter().copied().filter(|c| !matches!(*c, "id" | "first_failed_at")).collect();
    let params: Vec<String> = (1..=cols.len()).map(|i| param(dialect, i)).collect();
    let insert = format!("INSERT INTO {t} ({}) VALUES ({})", cols.join(", "), params.join(", "));
    match dialect {
        Dialect::MySql => {
            let mut set: Vec<String> = updated.iter().map(|c| format!("{c} = VALUES({c})")).collect();
            if extended {
                set.push("dead_lettered = dead_lettered + 1".into());
            }
            format!("{insert} ON DUPLICATE KEY UPDATE {}", set.join(", "))
        }
        _ => {
            let mut set: Vec<String> = updated.iter().map(|c| format!("{c} = excluded.{c}")).collect();
            if extended {
                set.push(format!("dead_lettered = {t}.dead_lettered + 1"));
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

fn to_row(r: &AnyRow, extended: bool) -> Result<DlqRow> {
    Ok(DlqRow {
        id: text(r, "id")?.unwrap_or_default(),
        event_type: text(r, "type")?.unwrap_or_default(),
        reason: text(r, "reason")?.unwrap_or_default(),
        stream: if extended { text(r, "stream")? } else { None },
        attempts: if extended { int(r, "attempts")? } else { None },
        last_failed_at: if extended { text(r, "last_failed_at")? } else { None },
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
        assert!(normalize_url("nonsense").is_err());
    }

    #[test]
    fn upserts_per_dialect() {
        let pg = upsert_sql(Dialect::Postgres, "dlq", false);
        assert_eq!(pg, "INSERT INTO dlq (id, type, reason, payload) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET type = excluded.type, reason = excluded.reason, payload = excluded.payload");
        let my = upsert_sql(Dialect::MySql, "dlq", true);
        assert!(my.starts_with("INSERT INTO dlq (id, type, reason, payload, stream, meta, attempts, first_failed_at, last_failed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE"), "{my}");
        assert!(my.contains("dead_lettered = dead_lettered + 1") && !my.contains("first_failed_at = "), "{my}");
        let lite = upsert_sql(Dialect::Sqlite, "s.dlq", true);
        assert!(lite.contains("dead_lettered = s.dlq.dead_lettered + 1"), "{lite}");
    }

    #[test]
    fn numeric_ids_sort_as_numbers() {
        let mut ids = vec!["10", "9", "b", "a", "100"];
        ids.sort_by(|a, b| id_order(a, b));
        assert_eq!(ids, ["9", "10", "100", "a", "b"]);
    }
}
