//! Moves due scheduled retries back to their streams: from the global `events:retry`
//! (single layout), or from each stream's own schedule (cluster layout), where the
//! original's global keys are still swept for retries it scheduled.

use std::sync::Arc;
use std::time::Duration;

use crate::consumer::Worker;
use crate::event::now_unix;
use crate::retry::backoff;
use crate::streams::Layout;

const TICK: Duration = Duration::from_millis(200);
const BATCH: usize = 500;

pub async fn run(w: Arc<Worker>) {
    let fallback = crate::config::stream_key(&w.cfg.streams[0]);
    let own: Vec<_> = w.cfg.streams.iter().map(|s| w.cfg.stream_keys(s)).collect();
    let mut failures = 0u32;
    loop {
        let pause = if failures == 0 { TICK } else { backoff(TICK, failures, Duration::from_secs(5)) };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = w.shutdown.stop.cancelled() => return,
        }
        let result = match w.cfg.layout {
            Layout::Single => {
                drain(|| {
                    let (mut con, w, fallback) = (w.redis.clone(), &w, &fallback);
                    async move { w.scripts.move_due(&mut con, now_unix(), BATCH, fallback).await }
                })
                .await
            }
            Layout::Cluster => {
                let mut total = 0;
                let mut failed = None;
                for keys in &own {
                    let moved = drain(|| {
                        let (mut con, w) = (w.redis.clone(), &w);
                        async move { w.scripts.move_due_own(&mut con, keys, now_unix(), BATCH).await }
                    })
                    .await;
                    // One stream's node being down must not hold the others' retries.
                    match moved {
                        Ok(n) => total += n,
                        Err(e) => failed = Some(e),
                    }
                }
                let legacy = drain(|| {
                    let (mut con, w, fallback) = (w.redis.clone(), &w, &fallback);
                    async move { w.scripts.move_due_legacy(&mut con, now_unix(), BATCH, fallback).await }
                })
                .await;
                match (legacy, failed) {
                    (Ok(n), None) => Ok(total + n),
                    (Err(e), _) | (_, Some(e)) => Err(e),
                }
            }
        };
        match result {
            Ok(n) => {
                failures = 0;
                if n > 0 {
                    tracing::debug!(moved = n, "scheduled retries moved back to their streams");
                }
            }
            Err(e) => {
                failures += 1;
                w.metrics.redis_errors.with_label_values(&["scheduler"]).inc();
                tracing::warn!(error = %e, "retry scheduler could not reach redis");
            }
        }
    }
}

/// Move batches until one comes back short.
async fn drain<F, Fut>(mut step: F) -> crate::Result<usize>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::Result<usize>>,
{
    let mut total = 0;
    loop {
        let n = step().await?;
        total += n;
        if n < BATCH {
            return Ok(total);
        }
    }
}
