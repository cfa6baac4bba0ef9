//! The fate of one event: admission at its host, one delivery attempt, and the outcome
//! applied: acknowledged, scheduled for a later retry, deferred, held behind its ordering
//! key, or dead-lettered. Every retry goes through the durable retry schedule with a
//! per-event backoff; nothing waits in memory for longer than a host's queue allows.

use std::time::Duration;

use rand::Rng;
use serde_json::Value;
use tracing::Instrument;

use crate::config::Ordering;
use crate::consumer::{Job, Stream};
use crate::delivery::Outcome;
use crate::dlq::{payload_text, DeadLetter};
use crate::event::{self, Event, RawEntry, ATTEMPTS_FIELD, SINCE_FIELD, TRACEPARENT_FIELD};
use crate::hosts::Admit;
use crate::ordering::new_token;
use crate::retry::{backoff, exhausted, MAX_SCHEDULE_DELAY};
use crate::streams::{self, AppendReq, ReleaseReq, ScheduleReq};

/// Longest a dead-letter sink may take to accept one record.
const SINK_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the head of a key's lane waits for its host before it is deferred (its lane's
/// later events hold read slots meanwhile).
const LANE_WAIT: Duration = Duration::from_secs(2);
/// Longest an event waits for its host while holding a read slot (no parking slot free).
const READ_SLOT_WAIT: Duration = Duration::from_secs(1);
/// Slack before a held key whose holder has not come back is handed on anyway.
const HOLD_GRACE: Duration = Duration::from_secs(600);
/// How long a host counts as one the stream sends to.
const HOSTS_SEEN_FOR: Duration = Duration::from_secs(30);
/// Events of a held key put back into the stream at once when the key is handed on.
const RELEASE_BATCH: usize = 100;
/// The span field that says what became of an attempt: delivered, scheduled (at the
/// receiver's Retry-After), retried (after a backoff), dead_lettered, or interrupted.
const OUTCOME: &str = "eventworker.outcome";
/// The outcome of an attempt cut short by the hard stop (the event stays pending).
const INTERRUPTED: &str = "interrupted";

/// What became of an event handed to the retry schedule.
enum Scheduled {
    Yes,
    /// Past its age budget: dead-lettered instead (or held pending at a hard stop).
    DeadLettered,
    /// The hard stop came first: the event stays pending.
    Interrupted,
}
/// Longest a scheduled retry waits for a 429 without Retry-After.
const SCHEDULE_BACKOFF_CAP: Duration = Duration::from_secs(3600);

impl Stream {
    /// One event to its end. `lane` is its ordering key when its stream is ordered.
    pub(crate) async fn handle(&self, mut job: Job, lane: Option<&str>) {
        let w = &self.w;
        let cfg = &w.cfg;
        let ev = &job.ev;
        let counter = self.keys.counter(ev.dlq_id());
        let mut failures = ev.prior_failures;
        if job.recovered {
            let c = &counter;
            let Some(n) = Box::pin(
                w.redis_retry("get_attempts", |mut con| async move { streams::get_failures(&mut con, c).await }),
            )
            .await
            else {
                return;
            };
            failures = failures.max(n);
            if exhausted(failures, cfg.max_attempts) {
                return Box::pin(self.dead_letter(job, lane, "max_attempts", failures)).await;
            }
        }
        let target = match w.deliverer.target(ev) {
            Ok(t) => t,
            Err(reason) => {
                w.metrics.failed.with_label_values(&[&self.key, w.metrics.type_label(&ev.event_type), reason]).inc();
                if reason != "invalid_url" {
                    tracing::warn!(stream = %self.key, id = ev.dlq_id(), url = ev.url.as_deref().unwrap_or(""), reason, "event's target refused by TARGET_ALLOWLIST / TARGET_DENYLIST: dead-lettering it");
                }
                return Box::pin(self.dead_letter(job, lane, reason, failures + 1)).await;
            }
        };

        // Admission. An event that has to wait gives its read slot up for a parking slot,
        // so that the stream goes on reading for other hosts. With no parking slot free it
        // waits a moment with its read slot (which slows reading down to what the hosts
        // take, instead of churning events through the retry schedule), then is deferred.
        // Waiting is bounded only where there is someone to make room for: a stream that
        // sends to one host alone just reads as fast as that host takes events.
        self.note_host(&target.host);
        let must_wait = w.hosts.must_wait(&target.host);
        let shared = must_wait && self.other_hosts_lately(&target.host);
        let mut max_wait = match (self.ordering, lane) {
            (Ordering::Key, Some(_)) if shared => Some(LANE_WAIT),
            _ => None,
        };
        if must_wait {
            match self.parked.clone().try_acquire_owned() {
                Ok(p) => job.claim.slot = Some(p),
                Err(_) if shared => max_wait = Some(max_wait.map_or(READ_SLOT_WAIT, |m| m.min(READ_SLOT_WAIT))),
                Err(_) => {}
            }
        }
        let permit = match w.hosts.admit(&target, self.priority, max_wait).await {
            Admit::Go(p) => p,
            Admit::Paused { retry_in } => {
                return Box::pin(self.defer(job, lane, retry_in, "host_paused", failures)).await
            }
            Admit::Busy { retry_in } => return Box::pin(self.defer(job, lane, retry_in, "host_busy", failures)).await,
        };
        if w.shutdown.hard.is_cancelled() || !self.may_deliver() {
            // Admitted just as the grace period ended, or after this worker lost the
            // stream's ordering lease: leave it pending.
            return;
        }

        let span = self.attempt_span(&job.ev, failures + 1, &target.host);
        ew_otel::set_parent(&span, job.ev.trace_parent(), job.ev.trace_state());
        self.attempt(job, lane, target, permit, failures, counter).instrument(span).await
    }

    /// The span of one delivery attempt (exported when tracing is on; disabled otherwise).
    fn attempt_span(&self, ev: &Event, attempt: u32, host: &str) -> tracing::Span {
        tracing::info_span!(
            target: ew_otel::TARGET,
            "deliver",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            messaging.system = "redis",
            messaging.operation.type = "process",
            messaging.destination.name = %self.key,
            messaging.consumer.group.name = %self.w.cfg.group,
            messaging.message.id = %ev.entry_id,
            eventworker.event.id = ev.dlq_id(),
            eventworker.event.type = %ev.event_type,
            eventworker.attempt = i64::from(attempt),
            server.address = host,
            http.request.method = "POST",
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
            eventworker.outcome = tracing::field::Empty,
        )
    }

    /// One delivery attempt of an admitted event, and its outcome applied (in the
    /// attempt's span).
    async fn attempt(
        &self,
        mut job: Job,
        lane: Option<&str>,
        target: crate::delivery::Target,
        permit: crate::hosts::HostPermit,
        failures: u32,
        counter: String,
    ) {
        let w = &self.w;
        let attempt = failures + 1;
        let span = tracing::Span::current();
        let trace = ew_otel::outgoing(&span, job.ev.trace_parent(), job.ev.trace_state());
        let ev = &job.ev;
        let outcome = tokio::select! {
            o = w.deliverer.deliver(ev, &target, &self.key, attempt, &trace) => o,
            _ = w.shutdown.hard.cancelled() => {
                span.record(OUTCOME, INTERRUPTED);
                return;
            }
        };
        let took = permit.started().elapsed();
        // Pause a failing host before its slot is given to the next waiting event.
        let own_timeout = outcome.reason() == "timeout" && ev.timeout.is_some_and(|t| t < w.deliverer.read_timeout());
        if matches!(outcome, Outcome::HostDown { .. }) && !own_timeout {
            // An event's own short timeout says little about its host: only failures at
            // the host's normal terms pause it.
            w.hosts.trip(&target, outcome.reason(), w.deliverer.headers(ev, &target, &self.key, attempt, &trace));
        }
        permit.finish(outcome.signal());
        if !matches!(outcome, Outcome::Delivered) && job.ev.trace_parent().is_none() {
            // Later attempts, and a replay of its dead letter, join this attempt's trace.
            job.ev.meta.insert(TRACEPARENT_FIELD.into(), Value::String(trace.traceparent));
        }
        let ev = &job.ev;
        let type_label = w.metrics.type_label(&ev.event_type);
        w.metrics.processing_duration.with_label_values(&[type_label]).observe(took.as_secs_f64());
        let reason = outcome.reason().to_string();
        if !matches!(outcome, Outcome::Delivered) {
            span.record("error.type", reason.as_str());
            span.record("otel.status_code", "ERROR");
        }
        match outcome {
            Outcome::Delivered => {
                span.record(OUTCOME, "delivered");
                w.metrics.processed.with_label_values(&[&self.key, type_label]).inc();
                if let Some(created) = ev.created_at {
                    let age = (event::now_unix() - created).max(0.0);
                    w.metrics.event_age.with_label_values(&[&self.key, type_label]).observe(age);
                }
                let clear = failures > 0 || job.recovered;
                let cleanup = w.cleanup_for(&job.ev);
                self.finished(job, lane, clear, cleanup).await
            }
            Outcome::DeadLetter { .. } => {
                w.metrics.failed.with_label_values(&[&self.key, type_label, &reason]).inc();
                Box::pin(self.dead_letter(job, lane, &reason, attempt)).await
            }
            Outcome::Schedule { .. } | Outcome::HostDown { .. } => {
                w.metrics.failed.with_label_values(&[&self.key, type_label, &reason]).inc();
                Box::pin(self.retry_later(job, lane, outcome, attempt, &counter)).await
            }
        }
    }

    /// A failed attempt that may be retried: count it, then schedule the retry with the
    /// receiver's delay or the event's backoff, or dead-letter when out of attempts.
    async fn retry_later(&self, job: Job, lane: Option<&str>, outcome: Outcome, attempt: u32, counter: &str) {
        let (w, cfg) = (&self.w, &self.w.cfg);
        let reason = outcome.reason().to_string();
        let ttl = cfg.attempt_ttl;
        let Some(n) = w
            .redis_retry("count_attempt", |mut con| async move { streams::count_failure(&mut con, counter, ttl).await })
            .await
        else {
            tracing::Span::current().record(OUTCOME, INTERRUPTED);
            return;
        };
        let failures = n.max(attempt);
        tracing::debug!(stream = %self.key, id = job.ev.dlq_id(), %reason, failures, "delivery failed");
        if exhausted(failures, cfg.max_attempts) {
            return self.dead_letter(job, lane, &reason, failures).await;
        }
        let delay = match outcome {
            Outcome::Schedule { delay, .. } => {
                delay.unwrap_or_else(|| backoff(cfg.retry_backoff, failures, SCHEDULE_BACKOFF_CAP))
            }
            _ => backoff(cfg.backoff_base, failures, cfg.backoff_max),
        };
        // "scheduled": at the time the receiver asked for; "retried": after a backoff.
        let how = if matches!(outcome, Outcome::Schedule { .. }) { "scheduled" } else { "retried" };
        let recorded = match self.schedule(job, lane, delay, failures, &reason, false).await {
            Scheduled::Yes => how,
            Scheduled::Interrupted => INTERRUPTED,
            Scheduled::DeadLettered => return, // recorded by dead_letter
        };
        tracing::Span::current().record(OUTCOME, recorded);
    }

    /// Put an event off without an attempt (its host is paused or saturated): back to the
    /// retry schedule, spread out so a reopening host is not met by all of them at once.
    async fn defer(&self, job: Job, lane: Option<&str>, retry_in: Duration, why: &str, failures: u32) {
        self.w.metrics.deferred.with_label_values(&[&self.key, why]).inc();
        let spread = rand::rng().random_range(1.0..1.25);
        let delay = retry_in.max(Duration::from_millis(200)).mul_f64(spread);
        self.schedule(job, lane, delay, failures, why, true).await;
    }

    /// Hand the event to `events:retry` and acknowledge it, in one atomic step. An ordered
    /// event holds its key meanwhile. Past the age budget it is dead-lettered instead.
    async fn schedule(
        &self,
        job: Job,
        lane: Option<&str>,
        delay: Duration,
        failures: u32,
        reason: &str,
        deferred: bool,
    ) -> Scheduled {
        let w = &self.w;
        let ev = &job.ev;
        let age = event::now_unix() - ev.born();
        if age > w.cfg.max_event_age.as_secs_f64() {
            tracing::warn!(stream = %self.key, id = ev.dlq_id(), age_s = age as u64, last = reason, "event past MAX_EVENT_AGE: dead-lettering it");
            Box::pin(self.dead_letter(job, lane, "max_age", failures)).await;
            return Scheduled::DeadLettered;
        }
        let due = event::now_unix() + delay.min(MAX_SCHEDULE_DELAY).as_secs_f64();
        let mut meta = ev.meta.clone();
        let due_iso = time::OffsetDateTime::from_unix_timestamp_nanos((due * 1e9) as i128)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_default();
        meta.insert("nextAttemptAt".into(), Value::String(due_iso));
        meta.insert(ATTEMPTS_FIELD.into(), Value::from(failures));
        if ev.created_at.is_none() && !meta.contains_key(SINCE_FIELD) {
            meta.insert(SINCE_FIELD.into(), Value::from(event::now_unix().floor()));
        }
        let meta_json = Value::Object(meta).to_string();
        let timeout = ev.timeout.map(|t| t.as_secs_f64().to_string());
        let counter = self.keys.counter(ev.dlq_id());
        let token = lane.map(|_| new_token());
        let hold = lane.zip(token.as_deref()).map(|(k, t)| (self.keys.held.as_str(), k, t));
        let req = ScheduleReq {
            keys: &self.keys,
            group: &w.cfg.group,
            entry_id: &ev.entry_id,
            delete: w.cfg.delete_on_ack,
            due_unix: due,
            meta_json: &meta_json,
            payload: &ev.payload,
            timeout: timeout.as_deref().map(str::as_bytes),
            hold,
            expect_by_ms: self.expect_by_ms(delay.min(MAX_SCHEDULE_DELAY)),
            drop_counter: ev.id.is_none().then_some(counter.as_str()),
        };
        let (scripts, req) = (&w.scripts, &req);
        if w.redis_retry("schedule", |mut con| async move { scripts.schedule(&mut con, req).await }).await.is_none() {
            return Scheduled::Interrupted;
        }
        if let Some((k, t)) = lane.zip(token.as_deref()) {
            self.holds.set(k, t);
            self.publish_holds();
        }
        if !deferred {
            w.metrics.retries_scheduled.with_label_values(&[&self.key]).inc();
        }
        tracing::debug!(stream = %self.key, id = ev.dlq_id(), delay_s = delay.as_secs_f64(), reason, "retry scheduled");
        Scheduled::Yes
    }

    /// An event of a held key joins the key's waiting events (acknowledged with the move).
    pub(crate) async fn hold_append(&self, job: Job, key: &str, front: bool) {
        let w = &self.w;
        let ev = &job.ev;
        let meta_json = Value::Object(ev.meta.clone()).to_string();
        let timeout = ev.timeout.map(|t| t.as_secs_f64().to_string());
        let keys = self.keys.hold(key);
        let req = AppendReq {
            stream_key: &self.key,
            group: &w.cfg.group,
            entry_id: &ev.entry_id,
            delete: w.cfg.delete_on_ack,
            meta_json: &meta_json,
            payload: &ev.payload,
            timeout: timeout.as_deref().map(str::as_bytes),
            key,
            keys: &keys,
            front,
        };
        let (scripts, req) = (&w.scripts, &req);
        match w.redis_retry("hold_append", |mut con| async move { scripts.hold_append(&mut con, req).await }).await {
            Some(true) => tracing::debug!(stream = %self.key, id = ev.dlq_id(), key, "waiting behind its ordering key"),
            Some(false) => {
                // Not held any more (our view was stale): deliver it.
                self.holds.set(key, "");
                self.publish_holds();
                Box::pin(self.handle(job, Some(key))).await
            }
            None => {}
        }
    }

    /// The event is done with (delivered, or accepted by the dead-letter sink): acknowledge
    /// it (recording its outbox row's clean-up when delivered), and hand its key on when it
    /// held it.
    async fn finished(&self, job: Job, lane: Option<&str>, clear_counter: bool, cleanup: Option<String>) {
        let ev = &job.ev;
        let counter = self.keys.counter(ev.dlq_id());
        let holder = lane.filter(|k| ev.hold_token.is_some() && self.holds.token(k) == ev.hold_token);
        let (Some(key), Some(token)) = (holder, ev.hold_token.as_deref()) else {
            return self.ack(&ev.entry_id, clear_counter.then_some(counter), cleanup).await;
        };
        let woke = cleanup.is_some();
        Box::pin(self.hand_on(key, Some((&ev.entry_id, &counter)), token, cleanup.as_deref())).await;
        if woke {
            self.w.outbox_wake.notify_one();
        }
    }

    /// Hand a held key on: after its holder finished (`finished`, acknowledged here with
    /// its outbox clean-up), or because it never came back (`finished` None, `token` the
    /// value the sweep saw).
    pub(crate) async fn hand_on(&self, key: &str, finished: Option<(&str, &str)>, token: &str, cleanup: Option<&str>) {
        let w = &self.w;
        let keys = self.keys.hold(key);
        let next = new_token();
        let req = ReleaseReq {
            stream_key: &self.key,
            group: &w.cfg.group,
            finished,
            delete: w.cfg.delete_on_ack,
            key,
            keys: &keys,
            token,
            next_token: &next,
            batch: RELEASE_BATCH,
            expect_by_ms: self.expect_by_ms(Duration::ZERO),
            cleanup: cleanup.map(|row| (self.keys.cleanup.as_str(), row)),
        };
        let req = &req;
        let released =
            w.redis_retry("hold_release", |mut con| async move { w.scripts.hold_release(&mut con, req).await }).await;
        if let Some(now) = released {
            self.holds.set(key, &now);
            self.publish_holds();
        }
    }

    /// When a held key should change again at the latest, for an event due in `due_in`:
    /// its due time plus the longest one delivery can take plus ten minutes.
    fn expect_by_ms(&self, due_in: Duration) -> u64 {
        let by = event::now_unix() + (due_in + self.w.cfg.read_timeout + HOLD_GRACE).as_secs_f64();
        (by * 1000.0) as u64
    }

    /// Remember that this stream sends to `host` (cheap: every event passes here).
    fn note_host(&self, host: &std::sync::Arc<str>) {
        let now = std::time::Instant::now();
        let mut seen = crate::lock(&self.hosts_seen);
        match seen.get_mut(host) {
            Some(at) => *at = now,
            None => {
                if seen.len() >= 64 {
                    seen.retain(|_, at| now.duration_since(*at) < HOSTS_SEEN_FOR);
                }
                seen.insert(host.clone(), now);
            }
        }
    }

    /// Whether this stream has recently had events for hosts other than `host` (only asked
    /// when an event has to wait).
    fn other_hosts_lately(&self, host: &str) -> bool {
        let now = std::time::Instant::now();
        crate::lock(&self.hosts_seen).iter().any(|(h, at)| &**h != host && now.duration_since(*at) < HOSTS_SEEN_FOR)
    }

    fn publish_holds(&self) {
        self.w.metrics.ordering_held_keys.with_label_values(&[&self.key]).set(self.holds.len() as i64);
    }

    async fn dead_letter(&self, job: Job, lane: Option<&str>, reason: &str, attempts: u32) {
        let ev = &job.ev;
        let accepted = self.send_to_sink(&dead_letter_of(ev, &self.key, reason, attempts)).await;
        // In an attempt's span, its outcome (the other callers have no such span).
        tracing::Span::current().record(OUTCOME, if accepted { "dead_lettered" } else { INTERRUPTED });
        if accepted {
            self.finished(job, lane, true, None).await;
        }
    }

    pub(crate) async fn dead_letter_malformed(&self, entry: &RawEntry, why: &str) {
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
            self.ack(&entry.id, None, None).await;
        }
    }

    /// Offer the record to the sink until it accepts; false at a hard stop (event stays
    /// pending). A record the sink refuses for good goes to the Redis dead-letter stream.
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
                Err(crate::Error::Rejected { sink, msg }) => {
                    w.metrics.dlq_refused.with_label_values(&[sink]).inc();
                    tracing::warn!(sink, error = %msg, id = %record.id, stream = %self.key, reason = %record.reason, "dead-letter sink refuses this record for good: keeping it in the Redis stream events:dlq");
                    let msg = &msg;
                    let kept = w
                        .redis_retry("dlq_stream", |mut con| async move {
                            let id = crate::dlq::stream::add(&mut con, record, msg).await?;
                            // In a cluster events:dlq is in another slot than the stream: on a
                            // replica before the entry is acknowledged.
                            con.wait_replicated(crate::dlq::stream::DLQ_STREAM, crate::streams::REPLICA_WAIT).await;
                            Ok(id)
                        })
                        .await;
                    if kept.is_none() {
                        return false;
                    }
                    w.metrics.dead_lettered.with_label_values(&[&self.key, &record.reason]).inc();
                    return true;
                }
                Ok(()) => {
                    if n > 1 {
                        w.health.set_dlq_error(None);
                        tracing::info!(sink = w.sink.name(), "dead-letter sink accepts again");
                    }
                    w.metrics.dead_lettered.with_label_values(&[&self.key, &record.reason]).inc();
                    // The console sink prints each letter itself; the others are logged here.
                    if w.sink.name() != "console" {
                        if let Some(suppressed) = DEAD_LETTER_LOG.allow() {
                            if suppressed > 0 {
                                tracing::info!(
                                    suppressed,
                                    "dead letters not logged in the last {DEAD_LETTER_LOG_WINDOW:?} (rate-limited)"
                                );
                            }
                            tracing::info!(id = %record.id, r#type = %record.event_type, reason = %record.reason, stream = %self.key, sink = w.sink.name(), "dead-lettered");
                        }
                    }
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

/// At most [`DEAD_LETTER_LOG_MAX`] dead-letter lines per window; the rest are counted and
/// the count logged with the next line that is.
pub(crate) const DEAD_LETTER_LOG_WINDOW: Duration = Duration::from_secs(10);
const DEAD_LETTER_LOG_MAX: u32 = 20;
static DEAD_LETTER_LOG: LogBudget = LogBudget::new();

pub(crate) struct LogBudget(std::sync::Mutex<(Option<std::time::Instant>, u32, u64)>);

impl LogBudget {
    const fn new() -> Self {
        Self(std::sync::Mutex::new((None, 0, 0)))
    }

    /// Some(lines suppressed since the last one logged) when this line may be logged.
    fn allow(&self) -> Option<u64> {
        let mut g = crate::lock(&self.0);
        let (start, used, suppressed) = &mut *g;
        let now = std::time::Instant::now();
        if start.is_none_or(|s| now.duration_since(s) >= DEAD_LETTER_LOG_WINDOW) {
            *start = Some(now);
            *used = 0;
        }
        if *used >= DEAD_LETTER_LOG_MAX {
            *suppressed += 1;
            return None;
        }
        *used += 1;
        Some(std::mem::take(suppressed))
    }
}

fn dead_letter_of(ev: &Event, stream: &str, reason: &str, attempts: u32) -> DeadLetter {
    DeadLetter {
        id: ev.dlq_id().to_string(),
        event_type: ev.event_type.clone(),
        reason: reason.to_string(),
        payload: payload_text(&ev.payload),
        stream: stream.to_string(),
        attempts,
        meta: Some(Value::Object(ev.meta.clone()).to_string()),
    }
}
