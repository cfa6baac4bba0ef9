//! `eventworker dlq list|show|replay|delete|purge`: the SQL store (when configured) and
//! the Redis dead-letter stream `events:dlq`.

use std::time::Duration;

use crate::streams::Conn;

use super::redrive::{gather, replay, ReplayOptions, Targets};
use super::sql::{DlqRow, FullRow};
use super::SqlSink;
use crate::config::{stream_key, Config, DlqAction, DlqConfig};
use crate::{Error, Result};

/// `println!` that ends the command quietly when the reader went away (`dlq list | head`).
macro_rules! out {
    () => {
        out!("")
    };
    ($($t:tt)*) => {
        if !crate::print_out(&format!("{}\n", format_args!($($t)*))) {
            std::process::exit(0)
        }
    };
}

async fn connect(cfg: &Config) -> Result<Conn> {
    let addr = crate::redact(&cfg.redis_url);
    tokio::time::timeout(Duration::from_secs(10), crate::streams::connect(&cfg.redis_url, Duration::from_secs(5)))
        .await
        .map_err(|_| Error::Invalid(format!("redis at {addr} did not answer within 10 s")))?
        .map_err(|e| Error::Invalid(format!("redis at {addr}: {}", crate::redact(&e.to_string()))))
}

pub async fn run(cfg: &Config, action: DlqAction) -> Result<()> {
    let sink = match &cfg.dlq {
        DlqConfig::Sql { url, table, event_table, mode } => {
            let s = SqlSink::new(url, table, event_table.as_deref(), *mode)?;
            s.prepare().await?;
            Some(s)
        }
        _ => None,
    };
    match action {
        DlqAction::List { filter, json, undelivered, older_than } => {
            filter.validate()?;
            let rows = if undelivered {
                let Some(s) = &sink else {
                    return Err(Error::Config {
                        var: "DLQ_DB_CONNECTION",
                        msg: "--undelivered reads the outbox table; set DLQ_DB_CONNECTION and DLQ_DB_TABLE".into(),
                    });
                };
                let rows = filter.apply(s.undelivered(older_than, None).await?);
                // Delivered rows whose delete waits in Redis (the database was down) are not undelivered.
                match connect(cfg).await {
                    Ok(mut con) => {
                        let sets = cfg.cleanup_sets();
                        let mut out = Vec::with_capacity(rows.len());
                        for r in rows {
                            let mut waiting = false;
                            for set in &sets {
                                waiting |=
                                    redis::cmd("SISMEMBER").arg(set).arg(&r.id).query_async::<bool>(&mut con).await?;
                            }
                            if !waiting {
                                out.push(r);
                            }
                        }
                        out
                    }
                    Err(e) => {
                        eprintln!("warning: {e}; rows whose clean-up waits in Redis may be listed");
                        rows
                    }
                }
            } else {
                let redis = match connect(cfg).await {
                    Ok(c) => Some(c),
                    Err(e) if sink.is_some() => {
                        eprintln!("warning: {e}; the Redis dead-letter stream events:dlq is not listed");
                        None
                    }
                    Err(e) => {
                        return Err(Error::Invalid(format!(
                            "{e}; with DLQ_DB_CONNECTION unset only the Redis dead-letter stream events:dlq is listed"
                        )))
                    }
                };
                filter.apply(gather(sink.as_ref(), redis.as_ref()).await?.0)
            };
            print_rows(&rows, json);
            let what = if undelivered { "undelivered row(s)" } else { "dead letter(s)" };
            eprintln!("{} {what} match", rows.len());
        }
        DlqAction::Replay { filter, dry_run, stream, rate, all } => {
            let opts = ReplayOptions { dry_run, stream, rate, all };
            // Before connecting: a refused replay needs no Redis.
            filter.validate()?;
            opts.check_scope(&filter)?;
            // A dry run shows the SQL store's letters even while Redis cannot be reached.
            let redis = match connect(cfg).await {
                Ok(r) => Some(r),
                Err(e) if dry_run && sink.is_some() => {
                    eprintln!("warning: {e}; the Redis dead-letter stream events:dlq is not looked at");
                    None
                }
                Err(e) => return Err(e),
            };
            let verb = if dry_run { "would replay" } else { "replayed" };
            let report = replay(sink.as_ref(), redis.as_ref(), &filter, &opts, &targets(cfg), |m| {
                out!(
                    "{verb} {} -> {}{}",
                    m.id,
                    m.stream,
                    m.entry.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
                );
            })
            .await?;
            eprintln!(
                "{verb} {} of {} matching dead letter(s){}{}",
                report.replayed.len(),
                report.matched,
                if report.skipped.is_empty() {
                    String::new()
                } else {
                    format!("; {} taken by another replay", report.skipped.len())
                },
                if dry_run { "; dry run: nothing changed" } else { "" }
            );
        }
        DlqAction::Show { ids, json } => {
            let redis = optional_redis(cfg, sink.is_some(), "not looked at").await?;
            let kept = match &redis {
                Some(r) => gather(None, Some(r)).await?.1,
                None => Default::default(),
            };
            let mut found = 0;
            for id in &ids {
                let mut letters: Vec<FullRow> = Vec::new();
                if let Some(s) = &sink {
                    letters.extend(s.get(id).await?);
                }
                let mut in_redis: Vec<&FullRow> = kept.values().filter(|f| &f.row.id == id).collect();
                in_redis.sort_by(|a, b| a.row.entry.cmp(&b.row.entry));
                letters.extend(in_redis.into_iter().cloned());
                if letters.is_empty() {
                    eprintln!("no dead letter with id {id:?}");
                }
                for l in &letters {
                    print_full(l, json);
                }
                found += letters.len();
            }
            if found == 0 {
                return Err(Error::Invalid("no such dead letter".into()));
            }
        }
        DlqAction::Delete { filter, dry_run, all } => delete(cfg, sink.as_ref(), &filter, dry_run, all).await?,
        DlqAction::Purge { dry_run } => {
            delete(cfg, sink.as_ref(), &crate::dlq::redrive::Filter::default(), dry_run, true).await?
        }
    }
    Ok(())
}

/// Redis for a command that can do without it when the SQL store is configured.
async fn optional_redis(cfg: &Config, have_sql: bool, what: &str) -> Result<Option<Conn>> {
    match connect(cfg).await {
        Ok(c) => Ok(Some(c)),
        Err(e) if have_sql => {
            eprintln!("warning: {e}; the Redis dead-letter stream events:dlq is {what}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Delete the letters `filter` selects, each from where it is kept.
async fn delete(
    cfg: &Config,
    sink: Option<&SqlSink>,
    filter: &crate::dlq::redrive::Filter,
    dry_run: bool,
    all: bool,
) -> Result<()> {
    filter.validate()?;
    if filter.is_empty() && !all && !dry_run {
        return Err(Error::Invalid(
            "no filter given: to delete every dead letter say so (--all, or `dlq purge`), or filter (--ids, --type, ...)"
                .into(),
        ));
    }
    let redis =
        if dry_run { optional_redis(cfg, sink.is_some(), "not looked at").await? } else { Some(connect(cfg).await?) };
    let rows = filter.apply(gather(sink, redis.as_ref()).await?.0);
    let verb = if dry_run { "would delete" } else { "deleted" };
    let mut done = 0;
    for r in &rows {
        let gone = match (dry_run, r.entry.as_deref(), sink, &redis) {
            (true, _, _, _) => true,
            (false, Some(entry), _, Some(con)) => super::stream::remove(&mut con.clone(), entry).await?,
            (false, None, Some(s), _) => s.discard(&r.id).await?,
            _ => false,
        };
        if gone {
            done += 1;
            out!("{verb} {} ({}){}", r.id, r.store, r.entry.as_deref().map(|e| format!(" {e}")).unwrap_or_default());
        }
    }
    eprintln!(
        "{verb} {done} of {} matching dead letter(s){}",
        rows.len(),
        if dry_run { "; dry run: nothing changed" } else { "" }
    );
    Ok(())
}

fn print_full(l: &FullRow, json: bool) {
    let meta: Option<serde_json::Value> =
        l.meta.as_deref().map(|m| serde_json::from_str(m).unwrap_or_else(|_| serde_json::Value::String(m.into())));
    if json {
        let mut v = serde_json::to_value(&l.row).unwrap_or_default();
        v["meta"] = meta.unwrap_or(serde_json::Value::Null);
        v["payload"] = serde_json::Value::String(l.payload.clone());
        out!("{v}");
        return;
    }
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    out!("id:         {}", l.row.id);
    out!("type:       {}", l.row.event_type);
    out!("reason:     {}", l.row.reason);
    out!("stream:     {}", or_dash(l.row.stream.clone()));
    out!("attempts:   {}", or_dash(l.row.attempts.map(|a| a.to_string())));
    out!("failed at:  {}", or_dash(l.row.last_failed_at.clone()));
    out!(
        "kept in:    {}{}",
        l.row.store,
        l.row.entry.as_deref().map(|e| format!(" (events:dlq entry {e})")).unwrap_or_default()
    );
    match meta {
        Some(m) => {
            out!("meta:       {}", serde_json::to_string_pretty(&m).unwrap_or_default().replace('\n', "\n            "))
        }
        None => out!("meta:       -"),
    }
    out!("payload:    {}", l.payload);
    out!();
}

fn print_rows(rows: &[DlqRow], json: bool) {
    if json {
        for r in rows {
            out!("{}", serde_json::to_string(r).unwrap_or_default());
        }
        return;
    }
    out!("{:<24} {:<24} {:<18} {:<18} {:>8} {:<6} WHEN", "ID", "TYPE", "REASON", "STREAM", "ATTEMPTS", "STORE");
    for r in rows {
        out!(
            "{:<24} {:<24} {:<18} {:<18} {:>8} {:<6} {}",
            r.id,
            r.event_type,
            r.reason,
            r.stream.as_deref().unwrap_or("-"),
            r.attempts.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            r.store,
            r.last_failed_at.as_deref().unwrap_or("-")
        );
    }
}

/// Where rows without a recorded (configured) stream go: `events:default` when
/// configured, else the first stream.
pub fn default_stream(cfg: &Config) -> String {
    let name = cfg.streams.iter().find(|s| *s == "default").unwrap_or(&cfg.streams[0]);
    stream_key(name)
}

pub fn targets(cfg: &Config) -> Targets {
    Targets { streams: cfg.streams.iter().map(|s| stream_key(s)).collect(), default: default_stream(cfg) }
}
