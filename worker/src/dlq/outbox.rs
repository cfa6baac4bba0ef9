//! The clean-up of an outbox table (DESIGN.md §2b): the row of a delivered event is
//! deleted, like the original did after a 2xx.
//!
//! The delete is recorded in Redis in the same transaction as the entry's XACK (the set
//! [`cleanup_key`]), and applied from there in batches by [`run`]. So a database that is
//! down loses no clean-up and causes no re-delivery: the events are acknowledged as usual,
//! the deletes wait in Redis (metric `outbox_cleanups_pending`, `/readyz`) and are applied
//! once the database is back. A delete applied twice (a crash between DELETE and SREM)
//! changes nothing.
//!
//! The same task keeps the delivery audit: rows neither deleted nor dead-lettered long
//! after they were created (metric `outbox_undelivered_rows`).

use std::sync::Arc;
use std::time::Duration;

use crate::consumer::Worker;
use crate::dlq::sql::Shape;
use crate::dlq::Sink;
use crate::retry::backoff;

/// Rows deleted per statement.
const BATCH: usize = 500;
/// How often the audit counts undelivered rows, at most.
const AUDIT_EVERY: Duration = Duration::from_secs(30);
/// Longest one DELETE may take (a row lock must not hold the clean-up, or a stop, forever).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the set is looked at without a wake-up (another worker's records).
const IDLE_POLL: Duration = Duration::from_secs(2);

/// The set of outbox rows (ids) whose events were delivered and whose delete is pending.
pub fn cleanup_key(group: &str) -> String {
    format!("eventworker:outbox:{group}:delivered")
}

pub async fn pending(con: &mut crate::streams::Conn, group: &str) -> crate::Result<i64> {
    Ok(redis::cmd("SCARD").arg(cleanup_key(group)).query_async(con).await?)
}

/// Apply recorded clean-ups until `stop` (cancelled once the consumers have drained),
/// then once more.
pub async fn run(w: Arc<Worker>, stop: tokio_util::sync::CancellationToken) {
    let Sink::Sql(sql) = &w.sink else { return };
    if !sql.may_be_outbox() {
        return;
    }
    let key = cleanup_key(&w.cfg.group);
    let gauge = w.metrics.outbox_cleanups_pending.clone();
    let mut failures = 0u32;
    let mut next_audit = tokio::time::Instant::now();
    loop {
        let stopping = stop.is_cancelled();
        // Which mode, once the database has answered: a dead-letter table has nothing to clean.
        if let Ok(Shape::DeadLetter { .. }) = sql.prepare().await {
            let mut con = w.redis.clone();
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&key).query_async(&mut con).await;
            gauge.set(0);
            return;
        }
        let mut con = w.redis.clone();
        let ids: redis::RedisResult<Vec<String>> =
            redis::cmd("SRANDMEMBER").arg(&key).arg(BATCH).query_async(&mut con).await;
        let outcome = match ids {
            Ok(ids) if ids.is_empty() => Ok(0),
            Ok(ids) => match tokio::time::timeout(STATEMENT_TIMEOUT, sql.delete_delivered(&ids)).await {
                Err(_) => Err(format!("DELETE did not finish within {STATEMENT_TIMEOUT:?}")),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(deleted)) => {
                    w.metrics.outbox_rows_deleted.inc_by(deleted);
                    let removed: redis::RedisResult<i64> =
                        redis::cmd("SREM").arg(&key).arg(&ids).query_async(&mut con).await;
                    removed.map(|_| ids.len()).map_err(|e| e.to_string())
                }
            },
            Err(e) => Err(e.to_string()),
        };
        if let Ok(n) = pending(&mut con, &w.cfg.group).await {
            gauge.set(n);
        }
        let pause = match outcome {
            Ok(n) => {
                if failures > 0 {
                    tracing::info!("outbox clean-up resumed: deleting the rows of delivered events again");
                    w.health.set_cleanup_error(None);
                    failures = 0;
                }
                if n == BATCH && !stopping {
                    continue; // more waiting (at a stop, the rest waits for the next start)
                }
                if stopping {
                    return;
                }
                if gauge.get() == 0 && tokio::time::Instant::now() >= next_audit {
                    let every = w.cfg.outbox_audit_after.clamp(Duration::from_secs(1), AUDIT_EVERY);
                    next_audit = tokio::time::Instant::now() + every;
                    audit(&w).await;
                }
                IDLE_POLL
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(error = %crate::redact(&e), "outbox clean-up failing; delivered rows wait in Redis until it works again");
                }
                w.health.set_cleanup_error(Some(crate::redact(&e)));
                if stopping {
                    return;
                }
                backoff(Duration::from_millis(200), failures, Duration::from_secs(10))
            }
        };
        tokio::select! {
            _ = w.outbox_wake.notified() => {}
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled(), if !stopping => {}
        }
    }
}

async fn audit(w: &Worker) {
    let Sink::Sql(sql) = &w.sink else { return };
    if !matches!(sql.known_shape(), Some(Shape::Outbox(o)) if o.created_at) {
        return;
    }
    match sql.count_undelivered(w.cfg.outbox_audit_after).await {
        Ok(n) => w.metrics.outbox_undelivered.set(n),
        Err(e) => tracing::debug!(error = %e, "cannot count undelivered outbox rows"),
    }
}
