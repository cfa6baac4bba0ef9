//! A local demo of the main job: `scripts/demo.sh` (or `cargo run --release -p eventworker
//! --example demo` after building the binary).
//!
//! Starts a redis-server and a small HTTP sink, runs the eventworker binary against them,
//! publishes events to the four priority streams with a progress line, and prints what was
//! delivered, retried and dead-lettered. `DEMO_EVENTS` sets how many (default 10000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const STREAMS: [&str; 4] = ["critical", "fast", "default", "slow"];
/// Event types and what the demo sink does with them.
const TYPES: [(&str, &str); 5] = [
    ("user.created", "200 OK"),
    ("order.placed", "200 OK"),
    ("invoice.sent", "400 + X-Retry-After: 1 on the first try, then 200 (scheduled retry)"),
    ("report.ready", "503 for the first five seconds: its host is paused and probed, the others keep flowing"),
    ("legacy.ping", "410 Gone (dead-lettered)"),
];

#[tokio::main]
async fn main() {
    let total: usize = std::env::var("DEMO_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    println!("eventworker demo\n");
    let redis = RedisServer::start_with(false);
    println!("  redis-server       {}", redis.url());
    let sink = Sink::start().await;
    let flaky = Sink::start_with(false).await;
    let started = Instant::now();
    sink.respond(|r, _| match r.path.as_str() {
        "/dlq" => Reply::ok(),
        "/events/legacy.ping" => Reply::status(410),
        "/events/invoice.sent" if r.header("x-event-attempt") == Some("1") => {
            Reply::status(400).header("x-retry-after", "1")
        }
        _ => Reply::ok(),
    });
    flaky
        .respond(move |_, _| if started.elapsed() < Duration::from_secs(5) { Reply::status(503) } else { Reply::ok() });
    println!("  sink               {}", sink.url("/events/[EVENT_TYPE]"));
    println!("  second sink        {} (report.ready goes here via meta.url)", flaky.url("/reports"));
    for (t, what) in TYPES {
        println!("      {t:<14} {what}");
    }
    let log_path = std::env::temp_dir().join("eventworker-demo.log");
    let dlq_uri = sink.url(DEMO_DLQ_PATH);
    let mut settings: Vec<(&str, &str)> = DEMO_SETTINGS.to_vec();
    settings.push(("DLQ_URI", &dlq_uri));
    let w = Worker::start_logging(&redis, &sink.url(DEMO_EVENTS_PATH), &settings, &log_path);
    println!(
        "  eventworker        pid {}, metrics http://127.0.0.1:{}/metrics, log {}",
        w.child.id(),
        w.metrics_port,
        log_path.display()
    );
    w.wait_ready().await;

    // Publish, in batches, with a progress line.
    let mut con = redis.con().await;
    let t0 = Instant::now();
    let batch = 500;
    let mut published = 0;
    let mut malformed = 0;
    while published < total {
        let n = batch.min(total - published);
        let mut per_stream: BTreeMap<&str, Vec<(serde_json::Value, Vec<u8>)>> = BTreeMap::new();
        for i in published..published + n {
            let (t, _) = TYPES[i % TYPES.len()];
            let mut m = json!({"id": format!("evt-{i}"), "type": t, "createdAt": iso_now()});
            // A user's account events are delivered in order; the others need no order (an
            // ordering key would hold them behind a retry or a paused host).
            if matches!(t, "user.created" | "order.placed") {
                m["orderingKey"] = json!(format!("user-{}", i % 100));
            }
            if t == "report.ready" {
                m["url"] = json!(flaky.url("/reports"));
            }
            let payload = json!({"n": i, "user": i % 100}).to_string().into_bytes();
            per_stream.entry(STREAMS[i % STREAMS.len()]).or_default().push((m, payload));
        }
        for (s, evs) in per_stream {
            produce(&mut con, &format!("events:{s}"), &evs).await;
        }
        published += n;
        if published == total {
            // A producer bug: an entry without a readable meta field.
            let _: String = redis::cmd("XADD")
                .arg("events:default")
                .arg("*")
                .arg("meta")
                .arg("{not json")
                .arg("payload")
                .arg("?")
                .query_async(&mut con)
                .await
                .unwrap();
            malformed += 1;
        }
        progress(&sink, &flaky, &w, published, total).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let expected = total + malformed;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = delivered(&sink, &flaky) + sink.count(axum::http::Method::POST, "/dlq");
        progress(&sink, &flaky, &w, published, total).await;
        if done >= expected || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    println!("\n\nDelivered (answered 2xx, unique X-Event-Id per type):");
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    for r in sink.posts("/events/").into_iter().chain(flaky.posts("/reports")) {
        if (200..300).contains(&r.status) {
            *by_type.entry(r.header("x-event-type").unwrap_or("?").to_string()).or_default() += 1;
        }
    }
    for (t, n) in &by_type {
        println!("  {t:<14} {n:>6}");
    }
    println!("\nDead-lettered (POSTed to DLQ_URI):");
    let mut reasons: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for r in sink.posts("/dlq") {
        let j = r.json();
        let e = reasons.entry(j["reason"].as_str().unwrap_or("?").to_string()).or_insert((0, j.to_string()));
        e.0 += 1;
    }
    for (reason, (n, example)) in &reasons {
        println!("  {reason:<16} {n:>6}   e.g. {example}");
    }
    let retried =
        sink.posts("/events/invoice.sent").iter().filter(|r| r.header("x-event-attempt") == Some("2")).count();
    let probes = flaky.count(axum::http::Method::OPTIONS, "/");
    let deferred = w.metric_sum("events_deferred_total").await;
    println!("\nScheduled retries delivered on attempt 2: {retried}; OPTIONS probes of the paused host: {probes}");
    println!("Events put off while their host was paused (no attempt used): {deferred}");
    println!("{expected} entries handled in {elapsed:.1}s; nothing left pending: {}", pending_all(&redis).await == 0);
    println!("\nA few metrics from /metrics:");
    let (_, metrics) = w.get("/metrics").await;
    for l in metrics
        .lines()
        .filter(|l| {
            ["events_processed_total", "events_dead_lettered_total", "host_concurrency_limit", "events_deferred_total"]
                .iter()
                .any(|m| l.starts_with(m))
        })
        .take(12)
    {
        println!("  {l}");
    }
    w.sigterm();
}

fn delivered(sink: &Sink, flaky: &Sink) -> usize {
    sink.delivered_ids("/events/").len() + flaky.delivered_ids("/reports").len()
}

async fn progress(sink: &Sink, flaky: &Sink, w: &Worker, published: usize, total: usize) {
    let paused = w.metric(&format!("host_circuit_open{{host=\"http://127.0.0.1:{}\"}}", flaky.port)).await == 1.0;
    print!(
        "\r  published {published:>6}/{total} | delivered {:>6} to the main sink, {:>5} to the second ({:<6}) | dead-lettered {:>5}   ",
        sink.delivered_ids("/events/").len(),
        flaky.delivered_ids("/reports").len(),
        if paused { "paused" } else { "open" },
        sink.count(axum::http::Method::POST, "/dlq")
    );
    let _ = std::io::stdout().flush();
}

async fn pending_all(redis: &RedisServer) -> i64 {
    let mut con = redis.con().await;
    let mut n = 0;
    for s in STREAMS {
        n += pending(&mut con, &format!("events:{s}"), "workers").await;
    }
    n
}
