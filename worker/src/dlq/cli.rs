//! `eventworker dlq list` and `eventworker dlq replay`: the SQL store (when configured)
//! and the Redis dead-letter stream `events:dlq`.

use std::time::Duration;

use crate::streams::Conn;

use super::redrive::{gather, replay, ReplayOptions, Targets};
use super::sql::DlqRow;
use super::SqlSink;
use crate::config::{stream_key, Config, DlqAction, DlqConfig};
use crate::{Error, Result};

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
        DlqAction::Replay { filter, dry_run, stream, rate } => {
            let redis = connect(cfg).await?;
            let opts = ReplayOptions { dry_run, stream, rate };
            let verb = if dry_run { "would replay" } else { "replayed" };
            let report = replay(sink.as_ref(), &redis, &filter, &opts, &targets(cfg), |m| {
                println!(
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
    }
    Ok(())
}

fn print_rows(rows: &[DlqRow], json: bool) {
    if json {
        for r in rows {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        }
        return;
    }
    println!("{:<24} {:<24} {:<18} {:<18} {:>8} {:<6} WHEN", "ID", "TYPE", "REASON", "STREAM", "ATTEMPTS", "STORE");
    for r in rows {
        println!(
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
