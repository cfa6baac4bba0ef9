//! The read side of one stream: XREADGROUP with read slots, own pending list recovery,
//! takeover of dead consumers' entries, the ordering lease, ordering lanes, and batched
//! acknowledgements. What happens to each event is `handler.rs`; this file knows neither
//! hosts nor limits.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::streams::Conn;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Health;
use crate::config::{stream_key, Config, Ordering};
use crate::delivery::Deliverer;
use crate::dlq::Sink;
use crate::event::{self, Event, RawEntry};
use crate::hosts::Hosts;
use crate::metrics::Metrics;
use crate::ordering::{self, Gate, Holds};
use crate::retry::backoff;
use crate::shutdown::Shutdown;
use crate::streams::{self, Scripts};

/// How long one XREADGROUP waits for new entries; bounds how late a stop is noticed.
const BLOCK: Duration = Duration::from_secs(1);
/// Most entries read per round trip.
const READ_BATCH: usize = 256;
/// Events that may wait for a host without holding a read slot, per read slot.
const PARKED_PER_SLOT: usize = 4;
/// Longest wait for more free slots before a read, when nearly all are taken.
const BATCH_WAIT: Duration = Duration::from_millis(2);
/// Most entries acknowledged per round trip.
const ACK_BATCH: usize = 512;
/// How often the lease holder looks for held keys whose holder never came back.
const HOLD_SWEEP: Duration = Duration::from_secs(30);

/// Everything the stream consumers share.
pub struct Worker {
    pub cfg: Arc<Config>,
    pub redis: Conn,
    pub scripts: Arc<Scripts>,
    pub deliverer: Deliverer,
    pub sink: Sink,
    pub metrics: Arc<Metrics>,
    pub hosts: Arc<Hosts>,
    pub health: Arc<Health>,
    pub shutdown: Shutdown,
    /// Wakes the outbox clean-up when delivered rows were recorded.
    pub outbox_wake: Arc<tokio::sync::Notify>,
}

impl Worker {
    /// The outbox row a delivered event leaves to delete, when the sink may be an outbox
    /// table: the event's `meta.id` (events without one have no row).
    pub(crate) fn cleanup_for(&self, ev: &Event) -> Option<String> {
        match &self.sink {
            Sink::Sql(s) if s.may_be_outbox() => ev.id.clone(),
            _ => None,
        }
    }
}

impl Worker {
    /// Run a Redis operation until it succeeds; None once the hard stop fired (the entry
    /// then stays pending and is recovered later).
    pub(crate) async fn redis_retry<T, F, Fut>(&self, op: &'static str, mut f: F) -> Option<T>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = crate::Result<T>>,
    {
        for n in 1.. {
            match f(self.redis.clone()).await {
                Ok(v) => return Some(v),
                Err(e) => {
                    self.metrics.redis_errors.with_label_values(&[op]).inc();
                    self.health.redis_ok.store(false, AtomicOrdering::Relaxed);
                    tracing::warn!(op, redis = %self.cfg.redis_address(), error = %e, "redis operation failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(Duration::from_millis(100), n, Duration::from_secs(5))) => {}
                        _ = self.shutdown.hard.cancelled() => return None,
                    }
                }
            }
        }
        None
    }
}

pub(crate) struct Ack {
    pub id: String,
    /// Attempt counter to clear with the acknowledgement.
    pub counter: Option<String>,
    /// Outbox row of a delivered event, to delete (recorded with the acknowledgement).
    pub cleanup: Option<String>,
}

/// An entry being worked on. While it lives the entry counts as in flight (kept fresh
/// against takeover) and holds its slot; however the work ends (finished, failed, a
/// panicking task), dropping it frees both.
pub(crate) struct Claim {
    sc: Arc<Stream>,
    id: String,
    /// A read slot, or a parking slot while waiting for a host.
    pub slot: Option<OwnedSemaphorePermit>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        crate::lock(&self.sc.in_flight).remove(&self.id);
        self.sc.in_flight_gauge.dec();
    }
}

pub(crate) struct Job {
    pub ev: Event,
    pub recovered: bool,
    pub claim: Claim,
}

/// One stream's consumer state.
pub(crate) struct Stream {
    pub w: Arc<Worker>,
    pub key: String,
    pub consumer: String,
    pub ordering: Ordering,
    /// Admission priority at hosts (lower first).
    pub priority: u32,
    sem: Arc<Semaphore>,
    /// Events waiting for a host without holding a read slot.
    pub parked: Arc<Semaphore>,
    lanes: Mutex<HashMap<String, VecDeque<Job>>>,
    in_flight: Mutex<HashMap<String, Instant>>,
    acks: mpsc::Sender<Ack>,
    /// Entries finished and waiting for their acknowledgement to reach Redis.
    acking: Arc<Mutex<HashSet<String>>>,
    tracker: TaskTracker,
    in_flight_gauge: prometheus::IntGauge,
    max_in_flight: usize,
    /// Held ordering keys (ordered streams, while this worker holds the lease).
    pub holds: Holds,
    /// The worker's own keys for this stream (retry schedule, held keys, lease, counters).
    pub keys: crate::streams::StreamKeys,
    /// Target hosts of recent events, and when each was last seen.
    pub hosts_seen: Mutex<HashMap<Arc<str>, Instant>>,
    /// Whether this worker holds the stream's ordering lease (always true when unordered).
    leader: watch::Receiver<bool>,
}

/// Consume one stream until shutdown, then drain.
pub async fn run_stream(w: Arc<Worker>, name: String) {
    let key = stream_key(&name);
    let (tx, rx) = mpsc::channel(ACK_BATCH * 4);
    let acking = Arc::new(Mutex::new(HashSet::new()));
    let acker = tokio::spawn(ack_loop(w.clone(), key.clone(), rx, acking.clone()));
    let keys = crate::streams::StreamKeys::new(w.cfg.layout, &w.cfg.group, &key);
    let lease_key = keys.lease.clone();
    let max_in_flight = w.cfg.max_in_flight_for(&name);
    // Ordered streams are delivered by one consumer at a time: the holder of the lease.
    // The lease outlives the drain, so no other worker starts on our keys meanwhile.
    let ordered = w.cfg.ordering_for(&name) != Ordering::None;
    let (leader_tx, leader_rx) = watch::channel(!ordered);
    let sc = Arc::new(Stream {
        consumer: w.cfg.consumer(&name),
        sem: Arc::new(Semaphore::new(max_in_flight)),
        parked: Arc::new(Semaphore::new(max_in_flight * PARKED_PER_SLOT)),
        max_in_flight,
        ordering: w.cfg.ordering_for(&name),
        priority: w.cfg.priority_for(&name),
        lanes: Mutex::new(HashMap::new()),
        in_flight: Mutex::new(HashMap::new()),
        acks: tx,
        acking,
        tracker: TaskTracker::new(),
        in_flight_gauge: w.metrics.in_flight.with_label_values(&[&key]),
        holds: Holds::default(),
        keys,
        hosts_seen: Mutex::new(HashMap::new()),
        leader: leader_rx.clone(),
        key,
        w,
    });
    let lease_done = CancellationToken::new();
    let lease = ordered.then(|| {
        tokio::spawn(ordering::hold_lease(
            sc.w.redis.clone(),
            sc.w.scripts.clone(),
            lease_key,
            sc.consumer.clone(),
            sc.w.cfg.ordering_lease,
            leader_tx,
            lease_done.clone(),
        ))
    });
    sc.clone().read_loop(leader_rx).await;
    sc.tracker.close();
    sc.tracker.wait().await;
    lease_done.cancel();
    if let Some(l) = lease {
        let _ = l.await;
    }
    let key = sc.key.clone();
    let consumer = sc.consumer.clone();
    let w = sc.w.clone();
    sc.w.metrics.stream_leader.with_label_values(&[&key]).set(0);
    drop(sc);
    // All senders are gone: the acker flushes what is queued and ends.
    let _ = acker.await;
    // A clean stop that left nothing pending: this consumer's name is not needed any more
    // (every pod name would otherwise stay in the group forever).
    if !w.shutdown.hard.is_cancelled() {
        let mut con = w.redis.clone();
        match w.scripts.remove_consumer(&mut con, &key, &w.cfg.group, &consumer).await {
            Ok(true) => {
                tracing::info!(stream = %key, consumer = %consumer, "nothing pending: consumer removed from the group")
            }
            Ok(false) => {
                tracing::info!(stream = %key, consumer = %consumer, "entries still pending: consumer kept for the next owner")
            }
            Err(e) => tracing::debug!(error = %e, "could not remove the consumer"),
        }
    }
    tracing::info!(stream = %key, "stream consumer stopped");
}

async fn ack_loop(w: Arc<Worker>, key: String, mut rx: mpsc::Receiver<Ack>, acking: Arc<Mutex<HashSet<String>>>) {
    let mut batch = Vec::with_capacity(ACK_BATCH);
    let set = crate::streams::StreamKeys::new(w.cfg.layout, &w.cfg.group, &key).cleanup;
    while rx.recv_many(&mut batch, ACK_BATCH).await > 0 {
        let ids: Vec<String> = batch.iter().map(|a| a.id.clone()).collect();
        let counters: Vec<String> = batch.iter().filter_map(|a| a.counter.clone()).collect();
        let rows: Vec<String> = batch.iter().filter_map(|a| a.cleanup.clone()).collect();
        let (group, delete) = (&w.cfg.group, w.cfg.delete_on_ack);
        let (ids_ref, counters_ref, key_ref, rows_ref) = (&ids, &counters, &key, &rows);
        let set = &set;
        let done = w
            .redis_retry("ack", |mut con| async move {
                let cleanups = Some((set.as_str(), rows_ref.as_slice()));
                streams::ack(&mut con, key_ref, group, ids_ref, delete, counters_ref, cleanups).await
            })
            .await;
        if done.is_some() {
            w.metrics.ack_batch.observe(ids.len() as f64);
            if !rows.is_empty() {
                w.outbox_wake.notify_one();
            }
            let mut set = crate::lock(&acking);
            for id in &ids {
                set.remove(id);
            }
        } else {
            tracing::warn!(stream = %key, count = ids.len(), "acknowledgements abandoned at shutdown; entries stay pending");
        }
        batch.clear();
    }
}

/// Where the next read comes from.
struct Cursors {
    /// Re-read our own pending list from here (after a start, a lost connection, a new lease).
    own: Option<String>,
    /// Take over every pending entry of other consumers first (a new lease holder).
    claim_all: Option<String>,
    next_claim: Instant,
    /// XAUTOCLAIM scans a bounded part of the pending list per call: keep its cursor.
    claim: String,
}

impl Stream {
    fn stop(&self) -> &CancellationToken {
        &self.w.shutdown.stop
    }

    /// May this worker deliver the stream's events now? An ordered stream's events are
    /// delivered only while we hold its lease: once it is lost, what has not been sent yet
    /// stays pending for the next holder, in order.
    pub(crate) fn may_deliver(&self) -> bool {
        *self.leader.borrow()
    }

    async fn read_loop(self: Arc<Self>, mut leader: watch::Receiver<bool>) {
        let cfg = &self.w.cfg;
        let mut con = match streams::connect_lazy(&cfg.redis_url, BLOCK + Duration::from_secs(5)) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot create redis client");
                return;
            }
        };
        let leader_gauge = self.w.metrics.stream_leader.with_label_values(&[&self.key]);
        let ordered = self.ordering != Ordering::None;
        let mut group_ready = false;
        let mut was_leader = false;
        // Start by re-reading our own pending list (entries read before a crash or restart).
        let mut cur =
            Cursors { own: Some("0".into()), claim_all: None, next_claim: Instant::now(), claim: "0-0".into() };
        let mut next_touch = Instant::now() + self.touch_every();
        let mut next_sweep = Instant::now();
        let mut errors = 0u32;
        while !self.stop().is_cancelled() {
            if !group_ready {
                match streams::ensure_group(&mut con, &self.key, &cfg.group).await {
                    Ok(()) => {
                        group_ready = true;
                        self.w.health.set_group(&self.key, true);
                        tracing::info!(stream = %self.key, group = %cfg.group, consumer = %self.consumer, "consuming");
                    }
                    Err(e) => {
                        errors += 1;
                        self.on_redis_error("group_create", &e.to_string(), errors).await;
                        continue;
                    }
                }
            }
            if ordered {
                let is_leader = *leader.borrow_and_update();
                if !is_leader {
                    was_leader = false;
                    leader_gauge.set(0);
                    tokio::select! {
                        _ = leader.changed() => {}
                        _ = tokio::time::sleep(BLOCK) => {}
                        _ = self.stop().cancelled() => {}
                    }
                    continue;
                }
                if !was_leader {
                    // Everything a previous holder left pending goes first, in id order,
                    // and the held keys are as it left them.
                    if let Err(e) = self.holds.load(&mut con, &self.keys.held).await {
                        errors += 1;
                        self.on_redis_error("load_holds", &e.to_string(), errors).await;
                        continue;
                    }
                    self.w.metrics.ordering_held_keys.with_label_values(&[&self.key]).set(self.holds.len() as i64);
                    was_leader = true;
                    leader_gauge.set(1);
                    cur.own = Some("0".into());
                    cur.claim_all = Some("0-0".into());
                }
            }
            if Instant::now() >= next_touch {
                self.touch_in_flight().await;
                next_touch = Instant::now() + self.touch_every();
            }
            if ordered && Instant::now() >= next_sweep {
                next_sweep = Instant::now() + HOLD_SWEEP;
                self.sweep_holds(&mut con).await;
            }
            let Some(permits) = self.acquire_permits().await else { break };
            match self.read_once(&mut con, &mut cur, permits.len()).await {
                Ok((entries, recovered)) => {
                    if errors > 0 {
                        tracing::info!(stream = %self.key, "redis reachable again");
                        errors = 0;
                    }
                    self.w.health.redis_ok.store(true, AtomicOrdering::Relaxed);
                    let mut permits = permits.into_iter();
                    for entry in entries {
                        // One permit per entry; we never read more entries than permits.
                        let Some(permit) = permits.next() else { break };
                        self.dispatch(entry, recovered, permit);
                    }
                }
                Err(e) if streams::is_nogroup(&e) => {
                    tracing::warn!(stream = %self.key, "consumer group or stream vanished (NOGROUP): recreating it");
                    self.w.health.set_group(&self.key, false);
                    group_ready = false;
                }
                Err(e) => {
                    errors += 1;
                    // A read whose reply was lost with the connection left entries in our
                    // pending list that we never saw: look there again once Redis is back.
                    cur.own = Some("0".into());
                    self.on_redis_error("read", &e.to_string(), errors).await;
                }
            }
        }
    }

    /// One read: our own pending list, then (for a new lease holder) everything pending
    /// elsewhere, then idle entries of dead consumers now and then, else new entries.
    /// Returns the entries and whether they are recovered ones.
    async fn read_once(
        &self,
        con: &mut Conn,
        cur: &mut Cursors,
        want: usize,
    ) -> Result<(Vec<RawEntry>, bool), redis::RedisError> {
        let cfg = &self.w.cfg;
        if let Some(cursor) = cur.own.clone() {
            let entries = streams::read_group(con, &self.key, &cfg.group, &self.consumer, &cursor, want, None).await?;
            cur.own = entries.last().map(|e| e.id.clone());
            // Entries we are working on are pending too; only the others are new to us.
            let entries = self.not_in_flight(entries);
            self.count_claimed("own_pending", entries.len());
            return Ok((entries, true));
        }
        if let Some(cursor) = cur.claim_all.clone() {
            let (next, entries) =
                streams::autoclaim(con, &self.key, &cfg.group, &self.consumer, Duration::ZERO, &cursor, want).await?;
            cur.claim_all = (next != "0-0").then_some(next);
            let taken = self.not_in_flight(entries);
            if !taken.is_empty() {
                tracing::info!(stream = %self.key, count = taken.len(), "took over the entries a previous lease holder left pending");
            }
            self.count_claimed("lease_takeover", taken.len());
            return Ok((taken, true));
        }
        if Instant::now() >= cur.next_claim {
            cur.next_claim = Instant::now() + cfg.claim_idle / 2;
            let (next, entries) =
                streams::autoclaim(con, &self.key, &cfg.group, &self.consumer, cfg.claim_idle, &cur.claim, want)
                    .await?;
            if next != "0-0" {
                // Not at the end of the pending list: go on from there soon, without
                // crowding out the reading of new entries.
                cur.next_claim = Instant::now() + Duration::from_secs(1);
            }
            cur.claim = next;
            let taken = self.not_in_flight(entries);
            if !taken.is_empty() {
                tracing::info!(stream = %self.key, count = taken.len(), "took over idle entries from other consumers");
                // More may be waiting: claim again next round.
                cur.next_claim = Instant::now();
            }
            self.count_claimed("autoclaim", taken.len());
            return Ok((taken, true));
        }
        let entries = streams::read_group(con, &self.key, &cfg.group, &self.consumer, ">", want, Some(BLOCK)).await?;
        Ok((entries, false))
    }

    /// Hand on held keys whose holder has not come back in time (its entry trimmed from
    /// the stream or deleted from the retry schedule): their waiting events must not wait
    /// forever.
    async fn sweep_holds(&self, con: &mut Conn) {
        let held: HashMap<String, String> = match redis::cmd("HGETALL").arg(&self.keys.held).query_async(con).await {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read held keys");
                return;
            }
        };
        let now_ms = (event::now_unix() * 1000.0) as u64;
        for (key, value) in held {
            if ordering::expected_by_ms(&value).is_some_and(|by| by < now_ms) {
                tracing::warn!(stream = %self.key, key = %key, "an ordering key's holder never came back: handing the key on to its waiting events");
                self.w.metrics.held_keys_expired.with_label_values(&[&self.key]).inc();
                self.hand_on(&key, None, &value, None).await;
            }
        }
    }

    fn count_claimed(&self, source: &str, n: usize) {
        if n > 0 {
            self.w.metrics.claimed.with_label_values(&[&self.key, source]).inc_by(n as u64);
        }
    }

    /// Entries that are neither being worked on nor waiting for their acknowledgement.
    fn not_in_flight(&self, entries: Vec<RawEntry>) -> Vec<RawEntry> {
        let mine = crate::lock(&self.in_flight);
        let acking = crate::lock(&self.acking);
        entries.into_iter().filter(|e| !mine.contains_key(&e.id) && !acking.contains(&e.id)).collect()
    }

    fn touch_every(&self) -> Duration {
        (self.w.cfg.claim_idle / 3).max(Duration::from_millis(100))
    }

    async fn on_redis_error(&self, op: &'static str, err: &str, n: u32) {
        self.w.metrics.redis_errors.with_label_values(&[op]).inc();
        self.w.health.redis_ok.store(false, AtomicOrdering::Relaxed);
        if n == 1 || n % 20 == 0 {
            tracing::warn!(stream = %self.key, redis = %self.w.cfg.redis_address(), op, error = err, attempt = n, "redis error; retrying");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff(Duration::from_millis(100), n, Duration::from_secs(5))) => {}
            _ = self.stop().cancelled() => {}
        }
    }

    /// At least one permit (waiting for one), plus whatever else is free, up to a batch.
    /// Under load permits free up one at a time; waiting a moment for a quarter of them
    /// turns many one-entry reads into a few batched ones.
    async fn acquire_permits(&self) -> Option<Vec<OwnedSemaphorePermit>> {
        // Keep refreshing in-flight entries while every slot is busy, or other consumers
        // would take over work that is still going on.
        let first = loop {
            tokio::select! {
                p = self.sem.clone().acquire_owned() => break p.ok()?,
                _ = tokio::time::sleep(self.touch_every()) => self.touch_in_flight().await,
                _ = self.stop().cancelled() => return None,
            }
        };
        let mut permits = vec![first];
        let enough = (self.max_in_flight / 4).clamp(1, READ_BATCH);
        let deadline = tokio::time::Instant::now() + BATCH_WAIT;
        loop {
            while permits.len() < READ_BATCH {
                match self.sem.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            if permits.len() >= enough {
                return Some(permits);
            }
            tokio::select! {
                p = self.sem.clone().acquire_owned() => permits.push(p.ok()?),
                _ = tokio::time::sleep_until(deadline) => return Some(permits),
            }
        }
    }

    /// Keep entries we are still working on from looking idle to other consumers (not
    /// after losing an ordered stream's lease: they are the next holder's now).
    async fn touch_in_flight(&self) {
        if !self.may_deliver() {
            return;
        }
        let threshold = self.touch_every();
        let ids: Vec<String> = {
            let m = crate::lock(&self.in_flight);
            m.iter().filter(|(_, t)| t.elapsed() >= threshold).map(|(id, _)| id.clone()).collect()
        };
        for chunk in ids.chunks(500) {
            let mut con = self.w.redis.clone();
            if let Err(e) = streams::touch(&mut con, &self.key, &self.w.cfg.group, &self.consumer, chunk).await {
                tracing::debug!(error = %e, "could not refresh idle time of in-flight entries");
            }
        }
    }

    fn dispatch(self: &Arc<Self>, entry: RawEntry, recovered: bool, permit: OwnedSemaphorePermit) {
        crate::lock(&self.in_flight).insert(entry.id.clone(), Instant::now());
        self.in_flight_gauge.inc();
        let claim = Claim { sc: self.clone(), id: entry.id.clone(), slot: Some(permit) };
        let this = self.clone();
        if entry.fields.is_none() {
            // Listed in a pending list but deleted from the stream: nothing left to deliver.
            tracing::warn!(stream = %self.key, id = %entry.id, "pending entry no longer exists in the stream; acknowledging it");
            self.tracker.spawn(async move {
                this.ack(&entry.id, None, None).await;
                drop(claim);
            });
            return;
        }
        match event::parse(&entry, &self.w.cfg.ordering_key_field) {
            Err(why) => {
                self.tracker.spawn(async move {
                    this.dead_letter_malformed(&entry, &why.0).await;
                    drop(claim);
                });
            }
            Ok(ev) => {
                let job = Job { ev, recovered, claim };
                match event::lane(self.ordering, &job.ev) {
                    None => {
                        self.tracker.spawn(async move { this.handle(job, None).await });
                    }
                    Some(lane) => {
                        let mut lanes = crate::lock(&self.lanes);
                        match lanes.get_mut(&lane) {
                            Some(queue) => queue.push_back(job),
                            None => {
                                lanes.insert(lane.clone(), VecDeque::new());
                                self.tracker.spawn(this.run_lane(lane, job));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Events of one lane, one after another. Events of a held key join its waiting events
    /// instead of being delivered (see `ordering.rs`).
    async fn run_lane(self: Arc<Self>, lane: String, mut job: Job) {
        // However this task ends (a stop, a panic), the lane goes and what it still queues
        // stays pending for the next owner.
        let mut guard = LaneGuard { sc: self.clone(), lane: lane.clone(), armed: true };
        loop {
            if !self.may_deliver() {
                return; // the guard leaves the lane's events pending for the next holder
            }
            match self.holds.gate(&lane, job.ev.hold_token.as_deref()) {
                Gate::Deliver => self.handle(job, Some(&lane)).await,
                gate => self.hold_append(job, &lane, gate == Gate::WaitFront).await,
            }
            let next = {
                let mut lanes = crate::lock(&self.lanes);
                match lanes.get_mut(&lane).and_then(|q| q.pop_front()) {
                    Some(next) if !self.stop().is_cancelled() => Some(next),
                    // Removed under the same lock that found it empty, so no event can
                    // join a lane that is ending.
                    _ => {
                        lanes.remove(&lane);
                        None
                    }
                }
            };
            match next {
                Some(next) => job = next,
                None => break,
            }
        }
        guard.armed = false;
    }

    pub(crate) async fn ack(&self, id: &str, counter: Option<String>, cleanup: Option<String>) {
        crate::lock(&self.acking).insert(id.to_string());
        // The channel is bounded: a slow Redis slows the consumers down rather than growing memory.
        let _ = self.acks.send(Ack { id: id.to_string(), counter, cleanup }).await;
    }
}

struct LaneGuard {
    sc: Arc<Stream>,
    lane: String,
    armed: bool,
}

impl Drop for LaneGuard {
    fn drop(&mut self) {
        if self.armed {
            // Dropping the queued jobs drops their claims: slots and in-flight marks are freed.
            let rest = crate::lock(&self.sc.lanes).remove(&self.lane);
            drop(rest);
        }
    }
}
