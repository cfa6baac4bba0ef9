//! Builds the HTTP request for an event and classifies what came back into an [`Outcome`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use reqwest::StatusCode;
use sha2::Sha256;

use crate::config::Config;
use crate::event::Event;
use crate::limiter::Signal;
use crate::policy::TargetPolicy;
use crate::retry::parse_retry_after;
use ew_otel::TraceContext;

/// What to do with an event after one delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// 2xx: acknowledge.
    Delivered,
    /// The receiver asked for a later retry; `delay` None means "use our backoff".
    Schedule { delay: Option<Duration>, reason: String },
    /// The target host is unavailable: retry in place once it answers a probe again.
    HostDown { reason: String },
    /// Give up: to the dead-letter sink.
    DeadLetter { reason: String },
}

impl Outcome {
    /// What the answer says about the receiver's capacity, for its host's limiter: 429, any
    /// 5xx, timeouts and connection failures push back; everything else does not.
    pub fn signal(&self) -> Signal {
        let r = self.reason();
        let pushes_back = r == "http_429"
            || r.strip_prefix("http_5").is_some()
            || matches!(r, "timeout" | "connect_error" | "request_error");
        if pushes_back {
            Signal::Backpressure
        } else {
            Signal::Ok
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Schedule { reason, .. } | Outcome::HostDown { reason } | Outcome::DeadLetter { reason } => reason,
        }
    }
}

/// Whether a probe's answer means the host is alive: the original's list (200, 204, 3xx,
/// 404, 405), any other answer an application gives when it is up (401 and 403 from an
/// auth layer, 400 from a strict router), and 501: a server without `OPTIONS` (Python's
/// http.server, many small frameworks) is up all the same.
pub fn probe_says_alive(status: u16) -> bool {
    status < 500 || status == 501
}

/// Classify an HTTP response (DESIGN.md §2).
pub fn classify(status: StatusCode, headers: &HeaderMap, now: SystemTime) -> Outcome {
    let code = status.as_u16();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| parse_retry_after(v, now));
    let reason = format!("http_{code}");
    match code {
        200..=299 => Outcome::Delivered,
        // The header's presence asks for a retry; a value we cannot read means our backoff.
        400 if headers.contains_key("x-retry-after") => Outcome::Schedule { delay: header("x-retry-after"), reason },
        400 => Outcome::DeadLetter { reason },
        // 429 without Retry-After is still "slow down", never a reason to drop the event.
        429 => Outcome::Schedule { delay: header("retry-after"), reason },
        503 => match header("retry-after") {
            Some(delay) => Outcome::Schedule { delay: Some(delay), reason },
            None => Outcome::HostDown { reason },
        },
        502 | 504 => Outcome::HostDown { reason },
        _ => Outcome::DeadLetter { reason },
    }
}

/// Classify a transport error: the host is unreachable or too slow.
pub fn classify_error(err: &reqwest::Error) -> Outcome {
    let reason = if err.is_timeout() {
        "timeout"
    } else if err.is_connect() {
        "connect_error"
    } else {
        "request_error"
    };
    Outcome::HostDown { reason: reason.into() }
}

type HmacSha256 = Hmac<Sha256>;

/// Where an event goes: its URL, parsed, and the host it belongs to for pausing.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: reqwest::Url,
    pub host: Arc<str>,
    /// The default target's host or an allowlisted one: it may see TARGET_HEADERS and
    /// signatures.
    pub trusted: bool,
}

impl Target {
    /// An http(s) URL the policy allows; `Err` is the dead-letter reason.
    pub fn parse(url: &str, policy: &TargetPolicy) -> Result<Self, &'static str> {
        let url =
            reqwest::Url::parse(url).ok().filter(|u| matches!(u.scheme(), "http" | "https")).ok_or("invalid_url")?;
        let trusted = policy.check(&url)?;
        let host = host_key(&url).into();
        Ok(Self { url, host, trusted })
    }
}

/// Most bytes of a response body read (and thrown away) per delivery.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// Parsed default targets per event type; bounded, since types come from events.
const TARGET_CACHE_MAX: usize = 1024;

/// Sends events over one shared connection pool.
#[derive(Clone)]
pub struct Deliverer {
    client: reqwest::Client,
    default_uri: String,
    read_timeout: Duration,
    secret: Option<Vec<u8>>,
    targets: Arc<RwLock<HashMap<String, Target>>>,
    extra_headers: HeaderMap,
    policy: TargetPolicy,
}

impl Deliverer {
    pub fn new(cfg: &Config) -> crate::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .pool_max_idle_per_host(1024)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("eventworker/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(cfg.targets.resolver())
            .build()?;
        Ok(Self {
            client,
            default_uri: cfg.default_worker_uri.clone(),
            read_timeout: cfg.read_timeout,
            secret: cfg.webhook_secret.clone(),
            targets: Arc::default(),
            extra_headers: cfg
                .target_headers
                .iter()
                .filter_map(|(k, v)| {
                    Some((reqwest::header::HeaderName::from_bytes(k.as_bytes()).ok()?, HeaderValue::from_str(v).ok()?))
                })
                .collect(),
            policy: cfg.targets.clone(),
        })
    }

    /// Where an event goes: `meta.url`, or the default URI with its type filled in. `Err`
    /// (the dead-letter reason) when that is not an http(s) URL or the policy refuses it.
    pub fn target(&self, ev: &Event) -> Result<Target, &'static str> {
        if let Some(u) = &ev.url {
            return Target::parse(u, &self.policy);
        }
        if let Some(t) = self.targets.read().unwrap_or_else(|p| p.into_inner()).get(&ev.event_type) {
            return Ok(t.clone());
        }
        // The type comes from the producer: encoded, it cannot change the URL's structure.
        let url = self.default_uri.replace("[EVENT_TYPE]", &crate::config::percent_encode(&ev.event_type));
        let t = Target::parse(&url, &self.policy)?;
        let mut cache = self.targets.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() < TARGET_CACHE_MAX {
            cache.insert(ev.event_type.clone(), t.clone());
        }
        Ok(t)
    }

    /// One POST attempt. `attempt` is 1-based; `trace` is the context the receiver
    /// continues. The HTTP status is recorded on the current span (the attempt's).
    pub async fn deliver(
        &self,
        ev: &Event,
        target: &Target,
        stream_key: &str,
        attempt: u32,
        trace: &TraceContext,
    ) -> Outcome {
        let headers = self.headers(ev, target, stream_key, attempt, trace);
        let mut request = reqwest::Request::new(reqwest::Method::POST, target.url.clone());
        *request.headers_mut() = headers;
        *request.timeout_mut() = Some(ev.timeout.unwrap_or(self.read_timeout));
        *request.body_mut() = Some(ev.payload.clone().into());
        match self.client.execute(request).await {
            Ok(mut resp) => {
                tracing::Span::current().record("http.response.status_code", i64::from(resp.status().as_u16()));
                let outcome = classify(resp.status(), resp.headers(), SystemTime::now());
                // Drain the body so the connection goes back to the pool, but only so much
                // of it: a receiver answering with a huge body just loses its connection.
                let mut read = 0usize;
                while let Ok(Some(chunk)) = resp.chunk().await {
                    read += chunk.len();
                    if read > MAX_RESPONSE_BODY {
                        break;
                    }
                }
                outcome
            }
            Err(e) if e.is_builder() => Outcome::DeadLetter { reason: "invalid_url".into() },
            Err(e) if crate::policy::is_denied_error(&e) => {
                Outcome::DeadLetter { reason: crate::policy::DENIED.into() }
            }
            Err(e) => classify_error(&e),
        }
    }

    /// The delivery headers of one attempt (also sent with the host's `OPTIONS` probe, so a
    /// receiver that checks them answers the probe as it would the delivery).
    /// TARGET_HEADERS and signatures only go to a trusted target.
    pub fn headers(
        &self,
        ev: &Event,
        target: &Target,
        stream_key: &str,
        attempt: u32,
        trace: &TraceContext,
    ) -> HeaderMap {
        let mut headers = if target.trusted { self.extra_headers.clone() } else { HeaderMap::new() };
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        if let Some(id) = ev.id.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert("x-event-id", id);
        }
        if let Ok(v) = HeaderValue::from_str(&ev.event_type) {
            headers.insert("x-event-type", v);
        }
        if let Ok(v) = HeaderValue::from_str(ev.queue.as_deref().unwrap_or(stream_key)) {
            headers.insert("x-event-queue", v);
        }
        headers.insert("x-event-attempt", HeaderValue::from(attempt));
        if let Ok(v) = HeaderValue::from_str(&trace.traceparent) {
            headers.insert("traceparent", v);
        }
        if let Some(v) = trace.tracestate.as_deref().and_then(|s| HeaderValue::from_str(s).ok()) {
            headers.insert("tracestate", v);
        }
        if let Some(secret) = self.secret.as_ref().filter(|_| target.trusted) {
            let ts = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let msg_id = ev.dlq_id();
            let sig = sign(secret, msg_id, ts, &ev.payload);
            for (k, v) in
                [("webhook-id", msg_id.to_string()), ("webhook-timestamp", ts.to_string()), ("webhook-signature", sig)]
            {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    headers.insert(k, v);
                }
            }
        }
        headers
    }

    /// `OPTIONS` probe with the delivery headers: is the host answering again? Any answer
    /// below 500 counts as alive.
    pub async fn probe(&self, url: &reqwest::Url, mut headers: HeaderMap) -> bool {
        headers.remove(CONTENT_TYPE);
        match self
            .client
            .request(reqwest::Method::OPTIONS, url.clone())
            .headers(headers)
            .timeout(self.read_timeout.min(Duration::from_secs(10)))
            .send()
            .await
        {
            Ok(resp) => probe_says_alive(resp.status().as_u16()),
            Err(_) => false,
        }
    }

    /// The read timeout used for events without their own `timeout`.
    pub fn read_timeout(&self) -> Duration {
        self.read_timeout
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

/// The pause domain of a URL: scheme, host and port.
pub fn host_key(u: &reqwest::Url) -> String {
    format!("{}://{}:{}", u.scheme(), u.host_str().unwrap_or(""), u.port_or_known_default().unwrap_or(0))
}

/// Standard Webhooks signature: `v1,` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")).
pub fn sign(secret: &[u8], msg_id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn c(code: u16, pairs: &[(&'static str, &str)]) -> Outcome {
        classify(StatusCode::from_u16(code).unwrap(), &hdrs(pairs), SystemTime::now())
    }

    #[test]
    fn a_probe_answer_from_a_running_server_counts_as_alive() {
        for up in [200, 204, 301, 400, 401, 403, 404, 405, 501] {
            assert!(probe_says_alive(up), "{up}");
        }
        for down in [500, 502, 503, 504] {
            assert!(!probe_says_alive(down), "{down}");
        }
    }

    #[test]
    fn classification_follows_the_contract() {
        assert_eq!(c(200, &[]), Outcome::Delivered);
        assert_eq!(c(204, &[]), Outcome::Delivered);
        assert_eq!(
            c(400, &[("x-retry-after", "30")]),
            Outcome::Schedule { delay: Some(Duration::from_secs(30)), reason: "http_400".into() }
        );
        assert_eq!(c(400, &[]), Outcome::DeadLetter { reason: "http_400".into() });
        for odd in ["-5", "NaN", "soon", "1e20", "Thu, 01 Jan 1970 00:00:00 GMT"] {
            // Never a panic, never a dead letter: the event is scheduled, with a bounded delay.
            match c(400, &[("x-retry-after", odd)]) {
                Outcome::Schedule { delay, .. } => {
                    assert!(delay.is_none_or(|d| d <= crate::retry::MAX_SCHEDULE_DELAY), "{odd}: {delay:?}")
                }
                o => panic!("{odd}: {o:?}"),
            }
            assert!(matches!(c(429, &[("retry-after", odd)]), Outcome::Schedule { .. }), "{odd}");
        }
        assert_eq!(c(400, &[("retry-after", "3")]), Outcome::DeadLetter { reason: "http_400".into() });
        assert_eq!(
            c(429, &[("retry-after", "2")]),
            Outcome::Schedule { delay: Some(Duration::from_secs(2)), reason: "http_429".into() }
        );
        assert_eq!(c(429, &[]), Outcome::Schedule { delay: None, reason: "http_429".into() });
        assert_eq!(
            c(503, &[("retry-after", "1")]),
            Outcome::Schedule { delay: Some(Duration::from_secs(1)), reason: "http_503".into() }
        );
        assert_eq!(c(503, &[]), Outcome::HostDown { reason: "http_503".into() });
        assert_eq!(c(502, &[]), Outcome::HostDown { reason: "http_502".into() });
        assert_eq!(c(504, &[]), Outcome::HostDown { reason: "http_504".into() });
        for code in [301, 401, 404, 409, 422, 500, 501] {
            assert_eq!(c(code, &[]), Outcome::DeadLetter { reason: format!("http_{code}") });
        }
    }

    #[test]
    fn what_pushes_back() {
        for (code, pushes) in [(200, false), (404, false), (400, false), (429, true), (500, true), (502, true)] {
            assert_eq!(c(code, &[]).signal() == Signal::Backpressure, pushes, "{code}");
        }
        assert_eq!(Outcome::HostDown { reason: "timeout".into() }.signal(), Signal::Backpressure);
        assert_eq!(Outcome::HostDown { reason: "connect_error".into() }.signal(), Signal::Backpressure);
    }

    #[test]
    fn standard_webhooks_signature() {
        // Test vector from the Standard Webhooks specification's reference implementations.
        use base64::Engine;
        let secret = base64::engine::general_purpose::STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn host_keys_include_port() {
        let policy = TargetPolicy::parse("*", "", "http://a/").unwrap();
        let key = |u: &str| Target::parse(u, &policy).unwrap().host.to_string();
        assert_eq!(key("http://a:8080/x/1"), "http://a:8080");
        assert_eq!(key("https://a/x"), "https://a:443");
        assert_ne!(key("http://a:1/"), key("http://a:2/"));
        assert_eq!(Target::parse("ftp://a/x", &policy).err(), Some("invalid_url"));
        assert_eq!(Target::parse("not a url", &policy).err(), Some("invalid_url"));
    }

    #[test]
    fn event_types_are_encoded_into_the_default_uri() {
        let cfg =
            crate::config::tests::parse(&["--default-worker-uri", "http://h:1/events/[EVENT_TYPE]?t=[EVENT_TYPE]"])
                .unwrap();
        let d = Deliverer::new(&cfg).unwrap();
        let entry = crate::event::RawEntry {
            id: "1-0".into(),
            fields: Some(vec![("meta".into(), bytes::Bytes::from(r#"{"type":"a b/../admin?x=1#f"}"#))]),
        };
        let ev = crate::event::parse(&entry, "orderingKey").unwrap();
        let t = d.target(&ev).unwrap();
        assert_eq!(t.url.path(), "/events/a%20b%2F..%2Fadmin%3Fx%3D1%23f");
        assert_eq!(t.url.query(), Some("t=a%20b%2F..%2Fadmin%3Fx%3D1%23f"));
        assert_eq!(t.host.as_ref(), "http://h:1");
    }
}
