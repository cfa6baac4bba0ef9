//! eventworker: delivers events from Redis Streams to HTTP endpoints.

pub mod admin;
pub mod config;
pub mod consumer;
pub mod delivery;
pub mod dlq;
pub mod error;
pub mod event;
pub mod handler;
pub mod hosts;
pub mod limiter;
pub mod metrics;
pub mod ordering;
pub mod policy;
pub mod retry;
pub mod scheduler;
pub mod shutdown;
pub mod stats;
pub mod status;
pub mod streams;

use std::sync::Arc;
use std::time::Duration;

pub use error::{Error, Result};

/// Lock a mutex; a panic elsewhere while holding it does not make its data unusable here.
/// Write to stdout; false when the reader went away (`| head`): the caller ends quietly
/// instead of panicking like `println!` would.
pub fn print_out(text: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|_| out.flush()).is_ok()
}

pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A message with the credentials of any URL in it (`scheme://user:password@host`)
/// replaced by `***`, for logs and errors.
pub fn redact(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first '/', whitespace or quote; credentials end at its last '@'.
        let end = tail.find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'').unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&tail[at..end]);
            }
            None => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

use crate::admin::{AdminState, Health};
use crate::config::Config;
use crate::consumer::Worker;
use crate::delivery::Deliverer;
use crate::dlq::Sink;
use crate::hosts::Hosts;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Run the worker until `shutdown.stop` fires and in-flight work has drained (or the grace
/// period ran out).
pub async fn run(cfg: Config, shutdown: Shutdown) -> Result<()> {
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(Metrics::new());
    let deliverer = Deliverer::new(&cfg)?;
    let sink = Sink::from_config(&cfg.dlq, deliverer.client().clone())?;
    if let Sink::Sql(sql) = &sink {
        // Fail start-up on a bad table; a database that is down only delays readiness.
        match tokio::time::timeout(Duration::from_secs(10), sql.prepare()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e @ Error::Config { .. })) => return Err(e),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "dead-letter database not usable yet; events will be held until it is")
            }
            Err(_) => {
                tracing::warn!("dead-letter database did not answer within 10 s; events will be held until it does")
            }
        }
    }
    let redis = streams::connect_lazy(&cfg.redis_url, Duration::from_secs(5))?;
    let health = Arc::new(Health::new(&cfg.streams).redis_at(cfg.redis_address()));
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", cfg.metrics_port)).await.map_err(|e| Error::Config {
        var: "METRICS_PORT",
        msg: format!("cannot listen on port {}: {e}", cfg.metrics_port),
    })?;
    tracing::info!(
        streams = ?cfg.streams,
        group = %cfg.group,
        ordering = ?cfg.ordering,
        dlq = sink.name(),
        metrics_port = cfg.metrics_port,
        "eventworker {} starting",
        env!("CARGO_PKG_VERSION")
    );
    let w = Arc::new(Worker {
        hosts: Hosts::new(cfg.hosts.clone(), deliverer.clone(), metrics.clone(), shutdown.hard.clone()),
        scripts: Arc::new(streams::Scripts::default()),
        cfg: cfg.clone(),
        redis: redis.clone(),
        deliverer,
        sink,
        metrics: metrics.clone(),
        health: health.clone(),
        shutdown: shutdown.clone(),
        outbox_wake: Arc::default(),
    });
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    if cfg.admin_token.is_none() {
        tracing::warn!(
            "ADMIN_TOKEN is not set: GET /reprocess-dlq (the original's endpoint) replays dead letters without authentication; set ADMIN_TOKEN to require a token"
        );
    }

    let admin_stop = tokio_util::sync::CancellationToken::new();
    let app = admin::router(AdminState {
        metrics,
        health,
        redis: Some(redis),
        dlq: match &w.sink {
            Sink::Sql(s) => Some(s.clone()),
            _ => None,
        },
        token: cfg.admin_token.clone(),
        targets: dlq::cli::targets(&cfg),
    });
    let admin = tokio::spawn({
        let stop = admin_stop.clone();
        async move { axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await }
    });

    // The grace period starts when the stop is requested; then in-flight work is abandoned.
    tokio::spawn({
        let s = shutdown.clone();
        let grace = cfg.shutdown_grace;
        async move {
            s.stop.cancelled().await;
            tokio::select! {
                _ = tokio::time::sleep(grace) => {
                    tracing::warn!("grace period over: abandoning in-flight events (they stay pending)");
                    s.hard.cancel();
                }
                _ = s.hard.cancelled() => {}
            }
        }
    });

    let scheduler = tokio::spawn(scheduler::run(w.clone()));
    let evictor = tokio::spawn({
        let hosts = w.hosts.clone();
        let stop = shutdown.stop.clone();
        async move { hosts.evict_idle(stop).await }
    });
    let stats = tokio::spawn(stats::run(w.clone()));
    let outbox_stop = tokio_util::sync::CancellationToken::new();
    let outbox = tokio::spawn(dlq::outbox::run(w.clone(), outbox_stop.clone()));
    let consumers: Vec<_> =
        cfg.streams.iter().map(|name| tokio::spawn(consumer::run_stream(w.clone(), name.clone()))).collect();
    for c in consumers {
        let _ = c.await;
    }
    // The last acknowledgements recorded their clean-ups: apply them once more, then stop.
    outbox_stop.cancel();
    let _ = scheduler.await;
    let _ = stats.await;
    let _ = outbox.await;
    let _ = evictor.await;
    // Everything drained: let the grace timer go.
    shutdown.hard.cancel();
    admin_stop.cancel();
    let _ = admin.await;
    tracing::info!("eventworker stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_are_redacted() {
        assert_eq!(
            super::redact("redis at redis://:hunter2@db:6379/0 did not answer"),
            "redis at redis://***@db:6379/0 did not answer"
        );
        assert_eq!(super::redact("mysql://u:p@h/db and rediss://h:1"), "mysql://***@h/db and rediss://h:1");
        assert_eq!(super::redact("no url here"), "no url here");
        assert_eq!(super::redact("redis://user:p@ss@host"), "redis://***@host");
    }
}
