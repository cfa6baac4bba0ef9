//! The Redis dead-letter stream `events:dlq`: where a dead letter goes when the configured
//! sink refuses it for good (a value its table cannot hold, a 4xx from the HTTP sink), so
//! that it neither blocks its stream nor is lost. Bounded (oldest trimmed beyond
//! [`MAXLEN`]); listed and replayed by the same commands as the SQL store.

use crate::streams::Conn;
use redis::Value;

use super::sql::{DlqRow, FullRow};
use super::DeadLetter;
use crate::Result;

pub const DLQ_STREAM: &str = "events:dlq";
/// About this many letters are kept (XADD MAXLEN ~).
pub const MAXLEN: usize = 100_000;

/// Keep a refused dead letter, with the sink's reason for refusing it.
pub async fn add(con: &mut Conn, r: &DeadLetter, sink_error: &str) -> Result<String> {
    let id: String = redis::cmd("XADD")
        .arg(DLQ_STREAM)
        .arg("MAXLEN")
        .arg("~")
        .arg(MAXLEN)
        .arg("*")
        .arg("id")
        .arg(&r.id)
        .arg("type")
        .arg(&r.event_type)
        .arg("reason")
        .arg(&r.reason)
        .arg("stream")
        .arg(&r.stream)
        .arg("attempts")
        .arg(r.attempts)
        .arg("meta")
        .arg(r.meta.as_deref().unwrap_or(""))
        .arg("payload")
        .arg(&r.payload)
        .arg("error")
        .arg(sink_error)
        .arg("at")
        .arg(crate::event::iso_now())
        .query_async(con)
        .await?;
    Ok(id)
}

/// Every letter in the stream, oldest first.
pub async fn list(con: &mut Conn) -> Result<Vec<FullRow>> {
    let v: Value = redis::cmd("XRANGE").arg(DLQ_STREAM).arg("-").arg("+").query_async(con).await?;
    let Value::Array(entries) = v else { return Ok(vec![]) };
    let mut out = Vec::new();
    for e in entries {
        let Value::Array(mut parts) = e else { continue };
        if parts.len() < 2 {
            continue;
        }
        let fields = parts.swap_remove(1);
        let Ok(entry) = redis::from_redis_value::<String>(parts.swap_remove(0)) else { continue };
        let map: std::collections::HashMap<String, String> = redis::from_redis_value(fields).unwrap_or_default();
        let get = |k: &str| map.get(k).cloned().unwrap_or_default();
        out.push(FullRow {
            row: DlqRow {
                id: get("id"),
                event_type: get("type"),
                reason: get("reason"),
                stream: map.get("stream").cloned().filter(|s| !s.is_empty()),
                attempts: map.get("attempts").and_then(|a| a.parse().ok()),
                last_failed_at: map.get("at").cloned(),
                store: "redis",
                entry: Some(entry),
            },
            payload: get("payload"),
            meta: map.get("meta").cloned().filter(|m| !m.is_empty()),
        });
    }
    Ok(out)
}

/// Move one letter back into `target`, exactly once: the XADD happens only if this call
/// removed the letter. None when another replay took it first.
const TAKE_LUA: &str = r#"
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return false end
redis.call('DEL', KEYS[3])
return redis.call('XADD', KEYS[2], '*', 'meta', ARGV[2], 'payload', ARGV[3])
"#;

/// In a cluster the letter and its target live in different slots: the letter is claimed
/// first (for [`CLAIM`], so that concurrent replays do not both take it), then added to its
/// target, then removed. A replay that dies between the add and the removal leaves the
/// letter to be replayed again once the claim ends: at least once, never lost.
const CLAIM_LUA: &str = r#"
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return 0 end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"#;

const CLAIM: std::time::Duration = std::time::Duration::from_secs(60);

pub async fn take(
    con: &mut Conn,
    entry: &str,
    target: &str,
    counter: &str,
    meta: &str,
    payload: &[u8],
) -> Result<Option<String>> {
    if con.layout() == crate::streams::Layout::Cluster {
        return take_across_slots(con, entry, target, counter, meta, payload).await;
    }
    let id: Option<String> = redis::Script::new(TAKE_LUA)
        .key(DLQ_STREAM)
        .key(target)
        .key(counter)
        .arg(entry)
        .arg(meta)
        .arg(payload)
        .invoke_async(con)
        .await?;
    Ok(id)
}

async fn take_across_slots(
    con: &mut Conn,
    entry: &str,
    target: &str,
    counter: &str,
    meta: &str,
    payload: &[u8],
) -> Result<Option<String>> {
    let tag = backlog::layout::cluster_tag(DLQ_STREAM).expect("events:dlq has a tag");
    let claim = format!("{tag}:replaying:{entry}");
    let claimed: i64 = redis::Script::new(CLAIM_LUA)
        .key(DLQ_STREAM)
        .key(&claim)
        .arg(entry)
        .arg(CLAIM.as_millis() as u64)
        .invoke_async(con)
        .await?;
    if claimed == 0 {
        return Ok(None);
    }
    let (id,): (String,) = redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg(target)
        .arg("*")
        .arg("meta")
        .arg(meta)
        .arg("payload")
        .arg(payload)
        .cmd("DEL")
        .arg(counter)
        .ignore()
        .query_async(con)
        .await?;
    // On a replica of the target's master before the letter goes (replication is asynchronous).
    con.wait_replicated(target, crate::streams::REPLICA_WAIT).await;
    let _: () = redis::pipe()
        .atomic()
        .cmd("XDEL")
        .arg(DLQ_STREAM)
        .arg(entry)
        .ignore()
        .cmd("DEL")
        .arg(&claim)
        .ignore()
        .query_async(con)
        .await?;
    Ok(Some(id))
}

/// Delete one letter for good; false when it was gone already.
pub async fn remove(con: &mut Conn, entry: &str) -> Result<bool> {
    let n: i64 = redis::cmd("XDEL").arg(DLQ_STREAM).arg(entry).query_async(con).await?;
    Ok(n > 0)
}

/// Remove letters from the stream (after they were replayed elsewhere or purged).
pub async fn len(con: &mut Conn) -> Result<i64> {
    Ok(redis::cmd("XLEN").arg(DLQ_STREAM).query_async(con).await?)
}
