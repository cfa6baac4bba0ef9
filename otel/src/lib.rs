//! Logging and trace export for eventworker's two binaries, set up once at start-up.
//!
//! Logs go to stderr through `tracing-subscriber` (text or JSON, `RUST_LOG` filters).
//! Traces are exported over OTLP (HTTP/protobuf) only when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set: the spans that make a trace are the
//! ones with target [`TARGET`]; without an endpoint they are disabled at their call site
//! and cost nothing. The standard `OTEL_*` variables (service name, resource attributes,
//! headers, timeout, sampler, batch sizes) are read by the OpenTelemetry SDK; the ones
//! this build cannot honour stop start-up with a message naming them.
//!
//! The W3C trace context helpers (`traceparent` / `tracestate`) work with tracing on or
//! off: with it off, a request still continues its producer's trace id.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// Target of the spans that are exported as traces (and kept out of the logs).
pub const TARGET: &str = "eventworker_trace";

const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const SAMPLERS: [&str; 6] = [
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Keeps the trace exporter running; dropping it exports what is still queued.
#[must_use = "dropping the guard stops trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn traces_exported(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("traces still queued could not be exported: {e}");
            }
        }
    }
}

/// Whether the environment asks for trace export, after checking the `OTEL_*` settings
/// this build depends on. `Err` names the variable and what is wrong with it.
pub fn traces_requested(env: impl Fn(&str) -> Option<String>) -> Result<bool, String> {
    let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(false);
    }
    let endpoint = match (set(TRACES_ENDPOINT), set(ENDPOINT)) {
        (Some(e), _) => Some((TRACES_ENDPOINT, e)),
        (None, Some(e)) => Some((ENDPOINT, e)),
        (None, None) => None,
    };
    let Some((name, endpoint)) = endpoint else { return Ok(false) };
    let e = endpoint.trim();
    let rest = e.strip_prefix("http://").or_else(|| e.strip_prefix("https://"));
    if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
        return Err(format!(
            "{name}={endpoint}: not an http:// or https:// URL (the collector's OTLP/HTTP port, usually 4318)"
        ));
    }
    for var in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
        if let Some(p) = set(var) {
            if p.trim() != "http/protobuf" {
                return Err(format!(
                    "{var}={p}: this build exports OTLP over http/protobuf only (the collector's port 4318); unset it or set http/protobuf"
                ));
            }
            break;
        }
    }
    if let Some(s) = set("OTEL_TRACES_SAMPLER") {
        let s = s.trim();
        if !SAMPLERS.contains(&s) {
            return Err(format!("OTEL_TRACES_SAMPLER={s}: not one of {}", SAMPLERS.join(", ")));
        }
        if s.ends_with("traceidratio") {
            let arg = set("OTEL_TRACES_SAMPLER_ARG").unwrap_or_else(|| "1".into());
            if !arg.trim().parse::<f64>().is_ok_and(|r| (0.0..=1.0).contains(&r)) {
                return Err(format!("OTEL_TRACES_SAMPLER_ARG={arg}: the sampled fraction, between 0 and 1"));
            }
        }
    }
    for var in ["OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] {
        if let Some(v) = set(var) {
            if !v.trim().parse::<u64>().is_ok_and(|n| n > 0) {
                return Err(format!("{var}={v}: a positive whole number"));
            }
        }
    }
    Ok(true)
}

/// Sets up logging, and trace export when the environment asks for it. `service` is the
/// `service.name` unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` name one.
/// `endpoint` is `OTEL_EXPORTER_OTLP_ENDPOINT` as the command line gave it (the variable
/// itself when not given). `Err` names the setting that stops start-up.
pub fn init(service: &'static str, format: LogFormat, endpoint: Option<&str>) -> Result<Telemetry, String> {
    let (dispatch, telemetry) = subscriber(service, Some(format), endpoint)?;
    let _ = tracing::dispatcher::set_global_default(dispatch);
    Ok(telemetry)
}

/// The subscriber [`init`] installs, without installing it (a test runs one future with it:
/// `tracing::instrument::WithSubscriber`). No log lines when `format` is None.
pub fn subscriber(
    service: &'static str,
    format: Option<LogFormat>,
    endpoint: Option<&str>,
) -> Result<(tracing::Dispatch, Telemetry), String> {
    let endpoint = endpoint.filter(|e| !e.trim().is_empty());
    let env = |name: &str| match (name, endpoint) {
        (ENDPOINT, Some(e)) => Some(e.to_string()),
        _ => std::env::var(name).ok(),
    };
    let provider = if traces_requested(env)? { Some(provider(service, endpoint)?) } else { None };

    // Trace spans never reach the log lines: formatting their fields on every event
    // would cost the hot path for nothing.
    let fmt = format.map(|format| {
        let filter = EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("info"))
            .add_directive(format!("{TARGET}=off").parse().expect("a valid directive"));
        // Colours only on a terminal: a log written to a file or a collector stays plain.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
        let fmt = match format {
            LogFormat::Json => fmt.json().flatten_event(true).boxed(),
            LogFormat::Text => fmt.boxed(),
        };
        fmt.with_filter(filter)
    });
    let otel = provider.as_ref().map(|p| {
        // The trace spans, and warnings and errors as events on them.
        let targets = Targets::new().with_target(TARGET, LevelFilter::INFO).with_default(LevelFilter::WARN);
        // Attributes are ours alone: no code location, thread or busy/idle times per span.
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .with_location(false)
            .with_target(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(targets)
    });
    // Without export, no OpenTelemetry layer at all: an absent layer would still make every
    // trace span's call site ask the filters each time.
    let registry = tracing_subscriber::registry().with(fmt);
    let dispatch = match otel {
        Some(otel) => tracing::Dispatch::new(registry.with(otel)),
        None => tracing::Dispatch::new(registry),
    };
    Ok((dispatch, Telemetry { provider }))
}

fn provider(service: &'static str, endpoint: Option<&str>) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig;
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
    // As the SDK does with the variable; an endpoint set here would override
    // OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, which must win.
    let traces_endpoint_set = std::env::var(TRACES_ENDPOINT).is_ok_and(|v| !v.trim().is_empty());
    if let Some(e) = endpoint.filter(|_| !traces_endpoint_set) {
        builder = builder.with_endpoint(format!("{}/v1/traces", e.trim().trim_end_matches('/')));
    }
    let exporter = builder.build().map_err(|e| format!("{ENDPOINT} / {TRACES_ENDPOINT}: cannot export traces: {e}"))?;
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !named {
        resource = resource.with_service_name(service);
    }
    // The sampler and the batch settings come from OTEL_TRACES_SAMPLER(_ARG) and OTEL_BSP_*.
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}

/// A W3C trace context as carried by an event: its `traceparent` and `tracestate`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

struct Carrier<'a>(Option<&'a str>, Option<&'a str>);

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.0,
            "tracestate" => self.1,
            _ => None,
        }
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

impl Injector for TraceContext {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => self.traceparent = value,
            "tracestate" if !value.is_empty() => self.tracestate = Some(value),
            _ => {}
        }
    }
}

/// Makes `span` a child of the producer's context (`traceparent` / `tracestate`). Call it
/// before the span is entered; a span that is not exported ignores it.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if span.is_disabled() || traceparent.is_none() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&Carrier(traceparent, tracestate));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The trace context to send with the request that `span` stands for. When the span is
/// not exported (tracing off, or not sampled by the layer): the producer's trace id and
/// flags with a fresh span id, or a fresh trace when the producer sent none or an invalid
/// one, so a receiver always sees one trace per event.
pub fn outgoing(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) -> TraceContext {
    if !span.is_disabled() {
        let cx = span.context();
        if cx.span().span_context().is_valid() {
            let mut out = TraceContext::default();
            TraceContextPropagator::new().inject_context(&cx, &mut out);
            return out;
        }
    }
    match traceparent.and_then(parse_traceparent) {
        Some(p) => TraceContext {
            traceparent: format_traceparent(p.trace_id, fresh_span_id(), p.flags),
            tracestate: tracestate.filter(|s| !s.is_empty()).map(str::to_string),
        },
        None => {
            TraceContext { traceparent: format_traceparent(fresh_trace_id(), fresh_span_id(), 1), tracestate: None }
        }
    }
}

/// The parts of a valid version-00 `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

/// Parses a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero);
/// `None` for anything else.
pub fn parse_traceparent(s: &str) -> Option<TraceParent> {
    let mut parts = s.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    // Version 00 has exactly four parts; a later version may add some (W3C §3.2.4).
    if !hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    let tp = TraceParent {
        trace_id: u128::from_str_radix(trace, 16).ok()?,
        span_id: u64::from_str_radix(span, 16).ok()?,
        flags: u8::from_str_radix(flags, 16).ok()?,
    };
    (tp.trace_id != 0 && tp.span_id != 0).then_some(tp)
}

pub fn format_traceparent(trace_id: u128, span_id: u64, flags: u8) -> String {
    format!("00-{trace_id:032x}-{span_id:016x}-{flags:02x}")
}

fn fresh_trace_id() -> u128 {
    rand::random::<u128>().max(1)
}

fn fresh_span_id() -> u64 {
    rand::random::<u64>().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn traces_are_exported_only_with_an_endpoint() {
        assert_eq!(traces_requested(env(&[])), Ok(false));
        assert_eq!(traces_requested(env(&[(ENDPOINT, "http://collector:4318")])), Ok(true));
        assert_eq!(traces_requested(env(&[(TRACES_ENDPOINT, "https://c/v1/traces")])), Ok(true));
        assert_eq!(traces_requested(env(&[(ENDPOINT, "http://c:4318"), ("OTEL_SDK_DISABLED", "true")])), Ok(false));
        assert_eq!(traces_requested(env(&[(ENDPOINT, " ")])), Ok(false));
    }

    #[test]
    fn settings_this_build_cannot_honour_are_refused_by_name() {
        let err = |pairs| traces_requested(env(pairs)).unwrap_err();
        assert!(err(&[(ENDPOINT, "collector:4318")]).starts_with("OTEL_EXPORTER_OTLP_ENDPOINT=collector:4318"));
        assert!(err(&[(ENDPOINT, "http://c:4318"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])
            .starts_with("OTEL_EXPORTER_OTLP_PROTOCOL=grpc: this build exports OTLP over http/protobuf"));
        // The traces-specific variable wins over the general one.
        assert_eq!(
            traces_requested(env(&[
                (ENDPOINT, "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            ])),
            Ok(true)
        );
        assert!(err(&[(ENDPOINT, "http://c:4318"), ("OTEL_TRACES_SAMPLER", "sometimes")])
            .starts_with("OTEL_TRACES_SAMPLER=sometimes: not one of always_on"));
        assert!(err(&[
            (ENDPOINT, "http://c:4318"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "1.5")
        ])
        .starts_with("OTEL_TRACES_SAMPLER_ARG=1.5"));
        assert!(err(&[(ENDPOINT, "http://c:4318"), ("OTEL_BSP_MAX_QUEUE_SIZE", "lots")])
            .starts_with("OTEL_BSP_MAX_QUEUE_SIZE=lots"));
        // Without an endpoint the other settings do not matter.
        assert_eq!(traces_requested(env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])), Ok(false));
    }

    #[test]
    fn traceparent_parsing_follows_w3c() {
        let p = parse_traceparent(PARENT).unwrap();
        assert_eq!(p.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_eq!(p.span_id, 0xb7ad6b7169203331);
        assert_eq!(p.flags, 1);
        assert_eq!(format_traceparent(p.trace_id, p.span_id, p.flags), PARENT);
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        // A later version may carry more parts.
        assert!(parse_traceparent("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-xyz").is_some());
    }

    #[test]
    fn without_export_a_request_continues_the_producers_trace() {
        let off = tracing::Span::none();
        let out = outgoing(&off, Some(PARENT), Some("vendor=x"));
        let p = parse_traceparent(&out.traceparent).unwrap();
        assert_eq!(p.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_ne!(p.span_id, 0xb7ad6b7169203331, "a span id of its own");
        assert_eq!(p.flags, 1);
        assert_eq!(out.tracestate.as_deref(), Some("vendor=x"));
        // Unsampled stays unsampled.
        let out = outgoing(&off, Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"), None);
        assert!(out.traceparent.ends_with("-00"));
        // No parent, or a broken one: a fresh trace each time.
        let (a, b) = (outgoing(&off, None, None), outgoing(&off, Some("garbage"), Some("x=y")));
        let (a, b) = (parse_traceparent(&a.traceparent).unwrap(), parse_traceparent(&b.traceparent).unwrap());
        assert_ne!(a.trace_id, b.trace_id);
    }
}
