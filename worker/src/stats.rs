//! Refreshes the stream gauges (length, pending, lag, backlog, oldest ages, scheduled
//! retries), from the backlog definition the operator scales on (crate `backlog`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::config::stream_key;
use crate::consumer::Worker;
use crate::streams;

pub const INTERVAL: Duration = Duration::from_secs(5);
/// How often the group's idle consumers are looked for, at most.
const CONSUMER_SWEEP: Duration = Duration::from_secs(300);

pub async fn run(w: Arc<Worker>) {
    let idle = w.cfg.consumer_idle_timeout.unwrap_or(CONSUMER_SWEEP);
    let every = idle.clamp(Duration::from_secs(5), CONSUMER_SWEEP);
    let mut next_sweep = tokio::time::Instant::now() + idle.clamp(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        refresh(&w).await;
        if tokio::time::Instant::now() >= next_sweep {
            next_sweep = tokio::time::Instant::now() + every;
            if let Some(idle) = w.cfg.consumer_idle_timeout {
                remove_idle_consumers(&w, idle).await;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            _ = w.shutdown.stop.cancelled() => return,
        }
    }
}

async fn refresh(w: &Worker) {
    let mut con = w.redis.clone();
    let mut ok = true;
    for name in &w.cfg.streams {
        let key = stream_key(name);
        match backlog::read(&mut con, &key, &w.cfg.group).await {
            // Not created yet (or gone): the consumer owns the group's health and recreates it
            // when its read says NOGROUP. Deciding it here too raced with the creation at
            // start-up and could leave a healthy worker unready.
            Ok(b) if !b.group_exists => {}
            Ok(b) => {
                let m = &w.metrics;
                let now = backlog::now_unix_ms();
                m.stream_length.with_label_values(&[&key]).set(b.length);
                m.stream_pending.with_label_values(&[&key]).set(b.pending);
                m.stream_lag.with_label_values(&[&key]).set(b.undelivered);
                m.stream_backlog.with_label_values(&[&key]).set(b.total());
                m.oldest_age.with_label_values(&[&key]).set(b.oldest_age_secs(now));
                m.oldest_pending_age.with_label_values(&[&key]).set(b.oldest_pending_age_secs(now));
            }
            Err(e) => {
                ok = false;
                tracing::debug!(error = %e, stream = %key, "stream statistics unavailable");
            }
        }
    }
    match streams::scheduled_count(&mut con, w.cfg.layout, &w.cfg.stream_keys_all()).await {
        Ok(n) => w.metrics.scheduled_retries.set(n),
        Err(_) => ok = false,
    }
    if let Ok(n) = crate::dlq::stream::len(&mut con).await {
        w.metrics.dlq_stream_length.set(n);
    }
    w.health.redis_ok.store(ok, Ordering::Relaxed);
}

/// Every pod name becomes a consumer of the group; pods come and go. Consumers idle longer
/// than `CONSUMER_IDLE_TIMEOUT` with nothing pending are removed (atomically: one that got
/// an entry meanwhile stays).
async fn remove_idle_consumers(w: &Worker, idle: Duration) {
    let mut con = w.redis.clone();
    for name in &w.cfg.streams {
        let key = stream_key(name);
        let consumers = match streams::consumers(&mut con, &key, &w.cfg.group).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, stream = %key, "cannot list consumers");
                continue;
            }
        };
        for c in consumers {
            if c.pending > 0 || c.idle < idle || c.name == w.cfg.consumer(name) {
                continue;
            }
            if let Ok(true) = w.scripts.remove_consumer(&mut con, &key, &w.cfg.group, &c.name).await {
                w.metrics.consumers_removed.inc();
                tracing::info!(stream = %key, consumer = %c.name, idle_s = c.idle.as_secs(), "removed an idle consumer with nothing pending");
            }
        }
    }
}
