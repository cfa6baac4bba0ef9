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
            if let Some(id) =
                headers.get("x-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
            {
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
    let out =
        std::process::Command::new("wrk").args(["-t1", "-c64", "-d5s", "-s"]).arg(&script).arg(url).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok())
}

fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
        })
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` probes; nothing to list
    }
    let var = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let total = var("EW_BENCH_EVENTS", 100_000);
    let rate = var("EW_BENCH_RATE", 10_000);
    let rounds = var("EW_BENCH_ROUNDS", 3).max(1);
    let redis = RedisServer::start_with(false);
    let log = Log::default();
    let port = start_sink(log.clone()).await;
    let sink_url = format!("http://127.0.0.1:{port}/events/[EVENT_TYPE]");
    // Worker defaults, unless MAX_IN_FLIGHT / WORKER_THREADS are set for the benchmark run.
    let tuning: Vec<(&str, String)> =
        ["MAX_IN_FLIGHT", "WORKER_THREADS"].iter().filter_map(|k| std::env::var(k).ok().map(|v| (*k, v))).collect();
    let mut env: Vec<(&str, &str)> = vec![("STREAMS", "critical,fast,default,slow")];
    env.extend(tuning.iter().map(|(k, v)| (*k, v.as_str())));

    println!(
        "eventworker throughput benchmark: {total} events over 4 streams, {rounds} rounds, {} cores, tuning {tuning:?}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let mut con = redis.con().await;
    let (mut raws, mut rates, mut cpus, mut rsss) = (vec![], vec![], vec![], vec![]);
    for round in 1..=rounds {
        // Raw HTTP rate of wrk against the same sink, right before the worker's round.
        let raw = wrk_rate(&format!("http://127.0.0.1:{port}/events/raw"));
        if let Some(r) = raw {
            raws.push(r);
        }
        log.0.lock().unwrap().clear();
        let per = total / STREAMS.len() as u64;
        for (i, s) in STREAMS.iter().enumerate() {
            produce(&mut con, &format!("events:{s}"), &events(i as u64 * per, per)).await;
        }
        let filled = per * STREAMS.len() as u64;
        let mut w = Worker::start(&redis, &sink_url, &env);
        let (pid, redis_pid) = (w.child.id(), redis.pid());
        let (cw, cr, cb) = (cpu_seconds(pid), cpu_seconds(redis_pid), cpu_seconds(std::process::id()));
        wait_until("backlog delivered", Duration::from_secs(600), || async {
            log.0.lock().unwrap().len() as u64 >= filled
        })
        .await;
        let (first, last) = {
            let l = log.0.lock().unwrap();
            (l.iter().map(|x| x.1).fold(f64::MAX, f64::min), l.iter().map(|x| x.1).fold(0.0, f64::max))
        };
        let drain = filled as f64 / (last - first);
        let us = |c: f64| c * 1e6 / filled as f64;
        let cpu =
            (us(cpu_seconds(pid) - cw), us(cpu_seconds(redis_pid) - cr), us(cpu_seconds(std::process::id()) - cb));
        let rss = peak_rss_mb(pid);
        println!(
            "  round {round}: raw HTTP {:>7.0} req/s | worker {drain:>6.0} events/s | CPU/event worker {:.1} us, redis {:.1} us, sink {:.1} us | peak RSS {rss:.1} MB",
            raw.unwrap_or(f64::NAN),
            cpu.0,
            cpu.1,
            cpu.2
        );
        rates.push(drain);
        cpus.push(cpu.0);
        rsss.push(rss);
        w.sigterm();
        let _ = w.wait_exit(Duration::from_secs(30)).await;
    }

    // Steady load: latency from the producer's clock at XADD to receipt at the sink.
    let w = Worker::start(&redis, &sink_url, &env);
    w.wait_ready().await;
    log.0.lock().unwrap().clear();
    let n2 = rate * 5;
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
    wait_until("steady-load events delivered", Duration::from_secs(300), || async {
        log.0.lock().unwrap().len() as u64 >= n2
    })
    .await;
    let mut lat: Vec<f64> =
        log.0.lock().unwrap().iter().map(|(id, at)| (at - sent_at[(id - base) as usize]) * 1000.0).collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rss_steady = peak_rss_mb(w.child.id());
    drop(w);

    println!("summary (medians of {rounds} rounds):");
    let (rate_m, raw_m) = (median(rates), median(raws.clone()));
    println!("  throughput:        {rate_m:.0} events/s (backlog of {total} over 4 streams)");
    if raws.is_empty() {
        println!("  raw HTTP:          wrk not installed (apt-get install wrk)");
    } else {
        println!("  raw HTTP (wrk):    {raw_m:.0} req/s against the same sink (wrk -t1 -c64, POST)");
        println!("  ratio:             {:.2}", rate_m / raw_m);
    }
    println!("  worker CPU/event:  {:.1} us", median(cpus));
    println!(
        "  latency at {rate}/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (XADD -> received)",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    println!("  peak RSS:          {:.1} MB backlog, {rss_steady:.1} MB steady", median(rsss));
}
