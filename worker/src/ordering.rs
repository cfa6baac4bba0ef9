//! Ordering that holds through retries and across replicas.
//!
//! - **One deliverer per ordered stream.** A stream with `ORDERING=key` or `stream` is
//!   delivered by the consumer holding its lease (`eventworker:lease:<group>:<stream>`, a
//!   Redis key with a TTL, renewed every third of it). The others stand by. A new holder
//!   first takes over every pending entry of the stream (in id order) before reading new
//!   ones, so a key's events are never delivered by two processes at once: not with
//!   `replicas: 2`, not during a rolling update (the old pod releases the lease only after
//!   draining), not after a crash (the lease expires). Different streams' leases spread
//!   over the replicas.
//! - **Held keys.** When an event with an ordering key is scheduled for a later retry (or
//!   deferred because its host is paused or saturated), its key becomes held: events of the
//!   key read meanwhile join the key's hold streams, durably and atomically with their
//!   acknowledgement, instead of being delivered. When the event that holds the key is
//!   delivered or dead-lettered, the waiting events go back to the end of the stream, in
//!   order, as one group; the key is free once a group finishes with nothing left waiting.
//!
//! The leader mirrors the held keys of its stream in memory (loaded when it takes the
//! lease), so deciding whether an event waits costs no round trip. Each held key records
//! when its holder is due back; the leader hands on keys past that time (a holder trimmed
//! away from Redis), so waiting events never wait forever. The scripts that change held
//! keys start from `XACK`, so a call retried after a lost reply changes nothing twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::streams::Conn;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::streams::Scripts;

/// What to do with an event of an ordered stream, given its key's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Deliver it (the key is free, or this event is one that holds it).
    Deliver,
    /// Join the key's waiting events, before newer arrivals (it was in circulation).
    WaitFront,
    /// Join the key's waiting events, at the end.
    WaitBack,
}

/// The held keys of one stream, as the leader knows them: key -> token of the events that
/// may go ahead.
#[derive(Default)]
pub struct Holds {
    map: Mutex<HashMap<String, String>>,
}

impl Holds {
    pub fn gate(&self, key: &str, token: Option<&str>) -> Gate {
        let map = crate::lock(&self.map);
        match (map.get(key), token) {
            (None, _) => Gate::Deliver,
            (Some(t), Some(mine)) if t == mine => Gate::Deliver,
            (Some(_), Some(_)) => Gate::WaitFront,
            (Some(_), None) => Gate::WaitBack,
        }
    }

    /// The token an event must carry to go ahead, when the key is held.
    pub fn token(&self, key: &str) -> Option<String> {
        crate::lock(&self.map).get(key).cloned()
    }

    /// Record the key's token after a script changed it ("" frees the key).
    pub fn set(&self, key: &str, token: &str) {
        let mut map = crate::lock(&self.map);
        if token.is_empty() {
            map.remove(key);
        } else {
            map.insert(key.to_string(), token.to_string());
        }
    }

    pub fn len(&self) -> usize {
        crate::lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Load the stream's held keys from Redis (on taking the lease).
    pub async fn load(&self, con: &mut Conn, held_key: &str) -> crate::Result<()> {
        let raw: HashMap<String, String> = redis::cmd("HGETALL").arg(held_key).query_async(con).await?;
        let mut map = crate::lock(&self.map);
        map.clear();
        for (k, v) in raw {
            if let Some(token) = v.split_whitespace().next() {
                map.insert(k, token.to_string());
            }
        }
        Ok(())
    }
}

/// The time (unix ms) by which a held key's value says it should have changed again; None
/// for values written before there was one.
pub fn expected_by_ms(value: &str) -> Option<u64> {
    value.split_whitespace().nth(2)?.parse().ok()
}

/// A fresh token for a group of events allowed to go ahead on a held key.
pub fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Keeps (or waits for) the lease of one ordered stream until `done` fires, then gives it
/// up. The watch says whether we hold it.
pub async fn hold_lease(
    mut con: Conn,
    scripts: Arc<Scripts>,
    key: String,
    owner: String,
    ttl: Duration,
    leader: watch::Sender<bool>,
    done: CancellationToken,
) {
    let every = (ttl / 3).max(Duration::from_millis(50));
    let mut last_ok = tokio::time::Instant::now();
    loop {
        let held = match tokio::time::timeout(every, scripts.lease(&mut con, &key, &owner, ttl)).await {
            Ok(Ok(h)) => {
                last_ok = tokio::time::Instant::now();
                h
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, lease = %key, "cannot renew the ordering lease");
                // Not renewed: assume it is lost before it can have expired elsewhere.
                *leader.borrow() && last_ok.elapsed() < ttl * 2 / 3
            }
            Err(_) => *leader.borrow() && last_ok.elapsed() < ttl * 2 / 3,
        };
        if held != *leader.borrow() {
            if held {
                tracing::info!(lease = %key, %owner, "took the ordering lease: this worker delivers the stream");
            } else {
                tracing::warn!(lease = %key, %owner, "ordering lease held elsewhere or lost: standing by");
            }
            leader.send_replace(held);
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = done.cancelled() => break,
        }
    }
    if *leader.borrow() {
        match tokio::time::timeout(Duration::from_secs(2), scripts.unlease(&mut con, &key, &owner)).await {
            Ok(Ok(())) => tracing::info!(lease = %key, "ordering lease released"),
            _ => tracing::warn!(lease = %key, "could not release the ordering lease; it expires by itself"),
        }
        leader.send_replace(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_follows_the_token() {
        let h = Holds::default();
        assert_eq!(h.gate("k", None), Gate::Deliver);
        assert_eq!(h.gate("k", Some("old")), Gate::Deliver, "a free key lets anything through");
        h.set("k", "t1");
        assert_eq!(h.gate("k", Some("t1")), Gate::Deliver);
        assert_eq!(h.gate("k", Some("t0")), Gate::WaitFront, "in circulation before the key was held again");
        assert_eq!(h.gate("k", None), Gate::WaitBack);
        assert_eq!(h.gate("other", None), Gate::Deliver);
        h.set("k", "");
        assert_eq!(h.gate("k", None), Gate::Deliver);
        assert!(h.is_empty());
        assert_ne!(new_token(), new_token());
        assert_eq!(expected_by_ms("t 3 1700000000000"), Some(1_700_000_000_000));
        assert_eq!(expected_by_ms("t 3"), None);
    }
}
