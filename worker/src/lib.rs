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
pub mod retry;
pub mod scheduler;
pub mod shutdown;
pub mod stats;
pub mod streams;
pub mod telemetry;

use std::sync::Arc;
use std::time::Duration;

pub use error::{Error, Result};

/// Lock a mutex; a panic elsewhere while holding it does not make its data unusable here.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    let health = Arc::new(Health::new(&cfg.streams));
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
    });

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
        default_stream: dlq::cli::default_stream(&cfg),
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
    let consumers: Vec<_> =
        cfg.streams.iter().map(|name| tokio::spawn(consumer::run_stream(w.clone(), name.clone()))).collect();
    for c in consumers {
        let _ = c.await;
    }
    let _ = scheduler.await;
    let _ = stats.await;
    let _ = evictor.await;
    // Everything drained: let the grace timer go.
    shutdown.hard.cancel();
    admin_stop.cancel();
    let _ = admin.await;
    tracing::info!("eventworker stopped");
    Ok(())
}
