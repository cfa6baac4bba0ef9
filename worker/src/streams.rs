//! Redis access: connections, stream commands and the atomic scripts every state change
//! goes through. An entry is acknowledged only in the same step that makes its next home
//! durable, or after it was delivered.

use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Client, RedisError, Script, Value};

use crate::event::RawEntry;
use crate::Result;

pub use backlog::layout::{cluster_seeds, Layout, RETRY_DELAYS, RETRY_STREAM};

/// Reconnects with backoff; `response_timeout` must exceed any BLOCK used on the connection.
fn manager_config(response_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(response_timeout))
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(2))
        .set_number_of_retries(2)
}

/// A connection to Redis: one server (a reconnecting `ConnectionManager`) or a Redis
/// Cluster (a slot-routed connection per node, following MOVED / ASK; made on first use).
/// Cheap to clone; clones share the connection.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(LazyCluster),
}

/// A cluster connection made on first use (and again after it could not be made), so that
/// the worker starts, and reports not-ready, while the cluster is down.
#[derive(Clone)]
pub struct LazyCluster {
    client: std::sync::Arc<redis::cluster::ClusterClient>,
    con: std::sync::Arc<tokio::sync::Mutex<Option<ClusterConnection>>>,
}

impl LazyCluster {
    async fn get(&self) -> redis::RedisResult<ClusterConnection> {
        let mut slot = self.con.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = self.client.get_async_connection().await?;
        *slot = Some(c.clone());
        Ok(c)
    }
}

impl Conn {
    /// In a cluster, before a step in another slot removes an event's previous home: wait (at
    /// most `timeout`) until a replica of `key`'s master has what this connection wrote there,
    /// so that a failover right after cannot lose the event's new home. Returns how many
    /// replicas have it; None on one Redis (nothing to wait for).
    pub async fn wait_replicated(&self, key: &str, timeout: Duration) -> Option<i64> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        let Conn::Cluster(lazy) = self else { return None };
        let mut con = lazy.get().await.ok()?;
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(1).arg(timeout.as_millis().max(1) as u64);
        let route =
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master)));
        match con.route_command(cmd, route).await {
            Ok(Value::Int(n)) => Some(n),
            _ => Some(0),
        }
    }

    /// How keys must be laid out on this connection's Redis.
    pub fn layout(&self) -> Layout {
        match self {
            Conn::Single(_) => Layout::Single,
            Conn::Cluster(_) => Layout::Cluster,
        }
    }
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(lazy) => Box::pin(async move { lazy.get().await?.req_packed_command(cmd).await }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(lazy) => {
                Box::pin(async move { lazy.get().await?.req_packed_commands(cmd, offset, count).await })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(_) => 0,
        }
    }
}

fn cluster_client(seeds: Vec<String>, response_timeout: Duration) -> Result<redis::cluster::ClusterClient> {
    Ok(redis::cluster::ClusterClient::builder(seeds)
        .connection_timeout(Duration::from_secs(2))
        .response_timeout(response_timeout)
        .retries(3)
        .build()?)
}

/// Connect now, with automatic reconnection afterwards.
pub async fn connect(url: &str, response_timeout: Duration) -> Result<Conn> {
    if let Some(seeds) = cluster_seeds(url) {
        let lazy = LazyCluster {
            client: std::sync::Arc::new(cluster_client(seeds, response_timeout)?),
            con: Default::default(),
        };
        lazy.get().await?;
        return Ok(Conn::Cluster(lazy));
    }
    Ok(Conn::Single(ConnectionManager::new_with_config(Client::open(url)?, manager_config(response_timeout)).await?))
}

/// Like [`connect`], but returns at once and connects in the background (the worker must
/// start, and report not-ready, while Redis is down).
pub fn connect_lazy(url: &str, response_timeout: Duration) -> Result<Conn> {
    if let Some(seeds) = cluster_seeds(url) {
        return Ok(Conn::Cluster(LazyCluster {
            client: std::sync::Arc::new(cluster_client(seeds, response_timeout)?),
            con: Default::default(),
        }));
    }
    Ok(Conn::Single(ConnectionManager::new_lazy_with_config(Client::open(url)?, manager_config(response_timeout))?))
}

pub fn is_nogroup(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

/// `XGROUP CREATE <key> <group> 0 MKSTREAM`; an existing group is fine.
pub async fn ensure_group(con: &mut Conn, key: &str, group: &str) -> Result<()> {
    let r: redis::RedisResult<Value> =
        redis::cmd("XGROUP").arg("CREATE").arg(key).arg(group).arg("0").arg("MKSTREAM").query_async(con).await;
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// XREADGROUP for one stream. `id` is ">" for new entries or an id for the own pending list.
pub async fn read_group(
    con: &mut Conn,
    key: &str,
    group: &str,
    consumer: &str,
    id: &str,
    count: usize,
    block: Option<Duration>,
) -> std::result::Result<Vec<RawEntry>, RedisError> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP").arg(group).arg(consumer).arg("COUNT").arg(count);
    if let Some(b) = block {
        cmd.arg("BLOCK").arg(b.as_millis() as u64);
    }
    cmd.arg("STREAMS").arg(key).arg(id);
    let v: Value = cmd.query_async(con).await?;
    let mut out = Vec::new();
    // RESP2: [[key, [entries]]]; RESP3: {key: [entries]}; Nil on timeout.
    match v {
        Value::Array(streams) => {
            for s in streams {
                if let Value::Array(mut kv) = s {
                    if kv.len() == 2 {
                        out.extend(parse_entries(kv.swap_remove(1)));
                    }
                }
            }
        }
        Value::Map(pairs) => {
            for (_, entries) in pairs {
                out.extend(parse_entries(entries));
            }
        }
        _ => {}
    }
    Ok(out)
}

/// XRANGE from `start` (inclusive), at most `count` entries.
pub async fn read_range(con: &mut Conn, key: &str, start: &str, count: usize) -> Result<Vec<RawEntry>> {
    let v: Value = redis::cmd("XRANGE").arg(key).arg(start).arg("+").arg("COUNT").arg(count).query_async(con).await?;
    Ok(parse_entries(v))
}

/// XAUTOCLAIM: take over entries idle longer than `min_idle` in any consumer's pending list.
/// Returns the next cursor and the claimed entries (deleted ones are dropped by Redis).
pub async fn autoclaim(
    con: &mut Conn,
    key: &str,
    group: &str,
    consumer: &str,
    min_idle: Duration,
    cursor: &str,
    count: usize,
) -> std::result::Result<(String, Vec<RawEntry>), RedisError> {
    let v: Value = redis::cmd("XAUTOCLAIM")
        .arg(key)
        .arg(group)
        .arg(consumer)
        .arg(min_idle.as_millis() as u64)
        .arg(cursor)
        .arg("COUNT")
        .arg(count)
        .query_async(con)
        .await?;
    let Value::Array(mut parts) = v else { return Ok(("0-0".into(), vec![])) };
    if parts.len() < 2 {
        return Ok(("0-0".into(), vec![]));
    }
    let entries = parse_entries(parts.swap_remove(1));
    let next = as_string(&parts[0]).unwrap_or_else(|| "0-0".into());
    Ok((next, entries))
}

/// Reset the idle time of entries this consumer is still working on, so that other
/// consumers do not take them over.
pub async fn touch(con: &mut Conn, key: &str, group: &str, consumer: &str, ids: &[String]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let _: Value =
        redis::cmd("XCLAIM").arg(key).arg(group).arg(consumer).arg(0).arg(ids).arg("JUSTID").query_async(con).await?;
    Ok(())
}

/// Acknowledge delivered entries in one round trip: XACK, XDEL (optional) and clear the
/// attempt counters of those that had failed before. `cleanups` (outbox rows to delete,
/// see `dlq/outbox.rs`) are recorded in the same transaction as the XACK: a delivered
/// event's clean-up is never lost, and never recorded for an entry not acknowledged.
pub async fn ack(
    con: &mut Conn,
    key: &str,
    group: &str,
    ids: &[String],
    delete: bool,
    counters: &[String],
    cleanups: Option<(&str, &[String])>,
) -> Result<()> {
    let mut p = redis::pipe();
    if let Some((set, rows)) = cleanups.filter(|(_, rows)| !rows.is_empty()) {
        p.atomic();
        p.cmd("SADD").arg(set).arg(rows).ignore();
    }
    p.cmd("XACK").arg(key).arg(group).arg(ids).ignore();
    if delete {
        p.cmd("XDEL").arg(key).arg(ids).ignore();
    }
    if !counters.is_empty() {
        p.cmd("DEL").arg(counters).ignore();
    }
    let _: () = p.query_async(con).await?;
    Ok(())
}

/// The failed-attempt counter of event `id` in `stream_key`.
pub fn counter_key(layout: Layout, stream_key: &str, id: &str) -> String {
    StreamKeys::new(layout, "", stream_key).counter(id)
}

/// INCR the attempt counter and refresh its TTL; returns the failures recorded so far.
pub async fn count_failure(con: &mut Conn, counter: &str, ttl: Duration) -> Result<u32> {
    // Atomic: a counter must never be left without its expiry.
    let (n,): (i64,) = redis::pipe()
        .atomic()
        .cmd("INCR")
        .arg(counter)
        .cmd("EXPIRE")
        .arg(counter)
        .arg(ttl.as_secs())
        .ignore()
        .query_async(con)
        .await?;
    Ok(n.clamp(0, u32::MAX as i64) as u32)
}

pub async fn get_failures(con: &mut Conn, counter: &str) -> Result<u32> {
    let n: Option<i64> = redis::cmd("GET").arg(counter).query_async(con).await?;
    Ok(n.unwrap_or(0).clamp(0, u32::MAX as i64) as u32)
}

/// Move an entry to the retry schedule and acknowledge it, atomically. With an ordering key
/// (ARGV[8]) the key becomes held by this entry (token ARGV[9]): later events of the key wait
/// behind it (see `HOLD_APPEND_LUA`).
const SCHEDULE_LUA: &str = r#"
-- Acknowledged already: this is a retried call whose first run went through. Do nothing twice.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return '' end
local args = {'meta', ARGV[5], 'stream', KEYS[1], 'payload', ARGV[6]}
if ARGV[7] ~= '' then table.insert(args, 'timeout'); table.insert(args, ARGV[7]) end
if ARGV[9] ~= '' then table.insert(args, 'holdToken'); table.insert(args, ARGV[9]) end
local rid = redis.call('XADD', KEYS[2], '*', unpack(args))
redis.call('ZADD', KEYS[3], ARGV[4], rid)
if ARGV[3] == '1' then redis.call('XDEL', KEYS[1], ARGV[2]) end
if ARGV[9] ~= '' then redis.call('HSET', KEYS[4], ARGV[8], ARGV[9] .. ' 1 ' .. ARGV[10]) end
-- An event without meta.id is counted under its entry id, which the retry changes: its
-- attempts travel in meta, and the old counter goes.
if ARGV[11] == '1' then redis.call('DEL', KEYS[5]) end
return rid
"#;

/// An event of a held key joins the key's hold stream (KEYS[4]) and is acknowledged, in one
/// step. 0 when the key is not held (any more): deliver it instead.
const HOLD_APPEND_LUA: &str = r#"
if redis.call('HEXISTS', KEYS[3], ARGV[7]) == 0 then return 0 end
-- Acknowledged already (a retried call whose first run went through): done.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 1 end
local args = {'meta', ARGV[4], 'payload', ARGV[5]}
if ARGV[6] ~= '' then table.insert(args, 'timeout'); table.insert(args, ARGV[6]) end
redis.call('XADD', KEYS[4], '*', unpack(args))
if ARGV[3] == '1' then redis.call('XDEL', KEYS[1], ARGV[2]) end
return 1
"#;

/// An event that held its key is done (delivered or dead-lettered): acknowledge it and, when
/// it was the last of its group, put the next group of held events (front stream first,
/// then back) at the end of the stream under a new token. Returns the key's token now
/// ('' when the key is free). Safe to run twice: once the entry is acknowledged, a second
/// run changes nothing and reports the key's state. With ARGV[9] = '1' it hands on a key
/// whose holder never came back (its value still ARGV[5], as the sweep saw it).
/// ARGV[10], when not empty, is an outbox row to clean up, recorded in KEYS[6] with the XACK.
/// Values are "<token> <events in circulation> <expected back by, unix ms>".
const HOLD_RELEASE_LUA: &str = r#"
local v = redis.call('HGET', KEYS[2], ARGV[4])
local tok, n = nil, nil
if v then tok, n = string.match(v, '^(%S+) (%d+)') end
local current = tok or ''
if ARGV[9] == '1' then
  if v ~= ARGV[5] then return current end
  n = 1
else
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return current end
  if ARGV[3] == '1' then redis.call('XDEL', KEYS[1], ARGV[2]) end
  redis.call('DEL', KEYS[5])
  if ARGV[10] ~= '' then redis.call('SADD', KEYS[6], ARGV[10]) end
  if tok ~= ARGV[5] then return current end
end
n = tonumber(n) - 1
if n > 0 then
  redis.call('HSET', KEYS[2], ARGV[4], tok .. ' ' .. n .. ' ' .. ARGV[8])
  return tok
end
local limit = tonumber(ARGV[7])
local moved = 0
for _, src in ipairs({KEYS[3], KEYS[4]}) do
  if moved < limit then
    local entries = redis.call('XRANGE', src, '-', '+', 'COUNT', limit - moved)
    for _, e in ipairs(entries) do
      local f = e[2]
      local args = {}
      for i = 1, #f, 2 do
        if f[i] ~= 'holdToken' then table.insert(args, f[i]); table.insert(args, f[i + 1]) end
      end
      table.insert(args, 'holdToken'); table.insert(args, ARGV[6])
      redis.call('XADD', KEYS[1], '*', unpack(args))
      redis.call('XDEL', src, e[1])
      moved = moved + 1
    end
    if redis.call('XLEN', src) == 0 then redis.call('DEL', src) end
  end
end
if moved == 0 then
  redis.call('HDEL', KEYS[2], ARGV[4])
  return ''
end
redis.call('HSET', KEYS[2], ARGV[4], ARGV[6] .. ' ' .. moved .. ' ' .. ARGV[8])
return ARGV[6]
"#;

/// Take or keep a lease: 1 when `ARGV[1]` holds it now.
const LEASE_LUA: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// Give a lease up, if it is ours.
const UNLEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Remove a consumer from the group only if it has nothing pending: 1 when removed.
const REMOVE_CONSUMER_LUA: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"#;

/// Move due retries back to their streams, atomically per call. Entries whose `stream`
/// field is missing go to the fallback stream rather than being dropped. With KEYS[3] (a
/// stream's own schedule, cluster layout) every entry goes back to KEYS[3], a declared key
/// of the same slot; the global schedule names its targets in the entries.
const MOVE_DUE_LUA: &str = r#"
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, rid in ipairs(ids) do
  local entries = redis.call('XRANGE', KEYS[1], rid, rid)
  if #entries > 0 then
    local f = entries[1][2]
    local target = nil
    local args = {}
    for i = 1, #f, 2 do
      if f[i] == 'stream' then target = f[i + 1] else
        table.insert(args, f[i]); table.insert(args, f[i + 1])
      end
    end
    if target == nil or target == '' then target = ARGV[4] end
    if string.sub(target, 1, #ARGV[3]) ~= ARGV[3] then target = ARGV[3] .. target end
    if KEYS[3] then target = KEYS[3] end
    if #args == 0 then args = {'meta', '{}'} end
    -- A target that cannot take it (wrong type) must not block every later retry: the
    -- entry goes to the fallback stream instead.
    local ok = redis.pcall('XADD', target, '*', unpack(args))
    if type(ok) == 'table' and ok.err then
      if KEYS[3] then
        -- The stream itself cannot take it (and nothing of it can be delivered): it stays
        -- scheduled, and the stream's other retries are not held up by an aborted script.
        rid = nil
      else
        redis.call('XADD', ARGV[4], '*', unpack(args))
      end
    end
    if rid then
      redis.call('XDEL', KEYS[1], rid)
      moved = moved + 1
    end
  end
  if rid then redis.call('ZREM', KEYS[2], rid) end
end
return moved
"#;

/// Due entries of a schedule (KEYS[1]), at most ARGV[2], each claimed by pushing its due
/// time to ARGV[3]: returns their ids.
const CLAIM_DUE_LUA: &str = r#"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, rid in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[3], rid) end
return ids
"#;

/// How long a worker has to move a claimed entry of the original's schedule in a cluster
/// before another may move it again.
pub const LEGACY_CLAIM: Duration = Duration::from_secs(60);

/// Longest wait for a replica before a step across slots removes an event's previous home
/// (see [`Conn::wait_replicated`]); without a replica in reach the step goes on.
pub const REPLICA_WAIT: Duration = Duration::from_secs(1);

pub struct Scripts {
    schedule: Script,
    move_due: Script,
    hold_append: Script,
    hold_release: Script,
    lease: Script,
    unlease: Script,
    remove_consumer: Script,
    claim_due: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Self {
            schedule: Script::new(SCHEDULE_LUA),
            move_due: Script::new(MOVE_DUE_LUA),
            hold_append: Script::new(HOLD_APPEND_LUA),
            hold_release: Script::new(HOLD_RELEASE_LUA),
            lease: Script::new(LEASE_LUA),
            unlease: Script::new(UNLEASE_LUA),
            remove_consumer: Script::new(REMOVE_CONSUMER_LUA),
            claim_due: Script::new(CLAIM_DUE_LUA),
        }
    }
}

/// The worker's keys for one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamKeys {
    /// The stream itself (the producers' key, unchanged in both layouts).
    pub stream: String,
    /// Scheduled retries: the entries, and their due times.
    pub retry: String,
    pub delays: String,
    /// Held ordering keys, and the ordering lease.
    pub held: String,
    pub lease: String,
    /// Outbox rows whose events were delivered, waiting for their delete (`dlq/outbox.rs`).
    pub cleanup: String,
    /// The stream key as it appears inside the other keys (`{events:fast}` in a cluster).
    tag: String,
    group: String,
}

impl StreamKeys {
    /// In the cluster layout `stream` must have a tag (`Layout::tag`; the configuration
    /// refuses streams without one) and `group` no braces.
    pub fn new(layout: Layout, group: &str, stream: &str) -> Self {
        let tag = layout.tag(stream).unwrap_or_else(|| stream.to_string());
        let cleanup = match layout {
            // The original layout has one set for the group.
            Layout::Single => format!("eventworker:outbox:{group}:delivered"),
            Layout::Cluster => format!("eventworker:outbox:{group}:{tag}:delivered"),
        };
        Self {
            stream: stream.to_string(),
            held: format!("eventworker:held:{group}:{tag}"),
            lease: format!("eventworker:lease:{group}:{tag}"),
            retry: layout.retry_stream(stream),
            delays: layout.retry_delays(stream),
            cleanup,
            tag,
            group: group.to_string(),
        }
    }

    /// The failed-attempt counter of event `id`.
    pub fn counter(&self, id: &str) -> String {
        format!("err_count:{}:{id}", self.tag)
    }

    /// Where the waiting events of ordering key `key` live.
    pub fn hold(&self, key: &str) -> HoldKeys {
        let base = format!("eventworker:hold:{}:{}:{key}", self.group, self.tag);
        HoldKeys { held: self.held.clone(), front: format!("{base}:front"), back: format!("{base}:back") }
    }
}

/// Where a held ordering key's waiting events live. `front` takes events that were already
/// in circulation when the key was held again (they go before `back`, the newer arrivals).
pub struct HoldKeys {
    pub held: String,
    pub front: String,
    pub back: String,
}

/// One scheduled retry.
pub struct ScheduleReq<'a> {
    pub keys: &'a StreamKeys,
    pub group: &'a str,
    pub entry_id: &'a str,
    pub delete: bool,
    pub due_unix: f64,
    pub meta_json: &'a str,
    pub payload: &'a [u8],
    pub timeout: Option<&'a [u8]>,
    /// Hold this ordering key (held-keys hash, key, token) while the entry waits.
    pub hold: Option<(&'a str, &'a str, &'a str)>,
    /// When the held key should see this entry again at the latest (unix ms), for the sweep.
    pub expect_by_ms: u64,
    /// An attempt counter to delete with the move (events without `meta.id`).
    pub drop_counter: Option<&'a str>,
}

/// Hand a held key on: after its holder finished, or (`finished` None) because the holder
/// never came back by the time the sweep looked.
pub struct ReleaseReq<'a> {
    pub stream_key: &'a str,
    pub group: &'a str,
    /// The finished entry and its attempt counter.
    pub finished: Option<(&'a str, &'a str)>,
    pub delete: bool,
    pub key: &'a str,
    pub keys: &'a HoldKeys,
    /// The finished entry's token, or the key's whole value as the sweep saw it.
    pub token: &'a str,
    pub next_token: &'a str,
    pub batch: usize,
    /// When the key should change again at the latest (unix ms).
    pub expect_by_ms: u64,
    /// An outbox row to delete, recorded with the acknowledgement: (set, row id).
    pub cleanup: Option<(&'a str, &'a str)>,
}

/// An event joining a held key's waiting events.
pub struct AppendReq<'a> {
    pub stream_key: &'a str,
    pub group: &'a str,
    pub entry_id: &'a str,
    pub delete: bool,
    pub meta_json: &'a str,
    pub payload: &'a [u8],
    pub timeout: Option<&'a [u8]>,
    pub key: &'a str,
    pub keys: &'a HoldKeys,
    /// Into the front stream (was in circulation) rather than the back.
    pub front: bool,
}

impl Scripts {
    pub async fn schedule(&self, con: &mut Conn, r: &ScheduleReq<'_>) -> Result<String> {
        let id: String = self
            .schedule
            .key(&r.keys.stream)
            .key(&r.keys.retry)
            .key(&r.keys.delays)
            .arg(r.group)
            .arg(r.entry_id)
            .arg(if r.delete { "1" } else { "0" })
            .arg(format!("{:.3}", r.due_unix))
            .arg(r.meta_json)
            .arg(r.payload)
            .arg(r.timeout.unwrap_or(b""))
            .arg(r.hold.map(|h| h.1).unwrap_or(""))
            .arg(r.hold.map(|h| h.2).unwrap_or(""))
            .key(r.hold.map(|h| h.0).unwrap_or(&r.keys.delays))
            .arg(r.expect_by_ms)
            .key(r.drop_counter.unwrap_or(&r.keys.delays))
            .arg(if r.drop_counter.is_some() { "1" } else { "0" })
            .invoke_async(con)
            .await?;
        Ok(id)
    }

    /// True when the event joined the key's waiting events; false when the key is free.
    pub async fn hold_append(&self, con: &mut Conn, r: &AppendReq<'_>) -> Result<bool> {
        let n: i64 = self
            .hold_append
            .key(r.stream_key)
            // Not used by the script; any key of the stream's slot.
            .key(&r.keys.held)
            .key(&r.keys.held)
            .key(if r.front { &r.keys.front } else { &r.keys.back })
            .arg(r.group)
            .arg(r.entry_id)
            .arg(if r.delete { "1" } else { "0" })
            .arg(r.meta_json)
            .arg(r.payload)
            .arg(r.timeout.unwrap_or(b""))
            .arg(r.key)
            .invoke_async(con)
            .await?;
        Ok(n == 1)
    }

    /// Hand a held key on (see [`ReleaseReq`]). The key's token now ("" when it is free).
    pub async fn hold_release(&self, con: &mut Conn, r: &ReleaseReq<'_>) -> Result<String> {
        let (entry, counter) = r.finished.unwrap_or(("0-0", ""));
        Ok(self
            .hold_release
            .key(r.stream_key)
            .key(&r.keys.held)
            .key(&r.keys.front)
            .key(&r.keys.back)
            .key(if counter.is_empty() { &r.keys.held } else { counter })
            .arg(r.group)
            .arg(entry)
            .arg(if r.delete { "1" } else { "0" })
            .arg(r.key)
            .arg(r.token)
            .arg(r.next_token)
            .arg(r.batch)
            .arg(r.expect_by_ms)
            .arg(if r.finished.is_none() { "1" } else { "0" })
            .key(r.cleanup.map(|c| c.0).unwrap_or(&r.keys.held))
            .arg(r.cleanup.map(|c| c.1).unwrap_or(""))
            .invoke_async(con)
            .await?)
    }

    /// Take or renew a lease for `ttl`; true when `owner` holds it.
    pub async fn lease(&self, con: &mut Conn, key: &str, owner: &str, ttl: Duration) -> Result<bool> {
        let n: i64 = self.lease.key(key).arg(owner).arg(ttl.as_millis().max(1) as u64).invoke_async(con).await?;
        Ok(n == 1)
    }

    pub async fn unlease(&self, con: &mut Conn, key: &str, owner: &str) -> Result<()> {
        let _: i64 = self.unlease.key(key).arg(owner).invoke_async(con).await?;
        Ok(())
    }

    /// Remove `consumer` from the group if nothing is pending for it; true when removed.
    pub async fn remove_consumer(&self, con: &mut Conn, key: &str, group: &str, consumer: &str) -> Result<bool> {
        let n: i64 = self.remove_consumer.key(key).arg(group).arg(consumer).invoke_async(con).await?;
        Ok(n == 1)
    }

    /// Move due retries of the global schedule (single layout) back to the streams their
    /// entries name. Returns how many entries were moved.
    pub async fn move_due(&self, con: &mut Conn, now_unix: f64, limit: usize, fallback: &str) -> Result<usize> {
        let n: i64 = self
            .move_due
            .key(RETRY_STREAM)
            .key(RETRY_DELAYS)
            .arg(format!("{now_unix:.3}"))
            .arg(limit)
            .arg(crate::config::STREAM_PREFIX)
            .arg(fallback)
            .invoke_async(con)
            .await?;
        Ok(n.max(0) as usize)
    }

    /// Move due retries of one stream's own schedule (cluster layout) back to the stream.
    pub async fn move_due_own(&self, con: &mut Conn, keys: &StreamKeys, now_unix: f64, limit: usize) -> Result<usize> {
        let n: i64 = self
            .move_due
            .key(&keys.retry)
            .key(&keys.delays)
            .key(&keys.stream)
            .arg(format!("{now_unix:.3}"))
            .arg(limit)
            .arg(crate::config::STREAM_PREFIX)
            .arg(&keys.stream)
            .invoke_async(con)
            .await?;
        Ok(n.max(0) as usize)
    }

    /// Move due retries that the original worker scheduled in the global keys back to their
    /// streams, in a cluster, where the schedule and the streams live in different slots:
    /// not atomic, so at least once. Each due entry is first claimed for [`LEGACY_CLAIM`]
    /// (its due time pushed back, in one step), so that workers do not move it twice; a
    /// worker that dies after the XADD leaves it to be moved again once the claim ends.
    pub async fn move_due_legacy(&self, con: &mut Conn, now_unix: f64, limit: usize, fallback: &str) -> Result<usize> {
        let ids: Vec<String> = self
            .claim_due
            .key(RETRY_DELAYS)
            .arg(format!("{now_unix:.3}"))
            .arg(limit)
            .arg(format!("{:.3}", now_unix + LEGACY_CLAIM.as_secs_f64()))
            .invoke_async(con)
            .await?;
        let mut moved = 0;
        for rid in &ids {
            let found = read_range(con, RETRY_STREAM, rid, 1).await?;
            if let Some(entry) = found.into_iter().find(|e| &e.id == rid) {
                let mut target = None;
                let mut fields: Vec<(String, Bytes)> = Vec::new();
                for (k, v) in entry.fields.unwrap_or_default() {
                    if k == "stream" {
                        target = Some(String::from_utf8_lossy(&v).into_owned());
                    } else {
                        fields.push((k, v));
                    }
                }
                // As the script does: a bare name gets the prefix, a missing one the fallback.
                let target = match target.filter(|t| !t.is_empty()) {
                    None => fallback.to_string(),
                    Some(t) if t.starts_with(crate::config::STREAM_PREFIX) => t,
                    Some(t) => crate::config::stream_key(&t),
                };
                if fields.is_empty() {
                    fields.push(("meta".into(), Bytes::from_static(b"{}")));
                }
                let add = |key: &str| {
                    let mut c = redis::cmd("XADD");
                    c.arg(key).arg("*");
                    for (k, v) in &fields {
                        c.arg(k).arg(v.as_ref());
                    }
                    c
                };
                let added: redis::RedisResult<String> = add(&target).query_async(con).await;
                let home = match added {
                    Ok(_) => target.as_str(),
                    // A target that cannot take it (wrong type) must not block later retries.
                    Err(e) if e.code() == Some("WRONGTYPE") => {
                        let _: String = add(fallback).query_async(con).await?;
                        fallback
                    }
                    Err(e) => return Err(e.into()),
                };
                con.wait_replicated(home, REPLICA_WAIT).await;
                let _: i64 = redis::cmd("XDEL").arg(RETRY_STREAM).arg(rid).query_async(con).await?;
                moved += 1;
            }
            let _: i64 = redis::cmd("ZREM").arg(RETRY_DELAYS).arg(rid).query_async(con).await?;
        }
        Ok(moved)
    }
}

/// One consumer of a group, from XINFO CONSUMERS.
#[derive(Debug, Clone)]
pub struct ConsumerInfo {
    pub name: String,
    pub pending: i64,
    /// Since its last read (or claim).
    pub idle: Duration,
}

pub async fn consumers(con: &mut Conn, key: &str, group: &str) -> Result<Vec<ConsumerInfo>> {
    let v: Value = redis::cmd("XINFO").arg("CONSUMERS").arg(key).arg(group).query_async(con).await?;
    let Value::Array(items) = v else { return Ok(vec![]) };
    Ok(items
        .into_iter()
        .filter_map(|c| {
            let fields = pairs(c);
            let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
            Some(ConsumerInfo {
                name: get("name").and_then(as_string)?,
                pending: get("pending").and_then(as_i64).unwrap_or(0),
                idle: Duration::from_millis(get("idle").and_then(as_i64).unwrap_or(0).max(0) as u64),
            })
        })
        .collect())
}

/// Retries scheduled for later over `streams` (see `backlog::layout::scheduled`).
pub async fn scheduled_count(con: &mut Conn, layout: Layout, streams: &[String]) -> Result<i64> {
    Ok(backlog::layout::scheduled(con, layout, streams).await?)
}

fn pairs(v: Value) -> Vec<(String, Value)> {
    match v {
        Value::Array(items) => {
            let mut out = Vec::new();
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let Some(k) = as_string(&k) {
                    out.push((k, v));
                }
            }
            out
        }
        Value::Map(m) => m.into_iter().filter_map(|(k, v)| as_string(&k).map(|k| (k, v))).collect(),
        _ => vec![],
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn into_string(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        other => as_string(&other),
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => as_string(other)?.parse().ok(),
    }
}

fn parse_entries(v: Value) -> Vec<RawEntry> {
    let Value::Array(items) = v else { return vec![] };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(mut parts) = item else { return None };
            if parts.len() < 2 {
                return None;
            }
            let fields = match parts.swap_remove(1) {
                Value::Array(kvs) => {
                    let mut out = Vec::with_capacity(kvs.len() / 2);
                    let mut it = kvs.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        let v = match v {
                            Value::BulkString(b) => Bytes::from(b),
                            other => Bytes::from(as_string(&other).unwrap_or_default()),
                        };
                        out.push((into_string(k).unwrap_or_default(), v));
                    }
                    Some(out)
                }
                Value::Map(m) => Some(
                    m.into_iter()
                        .map(|(k, v)| {
                            (as_string(&k).unwrap_or_default(), Bytes::from(as_string(&v).unwrap_or_default()))
                        })
                        .collect(),
                ),
                _ => None,
            };
            Some(RawEntry { id: into_string(parts.swap_remove(0))?, fields })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_layout_keeps_the_original_names_and_cluster_keys_share_their_streams_slot() {
        let k = StreamKeys::new(Layout::Single, "workers", "events:fast");
        assert_eq!((k.retry.as_str(), k.delays.as_str()), ("events:retry", "events:retry:delays"));
        assert_eq!(k.held, "eventworker:held:workers:events:fast");
        assert_eq!(k.lease, "eventworker:lease:workers:events:fast");
        assert_eq!(k.counter("42"), "err_count:events:fast:42");
        let h = k.hold("user-1");
        assert_eq!(h.front, "eventworker:hold:workers:events:fast:user-1:front");
        assert_eq!(counter_key(Layout::Single, "events:fast", "42"), k.counter("42"));
        assert_eq!(k.cleanup, "eventworker:outbox:workers:delivered");

        let c = StreamKeys::new(Layout::Cluster, "workers", "events:fast");
        let h = c.hold("user-{1}");
        let all = [
            c.retry.clone(),
            c.delays.clone(),
            c.held.clone(),
            c.lease.clone(),
            c.counter("42"),
            c.cleanup.clone(),
            h.front,
            h.back,
        ];
        for key in all {
            // Redis hashes the first {...} of a key: here always the stream key.
            let tag = key.split_once('{').and_then(|(_, rest)| rest.split_once('}')).map(|(t, _)| t);
            assert_eq!(tag, Some("events:fast"), "{key}");
        }
        assert_eq!(c.retry, "{events:fast}:retry");
    }
}
