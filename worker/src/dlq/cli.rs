//! `eventworker dlq list` and `eventworker dlq replay`.

use std::time::Duration;

use super::redrive::{replay, ReplayOptions};
use super::SqlSink;
use crate::config::{stream_key, Config, DlqAction, DlqConfig};
use crate::{Error, Result};

pub async fn run(cfg: &Config, action: DlqAction) -> Result<()> {
    let DlqConfig::Sql { url, table, event_table } = &cfg.dlq else {
        return Err(Error::Config {
            var: "DLQ_DB_CONNECTION",
            msg: "dlq commands work on the SQL dead-letter store; set DLQ_DB_CONNECTION".into(),
        });
    };
    let sink = SqlSink::new(url, table, event_table.as_deref())?;
    sink.prepare().await?;
    match action {
        DlqAction::List { filter, json } => {
            filter.validate()?;
            let rows = filter.apply(sink.list().await?);
            if json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r).unwrap_or_default());
                }
            } else {
                println!(
                    "{:<24} {:<24} {:<18} {:<18} {:>8}  LAST FAILED",
                    "ID", "TYPE", "REASON", "STREAM", "ATTEMPTS"
                );
                for r in &rows {
                    println!(
                        "{:<24} {:<24} {:<18} {:<18} {:>8}  {}",
                        r.id,
                        r.event_type,
                        r.reason,
                        r.stream.as_deref().unwrap_or("-"),
                        r.attempts.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                        r.last_failed_at.as_deref().unwrap_or("-")
                    );
                }
                eprintln!("{} dead letter(s) match", rows.len());
            }
        }
        DlqAction::Replay { filter, dry_run, stream, rate } => {
            let redis = tokio::time::timeout(
                Duration::from_secs(10),
                crate::streams::connect(&cfg.redis_url, Duration::from_secs(5)),
            )
            .await
            .map_err(|_| Error::Invalid(format!("redis at {} did not answer within 10 s", cfg.redis_url)))??;
            let opts = ReplayOptions { dry_run, stream, rate };
            let verb = if dry_run { "would replay" } else { "replayed" };
            let default_stream = default_stream(cfg);
            let report = replay(&sink, &redis, &filter, &opts, &default_stream, |m| {
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

/// Where rows without a recorded stream go: `events:default` when configured, else the first stream.
pub fn default_stream(cfg: &Config) -> String {
    let name = cfg.streams.iter().find(|s| *s == "default").unwrap_or(&cfg.streams[0]);
    stream_key(name)
}
