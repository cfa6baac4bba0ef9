//! The clean-up of an outbox table (DESIGN.md §2b): the row of a delivered event is
//! deleted, like the original did after a 2xx.
//!
//! The delete is recorded in Redis in the same transaction as the entry's XACK (the set
//! `StreamKeys::cleanup`: one per group, or one per stream in a Redis Cluster, where it must
//! share the stream's slot), and applied from there in batches by [`run`]. So a database that is
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

/// Rows whose events were delivered and whose delete waits, over `sets`.
pub async fn pending(con: &mut crate::streams::Conn, sets: &[String]) -> crate::Result<i64> {
    let mut n = 0;
    for set in sets {
        let m: i64 = redis::cmd("SCARD").arg(set).query_async(con).await?;
        n += m;
    }
    Ok(n)
}

/// Apply one batch from `set`: how many rows were taken from it.
async fn apply_batch(w: &Worker, sql: &super::sql::SqlSink, set: &str) -> Result<usize, String> {
    let mut con = w.redis.clone();
    let ids: Vec<String> =
        redis::cmd("SRANDMEMBER").arg(set).arg(BATCH).query_async(&mut con).await.map_err(|e| e.to_string())?;
    if ids.is_empty() {
        return Ok(0);
    }
    let deleted = match tokio::time::timeout(STATEMENT_TIMEOUT, sql.delete_delivered(&ids)).await {
        Err(_) => return Err(format!("DELETE did not finish within {STATEMENT_TIMEOUT:?}")),
        Ok(r) => r.map_err(|e| e.to_string())?,
    };
    w.metrics.outbox_rows_deleted.inc_by(deleted);
    let _: i64 = redis::cmd("SREM").arg(set).arg(&ids).query_async(&mut con).await.map_err(|e| e.to_string())?;
    Ok(ids.len())
}

/// Apply recorded clean-ups until `stop` (cancelled once the consumers have drained),
/// then once more.
pub async fn run(w: Arc<Worker>, stop: tokio_util::sync::CancellationToken) {
    let Sink::Sql(sql) = &w.sink else { return };
    if !sql.may_be_outbox() {
        return;
    }
    let sets = w.cfg.cleanup_sets();
    let gauge = w.metrics.outbox_cleanups_pending.clone();
    let mut failures = 0u32;
    let mut next_audit = tokio::time::Instant::now();
    loop {
        let stopping = stop.is_cancelled();
        // Which mode, once the database has answered: a dead-letter table has nothing to clean.
        if let Ok(Shape::DeadLetter { .. }) = sql.prepare().await {
            let mut con = w.redis.clone();
            for set in &sets {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(set).query_async(&mut con).await;
            }
            gauge.set(0);
            return;
        }
        // Every set in turn; a full batch from any means more may be waiting.
        let mut outcome = Ok(0);
        for set in &sets {
            match apply_batch(&w, sql, set).await {
                Ok(n) => outcome = outcome.map(|m: usize| m.max(n)),
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        let mut con = w.redis.clone();
        if let Ok(n) = pending(&mut con, &sets).await {
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
