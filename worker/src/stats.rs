//! Refreshes the stream gauges (length, pending, lag, oldest pending age, scheduled retries).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::config::stream_key;
use crate::consumer::Worker;
use crate::event::now_unix;
use crate::streams;

pub const INTERVAL: Duration = Duration::from_secs(5);

pub async fn run(w: Arc<Worker>) {
    loop {
        refresh(&w).await;
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
        match streams::stats(&mut con, &key, &w.cfg.group).await {
            Ok(s) => {
                let m = &w.metrics;
                m.stream_length.with_label_values(&[&key]).set(s.length);
                m.stream_pending.with_label_values(&[&key]).set(s.pending);
                m.stream_lag.with_label_values(&[&key]).set(s.lag);
                let age = s.oldest_pending_ms.map(|ms| (now_unix() - ms as f64 / 1000.0).max(0.0)).unwrap_or(0.0);
                m.oldest_pending_age.with_label_values(&[&key]).set(age);
            }
            Err(crate::Error::Redis(e)) if streams::is_nogroup(&e) => w.health.set_group(&key, false),
            Err(e) => {
                ok = false;
                tracing::debug!(error = %e, stream = %key, "stream statistics unavailable");
            }
        }
    }
    match streams::scheduled_count(&mut con).await {
        Ok(n) => w.metrics.scheduled_retries.set(n),
        Err(_) => ok = false,
    }
    w.health.redis_ok.store(ok, Ordering::Relaxed);
}
