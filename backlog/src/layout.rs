//! Where the worker keeps a stream's scheduled retries, shared by the worker (which writes
//! them) and the operator (which reports and scales on them), and how a Redis Cluster is
//! addressed.
//!
//! - **Single** Redis: the original worker's global keys, `events:retry` (the entries) and
//!   `events:retry:delays` (their due times), for every stream. The wire contract with the
//!   Python worker and its tools.
//! - **Cluster**: a script may only touch keys of one hash slot, so each stream has its own,
//!   with the stream key as hash tag: `{events:fast}:retry` and `{events:fast}:retry:delays`
//!   live in the slot of `events:fast` (a stream key with a tag of its own is used as it
//!   is: `events:{orders}:eu:retry`). The global keys are
//!   still read there (retries the original worker scheduled), but not atomically.

use redis::aio::ConnectionLike;
use redis::RedisResult;

/// The original's scheduled retries (single layout; read, never written, in a cluster).
pub const RETRY_STREAM: &str = "events:retry";
/// Their due times (sorted set, score: unix seconds).
pub const RETRY_DELAYS: &str = "events:retry:delays";

/// How the worker names its own keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    #[default]
    Single,
    Cluster,
}

impl Layout {
    /// How `stream` appears inside the worker's keys for it: the stream key itself (single),
    /// or a hash tag that puts a key in the stream's slot (cluster; None when no tag can,
    /// see [`cluster_tag`]).
    pub fn tag(self, stream: &str) -> Option<String> {
        match self {
            Layout::Single => Some(stream.to_string()),
            Layout::Cluster => cluster_tag(stream),
        }
    }

    /// Where the retries of `stream` are scheduled: the entries.
    pub fn retry_stream(self, stream: &str) -> String {
        match self.tag(stream) {
            Some(tag) if self == Layout::Cluster => format!("{tag}:retry"),
            _ => RETRY_STREAM.to_string(),
        }
    }

    /// Where the retries of `stream` are scheduled: their due times.
    pub fn retry_delays(self, stream: &str) -> String {
        match self.tag(stream) {
            Some(tag) if self == Layout::Cluster => format!("{tag}:retry:delays"),
            _ => RETRY_DELAYS.to_string(),
        }
    }
}

/// The part of `key` Redis Cluster hashes to pick its slot: the text between the first `{`
/// and the first `}` after it when that is not empty, else the whole key.
pub fn hash_part(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// How `key` appears inside the worker's keys for it in a cluster, so that they share its
/// slot and are its own: `{events:fast}` for `events:fast` (the whole key as hash tag); a
/// key with a hash tag of its own stays as it is (`events:{orders}:eu`), so two streams
/// that share a tag still have keys of their own. None for keys no tag can follow (a
/// hashed part with a `}`, as in `events:a}b`).
pub fn cluster_tag(key: &str) -> Option<String> {
    let part = hash_part(key);
    if part != key {
        return Some(key.to_string());
    }
    (!part.contains('}')).then(|| format!("{{{part}}}"))
}

/// The seed nodes of a cluster URL, `redis+cluster://[user:password@]host:port[,host:port...]`
/// (`rediss+cluster://` for TLS), as one `redis://` (`rediss://`) URL each; None for any
/// other URL.
pub fn cluster_seeds(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = match scheme {
        "redis+cluster" => "redis",
        "rediss+cluster" => "rediss",
        _ => return None,
    };
    let rest = rest.trim_end_matches('/');
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((a, h)) => (format!("{a}@"), h),
        None => (String::new(), rest),
    };
    Some(hosts.split(',').map(str::trim).filter(|h| !h.is_empty()).map(|h| format!("{scheme}://{auth}{h}")).collect())
}

/// Retries scheduled for later, over `streams`: the global schedule, and in a cluster each
/// stream's own as well.
pub async fn scheduled<C: ConnectionLike>(con: &mut C, layout: Layout, streams: &[String]) -> RedisResult<i64> {
    let mut n: i64 = redis::cmd("ZCARD").arg(RETRY_DELAYS).query_async(con).await?;
    if layout == Layout::Cluster {
        for s in streams {
            let delays = layout.retry_delays(s);
            if delays != RETRY_DELAYS {
                let m: i64 = redis::cmd("ZCARD").arg(delays).query_async(con).await?;
                n += m;
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_the_slot_redis_computes() {
        assert_eq!(hash_part("events:fast"), "events:fast");
        assert_eq!(hash_part("events:{orders}:eu"), "orders");
        assert_eq!(hash_part("events:{}x"), "events:{}x");
        assert_eq!(hash_part("events:{x"), "events:{x");
        assert_eq!(cluster_tag("events:fast").as_deref(), Some("{events:fast}"));
        assert_eq!(cluster_tag("events:{orders}:eu").as_deref(), Some("events:{orders}:eu"));
        assert_eq!(cluster_tag("events:{x").as_deref(), Some("{events:{x}"));
        assert_eq!(hash_part("{events:{x}:retry"), "events:{x");
        assert_eq!(cluster_tag("events:a}b"), None);
        assert_eq!(cluster_tag("events:{}x"), None);
        // Two streams with one tag: each its own keys, both in the tag's slot.
        assert_ne!(Layout::Cluster.retry_stream("{orders}:eu"), Layout::Cluster.retry_stream("{orders}:us"));
        assert_eq!(Layout::Cluster.retry_stream("{orders}:eu"), "{orders}:eu:retry");
        for key in ["events:fast", "events:{orders}:eu", "a{{b}c", "events:{x"] {
            let tag = cluster_tag(key).unwrap();
            assert_eq!(hash_part(&format!("{tag}:retry")), hash_part(key), "{key}");
            assert_eq!(hash_part(&format!("eventworker:held:g:{tag}")), hash_part(key), "{key}");
        }
    }

    #[test]
    fn the_single_layout_keeps_the_originals_keys() {
        assert_eq!(Layout::Single.retry_stream("events:fast"), "events:retry");
        assert_eq!(Layout::Single.retry_delays("events:fast"), "events:retry:delays");
        assert_eq!(Layout::Cluster.retry_stream("events:fast"), "{events:fast}:retry");
        assert_eq!(Layout::Cluster.retry_delays("events:fast"), "{events:fast}:retry:delays");
    }

    #[test]
    fn cluster_urls_name_their_seed_nodes() {
        assert_eq!(
            cluster_seeds("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001/"),
            Some(vec!["redis://:pw@10.0.0.1:7000".to_string(), "redis://:pw@10.0.0.2:7001".to_string()])
        );
        assert_eq!(cluster_seeds("rediss+cluster://c.example:6379"), Some(vec!["rediss://c.example:6379".to_string()]));
        assert_eq!(cluster_seeds("redis://localhost:6379"), None);
        assert_eq!(cluster_seeds("localhost:6379"), None);
    }
}
