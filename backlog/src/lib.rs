//! The backlog of a stream for a consumer group: one definition, read by one Lua script,
//! used by the worker's gauges (`stream_backlog`, ...) and by the operator's
//! status and scaler, so that the numbers a user sees and the numbers pods are scaled on
//! are the same numbers.
//!
//! - **undelivered**: entries the group has not read yet (after its last-delivered-id).
//!   Redis's own `lag` when it knows it; counted when it does not (after `XDEL` of entries
//!   the group has not passed, a group created behind deletions, Redis < 7), from whichever
//!   side of the group's position is smaller, at most [`COUNT_CAP`] entries per side (beyond
//!   that, estimated from the entries' times: `exact: false`).
//! - **pending**: read and not acknowledged (in flight, waiting for a slot at its host, or
//!   left by a pod that died, waiting for a claim).
//! - **backlog** = undelivered + pending: the work the workers still have to do.
//! - **oldest**: the entry ID of the oldest entry in the backlog; its age is the time since
//!   Redis accepted it (IDs from `XADD *`).
//!
//! Retries scheduled for later ([`layout`]: `events:retry`, per stream in a cluster) are *not* backlog: they wait by design and
//! more pods would not deliver them sooner. When due they are added to their stream again
//! and count from then on. The same goes for events held behind an earlier event of their
//! ordering key (they wait for that retry). Acknowledged entries that stay in the stream
//! (`DELETE_ON_ACK=false`) are not backlog either.

pub mod layout;

use redis::aio::ConnectionLike;
use redis::{RedisResult, Script, Value};

/// Most entries counted on either side of a group's position when Redis cannot tell the
/// lag (counting runs in Redis: 1.5 to 3 ms per 1,000 entries of 200 bytes); beyond that
/// the undelivered count is estimated from the entries' times, at least this many
/// (`exact: false`).
pub const COUNT_CAP: i64 = 1_000;

/// A stream's backlog for one group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backlog {
    /// XLEN: every entry still in the stream, acknowledged or not.
    pub length: i64,
    /// Not read by the group yet.
    pub undelivered: i64,
    /// Read, not acknowledged.
    pub pending: i64,
    /// ID of the oldest unacknowledged entry (pending or undelivered), if any.
    pub oldest_id: Option<String>,
    /// False when the undelivered count is an estimate (see [`COUNT_CAP`]).
    pub exact: bool,
    /// Whether the group exists (when not, every entry counts as undelivered).
    pub group_exists: bool,
    /// ID of the oldest pending entry, if any.
    pub oldest_pending_id: Option<String>,
    /// ID of the oldest entry the group has not read, if any.
    pub oldest_undelivered_id: Option<String>,
}

impl Backlog {
    /// Undelivered plus pending.
    pub fn total(&self) -> i64 {
        self.undelivered + self.pending
    }

    /// Seconds the oldest unacknowledged entry has waited, 0 when there is none.
    pub fn oldest_age_secs(&self, now_unix_ms: u64) -> f64 {
        age_secs(self.oldest_id.as_deref(), now_unix_ms)
    }

    /// Seconds the oldest entry nobody has read has waited, 0 when there is none.
    pub fn oldest_undelivered_age_secs(&self, now_unix_ms: u64) -> f64 {
        age_secs(self.oldest_undelivered_id.as_deref(), now_unix_ms)
    }

    /// Seconds the oldest pending entry has waited, 0 when there is none.
    pub fn oldest_pending_age_secs(&self, now_unix_ms: u64) -> f64 {
        age_secs(self.oldest_pending_id.as_deref(), now_unix_ms)
    }
}

fn age_secs(id: Option<&str>, now_unix_ms: u64) -> f64 {
    id.and_then(id_millis).map(|ms| now_unix_ms.saturating_sub(ms) as f64 / 1000.0).unwrap_or(0.0)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The milliseconds part of a stream entry ID.
pub fn id_millis(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

fn script() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(include_str!("backlog.lua")))
}

/// Read the backlog of stream `key` for `group` in one atomic step (a missing stream is an
/// empty one).
pub async fn read<C: ConnectionLike>(con: &mut C, key: &str, group: &str) -> RedisResult<Backlog> {
    read_capped(con, key, group, COUNT_CAP).await
}

async fn read_capped<C: ConnectionLike>(con: &mut C, key: &str, group: &str, cap: i64) -> RedisResult<Backlog> {
    let v: Vec<Value> = script().key(key).arg(group).arg(cap).invoke_async(con).await?;
    let int = |i: usize| match v.get(i) {
        Some(Value::Int(n)) => *n,
        _ => 0,
    };
    let id = |i: usize| match v.get(i) {
        Some(Value::BulkString(b)) if !b.is_empty() => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    };
    Ok(Backlog {
        length: int(0),
        undelivered: int(1).max(0),
        pending: int(2),
        oldest_id: id(3),
        exact: int(4) == 1,
        group_exists: int(5) == 1,
        oldest_pending_id: id(6),
        oldest_undelivered_id: id(7),
    })
}

#[cfg(test)]
mod tests;
