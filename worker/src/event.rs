//! One stream entry, parsed: the original worker's `meta` / `payload` / `timeout` fields.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::config::Ordering;

/// A raw stream entry: its id and field/value pairs (None when the entry was deleted but is
/// still listed in a pending list).
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub id: String,
    pub fields: Option<Vec<(String, Bytes)>>,
}

impl RawEntry {
    pub fn field(&self, name: &str) -> Option<&Bytes> {
        self.fields.as_ref()?.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// A readable event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Stream entry id.
    pub entry_id: String,
    /// `meta.id` as a string, when present.
    pub id: Option<String>,
    pub event_type: String,
    pub meta: Map<String, Value>,
    pub payload: Bytes,
    pub timeout: Option<Duration>,
    /// `meta.createdAt` as unix seconds.
    pub created_at: Option<f64>,
    pub url: Option<String>,
    pub queue: Option<String>,
    pub ordering_key: Option<String>,
    /// Failed attempts already recorded in meta (by a scheduled retry).
    pub prior_failures: u32,
    /// Set on events that may go ahead on a held ordering key (see `ordering.rs`).
    pub hold_token: Option<String>,
}

/// Field in meta (or, from producers that cannot write meta, of the entry) carrying the
/// producer's W3C trace context.
pub const TRACEPARENT_FIELD: &str = "traceparent";
pub const TRACESTATE_FIELD: &str = "tracestate";

/// Field in meta where scheduled retries carry the failures so far.
pub const ATTEMPTS_FIELD: &str = "attempts";
/// Field in meta where an event without `createdAt` carries when it was first put off, so
/// the age budget applies to it too.
pub const SINCE_FIELD: &str = "deferredSince";

impl Event {
    /// The id used for dead letters, attempt counters and `X-Event-Id` fallbacks.
    pub fn dlq_id(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.entry_id)
    }

    /// The producer's `traceparent` (or the first attempt's, once retried), when it is a
    /// valid one; None for a missing or malformed value.
    pub fn trace_parent(&self) -> Option<&str> {
        let tp = self.meta.get(TRACEPARENT_FIELD).and_then(Value::as_str)?.trim();
        ew_otel::parse_traceparent(tp).map(|_| tp)
    }

    pub fn trace_state(&self) -> Option<&str> {
        self.meta.get(TRACESTATE_FIELD).and_then(Value::as_str)
    }

    /// Unix seconds the event's age counts from: `createdAt`, else when it was first put
    /// off, else when its stream entry was added.
    pub fn born(&self) -> f64 {
        self.created_at
            .or_else(|| self.meta.get(SINCE_FIELD).and_then(Value::as_f64))
            .or_else(|| entry_millis(&self.entry_id).map(|ms| ms as f64 / 1000.0))
            .unwrap_or_else(now_unix)
    }
}

/// Why an entry could not be read as an event.
#[derive(Debug, Clone, PartialEq)]
pub struct Malformed(pub String);

pub fn parse(entry: &RawEntry, key_field: &str) -> Result<Event, Malformed> {
    let meta_raw = entry.field("meta").ok_or_else(|| Malformed("meta field missing".into()))?;
    let meta: Value = serde_json::from_slice(meta_raw).map_err(|e| Malformed(format!("meta is not JSON: {e}")))?;
    let Value::Object(mut meta) = meta else {
        return Err(Malformed("meta is not a JSON object".into()));
    };
    // A trace context given as an entry field travels in meta from here on, so that
    // scheduled retries, held events and dead letters keep it. Meta's own wins.
    if !meta.contains_key(TRACEPARENT_FIELD) {
        for name in [TRACEPARENT_FIELD, TRACESTATE_FIELD] {
            if let Some(v) = entry.field(name).and_then(|v| std::str::from_utf8(v).ok()) {
                meta.insert(name.into(), Value::String(v.trim().to_string()));
            }
        }
    }
    let id = match meta.get("id") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let str_field = |name: &str| match meta.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let event_type = str_field("type").unwrap_or_else(|| "unknown".into());
    let timeout = entry
        .field("timeout")
        .and_then(|t| std::str::from_utf8(t).ok())
        .and_then(|t| t.trim().parse::<f64>().ok())
        .filter(|t| t.is_finite() && *t > 0.0 && *t < 1e7)
        .map(Duration::from_secs_f64);
    let prior_failures = meta.get(ATTEMPTS_FIELD).and_then(Value::as_u64).unwrap_or(0).min(u32::MAX as u64) as u32;
    Ok(Event {
        entry_id: entry.id.clone(),
        created_at: meta.get("createdAt").and_then(Value::as_str).and_then(parse_timestamp),
        url: str_field("url"),
        queue: str_field("queue"),
        ordering_key: str_field(key_field),
        id,
        event_type,
        payload: entry.field("payload").cloned().unwrap_or_default(),
        timeout,
        prior_failures,
        hold_token: entry.field("holdToken").and_then(|t| std::str::from_utf8(t).ok()).map(str::to_string),
        meta,
    })
}

/// The lane an event runs in: events in the same lane are delivered one after another.
pub fn lane(ordering: Ordering, event: &Event) -> Option<String> {
    match ordering {
        Ordering::Key => event.ordering_key.clone(),
        Ordering::Stream => Some(String::new()),
        Ordering::None => None,
    }
}

/// ISO-8601 / RFC 3339 to unix seconds; a timestamp without offset is UTC.
pub fn parse_timestamp(s: &str) -> Option<f64> {
    use time::format_description::well_known::Rfc3339;
    use time::{OffsetDateTime, PrimitiveDateTime};
    let s = s.trim();
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t.unix_timestamp_nanos() as f64 / 1e9);
    }
    // Naive forms: "2024-01-02T03:04:05[.ffffff]" or with a space.
    let normalized = s.replacen(' ', "T", 1);
    let fmt = time::macros::format_description!(
        version = 2,
        "[year]-[month]-[day]T[hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    if let Ok(t) = PrimitiveDateTime::parse(&normalized, &fmt) {
        return Some(t.assume_utc().unix_timestamp_nanos() as f64 / 1e9);
    }
    let date = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(s, &date).ok().map(|d| d.midnight().assume_utc().unix_timestamp() as f64)
}

/// Seconds since the unix epoch, now.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// `createdAt` value for now, in the form producers use.
pub fn iso_now() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Milliseconds part of a stream entry id ("1700000000000-0").
pub fn entry_millis(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(fields: &[(&str, &str)]) -> RawEntry {
        RawEntry {
            id: "1-0".into(),
            fields: Some(fields.iter().map(|(k, v)| (k.to_string(), Bytes::from(v.to_string()))).collect()),
        }
    }

    #[test]
    fn parses_the_original_fields() {
        let e = parse(
            &raw(&[
                ("meta", r#"{"id":42,"type":"user.created","createdAt":"2024-01-01T00:00:00","url":"http://x/y","queue":"q","orderingKey":"u1"}"#),
                ("payload", "{\"a\":1}"),
                ("timeout", "2.5"),
            ]),
            "orderingKey",
        )
        .unwrap();
        assert_eq!(e.id.as_deref(), Some("42"));
        assert_eq!(e.event_type, "user.created");
        assert_eq!(e.created_at, Some(1704067200.0));
        assert_eq!(e.url.as_deref(), Some("http://x/y"));
        assert_eq!(e.queue.as_deref(), Some("q"));
        assert_eq!(e.ordering_key.as_deref(), Some("u1"));
        assert_eq!(e.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(&e.payload[..], b"{\"a\":1}");
        assert_eq!(lane(Ordering::Key, &e).as_deref(), Some("u1"));
        assert_eq!(lane(Ordering::Stream, &e).as_deref(), Some(""));
        assert_eq!(lane(Ordering::None, &e), None);
    }

    #[test]
    fn defaults_when_fields_absent() {
        let e = parse(&raw(&[("meta", "{}")]), "orderingKey").unwrap();
        assert_eq!(e.id, None);
        assert_eq!(e.dlq_id(), "1-0");
        assert_eq!(e.event_type, "unknown");
        assert!(e.payload.is_empty());
        assert_eq!(lane(Ordering::Key, &e), None);
    }

    #[test]
    fn a_trace_context_travels_in_meta() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let in_meta = format!(r#"{{"traceparent":"{tp}","tracestate":"a=b"}}"#);
        let e = parse(&raw(&[("meta", &in_meta), ("traceparent", "ignored")]), "k").unwrap();
        assert_eq!((e.trace_parent(), e.trace_state()), (Some(tp), Some("a=b")));
        // As entry fields (producers that cannot write meta): copied into meta, which is
        // what scheduled retries and dead letters keep.
        let e = parse(&raw(&[("meta", "{}"), ("traceparent", tp), ("tracestate", "c=d")]), "k").unwrap();
        assert_eq!((e.trace_parent(), e.trace_state()), (Some(tp), Some("c=d")));
        assert_eq!(e.meta["traceparent"], tp);
        assert_eq!(parse(&raw(&[("meta", "{}")]), "k").unwrap().trace_parent(), None);
        // A malformed one counts as none (the first attempt's context replaces it).
        let bad = parse(&raw(&[("meta", r#"{"traceparent":"00-XYZ-1-01"}"#)]), "k").unwrap();
        assert_eq!(bad.trace_parent(), None);
        let spaced = format!(r#"{{"traceparent":" {tp} "}}"#);
        assert_eq!(parse(&raw(&[("meta", &spaced)]), "k").unwrap().trace_parent(), Some(tp));
    }

    #[test]
    fn malformed_entries() {
        assert!(parse(&raw(&[("payload", "x")]), "k").is_err());
        assert!(parse(&raw(&[("meta", "{not json")]), "k").is_err());
        assert!(parse(&raw(&[("meta", "[1,2]")]), "k").is_err());
        assert!(parse(&RawEntry { id: "1-0".into(), fields: None }, "k").is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("2024-01-01T00:00:00Z"), Some(1704067200.0));
        assert_eq!(parse_timestamp("2024-01-01T01:00:00+01:00"), Some(1704067200.0));
        assert_eq!(parse_timestamp("2024-01-01 00:00:00.5"), Some(1704067200.5));
        assert_eq!(parse_timestamp("2024-01-02"), Some(1704153600.0));
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(entry_millis("1700000000000-3"), Some(1700000000000));
    }
}
