//! Throughput benchmark: `cargo bench -p eventworker --bench throughput`.
//!
//! Fills 100,000 events over 4 streams, runs the release worker against a fast local sink
//! and prints events/s, end-to-end latency percentiles (createdAt -> received) and peak RSS,
//! plus the raw HTTP rate of wrk against the same sink, measured in the same run.
//! Env: EW_BENCH_EVENTS (100000), EW_BENCH_RATE (latency phase events/s, 10000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use common::*;

const STREAMS: [&str; 4] = ["critical", "fast", "default", "slow"];

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(u64, f64)>>>);

async fn start_sink(log: Log) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().fallback(move |headers: HeaderMap| {
        let log = log.clone();
        async move {
            if let Some(id) = headers.get("x-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()) {
                log.0.lock().unwrap().push((id, unix_now()));
            }
            ""
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

fn wrk_rate(url: &str) -> Option<f64> {
    let script = std::env::temp_dir().join("ew-bench-post.lua");
    std::fs::write(&script, "wrk.method = \"POST\"\nwrk.body = \"{\\\"a\\\":1}\"\nwrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n").ok()?;
    let out = std::process::Command::new("wrk").args(["-t1", "-c64", "-d5s", "-s"]).arg(&script).arg(url).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok())
}

fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())))
        .flatten()
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// User + system CPU seconds a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<f64> = after.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    // Fields 14 and 15 of the whole line are utime and stime; `after` starts at field 3.
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn events(from: u64, n: u64) -> Vec<(serde_json::Value, Vec<u8>)> {
    (from..from + n).map(|i| (meta(i, "bench"), br#"{"user":42,"action":"signup"}"#.to_vec())).collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` probes; nothing to list
    }
    let total: u64 = std::env::var("EW_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let rate: u64 = std::env::var("EW_BENCH_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let redis = RedisServer::start_with(false);
    let log = Log::default();
    let port = start_sink(log.clone()).await;
    let sink_url = format!("http://127.0.0.1:{port}/events/[EVENT_TYPE]");

    println!("eventworker throughput benchmark ({} cores)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
    let raw = wrk_rate(&format!("http://127.0.0.1:{port}/events/raw"));
    match raw {
        Some(r) => println!("  raw HTTP (wrk -t1 -c64 POST, same sink):   {r:>10.0} req/s"),
        None => println!("  raw HTTP: wrk not installed (apt-get install wrk); ratio not available"),
    }

    // Phase 1: backlog drain.
    let mut con = redis.con().await;
    let fill_start = Instant::now();
    let per = total / STREAMS.len() as u64;
    for (i, s) in STREAMS.iter().enumerate() {
        produce(&mut con, &format!("events:{s}"), &events(i as u64 * per, per)).await;
    }
    let filled = per * STREAMS.len() as u64;
    println!("  filled {filled} events over 4 streams in {:.2}s", fill_start.elapsed().as_secs_f64());
    let t0 = unix_now();
    // Worker defaults, unless MAX_IN_FLIGHT / WORKER_THREADS are set for the benchmark run.
    let tuning: Vec<(&str, String)> =
        ["MAX_IN_FLIGHT", "WORKER_THREADS"].iter().filter_map(|k| std::env::var(k).ok().map(|v| (*k, v))).collect();
    let mut env: Vec<(&str, &str)> = vec![("STREAMS", "critical,fast,default,slow")];
    env.extend(tuning.iter().map(|(k, v)| (*k, v.as_str())));
    let w = Worker::start(&redis, &sink_url, &env);
    let pid = w.child.id();
    let redis_pid = redis.pid();
    let (cpu_w0, cpu_r0, cpu_b0) = (cpu_seconds(pid), cpu_seconds(redis_pid), cpu_seconds(std::process::id()));
    wait_until("backlog delivered", Duration::from_secs(600), || async { log.0.lock().unwrap().len() as u64 >= filled }).await;
    let (first, last) = {
        let l = log.0.lock().unwrap();
        (l.iter().map(|x| x.1).fold(f64::MAX, f64::min), l.iter().map(|x| x.1).fold(0.0, f64::max))
    };
    let drain_rate = filled as f64 / (last - first);
    println!("  backlog: {filled} events in {:.2}s = {drain_rate:.0} events/s ({:.2}s including start-up)", last - first, last - t0);
    if let Some(r) = raw {
        println!("  ratio to raw HTTP: {:.2}", drain_rate / r);
    }
    let per_event = |cpu: f64| cpu * 1e6 / filled as f64;
    println!(
        "  CPU per event: worker {:.1} us, redis {:.1} us, sink+bench {:.1} us",
        per_event(cpu_seconds(pid) - cpu_w0),
        per_event(cpu_seconds(redis_pid) - cpu_r0),
        per_event(cpu_seconds(std::process::id()) - cpu_b0)
    );

    // Phase 2: steady load, latency from createdAt (producer clock) to receipt.
    log.0.lock().unwrap().clear();
    let n2 = (rate * 5).min(total);
    let mut sent_at = vec![0f64; n2 as usize];
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    let start = Instant::now();
    let mut i = 0u64;
    let base = 10_000_000u64;
    while i < n2 {
        let k = per_tick.min(n2 - i);
        let now = unix_now();
        for j in i..i + k {
            sent_at[j as usize] = now;
        }
        let s = STREAMS[(i / per_tick) as usize % 4];
        produce(&mut con, &format!("events:{s}"), &events(base + i, k)).await;
        i += k;
        let due = tick * (i / per_tick) as u32;
        if let Some(d) = due.checked_sub(start.elapsed()) {
            tokio::time::sleep(d).await;
        }
    }
    wait_until("steady-load events delivered", Duration::from_secs(300), || async { log.0.lock().unwrap().len() as u64 >= n2 }).await;
    let mut lat: Vec<f64> = log.0.lock().unwrap().iter().map(|(id, at)| (at - sent_at[(id - base) as usize]) * 1000.0).collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "  steady {rate} events/s for {:.1}s: latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        start.elapsed().as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    println!("  worker peak RSS: {:.1} MB", peak_rss_mb(pid));
    drop(w);
}
