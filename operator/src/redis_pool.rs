//! The operator's Redis connections: one multiplexed connection per Redis (URL; a Redis
//! Cluster's `redis+cluster://` URL gets a slot-routed cluster connection), reused
//! across reconciles, bounded in number, with connect and response timeouts; and errors
//! worded for a status (host and port, never credentials, never the server's free text).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::AsyncConnectionConfig;
use tokio::time::Instant;

use crate::crd::StreamStatus;

/// Most Redis servers the operator keeps a connection to; the least recently used goes.
const MAX_CONNECTIONS: usize = 256;
/// A connection unused this long is closed.
const IDLE: Duration = Duration::from_secs(600);

pub struct RedisPool {
    timeout: Duration,
    conns: Mutex<HashMap<String, (Con, Instant)>>,
}

/// One Redis server's connection, or a cluster's.
#[derive(Clone)]
enum Con {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Con {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Con::Single(c) => c.req_packed_command(cmd),
            Con::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Con::Single(c) => c.req_packed_commands(cmd, offset, count),
            Con::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Con::Single(c) => c.get_db(),
            Con::Cluster(_) => 0,
        }
    }
}

impl RedisPool {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout, conns: Mutex::new(HashMap::new()) }
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        crate::lock(&self.conns).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pooled connection to `url` (reused: true), or a new one.
    async fn connection(&self, url: &str) -> Result<(Con, bool), String> {
        let now = Instant::now();
        {
            let mut conns = crate::lock(&self.conns);
            conns.retain(|_, (_, used)| now.saturating_duration_since(*used) < IDLE);
            if let Some((con, used)) = conns.get_mut(url) {
                *used = now;
                return Ok((con.clone(), true));
            }
        }
        let con = match backlog::layout::cluster_seeds(url) {
            Some(seeds) => Con::Cluster(
                redis::cluster::ClusterClient::builder(seeds)
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout)
                    .build()
                    .map_err(|e| describe(url, &e))?
                    .get_async_connection()
                    .await
                    .map_err(|e| describe(url, &e))?,
            ),
            None => {
                let client = redis::Client::open(url).map_err(|e| describe(url, &e))?;
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout));
                Con::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                        .map_err(|e| describe(url, &e))?,
                )
            }
        };
        let mut conns = crate::lock(&self.conns);
        if conns.len() >= MAX_CONNECTIONS {
            if let Some(oldest) = conns.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone()) {
                conns.remove(&oldest);
            }
        }
        conns.insert(url.to_string(), (con.clone(), now));
        Ok((con, false))
    }

    fn forget(&self, url: &str) {
        crate::lock(&self.conns).remove(url);
    }

    /// Each stream's backlog for `group`, and the retries scheduled, within the timeout.
    /// The error is fit for a status: the Redis's host and port and what went wrong. A
    /// pooled connection that fails (Redis restarted since) is replaced once at once.
    pub async fn read_backlog(
        &self,
        url: &str,
        streams: &[String],
        group: &str,
    ) -> Result<(Vec<StreamStatus>, i64), String> {
        let limit = self.timeout * 2;
        let deadline = tokio::time::Instant::now() + limit;
        let mut fresh_tried = false;
        loop {
            let attempt = async {
                let (mut con, reused) = self.connection(url).await.map_err(|e| (e, false))?;
                read(&mut con, url, streams, group).await.map_err(|e| (e, reused))
            };
            let (e, reused) = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(read)) => return Ok(read),
                Ok(Err(failed)) => failed,
                Err(_) => (format!("redis at {}: no answer within {limit:?}", address(url)), false),
            };
            // The next read starts from a fresh connection.
            self.forget(url);
            if reused && !fresh_tried && tokio::time::Instant::now() < deadline {
                fresh_tried = true;
                continue;
            }
            return Err(e);
        }
    }
}

async fn read(con: &mut Con, url: &str, streams: &[String], group: &str) -> Result<(Vec<StreamStatus>, i64), String> {
    let now = backlog::now_unix_ms();
    let mut out = Vec::new();
    let mut keys = Vec::new();
    for s in streams {
        let key = format!("events:{s}");
        keys.push(key.clone());
        let b = backlog::read(con, &key, group).await.map_err(|e| describe(url, &e))?;
        out.push(StreamStatus {
            length: b.length,
            pending: b.pending,
            lag: b.undelivered,
            backlog: b.total(),
            oldest_age_seconds: (b.oldest_age_secs(now) * 10.0).round() / 10.0,
            oldest_undelivered_age_seconds: (b.oldest_undelivered_age_secs(now) * 10.0).round() / 10.0,
            exact: b.exact,
            name: key,
        });
    }
    let layout = match con {
        Con::Single(_) => backlog::layout::Layout::Single,
        Con::Cluster(_) => backlog::layout::Layout::Cluster,
    };
    let scheduled = backlog::layout::scheduled(con, layout, &keys).await.map_err(|e| describe(url, &e))?;
    Ok((out, scheduled))
}

/// `host:port` of a Redis URL, without scheme, credentials or database.
pub fn address(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    let host: String = host.chars().filter(|c| !c.is_control()).take(255).collect();
    if host.is_empty() {
        "(no host)".into()
    } else {
        host
    }
}

/// What went wrong, in words of our own: Redis's and the OS's messages can carry the URL
/// (with its password) or whatever a server chose to answer.
pub fn describe(url: &str, e: &redis::RedisError) -> String {
    use redis::ErrorKind;
    let what = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connection_refusal() {
        "connection refused".to_string()
    } else if e.kind() == ErrorKind::AuthenticationFailed || e.code() == Some("NOAUTH") || e.code() == Some("WRONGPASS")
    {
        "authentication failed (check redis.passwordSecretRef)".to_string()
    } else if e.kind() == ErrorKind::InvalidClientConfig {
        "invalid Redis URL".to_string()
    } else if e.is_io_error() {
        let io = std::error::Error::source(e).and_then(|s| s.downcast_ref::<std::io::Error>()).map(|io| io.kind());
        match io {
            Some(std::io::ErrorKind::NotFound) => "host name not found".to_string(),
            Some(kind) => format!("connection failed ({kind})"),
            None => "connection failed".to_string(),
        }
    } else if let Some(code) = e.code() {
        // Server error codes are one word (NOPERM, LOADING, ...): safe and useful.
        let code: String = code.chars().filter(|c| c.is_ascii_alphanumeric()).take(32).collect();
        format!("server answered {code}")
    } else {
        format!("{:?} error", e.kind())
    };
    format!("redis at {}: {what}", address(url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_carry_no_credentials() {
        assert_eq!(address("redis://:s3cret@redis.shop:6380/2"), "redis.shop:6380");
        assert_eq!(address("rediss://user:p%40ss@10.0.0.1:6379"), "10.0.0.1:6379");
        assert_eq!(address("redis://redis:6379?protocol=resp3"), "redis:6379");
        assert_eq!(address("redis://"), "(no host)");
        assert_eq!(address("redis+cluster://:pw@a:7000,b:7001"), "a:7000,b:7001");
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_described_without_the_password() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let pool = RedisPool::new(Duration::from_millis(500));
        let url = format!("redis://:hunter2@127.0.0.1:{port}");
        let err = pool.read_backlog(&url, &["fast".into()], "g").await.unwrap_err();
        assert_eq!(err, format!("redis at 127.0.0.1:{port}: connection refused"));
        assert!(pool.is_empty(), "a failed connection is not kept");
    }
}
