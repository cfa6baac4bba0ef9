//! Moves due scheduled retries from `events:retry` back to their streams.

use std::sync::Arc;
use std::time::Duration;

use crate::consumer::Worker;
use crate::event::now_unix;
use crate::retry::backoff;

const TICK: Duration = Duration::from_millis(200);
const BATCH: usize = 500;

pub async fn run(w: Arc<Worker>) {
    let fallback = crate::config::stream_key(&w.cfg.streams[0]);
    let mut failures = 0u32;
    loop {
        let pause = if failures == 0 { TICK } else { backoff(TICK, failures, Duration::from_secs(5)) };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = w.shutdown.stop.cancelled() => return,
        }
        loop {
            let mut con = w.redis.clone();
            match w.scripts.move_due(&mut con, now_unix(), BATCH, &fallback).await {
                Ok(n) => {
                    failures = 0;
                    if n > 0 {
                        tracing::debug!(moved = n, "scheduled retries moved back to their streams");
                    }
                    if n < BATCH {
                        break;
                    }
                }
                Err(e) => {
                    failures += 1;
                    w.metrics.redis_errors.with_label_values(&["scheduler"]).inc();
                    tracing::warn!(error = %e, "retry scheduler could not reach redis");
                    break;
                }
            }
        }
    }
}
