//! Traces, end to end: a producer's `traceparent`, the worker binary exporting over OTLP to
//! a real Jaeger, the receiver's `traceparent` header, read back through Jaeger's query API.

mod common;

use std::time::Duration;

use common::db::Database;
use common::jaeger::{Jaeger, Span};
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// The environment of a worker exporting traces as `service`.
fn traced<'a>(service: &'a str, endpoint: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint), ("OTEL_SERVICE_NAME", service), ("OTEL_BSP_SCHEDULE_DELAY", "100")]
}

/// `(trace id, span id, flags)` of a `traceparent` header.
fn parts(tp: &str) -> (String, String, String) {
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!((p.len(), p[0]), (4, "00"), "{tp}");
    (p[1].to_string(), p[2].to_string(), p[3].to_string())
}

fn int(span: &Span, key: &str) -> i64 {
    span.tag(key).and_then(|v| v.as_i64()).unwrap_or_else(|| panic!("{key} missing on {span:#?}"))
}

fn by_event<'a>(spans: &'a [Span], id: &str) -> Vec<&'a Span> {
    let mut v: Vec<&Span> = spans.iter().filter(|s| s.tag_str("eventworker.event.id").as_deref() == Some(id)).collect();
    v.sort_by_key(|s| int(s, "eventworker.attempt"));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_trace_is_continued_to_the_receiver_and_exported() {
    let Some(jaeger) = Jaeger::start().await else { return };
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    let endpoint = jaeger.otlp_endpoint();
    let service = "ew-test-continue";
    let w = Worker::start(&redis, &sink.url("/e"), &[&traced(service, &endpoint)[..], &[("STREAMS", "fast")]].concat());
    w.wait_ready().await;

    let (t1, p1) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let (t2, p2) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut con = redis.con().await;
    let mut m1 = meta("in-meta", "order.paid");
    m1["traceparent"] = json!(format!("00-{t1}-{p1}-01"));
    m1["tracestate"] = json!("shop=1");
    produce(&mut con, "events:fast", &[(m1, b"a".to_vec())]).await;
    // From a producer that cannot write meta: an entry field of its own.
    let _: String = redis::cmd("XADD")
        .arg("events:fast")
        .arg("*")
        .arg("meta")
        .arg(meta("as-field", "order.paid").to_string())
        .arg("payload")
        .arg("b")
        .arg("traceparent")
        .arg(format!("00-{t2}-{p2}-01"))
        .query_async(&mut con)
        .await
        .unwrap();
    wait_until("both delivered", T, || async { sink.posts("/e").len() == 2 }).await;
    let spans = jaeger.wait_spans(service, 2, |s| s.name == "deliver").await;

    for (id, trace, parent) in [("in-meta", t1, p1), ("as-field", t2, p2)] {
        let span = by_event(&spans, id).pop().unwrap_or_else(|| panic!("no span for {id}: {spans:#?}"));
        assert_eq!(
            (span.trace_id.as_str(), span.parent.as_deref()),
            (trace, Some(parent)),
            "{id}: child of the producer"
        );
        assert_eq!(span.tag_str("messaging.destination.name").as_deref(), Some("events:fast"));
        assert_eq!(span.tag_str("messaging.system").as_deref(), Some("redis"));
        assert_eq!(span.tag_str("eventworker.event.type").as_deref(), Some("order.paid"));
        assert_eq!(int(span, "eventworker.attempt"), 1);
        assert_eq!(span.tag_str("server.address"), Some(format!("http://127.0.0.1:{}", sink.port)));
        assert_eq!(int(span, "http.response.status_code"), 200);
        assert_eq!(span.tag_str("eventworker.outcome").as_deref(), Some("delivered"));
        assert_eq!(span.tag_str("span.kind").as_deref(), Some("client"));
        // The receiver continues the worker's span, not the producer's.
        let got = sink.posts("/e").into_iter().find(|r| r.header("x-event-id") == Some(id)).unwrap();
        let (rt, rs, rf) = parts(got.header("traceparent").unwrap());
        assert_eq!((rt.as_str(), rs.as_str(), rf.as_str()), (trace, span.span_id.as_str(), "01"), "{id}");
    }
    let got = sink.posts("/e").into_iter().find(|r| r.header("x-event-id") == Some("in-meta")).unwrap();
    assert_eq!(got.header("tracestate"), Some("shop=1"), "tracestate passed on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_dead_letters_and_replays_stay_in_one_trace() {
    let Some(jaeger) = Jaeger::start().await else { return };
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    let db = Database::sqlite();
    let endpoint = jaeger.otlp_endpoint();
    let service = "ew-test-retries";
    // /later answers 429 with Retry-After once, then 200; /gone answers 404 until replayed.
    sink.respond(|r, n| match r.path.as_str() {
        "/later" if n == 0 => Reply::status(429).header("retry-after", "1"),
        "/gone" if n == 0 => Reply::status(404),
        _ => Reply::ok(),
    });
    let dlq = db.url();
    let env = [&traced(service, &endpoint)[..], &[("STREAMS", "fast"), ("DLQ_DB_CONNECTION", &dlq)]].concat();
    let w = Worker::start(&redis, &sink.url("/e"), &env);
    w.wait_ready().await;
    let mut con = redis.con().await;
    let mut later = meta("later", "t");
    later["url"] = json!(sink.url("/later"));
    let mut gone = meta("gone", "t");
    gone["url"] = json!(sink.url("/gone"));
    produce(&mut con, "events:fast", &[(later, b"1".to_vec()), (gone, b"2".to_vec())]).await;
    wait_until("the 429 retried and delivered", T, || async { sink.answered(200) == 1 }).await;
    wait_until("the 404 dead-lettered", T, || async { db.column("SELECT id FROM dlq").await.len() == 1 }).await;

    // No producer context: the first attempt starts the trace, the retry is its child.
    let spans = jaeger.wait_spans(service, 3, |s| s.name == "deliver").await;
    let attempts = by_event(&spans, "later");
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    let (first, second) = (attempts[0], attempts[1]);
    assert_eq!(first.parent, None, "a root without a producer context");
    assert_eq!(first.tag_str("eventworker.outcome").as_deref(), Some("scheduled"));
    assert_eq!(int(first, "http.response.status_code"), 429);
    assert_eq!(first.tag_str("otel.status_code").as_deref(), Some("ERROR"));
    assert_eq!(first.tag_str("error.type").as_deref(), Some("http_429"));
    assert_eq!(
        (second.trace_id.as_str(), second.parent.as_deref()),
        (first.trace_id.as_str(), Some(first.span_id.as_str()))
    );
    assert_eq!(int(second, "eventworker.attempt"), 2);
    assert_eq!(second.tag_str("eventworker.outcome").as_deref(), Some("delivered"));
    // The receiver saw one trace across both attempts.
    let seen: Vec<String> = sink.posts("/later").iter().map(|r| parts(r.header("traceparent").unwrap()).0).collect();
    assert_eq!(seen, vec![first.trace_id.clone(), first.trace_id.clone()]);

    let dead = by_event(&spans, "gone");
    assert_eq!(dead.len(), 1, "{spans:#?}");
    assert_eq!(dead[0].tag_str("eventworker.outcome").as_deref(), Some("dead_lettered"));
    assert_eq!(dead[0].tag_str("otel.status_code").as_deref(), Some("ERROR"));

    // The replayed dead letter is delivered in the trace its first attempt started.
    let (ok, out, err) =
        run_cli(&[("REDIS_URL", &redis.url()), ("DLQ_DB_CONNECTION", &dlq)], &["dlq", "replay", "--ids", "gone"]);
    assert!(ok, "{out}{err}");
    wait_until("the replay delivered", T, || async { sink.answered(200) == 2 }).await;
    let spans = jaeger.wait_spans(service, 4, |s| s.name == "deliver").await;
    let replayed = by_event(&spans, "gone");
    let last = replayed.iter().find(|s| s.tag_str("eventworker.outcome").as_deref() == Some("delivered")).unwrap();
    assert_eq!(
        (last.trace_id.as_str(), last.parent.as_deref()),
        (dead[0].trace_id.as_str(), Some(dead[0].span_id.as_str()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported_and_the_trace_still_continues() {
    let Some(jaeger) = Jaeger::start().await else { return };
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    let service = "ew-test-off";
    // Everything but the endpoint.
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast"), ("OTEL_SERVICE_NAME", service)]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    let mut m = meta("off", "t");
    m["traceparent"] = json!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    produce(&mut con, "events:fast", &[(m, b"x".to_vec())]).await;
    wait_until("delivered", T, || async { sink.posts("/e").len() == 1 }).await;
    let (trace, span, flags) = parts(sink.posts("/e")[0].header("traceparent").unwrap());
    assert_eq!((trace.as_str(), flags.as_str()), ("0af7651916cd43dd8448eb211c80319c", "01"));
    assert_ne!(span, "b7ad6b7169203331", "a span id of its own");
    // A traced worker on the same Jaeger shows the query would have found it.
    drop(w);
    let endpoint = jaeger.otlp_endpoint();
    let w = Worker::start(
        &redis,
        &sink.url("/e"),
        &[&traced("ew-test-on", &endpoint)[..], &[("STREAMS", "fast")]].concat(),
    );
    w.wait_ready().await;
    produce(&mut con, "events:fast", &[(meta("on", "t"), b"y".to_vec())]).await;
    jaeger.wait_spans("ew-test-on", 1, |s| s.name == "deliver").await;
    assert!(jaeger.spans(service).await.is_empty(), "nothing exported without OTEL_EXPORTER_OTLP_ENDPOINT");
}

#[test]
fn settings_the_exporter_cannot_honour_stop_start_up_by_name() {
    for (var, value, says) in [
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "grpc",
            "OTEL_EXPORTER_OTLP_PROTOCOL=grpc: this build exports OTLP over http/protobuf",
        ),
        ("OTEL_TRACES_SAMPLER", "sometimes", "OTEL_TRACES_SAMPLER=sometimes"),
    ] {
        let (ok, _, err) = run_cli(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"), (var, value)], &[]);
        assert!(!ok);
        assert!(err.contains(says), "{err}");
    }
    let (ok, _, err) = run_cli(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")], &[]);
    assert!(!ok && err.contains("OTEL_EXPORTER_OTLP_ENDPOINT=collector:4318: not an http:// or https:// URL"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_traces_endpoint_wins_over_the_general_one() {
    let Some(jaeger) = Jaeger::start().await else { return };
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    let traces = format!("{}/v1/traces", jaeger.otlp_endpoint());
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let service = "ew-test-traces-endpoint";
    let w = Worker::start(
        &redis,
        &sink.url("/e"),
        &[
            ("STREAMS", "fast"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &nowhere),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &traces),
            ("OTEL_SERVICE_NAME", service),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    w.wait_ready().await;
    let mut con = redis.con().await;
    produce(&mut con, "events:fast", &[(meta("x", "t"), b"x".to_vec())]).await;
    jaeger.wait_spans(service, 1, |s| s.name == "deliver").await;
}
