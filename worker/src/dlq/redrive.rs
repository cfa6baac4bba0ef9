//! Redrive: choose dead letters with a filter and move them back into a stream, each once:
//! a SQL row is deleted (or its outbox `dlq` mark cleared) in the same transaction that saw
//! the XADD succeed; a letter of the Redis stream `events:dlq` is moved by one script.

use std::collections::HashMap;
use std::time::Duration;

use crate::streams::Conn;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::sql::{id_order, DlqRow, FullRow, SqlSink};
use crate::config::STREAM_PREFIX;
use crate::event::{iso_now, parse_timestamp, ATTEMPTS_FIELD};
use crate::{Error, Result};

/// Which dead letters. Empty fields match everything.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Filter {
    /// Only these ids (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub ids: Vec<String>,
    /// Never these ids (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub neq: Vec<String>,
    /// Ids greater than this: as numbers when both are integers, else as text (byte by byte:
    /// "10" < "9" as text).
    #[arg(long)]
    pub gt: Option<String>,
    /// Ids greater than or equal to this.
    #[arg(long)]
    pub gte: Option<String>,
    /// Ids less than this.
    #[arg(long)]
    pub lt: Option<String>,
    /// Ids less than or equal to this.
    #[arg(long)]
    pub lte: Option<String>,
    /// Only these event types (comma-separated).
    #[arg(long = "type", value_delimiter = ',')]
    pub types: Vec<String>,
    /// Only these reasons, e.g. http_500,malformed_entry (comma-separated).
    #[arg(long = "reason", value_delimiter = ',')]
    pub reasons: Vec<String>,
    /// Only rows dead-lettered at or after this ISO-8601 time.
    #[arg(long)]
    pub since: Option<String>,
    /// Only rows dead-lettered before this ISO-8601 time.
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many rows.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// Query parameters of the admin endpoints, including the original `/reprocess-dlq` ones
/// (`gt, lt, gte, lte, eq, neq, in, dry_run`). Lists are comma-separated.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct FilterQuery {
    pub ids: Option<String>,
    #[serde(rename = "in")]
    pub in_: Option<String>,
    pub eq: Option<String>,
    pub neq: Option<String>,
    pub gt: Option<String>,
    pub gte: Option<String>,
    pub lt: Option<String>,
    pub lte: Option<String>,
    #[serde(rename = "type")]
    pub types: Option<String>,
    #[serde(rename = "reason")]
    pub reasons: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: Option<usize>,
    pub dry_run: Option<String>,
    pub stream: Option<String>,
    pub rate: Option<f64>,
    /// Replay every dead letter: needed when no filter is given.
    pub all: Option<String>,
}

/// The query parameters each admin endpoint takes; any other is refused by name (a typo
/// such as `dryrun` must not turn a dry run into a real one).
pub const LIST_PARAMS: &[&str] =
    &["ids", "in", "eq", "neq", "gt", "gte", "lt", "lte", "type", "reason", "since", "until", "limit", "token"];
pub const REPLAY_PARAMS: &[&str] = &[
    "ids", "in", "eq", "neq", "gt", "gte", "lt", "lte", "type", "reason", "since", "until", "limit", "token",
    "dry_run", "stream", "rate", "all",
];

/// The parameters of `query` not in `known`, in order.
pub fn unknown_params(query: Option<&str>, known: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let name = pair.split_once('=').map(|(k, _)| k).unwrap_or(pair);
        if !known.contains(&name) && !out.iter().any(|o| o == name) {
            out.push(name.to_string());
        }
    }
    out
}

/// A yes/no query value: `true`/`1`/`yes` or empty (`?dry_run`), `false`/`0`/`no`.
fn flag(name: &str, v: &Option<String>) -> Result<bool> {
    match v.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => Ok(false),
        Some("1" | "true" | "yes" | "") => Ok(true),
        Some("0" | "false" | "no") => Ok(false),
        Some(other) => Err(Error::Invalid(format!("{name}={other:?}: use true or false"))),
    }
}

fn split(s: &Option<String>) -> Vec<String> {
    s.iter().flat_map(|v| v.split(',')).map(str::trim).filter(|v| !v.is_empty()).map(str::to_string).collect()
}

impl FilterQuery {
    pub fn filter(&self) -> Result<Filter> {
        let mut ids = split(&self.ids);
        ids.extend(split(&self.in_));
        ids.extend(split(&self.eq));
        let f = Filter {
            ids,
            neq: split(&self.neq),
            gt: self.gt.clone(),
            gte: self.gte.clone(),
            lt: self.lt.clone(),
            lte: self.lte.clone(),
            types: split(&self.types),
            reasons: split(&self.reasons),
            since: self.since.clone(),
            until: self.until.clone(),
            limit: self.limit,
        };
        f.validate()?;
        Ok(f)
    }

    pub fn options(&self) -> Result<ReplayOptions> {
        Ok(ReplayOptions {
            dry_run: flag("dry_run", &self.dry_run)?,
            stream: self.stream.clone(),
            rate: self.rate,
            all: flag("all", &self.all)?,
        })
    }
}

impl Filter {
    /// Selects every dead letter.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.neq.is_empty()
            && self.gt.is_none()
            && self.gte.is_none()
            && self.lt.is_none()
            && self.lte.is_none()
            && self.types.is_empty()
            && self.reasons.is_empty()
            && self.since.is_none()
            && self.until.is_none()
            && self.limit.is_none()
    }

    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("since", &self.since), ("until", &self.until)] {
            if let Some(v) = v {
                if parse_timestamp(v).is_none() {
                    return Err(Error::Invalid(format!("{name}: {v:?} is not an ISO-8601 time")));
                }
            }
        }
        Ok(())
    }

    pub fn matches(&self, r: &DlqRow) -> bool {
        use std::cmp::Ordering::*;
        let cmp = |bound: &Option<String>, ok: &[std::cmp::Ordering]| {
            bound.as_ref().is_none_or(|b| ok.contains(&id_order(&r.id, b)))
        };
        let at = r.last_failed_at.as_deref().and_then(parse_timestamp);
        let time_ok = |bound: &Option<String>, after: bool| match (bound.as_deref().and_then(parse_timestamp), at) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(b), Some(t)) => (after && t >= b) || (!after && t < b),
        };
        (self.ids.is_empty() || self.ids.contains(&r.id))
            && !self.neq.contains(&r.id)
            && cmp(&self.gt, &[Greater])
            && cmp(&self.gte, &[Greater, Equal])
            && cmp(&self.lt, &[Less])
            && cmp(&self.lte, &[Less, Equal])
            && (self.types.is_empty() || self.types.contains(&r.event_type))
            && (self.reasons.is_empty() || self.reasons.contains(&r.reason))
            && time_ok(&self.since, true)
            && time_ok(&self.until, false)
    }

    pub fn apply(&self, rows: Vec<DlqRow>) -> Vec<DlqRow> {
        let mut out: Vec<DlqRow> = rows.into_iter().filter(|r| self.matches(r)).collect();
        if let Some(n) = self.limit {
            out.truncate(n);
        }
        out
    }
}

#[derive(Debug, Default, Clone)]
pub struct ReplayOptions {
    pub dry_run: bool,
    /// Target stream (name or key); default: the stream the event came from.
    pub stream: Option<String>,
    /// Most rows per second.
    pub rate: Option<f64>,
    /// Replay every dead letter when the filter selects all of them.
    pub all: bool,
}

impl ReplayOptions {
    /// A real replay of everything must be asked for (`all`): a filter that was meant and
    /// mistyped must not replay every dead letter. A dry run may look at everything.
    pub fn check_scope(&self, filter: &Filter) -> Result<()> {
        if filter.is_empty() && !self.all && !self.dry_run {
            return Err(Error::Invalid(
                "no filter given: to replay every dead letter say so (all=true, --all), or filter (ids, type, reason, ...)"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Moved {
    pub id: String,
    pub stream: String,
    /// New stream entry id (None in a dry run).
    pub entry: Option<String>,
    /// Where the letter was kept: `sql` or `redis` (`events:dlq`).
    pub store: &'static str,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ReplayReport {
    pub dry_run: bool,
    pub matched: usize,
    pub replayed: Vec<Moved>,
    /// Rows another replay took first.
    pub skipped: Vec<String>,
}

fn stream_key(name: &str) -> String {
    if name.starts_with(STREAM_PREFIX) {
        name.to_string()
    } else {
        format!("{STREAM_PREFIX}{name}")
    }
}

/// The streams a replay may write to: the worker's own (`STREAMS`), so that a replayed
/// event is certain to be consumed (never `events:retry` or a stream nobody reads).
#[derive(Debug, Clone)]
pub struct Targets {
    /// Stream keys.
    pub streams: Vec<String>,
    /// Where letters go whose own stream is not one of them.
    pub default: String,
}

impl Targets {
    /// The stream a letter goes back to; `Err` when `--stream` names one that is not configured.
    pub fn pick(&self, requested: Option<&str>, origin: Option<&str>) -> Result<String> {
        if let Some(r) = requested {
            let key = stream_key(r);
            if !self.streams.contains(&key) {
                return Err(Error::Invalid(format!(
                    "stream {r:?} is not one of the worker's streams ({}): a replay goes only where it will be consumed",
                    self.streams.join(", ")
                )));
            }
            return Ok(key);
        }
        Ok(origin.map(stream_key).filter(|k| self.streams.contains(k)).unwrap_or_else(|| self.default.clone()))
    }
}

/// The stream entry a stored dead letter becomes again: its original meta (without the
/// retry bookkeeping) or one rebuilt from id and type, and the payload as bytes.
pub fn entry_for(full: &FullRow) -> (String, Vec<u8>) {
    let mut meta = full
        .meta
        .as_deref()
        .and_then(|m| serde_json::from_str::<Value>(m).ok())
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    meta.remove(ATTEMPTS_FIELD);
    meta.remove("nextAttemptAt");
    meta.entry("id").or_insert_with(|| Value::String(full.row.id.clone()));
    meta.entry("type").or_insert_with(|| Value::String(full.row.event_type.clone()));
    meta.insert("replayedAt".into(), Value::String(iso_now()));
    let payload = match full.payload.strip_prefix("base64:") {
        Some(b64) => {
            base64::engine::general_purpose::STANDARD.decode(b64).unwrap_or_else(|_| full.payload.clone().into_bytes())
        }
        None => full.payload.clone().into_bytes(),
    };
    (Value::Object(meta).to_string(), payload)
}

/// Every stored dead letter: the SQL store's rows, then the Redis stream's letters (with
/// their full content, keyed by stream entry id).
pub async fn gather(sql: Option<&SqlSink>, redis: Option<&Conn>) -> Result<(Vec<DlqRow>, HashMap<String, FullRow>)> {
    let mut rows = match sql {
        Some(s) => s.list().await?,
        None => vec![],
    };
    let mut kept = HashMap::new();
    if let Some(r) = redis {
        for full in super::stream::list(&mut r.clone()).await? {
            if let Some(e) = &full.row.entry {
                rows.push(full.row.clone());
                kept.insert(e.clone(), full);
            }
        }
    }
    Ok((rows, kept))
}

/// Replay the dead letters `filter` selects. `redis` may be None for a dry run only (the
/// SQL store's rows are listed; the Redis stream's are not).
pub async fn replay(
    sql: Option<&SqlSink>,
    redis: Option<&Conn>,
    filter: &Filter,
    opts: &ReplayOptions,
    targets: &Targets,
    mut progress: impl FnMut(&Moved),
) -> Result<ReplayReport> {
    filter.validate()?;
    opts.check_scope(filter)?;
    if let Some(s) = &opts.stream {
        targets.pick(Some(s), None)?;
    }
    let (rows, kept) = gather(sql, redis).await?;
    let rows = filter.apply(rows);
    let mut report = ReplayReport { dry_run: opts.dry_run, matched: rows.len(), ..Default::default() };
    // Bounded: a tiny rate (1e-300) must not overflow the pause.
    let pause =
        opts.rate.filter(|r| *r > 0.0).and_then(|r| crate::retry::bounded_secs(1.0 / r, Duration::from_secs(3600)));
    let mut next = tokio::time::Instant::now();
    for row in rows {
        let target = targets.pick(opts.stream.as_deref(), row.stream.as_deref())?;
        if opts.dry_run {
            let m = Moved { id: row.id.clone(), stream: target, entry: None, store: row.store };
            progress(&m);
            report.replayed.push(m);
            continue;
        }
        if let Some(p) = pause {
            tokio::time::sleep_until(next).await;
            next += p;
        }
        let mut con = redis.ok_or_else(|| Error::Invalid("a replay needs Redis".into()))?.clone();
        let entry = match (&row.entry, sql) {
            (Some(e), _) => match kept.get(e) {
                Some(full) => {
                    let (meta, payload) = entry_for(full);
                    let counter = crate::streams::counter_key(con.layout(), &target, &row.id);
                    super::stream::take(&mut con, e, &target, &counter, &meta, &payload).await?
                }
                None => None,
            },
            (None, Some(sink)) => take_sql(sink, &mut con, &row, &target).await?,
            (None, None) => None,
        };
        match entry {
            Some(entry) => {
                let m = Moved { id: row.id.clone(), stream: target.clone(), entry: Some(entry), store: row.store };
                progress(&m);
                report.replayed.push(m);
            }
            None => report.skipped.push(row.id.clone()),
        }
    }
    Ok(report)
}

/// One SQL row back into `target`; the row changes only if the XADD succeeded.
async fn take_sql(sink: &SqlSink, con: &mut Conn, row: &DlqRow, target: &str) -> Result<Option<String>> {
    let origin = row.stream.clone();
    let taken = sink
        .take(&row.id, |full| async move {
            let (meta, payload) = entry_for(&full);
            let layout = con.layout();
            let counter = crate::streams::counter_key(layout, target, &full.row.id);
            let mut p = redis::pipe();
            p.atomic().cmd("XADD").arg(target).arg("*").arg("meta").arg(&meta).arg("payload").arg(payload);
            // A replayed event starts with fresh attempts (its counter shares the target's slot).
            p.cmd("DEL").arg(&counter).ignore();
            let (entry,): (String,) = p.query_async(&mut *con).await?;
            // Its counter in the stream it came from, if another: only tidiness (it expires), and
            // in a cluster in another slot, so not part of the step above.
            if let Some(o) = origin.as_deref().map(|o| crate::streams::counter_key(layout, o, &full.row.id)) {
                if o != counter {
                    let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(o).query_async(&mut *con).await;
                }
            }
            Ok(FullRow { meta: Some(entry), ..full })
        })
        .await?;
    Ok(taken.and_then(|f| f.meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, t: &str, reason: &str, at: &str) -> DlqRow {
        DlqRow {
            id: id.into(),
            event_type: t.into(),
            reason: reason.into(),
            stream: Some("events:fast".into()),
            attempts: Some(1),
            last_failed_at: Some(at.into()),
            store: "sql",
            entry: None,
        }
    }

    #[test]
    fn filters_like_the_original_reprocess_endpoint() {
        let rows = vec![
            row("1", "a", "http_500", "2024-01-01T00:00:00Z"),
            row("2", "b", "http_404", "2024-01-02T00:00:00Z"),
            row("10", "a", "http_500", "2024-01-03T00:00:00Z"),
        ];
        let ids =
            |q: FilterQuery| q.filter().unwrap().apply(rows.clone()).into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(FilterQuery { gt: Some("1".into()), ..Default::default() }), ["2", "10"]);
        assert_eq!(ids(FilterQuery { gte: Some("2".into()), lt: Some("10".into()), ..Default::default() }), ["2"]);
        assert_eq!(ids(FilterQuery { lte: Some("2".into()), ..Default::default() }), ["1", "2"]);
        assert_eq!(ids(FilterQuery { eq: Some("10".into()), ..Default::default() }), ["10"]);
        assert_eq!(ids(FilterQuery { in_: Some("1,10".into()), neq: Some("1".into()), ..Default::default() }), ["10"]);
        assert_eq!(ids(FilterQuery { types: Some("a".into()), ..Default::default() }), ["1", "10"]);
        assert_eq!(ids(FilterQuery { reasons: Some("http_404".into()), ..Default::default() }), ["2"]);
        assert_eq!(ids(FilterQuery { since: Some("2024-01-02T00:00:00Z".into()), ..Default::default() }), ["2", "10"]);
        assert_eq!(ids(FilterQuery { until: Some("2024-01-02".into()), ..Default::default() }), ["1"]);
        assert!(FilterQuery { until: Some("yesterday".into()), ..Default::default() }.filter().is_err());
        assert_eq!(ids(FilterQuery { limit: Some(1), ..Default::default() }), ["1"]);
        assert!(FilterQuery { dry_run: Some("true".into()), ..Default::default() }.options().unwrap().dry_run);
        assert!(!FilterQuery::default().options().unwrap().dry_run);
        assert!(FilterQuery { dry_run: Some("maybe".into()), ..Default::default() }.options().is_err());
        assert_eq!(
            unknown_params(Some("dryrun=true&ids=1&id=2&id=3&token"), REPLAY_PARAMS),
            ["dryrun".to_string(), "id".to_string()]
        );
    }

    #[test]
    fn replays_go_only_to_configured_streams() {
        let t =
            Targets { streams: vec!["events:fast".into(), "events:default".into()], default: "events:default".into() };
        assert_eq!(t.pick(None, Some("events:fast")).unwrap(), "events:fast");
        assert_eq!(t.pick(None, Some("events:gone")).unwrap(), "events:default", "an unconsumed origin");
        assert_eq!(t.pick(None, None).unwrap(), "events:default");
        assert_eq!(t.pick(Some("fast"), Some("events:default")).unwrap(), "events:fast");
        let err = t.pick(Some("retry"), None).unwrap_err().to_string();
        assert!(err.contains("\"retry\"") && err.contains("events:fast"), "{err}");
        assert!(t.pick(Some("events:retry"), None).is_err());
    }

    #[test]
    fn replayed_entries_restore_meta_and_bytes() {
        let full = FullRow {
            row: row("7", "t", "http_500", "2024-01-01T00:00:00Z"),
            payload: "base64:/wA=".into(),
            meta: Some(r#"{"id":"7","type":"t","url":"http://x/y","attempts":3,"nextAttemptAt":"z"}"#.into()),
        };
        let (meta, payload) = entry_for(&full);
        let m: Value = serde_json::from_str(&meta).unwrap();
        assert_eq!(m["url"], "http://x/y");
        assert!(m.get("attempts").is_none() && m.get("nextAttemptAt").is_none() && m["replayedAt"].is_string());
        assert_eq!(payload, vec![0xff, 0x00]);
        let legacy = FullRow { meta: None, payload: "{}".into(), ..full };
        let (meta, _) = entry_for(&legacy);
        let m: Value = serde_json::from_str(&meta).unwrap();
        assert_eq!((m["id"].as_str(), m["type"].as_str()), (Some("7"), Some("t")));
    }
}
