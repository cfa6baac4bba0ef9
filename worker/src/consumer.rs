//! The XREADGROUP / XACK loop of one stream: own pending list recovery, takeover of dead
//! consumers' entries, ordering lanes, and the fate of each event.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use serde_json::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::admin::Health;
use crate::config::{stream_key, Config};
use crate::delivery::{Deliverer, Outcome};
use crate::dlq::{payload_text, DeadLetter, Sink};
use crate::event::{self, Event, RawEntry, ATTEMPTS_FIELD};
use crate::hosts::HostGate;
use crate::metrics::Metrics;
use crate::retry::{backoff, exhausted, MAX_SCHEDULE_DELAY};
use crate::shutdown::Shutdown;
use crate::streams::{self, counter_key, ScheduleReq, Scripts};

/// How long one XREADGROUP waits for new entries; bounds how late a stop is noticed.
const BLOCK: Duration = Duration::from_secs(1);
/// Most entries read per round trip.
const READ_BATCH: usize = 256;
/// Longest a dead-letter sink may take to accept one record.
const SINK_TIMEOUT: Duration = Duration::from_secs(30);
/// Events that may wait for paused hosts, per read slot.
const PARKED_PER_SLOT: usize = 4;
/// Longest wait for more free slots before a read, when nearly all are taken.
const BATCH_WAIT: Duration = Duration::from_millis(2);
/// Most entries acknowledged per round trip.
const ACK_BATCH: usize = 512;

/// Everything the stream consumers share.
pub struct Worker {
    pub cfg: Arc<Config>,
    pub redis: ConnectionManager,
    pub scripts: Scripts,
    pub deliverer: Deliverer,
    pub sink: Sink,
    pub metrics: Arc<Metrics>,
    pub hosts: Arc<HostGate>,
    pub health: Arc<Health>,
    pub shutdown: Shutdown,
}

impl Worker {
    /// Run a Redis operation until it succeeds; None once the hard stop fired (the entry
    /// then stays pending and is recovered later).
    async fn redis_retry<T, F, Fut>(&self, op: &'static str, mut f: F) -> Option<T>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = crate::Result<T>>,
    {
        for n in 1.. {
            match f(self.redis.clone()).await {
                Ok(v) => return Some(v),
                Err(e) => {
                    self.metrics.redis_errors.with_label_values(&[op]).inc();
                    self.health.redis_ok.store(false, AtomicOrdering::Relaxed);
                    tracing::warn!(op, error = %e, "redis operation failed; retrying");
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

struct Ack {
    id: String,
    /// Attempt counter to clear with the acknowledgement.
    counter: Option<String>,
}

struct Job {
    ev: Event,
    recovered: bool,
    permit: OwnedSemaphorePermit,
}

struct StreamConsumer {
    w: Arc<Worker>,
    key: String,
    consumer: String,
    sem: Arc<Semaphore>,
    /// Events waiting for a paused host without holding a read slot.
    parked: Arc<Semaphore>,
    lanes: Mutex<HashMap<String, VecDeque<Job>>>,
    in_flight: Mutex<HashMap<String, Instant>>,
    acks: mpsc::Sender<Ack>,
    /// Entries finished and waiting for their acknowledgement to reach Redis.
    acking: Arc<Mutex<HashSet<String>>>,
    tracker: TaskTracker,
    in_flight_gauge: prometheus::IntGauge,
    max_in_flight: usize,
    ordering: crate::config::Ordering,
}

/// Consume one stream until shutdown, then drain.
pub async fn run_stream(w: Arc<Worker>, name: String) {
    let key = stream_key(&name);
    let (tx, rx) = mpsc::channel(ACK_BATCH * 4);
    let acking = Arc::new(Mutex::new(HashSet::new()));
    let acker = tokio::spawn(ack_loop(w.clone(), key.clone(), rx, acking.clone()));
    let sc = Arc::new(StreamConsumer {
        consumer: w.cfg.consumer(&name),
        sem: Arc::new(Semaphore::new(w.cfg.max_in_flight_for(&name))),
        parked: Arc::new(Semaphore::new(w.cfg.max_in_flight_for(&name) * PARKED_PER_SLOT)),
        max_in_flight: w.cfg.max_in_flight_for(&name),
        ordering: w.cfg.ordering_for(&name),
        lanes: Mutex::new(HashMap::new()),
        in_flight: Mutex::new(HashMap::new()),
        acks: tx,
        acking,
        tracker: TaskTracker::new(),
        in_flight_gauge: w.metrics.in_flight.with_label_values(&[&key]),
        key,
        w,
    });
    sc.clone().read_loop().await;
    sc.tracker.close();
    sc.tracker.wait().await;
    let key = sc.key.clone();
    drop(sc);
    // All senders are gone: the acker flushes what is queued and ends.
    let _ = acker.await;
    tracing::info!(stream = %key, "stream consumer stopped");
}

async fn ack_loop(w: Arc<Worker>, key: String, mut rx: mpsc::Receiver<Ack>, acking: Arc<Mutex<HashSet<String>>>) {
    let mut batch = Vec::with_capacity(ACK_BATCH);
    while rx.recv_many(&mut batch, ACK_BATCH).await > 0 {
        let ids: Vec<String> = batch.iter().map(|a| a.id.clone()).collect();
        let counters: Vec<String> = batch.iter().filter_map(|a| a.counter.clone()).collect();
        let (group, delete) = (&w.cfg.group, w.cfg.delete_on_ack);
        let (ids_ref, counters_ref, key_ref) = (&ids, &counters, &key);
        let done = w
            .redis_retry("ack", |mut con| async move {
                streams::ack(&mut con, key_ref, group, ids_ref, delete, counters_ref).await
            })
            .await;
        if done.is_some() {
            w.metrics.ack_batch.observe(ids.len() as f64);
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

impl StreamConsumer {
    fn stop(&self) -> &tokio_util::sync::CancellationToken {
        &self.w.shutdown.stop
    }

    async fn read_loop(self: Arc<Self>) {
        let cfg = &self.w.cfg;
        let mut con = match streams::connect_lazy(&cfg.redis_url, BLOCK + Duration::from_secs(5)) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot create redis client");
                return;
            }
        };
        let mut group_ready = false;
        // Start by re-reading our own pending list (entries read before a crash or restart).
        let mut own_cursor: Option<String> = Some("0".into());
        let mut next_claim = Instant::now();
        // XAUTOCLAIM scans a bounded part of the pending list per call: keep its cursor.
        let mut claim_cursor = "0-0".to_string();
        let mut next_touch = Instant::now() + self.touch_every();
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
            if Instant::now() >= next_touch {
                self.touch_in_flight().await;
                next_touch = Instant::now() + self.touch_every();
            }
            let Some(permits) = self.acquire_permits().await else { break };
            let want = permits.len();
            let result = if let Some(cursor) = own_cursor.clone() {
                streams::read_group(&mut con, &self.key, &cfg.group, &self.consumer, &cursor, want, None).await.map(
                    |entries| {
                        own_cursor = entries.last().map(|e| e.id.clone());
                        // Entries we are working on are pending too; only the others are new to us.
                        let entries = self.not_in_flight(entries);
                        if !entries.is_empty() {
                            self.w
                                .metrics
                                .claimed
                                .with_label_values(&[&self.key, "own_pending"])
                                .inc_by(entries.len() as u64);
                        }
                        (entries, true)
                    },
                )
            } else if Instant::now() >= next_claim {
                next_claim = Instant::now() + cfg.claim_idle / 2;
                streams::autoclaim(&mut con, &self.key, &cfg.group, &self.consumer, cfg.claim_idle, &claim_cursor, want)
                    .await
                    .map(|(cursor, entries)| {
                        if cursor != "0-0" {
                            // Not at the end of the pending list: go on from there soon, without
                            // crowding out the reading of new entries.
                            next_claim = Instant::now() + Duration::from_secs(1);
                        }
                        claim_cursor = cursor;
                        let taken = self.not_in_flight(entries);
                        if !taken.is_empty() {
                            tracing::info!(stream = %self.key, count = taken.len(), "took over idle entries from other consumers");
                            self.w.metrics.claimed.with_label_values(&[&self.key, "autoclaim"]).inc_by(taken.len() as u64);
                            // More may be waiting: claim again next round.
                            next_claim = Instant::now();
                        }
                        (taken, true)
                    },
                )
            } else {
                streams::read_group(&mut con, &self.key, &cfg.group, &self.consumer, ">", want, Some(BLOCK))
                    .await
                    .map(|entries| (entries, false))
            };
            match result {
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
                    own_cursor = Some("0".into());
                    self.on_redis_error("read", &e.to_string(), errors).await;
                }
            }
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
            tracing::warn!(stream = %self.key, op, error = err, attempt = n, "redis error; retrying");
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

    /// Keep entries we are still working on from looking idle to other consumers.
    async fn touch_in_flight(&self) {
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
        let this = self.clone();
        if entry.fields.is_none() {
            // Listed in a pending list but deleted from the stream: nothing left to deliver.
            tracing::warn!(stream = %self.key, id = %entry.id, "pending entry no longer exists in the stream; acknowledging it");
            self.tracker.spawn(async move {
                this.ack(&entry.id, None).await;
                this.done(&entry.id, Some(permit));
            });
            return;
        }
        match event::parse(&entry, &self.w.cfg.ordering_key_field) {
            Err(why) => {
                self.tracker.spawn(async move {
                    this.dead_letter_malformed(&entry, &why.0).await;
                    this.done(&entry.id, Some(permit));
                });
            }
            Ok(ev) => match event::lane(self.ordering, &ev) {
                None => {
                    self.tracker.spawn(async move {
                        let id = ev.entry_id.clone();
                        let mut permit = Some(permit);
                        this.handle(ev, recovered, &mut permit).await;
                        this.done(&id, permit);
                    });
                }
                Some(lane) => {
                    let job = Job { ev, recovered, permit };
                    let mut lanes = crate::lock(&self.lanes);
                    match lanes.get_mut(&lane) {
                        Some(queue) => queue.push_back(job),
                        None => {
                            lanes.insert(lane.clone(), VecDeque::new());
                            self.tracker.spawn(this.run_lane(lane, job));
                        }
                    }
                }
            },
        }
    }

    /// Events of one lane, one after another.
    async fn run_lane(self: Arc<Self>, lane: String, mut job: Job) {
        loop {
            let id = job.ev.entry_id.clone();
            let mut permit = Some(job.permit);
            self.handle(job.ev, job.recovered, &mut permit).await;
            self.done(&id, permit);
            let next = {
                let mut lanes = crate::lock(&self.lanes);
                let queue = lanes.get_mut(&lane);
                match queue.and_then(|q| q.pop_front()) {
                    Some(next) if !self.stop().is_cancelled() => next,
                    Some(next) => {
                        // Stopping: what has not started stays pending for the next owner.
                        let rest = lanes.remove(&lane).unwrap_or_default();
                        drop(lanes);
                        for j in std::iter::once(next).chain(rest) {
                            self.done(&j.ev.entry_id, Some(j.permit));
                        }
                        return;
                    }
                    None => {
                        lanes.remove(&lane);
                        return;
                    }
                }
            };
            job = next;
        }
    }

    /// Wait for a paused host. With a parking slot free, the event trades its read slot for
    /// it and keeps it to the end: waiting for a read slot again could deadlock behind the
    /// events queued in its own lane, which hold the read slots. Parking is bounded, so
    /// memory is too. False when stopping.
    async fn wait_parked(&self, host: &str, permit: &mut Option<OwnedSemaphorePermit>) -> bool {
        let stop = &self.w.shutdown.stop;
        if let Ok(parked) = self.parked.clone().try_acquire_owned() {
            *permit = Some(parked);
        }
        self.w.hosts.wait_open(host, stop).await
    }

    fn done(&self, id: &str, permit: Option<OwnedSemaphorePermit>) {
        crate::lock(&self.in_flight).remove(id);
        self.in_flight_gauge.dec();
        drop(permit);
    }

    async fn ack(&self, id: &str, counter: Option<String>) {
        crate::lock(&self.acking).insert(id.to_string());
        // The channel is bounded: a slow Redis slows the consumers down rather than growing memory.
        let _ = self.acks.send(Ack { id: id.to_string(), counter }).await;
    }

    /// One event to its end: delivered, scheduled, dead-lettered, or (at a hard stop) left pending.
    /// `permit` is the event's read slot; it is given up while the event waits for a paused
    /// host (parked), so that the stream's other hosts keep flowing.
    async fn handle(&self, ev: Event, recovered: bool, permit: &mut Option<OwnedSemaphorePermit>) {
        let w = &self.w;
        let cfg = &w.cfg;
        let counter = counter_key(&self.key, ev.dlq_id());
        let mut failures = ev.prior_failures;
        if recovered {
            let c = &counter;
            let Some(n) =
                w.redis_retry("get_attempts", |mut con| async move { streams::get_failures(&mut con, c).await }).await
            else {
                return;
            };
            failures = failures.max(n);
            if exhausted(failures, cfg.max_attempts) {
                return self.dead_letter(&ev, "max_attempts", failures).await;
            }
        }
        let Some(target) = w.deliverer.target(&ev) else {
            w.metrics.failed.with_label_values(&[&self.key, &ev.event_type, "invalid_url"]).inc();
            return self.dead_letter(&ev, "invalid_url", failures + 1).await;
        };
        loop {
            if !w.hosts.is_open(&target.host) && !self.wait_parked(&target.host, permit).await {
                return; // stopping while the host is paused: leave it pending
            }
            let started = Instant::now();
            let outcome = tokio::select! {
                o = w.deliverer.deliver(&ev, &target, &self.key, failures + 1) => o,
                _ = w.shutdown.hard.cancelled() => return,
            };
            w.metrics.processing_duration.with_label_values(&[&ev.event_type]).observe(started.elapsed().as_secs_f64());
            if outcome == Outcome::Delivered {
                w.metrics.processed.with_label_values(&[&self.key, &ev.event_type]).inc();
                if let Some(created) = ev.created_at {
                    let age = (event::now_unix() - created).max(0.0);
                    w.metrics.event_age.with_label_values(&[&self.key, &ev.event_type]).observe(age);
                }
                let clear = (failures > 0 || recovered).then_some(counter);
                return self.ack(&ev.entry_id, clear).await;
            }
            let reason = outcome.reason().to_string();
            w.metrics.failed.with_label_values(&[&self.key, &ev.event_type, &reason]).inc();
            if let Outcome::DeadLetter { .. } = outcome {
                return self.dead_letter(&ev, &reason, failures + 1).await;
            }
            let c = &counter;
            let ttl = cfg.attempt_ttl;
            let Some(n) = w
                .redis_retry("count_attempt", |mut con| async move { streams::count_failure(&mut con, c, ttl).await })
                .await
            else {
                return;
            };
            failures = n.max(failures + 1);
            tracing::debug!(stream = %self.key, id = ev.dlq_id(), %reason, failures, "delivery failed");
            if exhausted(failures, cfg.max_attempts) {
                return self.dead_letter(&ev, &reason, failures).await;
            }
            match outcome {
                Outcome::Schedule { delay, .. } => {
                    let delay =
                        delay.unwrap_or_else(|| backoff(cfg.retry_backoff, failures, Duration::from_secs(3600)));
                    return self.schedule(&ev, delay, failures).await;
                }
                _ => w.hosts.trip(&target, &reason),
            }
        }
    }

    /// Hand the event to `events:retry` and acknowledge it, in one atomic step.
    async fn schedule(&self, ev: &Event, delay: Duration, failures: u32) {
        let w = &self.w;
        let due = event::now_unix() + delay.min(MAX_SCHEDULE_DELAY).as_secs_f64();
        let mut meta = ev.meta.clone();
        let due_iso = time::OffsetDateTime::from_unix_timestamp_nanos((due * 1e9) as i128)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_default();
        meta.insert("nextAttemptAt".into(), Value::String(due_iso));
        meta.insert(ATTEMPTS_FIELD.into(), Value::from(failures));
        let meta_json = Value::Object(meta).to_string();
        let timeout = ev.timeout.map(|t| t.as_secs_f64().to_string());
        let req = ScheduleReq {
            stream_key: &self.key,
            group: &w.cfg.group,
            entry_id: &ev.entry_id,
            delete: w.cfg.delete_on_ack,
            due_unix: due,
            meta_json: &meta_json,
            payload: &ev.payload,
            timeout: timeout.as_deref().map(str::as_bytes),
        };
        let (scripts, req) = (&w.scripts, &req);
        if w.redis_retry("schedule", |mut con| async move { scripts.schedule(&mut con, req).await }).await.is_some() {
            w.metrics.retries_scheduled.with_label_values(&[&self.key]).inc();
            tracing::debug!(stream = %self.key, id = ev.dlq_id(), delay_s = delay.as_secs_f64(), "retry scheduled");
        }
    }

    async fn dead_letter(&self, ev: &Event, reason: &str, attempts: u32) {
        let record = DeadLetter {
            id: ev.dlq_id().to_string(),
            event_type: ev.event_type.clone(),
            reason: reason.to_string(),
            payload: payload_text(&ev.payload),
            stream: self.key.clone(),
            attempts,
            meta: Some(Value::Object(ev.meta.clone()).to_string()),
        };
        if self.send_to_sink(&record).await {
            self.ack(&ev.entry_id, Some(counter_key(&self.key, ev.dlq_id()))).await;
        }
    }

    async fn dead_letter_malformed(&self, entry: &RawEntry, why: &str) {
        tracing::warn!(stream = %self.key, id = %entry.id, why, "malformed entry: dead-lettering it");
        let payload = match entry.field("payload") {
            Some(p) => payload_text(p),
            None => {
                let fields: serde_json::Map<String, Value> =
                    entry.fields.iter().flatten().map(|(k, v)| (k.clone(), Value::String(payload_text(v)))).collect();
                Value::Object(fields).to_string()
            }
        };
        let event_type = entry
            .field("meta")
            .and_then(|m| serde_json::from_slice::<Value>(m).ok())
            .and_then(|m| m.get("type").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| "unknown".into());
        let record = DeadLetter {
            id: entry.id.clone(),
            event_type,
            reason: "malformed_entry".into(),
            payload,
            stream: self.key.clone(),
            attempts: 0,
            meta: None,
        };
        if self.send_to_sink(&record).await {
            self.ack(&entry.id, None).await;
        }
    }

    /// Offer the record to the sink until it accepts; false at a hard stop (event stays pending).
    async fn send_to_sink(&self, record: &DeadLetter) -> bool {
        let w = &self.w;
        for n in 1.. {
            // Bounded, and abandoned at the hard stop: a sink may hang (a row lock, a dead
            // connection) without ever failing.
            let sent = tokio::select! {
                r = tokio::time::timeout(SINK_TIMEOUT, w.sink.send(record)) => {
                    r.unwrap_or_else(|_| Err(crate::Error::DeadLetter { sink: w.sink.name(), msg: format!("no answer within {SINK_TIMEOUT:?}") }))
                }
                _ = w.shutdown.hard.cancelled() => return false,
            };
            match sent {
                Ok(()) => {
                    if n > 1 {
                        w.health.set_dlq_error(None);
                        tracing::info!(sink = w.sink.name(), "dead-letter sink accepts again");
                    }
                    w.metrics.dead_lettered.with_label_values(&[&self.key, &record.reason]).inc();
                    return true;
                }
                Err(e) => {
                    w.metrics.dlq_sink_errors.with_label_values(&[w.sink.name()]).inc();
                    // One warning when the sink starts failing, not one per held event.
                    if w.health.set_dlq_error(Some(e.to_string())) {
                        tracing::warn!(error = %e, sink = w.sink.name(), "dead-letter sink failing; holding dead letters until it accepts");
                    } else {
                        tracing::debug!(error = %e, id = %record.id, attempt = n, "dead-letter sink refused the event; holding it");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(Duration::from_millis(200), n, Duration::from_secs(30))) => {}
                        _ = w.shutdown.hard.cancelled() => return false,
                    }
                }
            }
        }
        false
    }
}
