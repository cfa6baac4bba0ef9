//! Every metric the worker exports, registered into one registry.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Event types kept as label values; later new types are counted as `other`.
pub const MAX_TYPE_LABELS: usize = 200;

pub struct Metrics {
    pub registry: Registry,
    /// Event types seen so far (label values are bounded: types come from producers).
    types: std::sync::Mutex<std::collections::HashSet<String>>,
    // Names kept from the original worker.
    pub processed: IntCounterVec,
    pub failed: IntCounterVec,
    pub event_age: HistogramVec,
    pub processing_duration: HistogramVec,
    // Added.
    pub dead_lettered: IntCounterVec,
    pub dlq_sink_errors: IntCounterVec,
    pub retries_scheduled: IntCounterVec,
    pub scheduled_retries: IntGauge,
    pub dlq_refused: IntCounterVec,
    pub dlq_stream_length: IntGauge,
    pub outbox_cleanups_pending: IntGauge,
    pub outbox_rows_deleted: IntCounter,
    pub outbox_undelivered: IntGauge,
    pub consumers_removed: IntCounter,
    pub in_flight: IntGaugeVec,
    pub stream_length: IntGaugeVec,
    pub stream_pending: IntGaugeVec,
    pub stream_lag: IntGaugeVec,
    pub stream_backlog: IntGaugeVec,
    pub oldest_pending_age: GaugeVec,
    pub oldest_age: GaugeVec,
    pub host_circuit_open: IntGaugeVec,
    pub host_limit: IntGaugeVec,
    pub host_in_flight: IntGaugeVec,
    pub host_queued: IntGaugeVec,
    pub host_latency_baseline: GaugeVec,
    pub deferred: IntCounterVec,
    pub ordering_held_keys: IntGaugeVec,
    pub stream_leader: IntGaugeVec,
    pub held_keys_expired: IntCounterVec,
    pub redis_errors: IntCounterVec,
    pub claimed: IntCounterVec,
    pub ack_batch: Histogram,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let lat = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
        let age = vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0];
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        Self {
            processed: counter("events_processed_total", "Events delivered (2xx)", &["stream", "type"]),
            failed: counter("events_failed_total", "Failed delivery attempts", &["stream", "type", "reason"]),
            event_age: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("event_age_seconds", "createdAt to delivery").buckets(age),
                    &["stream", "type"],
                )
                .expect("valid metric"),
            ),
            processing_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("event_processing_duration_seconds", "Duration of one delivery attempt")
                        .buckets(lat),
                    &["type"],
                )
                .expect("valid metric"),
            ),
            dead_lettered: counter(
                "events_dead_lettered_total",
                "Events handed to the dead-letter sink",
                &["stream", "reason"],
            ),
            dlq_sink_errors: counter(
                "dlq_sink_errors_total",
                "Dead-letter sink failures (the event is held and retried)",
                &["sink"],
            ),
            retries_scheduled: counter(
                "events_retry_scheduled_total",
                "Events scheduled for a later retry",
                &["stream"],
            ),
            scheduled_retries: reg(
                &r,
                IntGauge::new("scheduled_retries", "Entries waiting in events:retry:delays").expect("valid metric"),
            ),
            dlq_refused: counter(
                "dlq_refused_total",
                "Dead letters the sink refused for good, kept in the Redis stream events:dlq instead",
                &["sink"],
            ),
            dlq_stream_length: reg(
                &r,
                IntGauge::new("dlq_stream_length", "Dead letters waiting in the Redis stream events:dlq")
                    .expect("valid metric"),
            ),
            outbox_cleanups_pending: reg(
                &r,
                IntGauge::new(
                    "outbox_cleanups_pending",
                    "Delivered events whose outbox row is not deleted yet (recorded in Redis)",
                )
                .expect("valid metric"),
            ),
            outbox_rows_deleted: reg(
                &r,
                IntCounter::new("outbox_rows_deleted_total", "Outbox rows deleted after delivery")
                    .expect("valid metric"),
            ),
            outbox_undelivered: reg(
                &r,
                IntGauge::new(
                    "outbox_undelivered_rows",
                    "Outbox rows neither delivered nor dead-lettered OUTBOX_AUDIT_AFTER after created_at",
                )
                .expect("valid metric"),
            ),
            consumers_removed: reg(
                &r,
                IntCounter::new(
                    "consumers_removed_total",
                    "Idle consumers with nothing pending removed from the group",
                )
                .expect("valid metric"),
            ),
            in_flight: gauge("events_in_flight", "Events read and not yet finished", &["stream"]),
            stream_length: gauge("stream_length", "XLEN of the stream", &["stream"]),
            stream_pending: gauge("stream_pending", "Entries delivered to the group and not acknowledged", &["stream"]),
            stream_lag: gauge("stream_lag", "Entries the group has not read yet (undelivered)", &["stream"]),
            stream_backlog: gauge(
                "stream_backlog",
                "Undelivered plus pending entries: the work left (the autoscaling signal)",
                &["stream"],
            ),
            oldest_age: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "stream_oldest_age_seconds",
                        "Age of the oldest entry in the backlog (pending or undelivered)",
                    ),
                    &["stream"],
                )
                .expect("valid metric"),
            ),
            oldest_pending_age: reg(
                &r,
                GaugeVec::new(
                    Opts::new("stream_oldest_pending_age_seconds", "Age of the oldest pending entry"),
                    &["stream"],
                )
                .expect("valid metric"),
            ),
            host_circuit_open: gauge("host_circuit_open", "1 while deliveries to a target host are paused", &["host"]),
            host_limit: gauge("host_concurrency_limit", "Requests allowed at once to a target host now", &["host"]),
            host_in_flight: gauge("host_in_flight", "Requests in flight to a target host", &["host"]),
            host_queued: gauge("host_queued", "Events waiting for a slot at a target host", &["host"]),
            host_latency_baseline: reg(
                &r,
                GaugeVec::new(
                    Opts::new("host_latency_baseline_seconds", "Latency of a target host when not congested"),
                    &["host"],
                )
                .expect("valid metric"),
            ),
            deferred: counter(
                "events_deferred_total",
                "Events moved to the retry schedule without an attempt (host paused or saturated)",
                &["stream", "reason"],
            ),
            ordering_held_keys: gauge(
                "ordering_held_keys",
                "Ordering keys waiting behind an event scheduled for retry",
                &["stream"],
            ),
            held_keys_expired: counter(
                "ordering_held_keys_expired_total",
                "Held ordering keys handed on because their holder never came back",
                &["stream"],
            ),
            stream_leader: gauge(
                "stream_leader",
                "1 while this worker holds the ordering lease of the stream (ordered streams only)",
                &["stream"],
            ),
            redis_errors: counter("redis_errors_total", "Redis command failures", &["op"]),
            claimed: counter("events_claimed_total", "Entries recovered from pending lists", &["stream", "source"]),
            ack_batch: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("ack_batch_size", "Entries acknowledged per round trip")
                        .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]),
                )
                .expect("valid metric"),
            ),
            registry: r,
            types: Default::default(),
        }
    }

    /// The `type` label for an event type: the type itself for the first
    /// [`MAX_TYPE_LABELS`] types seen, `other` after that.
    pub fn type_label<'a>(&self, event_type: &'a str) -> &'a str {
        let mut types = crate::lock(&self.types);
        if types.contains(event_type) {
            return event_type;
        }
        if types.len() < MAX_TYPE_LABELS {
            types.insert(event_type.to_string());
            return event_type;
        }
        "other"
    }

    /// Drop a forgotten host's series, so label values stay bounded.
    pub fn remove_host(&self, host: &str) {
        for g in [&self.host_circuit_open, &self.host_limit, &self.host_in_flight, &self.host_queued] {
            let _ = g.remove_label_values(&[host]);
        }
        let _ = self.host_latency_baseline.remove_label_values(&[host]);
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_labels_are_bounded() {
        let m = Metrics::new();
        for i in 0..MAX_TYPE_LABELS {
            assert_eq!(m.type_label(&format!("t{i}")), format!("t{i}"));
        }
        assert_eq!(m.type_label("one.too.many"), "other");
        assert_eq!(m.type_label("t0"), "t0", "known types keep their name");
    }

    #[test]
    fn original_names_are_exported() {
        let m = Metrics::new();
        m.processed.with_label_values(&["events:fast", "t"]).inc();
        m.failed.with_label_values(&["events:fast", "t", "http_500"]).inc();
        m.event_age.with_label_values(&["events:fast", "t"]).observe(1.0);
        m.processing_duration.with_label_values(&["t"]).observe(0.1);
        let text = m.render();
        for name in [
            "events_processed_total{stream=\"events:fast\",type=\"t\"} 1",
            "events_failed_total{reason=\"http_500\",stream=\"events:fast\",type=\"t\"} 1",
            "event_age_seconds_count{stream=\"events:fast\",type=\"t\"} 1",
            "event_processing_duration_seconds_count{type=\"t\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
