//! Throughput benchmark: `cargo bench -p eventworker --bench throughput`.
//!
//! Fills 100,000 events over 4 streams, runs the release worker against a fast local sink
//! and prints events/s, end-to-end latency percentiles (createdAt -> received) and peak RSS,
//! plus the raw HTTP rate of wrk against the same sink, measured in the same run.
//! Last, the same with the original's outbox table on PostgreSQL (rows deleted after
//! delivery): delivery rate and how long the table takes to empty after the last delivery.
//! Env: EW_BENCH_EVENTS (100000), EW_BENCH_RATE (latency phase events/s, 10000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
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

/// An OTLP/HTTP trace receiver that accepts every export and counts requests and bytes
/// (Jaeger would share the two cores with the worker and blur the worker's cost).
async fn start_otlp_sink(exports: Arc<AtomicUsize>, bytes: Arc<AtomicUsize>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let (exports, bytes) = (exports.clone(), bytes.clone());
        async move {
            exports.fetch_add(1, SeqCst);
            bytes.fetch_add(body.len(), SeqCst);
            axum::http::StatusCode::OK
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

/// A receiver like a small application: each request takes `service` and holds one of
/// `pool` connections; beyond that it answers `500 Too many connections`.
async fn start_pool_sink(pool: usize, service: Duration, ok: Arc<AtomicUsize>, overloads: Arc<AtomicUsize>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let busy = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().fallback(move || {
        let (busy, ok, overloads) = (busy.clone(), ok.clone(), overloads.clone());
        async move {
            if busy.fetch_add(1, SeqCst) >= pool {
                busy.fetch_sub(1, SeqCst);
                overloads.fetch_add(1, SeqCst);
                return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
            }
            tokio::time::sleep(service).await;
            busy.fetch_sub(1, SeqCst);
            ok.fetch_add(1, SeqCst);
            axum::http::StatusCode::OK
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

/// The Redis a set of rounds runs against: its URL and its processes (for their CPU).
struct Target {
    url: String,
    pids: Vec<u32>,
}

struct Rounds {
    rate: f64,
    raw: Option<f64>,
    cpu: f64,
    rss: f64,
}

/// Backlog rounds: fill, drain with a fresh worker, measure; medians over the rounds.
#[allow(clippy::too_many_arguments)]
async fn run_rounds<C: redis::aio::ConnectionLike>(
    redis: &Target,
    con: &mut C,
    log: &Log,
    port: u16,
    sink_url: &str,
    env: &[(&str, &str)],
    total: u64,
    rounds: u64,
) -> Rounds {
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
            produce(con, &format!("events:{s}"), &events(i as u64 * per, per)).await;
        }
        let filled = per * STREAMS.len() as u64;
        let mut w = Worker::start_at(&redis.url, sink_url, env);
        let pid = w.child.id();
        let redis_cpu = || redis.pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
        let (cw, cr, cb) = (cpu_seconds(pid), redis_cpu(), cpu_seconds(std::process::id()));
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
        let cpu = (us(cpu_seconds(pid) - cw), us(redis_cpu() - cr), us(cpu_seconds(std::process::id()) - cb));
        let rss = peak_rss_mb(pid);
        let deferred = w.metric_sum("events_deferred_total").await;
        println!(
            "  round {round}: raw HTTP {:>7.0} req/s | worker {drain:>6.0} events/s | CPU/event worker {:.1} us, redis {:.1} us, sink {:.1} us | peak RSS {rss:.1} MB | deferred {deferred}",
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

    Rounds { rate: median(rates), raw: (!raws.is_empty()).then(|| median(raws)), cpu: median(cpus), rss: median(rsss) }
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
    let mut raised_env = env.clone();
    // As many requests at once as the previous worker sent (4 streams x 64), fixed.
    raised_env.extend([("HOST_MAX_CONCURRENCY", "256"), ("HOST_CONCURRENCY", "fixed")]);
    // Tracing on: every event sampled and exported (the queue raised so none is dropped).
    let (exports, export_bytes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let otlp = format!("http://127.0.0.1:{}", start_otlp_sink(exports.clone(), export_bytes.clone()).await);
    let mut traced_env = env.clone();
    traced_env.extend([("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()), ("OTEL_BSP_MAX_QUEUE_SIZE", "262144")]);
    let mut results = vec![];
    let single = Target { url: redis.url(), pids: vec![redis.pid()] };
    for (label, e) in [
        ("default host cap (32)", &env),
        ("host cap raised to 256, fixed", &raised_env),
        ("default host cap, tracing on (every event's span exported over OTLP)", &traced_env),
    ] {
        println!("{label}:");
        results.push((label, run_rounds(&single, &mut con, &log, port, &sink_url, e, total, rounds).await));
    }
    // The same rounds against a Redis Cluster on this machine: 3 masters with a replica each.
    {
        let label = "default host cap, Redis Cluster (3 masters + 3 replicas, same machine)";
        println!("{label}:");
        let cluster = common::cluster::RedisCluster::start();
        let target = Target { url: cluster.url(), pids: cluster.pids() };
        let mut ccon = eventworker::streams::connect(&target.url, Duration::from_secs(5)).await.expect("cluster");
        results.push((label, run_rounds(&target, &mut ccon, &log, port, &sink_url, &env, total, rounds).await));
    }
    let (off, on) = (&results[0].1, &results[2].1);

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

    // A receiver sized for the original worker: 100 connections, 20 ms per request.
    let (ok, overloads) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let pool_port = start_pool_sink(100, Duration::from_millis(20), ok.clone(), overloads.clone()).await;
    let pool_n = (total / 5).max(1000);
    let per = pool_n / STREAMS.len() as u64;
    for (i, s) in STREAMS.iter().enumerate() {
        produce(&mut con, &format!("events:{s}"), &events(20_000_000 + i as u64 * per, per)).await;
    }
    let pool_total = per * STREAMS.len() as u64;
    let started = Instant::now();
    let w = Worker::start(&redis, &format!("http://127.0.0.1:{pool_port}/events/[EVENT_TYPE]"), &env);
    wait_until("pool receiver backlog handled", Duration::from_secs(600), || async {
        (ok.load(SeqCst) + overloads.load(SeqCst)) as u64 >= pool_total
    })
    .await;
    let pool_rate = pool_total as f64 / started.elapsed().as_secs_f64();
    drop(w);

    // The original's outbox table on PostgreSQL: rows deleted after delivery.
    let outbox = outbox_phase(&redis, &mut con, &log, &sink_url, &env, (total / 5).max(1000)).await;

    println!("summary (medians of {rounds} rounds):");
    println!(
        "  tracing cost:      {:.0} -> {:.0} events/s ({:+.0} %), worker CPU/event {:.1} -> {:.1} us; {} OTLP exports, {:.1} MB",
        off.rate,
        on.rate,
        (on.rate / off.rate - 1.0) * 100.0,
        off.cpu,
        on.cpu,
        exports.load(SeqCst),
        export_bytes.load(SeqCst) as f64 / 1e6
    );
    for (label, r) in &results {
        println!("  {label}:");
        println!("    throughput:        {:.0} events/s (backlog of {total} over 4 streams)", r.rate);
        match r.raw {
            None => println!("    raw HTTP:          wrk not installed (apt-get install wrk)"),
            Some(raw) => {
                println!("    raw HTTP (wrk):    {raw:.0} req/s against the same sink (wrk -t1 -c64, POST)");
                println!("    ratio:             {:.2}", r.rate / raw);
            }
        }
        println!("    worker CPU/event:  {:.1} us", r.cpu);
        println!("    peak RSS:          {:.1} MB", r.rss);
    }
    println!(
        "  100-connection receiver (20 ms/request), defaults: {pool_rate:.0} events/s, {} overload answers (500) of {pool_total}",
        overloads.load(SeqCst)
    );
    println!(
        "  latency at {rate}/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (XADD -> received)",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    println!("  peak RSS steady:   {rss_steady:.1} MB");
    match outbox {
        Some((n, rate, lag)) => println!(
            "  outbox table (PostgreSQL, {n} rows): {rate:.0} events/s delivered, table empty {lag:.2} s after the last delivery"
        ),
        None => println!("  outbox table: skipped (PostgreSQL not installed)"),
    }
}

/// `n` events whose rows sit in a PostgreSQL outbox table (`DLQ_DB_TABLE=events`):
/// delivery rate, and how long after the last delivery the last row is deleted.
async fn outbox_phase(
    redis: &RedisServer,
    con: &mut redis::aio::MultiplexedConnection,
    log: &Log,
    sink_url: &str,
    env: &[(&str, &str)],
    n: u64,
) -> Option<(u64, f64, f64)> {
    if !std::path::Path::new("/usr/lib/postgresql").exists() {
        return None;
    }
    let db = common::db::Database::postgres();
    db.exec("CREATE TABLE events (id bigint PRIMARY KEY, type VARCHAR(255) NOT NULL, stream VARCHAR(255) NOT NULL, dlq BOOLEAN NOT NULL DEFAULT FALSE, created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, payload TEXT)").await;
    let base = 30_000_000u64;
    let per = n / STREAMS.len() as u64;
    let total = per * STREAMS.len() as u64;
    for chunk in (base..base + total).collect::<Vec<_>>().chunks(1000) {
        let rows: Vec<String> = chunk.iter().map(|i| format!("({i}, 'bench', 'events:default', 'x')")).collect();
        db.exec(&format!("INSERT INTO events (id, type, stream, payload) VALUES {}", rows.join(", "))).await;
    }
    for (i, s) in STREAMS.iter().enumerate() {
        produce(con, &format!("events:{s}"), &events(base + i as u64 * per, per)).await;
    }
    log.0.lock().unwrap().clear();
    let url = db.url();
    let mut env = env.to_vec();
    env.extend([("DLQ_DB_CONNECTION", url.as_str()), ("DLQ_DB_TABLE", "events")]);
    let started = Instant::now();
    let w = Worker::start(redis, sink_url, &env);
    let delivered = |log: &Log| log.0.lock().unwrap().iter().filter(|(id, _)| *id >= base).count() as u64;
    wait_until("outbox events delivered", Duration::from_secs(600), || async { delivered(log) >= total }).await;
    let took = started.elapsed();
    wait_until("outbox table emptied", Duration::from_secs(600), || async {
        db.column("SELECT COUNT(*) FROM events").await == ["0"]
    })
    .await;
    let lag = started.elapsed() - took;
    drop(w);
    Some((total, total as f64 / took.as_secs_f64(), lag.as_secs_f64()))
}
