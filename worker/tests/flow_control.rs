//! Flow control against receivers that behave like real applications (DESIGN.md §2a): a
//! connection pool that overflows, outages, a host that never answers, a saturated host
//! with events of every priority, and ordering through retries and across two workers.
//! Real redis-server, real HTTP sinks, the worker binary.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(60);
const STREAMS: [&str; 4] = ["critical", "fast", "default", "slow"];

fn ev(id: String, url: &str) -> (serde_json::Value, Vec<u8>) {
    (json!({"id": id, "type": "t", "url": url, "createdAt": iso_now()}), b"{}".to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_with_a_100_connection_pool_is_never_overloaded() {
    let redis = RedisServer::start();
    let sink = Sink::start_with(false).await;
    sink.pool(100);
    sink.respond(|_, _| Reply::ok().after(Duration::from_millis(20)));
    let dlq = Sink::start().await;
    // Default settings, the original's four streams full of events for one receiver.
    let w = Worker::start(&redis, &sink.url("/e"), &[("DLQ_URI", &dlq.url("/dlq"))]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    for s in STREAMS {
        let evs: Vec<_> = (0..1250).map(|i| (meta(format!("{s}-{i}"), "t"), b"{}".to_vec())).collect();
        produce(&mut con, &format!("events:{s}"), &evs).await;
    }
    wait_until("5,000 delivered", T, || async { sink.delivered_ids("/e").len() == 5000 }).await;
    println!("peak concurrency at the receiver: {}", sink.peak_concurrency());
    assert_eq!(sink.answered(500), 0, "the receiver was pushed past its pool");
    assert!(sink.peak_concurrency() <= 32, "default cap per host: {}", sink.peak_concurrency());
    assert!(dlq.posts("/dlq").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adaptive_limit_finds_a_pool_below_the_cap() {
    let redis = RedisServer::start();
    let sink = Sink::start_with(false).await;
    sink.pool(10);
    sink.respond(|_, _| Reply::ok().after(Duration::from_millis(10)));
    let dlq = Sink::start().await;
    let w = Worker::start(
        &redis,
        &sink.url("/e"),
        &[("STREAMS", "fast"), ("ORDERING", "none"), ("HOST_MAX_CONCURRENCY", "16"), ("DLQ_URI", &dlq.url("/dlq"))],
    );
    w.wait_ready().await;
    let mut con = redis.con().await;
    let evs: Vec<_> = (0..3000).map(|i| (meta(i, "t"), b"{}".to_vec())).collect();
    produce(&mut con, "events:fast", &evs).await;
    wait_until("all handled", T, || async { sink.delivered_ids("/e").len() + dlq.posts("/dlq").len() >= 3000 }).await;
    let overloads = sink.answered(500);
    println!("overload answers while the limit was found: {overloads} of 3000");
    assert!(overloads <= 5, "{overloads} overload answers");
    let limit = w.metric(&format!("host_concurrency_limit{{host=\"http://127.0.0.1:{}\"}}", sink.port)).await;
    assert!((1.0..=10.0).contains(&limit), "settled at {limit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_host_does_not_slow_the_others() {
    let redis = RedisServer::start();
    let healthy = Sink::start_with(false).await;
    healthy.respond(|_, _| Reply::ok().after(Duration::from_millis(2)));
    let down = Sink::start().await;
    let up = Arc::new(AtomicBool::new(false));
    let u = up.clone();
    down.respond(move |_, _| if u.load(SeqCst) { Reply::ok() } else { Reply::status(503) });
    let dlq = Sink::start().await;
    let w = Worker::start(&redis, &healthy.url("/ok"), &[("DLQ_URI", &dlq.url("/dlq")), ("MAX_IN_FLIGHT", "8")]);
    w.wait_ready().await;
    let started = tokio::time::Instant::now();
    let mut con = redis.con().await;
    // Interleaved on every stream: events for the failing host among the healthy one's.
    for s in STREAMS {
        let mut evs = vec![];
        for i in 0..500 {
            evs.push(ev(format!("{s}-ok-{i}"), &healthy.url("/ok")));
            if i % 10 == 0 {
                evs.push(ev(format!("{s}-down-{i}"), &down.url("/down")));
            }
        }
        produce(&mut con, &format!("events:{s}"), &evs).await;
    }
    wait_until("the healthy host got everything while the other is down", T, || async {
        healthy.delivered_ids("/ok").len() == 2000
    })
    .await;
    assert!(!up.load(SeqCst));
    let open = w.metric(&format!("host_circuit_open{{host=\"http://127.0.0.1:{}\"}}", down.port)).await;
    assert_eq!(open, 1.0, "the failing host is paused");
    println!("healthy host: 2000 events in {:.2}s during the outage", started.elapsed().as_secs_f64());
    // A ten-second outage, then the host recovers.
    tokio::time::sleep_until(started + Duration::from_secs(10)).await;
    up.store(true, SeqCst);
    wait_until("the failing host's events delivered after it recovered", T, || async {
        down.delivered_ids("/down").len() == 200
    })
    .await;
    assert!(dlq.posts("/dlq").is_empty(), "nothing dead-lettered: {:?}", dlq.posts("/dlq").first().map(|r| r.json()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brief_outage_dead_letters_nothing_and_retries_back_off() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    let dlq = Sink::start().await;
    // An application whose database is down: POST fails, the server itself answers.
    let up = Arc::new(AtomicBool::new(false));
    let u = up.clone();
    sink.respond(move |r, _| match r.method {
        Method::OPTIONS => Reply::status(204),
        _ if u.load(SeqCst) => Reply::ok(),
        _ => Reply::status(503),
    });
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast"), ("DLQ_URI", &dlq.url("/dlq"))]);
    w.wait_ready().await;
    let started = tokio::time::Instant::now();
    let mut con = redis.con().await;
    let evs: Vec<_> = (0..50).map(|i| (meta(format!("b{i}"), "t"), b"{}".to_vec())).collect();
    produce(&mut con, "events:fast", &evs).await;
    tokio::time::sleep_until(started + Duration::from_secs(3)).await;
    up.store(true, SeqCst);
    wait_until("all 50 delivered", T, || async { sink.delivered_ids("/e").len() == 50 }).await;
    assert!(
        dlq.posts("/dlq").is_empty(),
        "dead-lettered: {:?}",
        dlq.posts("/dlq").iter().map(|r| r.json()).collect::<Vec<_>>()
    );
    // Each event's attempts are spread out by its own backoff (1 s, 2 s, ... with ±20 %).
    let mut by_id: HashMap<String, Vec<f64>> = HashMap::new();
    for r in sink.posts("/e") {
        by_id.entry(r.header("x-event-id").unwrap().to_string()).or_default().push(r.at);
    }
    let mut retried = 0;
    for (id, at) in &by_id {
        for (n, pair) in at.windows(2).enumerate() {
            let gap = pair[1] - pair[0];
            let least = 0.8 * f64::from(1u32 << n);
            assert!(gap >= least - 0.05, "{id}: attempt {} came {gap:.2}s after the previous one", n + 2);
            retried += 1;
        }
    }
    let posts = sink.posts("/e").len();
    println!("50 events, {posts} POSTs, {retried} retries, {} probes", sink.count(Method::OPTIONS, "/"));
    assert!(retried > 0, "the outage was noticed");
    assert!(posts < 80, "a paused host is met with trial requests, not every waiting event: {posts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_event_does_not_pause_its_host() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink.respond(|r, _| {
        if r.header("x-event-id") == Some("slow") && r.header("x-event-attempt") == Some("1") {
            Reply::ok().after(Duration::from_secs(2))
        } else {
            Reply::ok()
        }
    });
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast"), ("ORDERING", "none")]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    // Its own `timeout` field: 0.2 s, far below READ_TIMEOUT.
    let _: String = redis::cmd("XADD")
        .arg("events:fast")
        .arg("*")
        .arg("meta")
        .arg(meta("slow", "t").to_string())
        .arg("payload")
        .arg("{}")
        .arg("timeout")
        .arg("0.2")
        .query_async(&mut con)
        .await
        .unwrap();
    wait_until("the slow event timed out", T, || async { !sink.posts("/e").is_empty() }).await;
    let evs: Vec<_> = (0..100).map(|i| (meta(i, "t"), b"{}".to_vec())).collect();
    produce(&mut con, "events:fast", &evs).await;
    wait_until("the others delivered", T, || async { sink.delivered_ids("/e").len() >= 100 }).await;
    wait_until("the slow event retried and delivered", T, || async {
        sink.posts("/e")
            .iter()
            .any(|r| r.header("x-event-id") == Some("slow") && r.header("x-event-attempt") == Some("2"))
    })
    .await;
    assert_eq!(sink.count(Method::OPTIONS, "/"), 0, "the host was never paused (no probe)");
    let timeouts = w.metric("events_failed_total{reason=\"timeout\",stream=\"events:fast\",type=\"t\"}").await;
    assert_eq!(timeouts, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_never_answers_ends_in_dead_letters() {
    let redis = RedisServer::start();
    let healthy = Sink::start_with(false).await;
    let dlq = Sink::start().await;
    let dead = format!("http://127.0.0.1:{}/never", free_port());
    let w = Worker::start(
        &redis,
        &healthy.url("/ok"),
        &[("STREAMS", "fast"), ("DLQ_URI", &dlq.url("/dlq")), ("MAX_EVENT_AGE", "4"), ("BACKOFF_BASE", "0.5")],
    );
    w.wait_ready().await;
    let mut con = redis.con().await;
    let mut evs: Vec<_> = (0..40).map(|i| ev(format!("dead-{i}"), &dead)).collect();
    evs.extend((0..200).map(|i| ev(format!("ok-{i}"), &healthy.url("/ok"))));
    produce(&mut con, "events:fast", &evs).await;
    wait_until("the healthy host got its events", T, || async { healthy.delivered_ids("/ok").len() == 200 }).await;
    wait_until("every event for the dead host dead-lettered", T, || async { dlq.posts("/dlq").len() == 40 }).await;
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for r in dlq.posts("/dlq") {
        *reasons.entry(r.json()["reason"].as_str().unwrap().to_string()).or_default() += 1;
    }
    println!("dead letters by reason: {reasons:?}");
    assert!(reasons.keys().all(|r| r == "max_age" || r == "connect_error"), "{reasons:?}");
    wait_until("nothing left in flight, queued or scheduled", T, || async {
        let mut c = redis.con().await;
        scheduled(&mut c).await.is_empty() && pending(&mut c, "events:fast", "workers").await == 0
    })
    .await;
    assert_eq!(w.metric("events_in_flight{stream=\"events:fast\"}").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_events_overtake_a_backlog_of_slow_ones_at_a_saturated_host() {
    let redis = RedisServer::start();
    let sink = Sink::start_with(false).await;
    sink.respond(|_, _| Reply::ok().after(Duration::from_millis(5)));
    let w = Worker::start(
        &redis,
        &sink.url("/e"),
        &[("HOST_MAX_CONCURRENCY", "4"), ("HOST_CONCURRENCY", "fixed"), ("ORDERING", "none")],
    );
    w.wait_ready().await;
    let mut con = redis.con().await;
    let slow: Vec<_> = (0..10_000).map(|i| (meta(format!("slow-{i}"), "t"), b"{}".to_vec())).collect();
    let slow_at = unix_now();
    produce(&mut con, "events:slow", &slow).await;
    wait_until("the host is busy with slow events", T, || async { sink.posts("/e").len() >= 500 }).await;
    let critical: Vec<_> = (0..100).map(|i| (meta(format!("critical-{i}"), "t"), b"{}".to_vec())).collect();
    let critical_at = unix_now();
    produce(&mut con, "events:critical", &critical).await;
    wait_until("critical events delivered", T, || async {
        sink.delivered_ids("/e").iter().filter(|id| id.starts_with("critical-")).count() == 100
    })
    .await;
    let slow_done = sink.delivered_ids("/e").iter().filter(|id| id.starts_with("slow-")).count();
    println!("when the 100 critical events were done, {slow_done} of 10,000 slow ones were");
    assert!(slow_done < 5_000, "critical events waited behind the slow backlog ({slow_done} slow delivered first)");
    wait_until("slow backlog delivered", Duration::from_secs(120), || async {
        sink.delivered_ids("/e").len() == 10_100
    })
    .await;
    let deferred = w.metric("events_deferred_total{reason=\"host_busy\",stream=\"events:slow\"}").await;
    println!("slow events deferred while the host was busy: {deferred} (each came back when the host had room)");
    // Latency per stream, from XADD to receipt.
    let posts = sink.posts("/e");
    for (prefix, produced) in [("critical-", critical_at), ("slow-", slow_at)] {
        let mut lat: Vec<f64> = posts
            .iter()
            .filter(|r| r.status == 200 && r.header("x-event-id").is_some_and(|id| id.starts_with(prefix)))
            .map(|r| (r.at - produced) * 1000.0)
            .collect();
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
        println!("{prefix:<10} p50 {:>8.1} ms  p99 {:>8.1} ms  ({} events)", p(0.5), p(0.99), lat.len());
    }
}

/// Sequence numbers per key of the 2xx answers, in arrival order.
fn arrivals(sink: &Sink) -> HashMap<String, Vec<u32>> {
    let mut by_key: HashMap<String, Vec<u32>> = HashMap::new();
    for r in sink.posts("/e").into_iter().filter(|r| r.status == 200) {
        let id = r.header("x-event-id").unwrap();
        let (key, seq) = id.rsplit_once('-').unwrap();
        by_key.entry(key.to_string()).or_default().push(seq.parse().unwrap());
    }
    by_key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_retry_holds_its_key() {
    for ordering in ["key", "stream"] {
        let redis = RedisServer::start();
        let sink = Sink::start().await;
        // Event 3 of each key is asked to come back a second later.
        sink.respond(|r, _| {
            let id = r.header("x-event-id").unwrap_or("");
            if id.ends_with("-3") && r.header("x-event-attempt") == Some("1") {
                Reply::status(429).header("retry-after", "1")
            } else {
                Reply::ok()
            }
        });
        let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast"), ("ORDERING", ordering)]);
        w.wait_ready().await;
        let mut con = redis.con().await;
        let mut evs = vec![];
        for seq in 0..10 {
            for k in 0..5 {
                evs.push((json!({"id": format!("k{k}-{seq}"), "type": "t", "orderingKey": format!("k{k}")}), vec![]));
            }
        }
        produce(&mut con, "events:fast", &evs).await;
        wait_until("all delivered", T, || async { sink.delivered_ids("/e").len() == 50 }).await;
        for (key, seqs) in arrivals(&sink) {
            assert_eq!(seqs, (0..10).collect::<Vec<_>>(), "{ordering}: key {key} out of order");
        }
        wait_until("nothing held any more", T, || async {
            let mut c = redis.con().await;
            let held: i64 =
                redis::cmd("HLEN").arg("eventworker:held:workers:events:fast").query_async(&mut c).await.unwrap();
            held == 0 && pending(&mut c, "events:fast", "workers").await == 0
        })
        .await;
        drop(w);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_keep_every_key_in_order_through_a_restart() {
    let redis = RedisServer::start();
    let sink = Sink::start_with(false).await;
    sink.respond(|r, _| {
        // Some answers take longer, and some events are asked to come back: overtaking
        // would show.
        let id = r.header("x-event-id").unwrap_or("");
        let n: u64 = id.bytes().map(u64::from).sum();
        if n % 97 == 0 && r.header("x-event-attempt") == Some("1") {
            Reply::status(503).header("retry-after", "0.5")
        } else {
            Reply::ok().after(Duration::from_millis(n % 4))
        }
    });
    let env = |name: &'static str| -> Vec<(&'static str, &'static str)> {
        vec![("STREAMS", "default"), ("CONSUMER_NAME", name), ("ORDERING_LEASE", "3"), ("SHUTDOWN_GRACE", "10")]
    };
    let mut pods = vec![
        ("pod-a", Worker::start(&redis, &sink.url("/e"), &env("pod-a"))),
        ("pod-b", Worker::start(&redis, &sink.url("/e"), &env("pod-b"))),
    ];
    for (_, p) in &pods {
        p.wait_ready().await;
    }
    let mut con = redis.con().await;
    let mut evs = vec![];
    for seq in 0..20 {
        for k in 0..1000 {
            evs.push((json!({"id": format!("k{k}-{seq}"), "type": "t", "orderingKey": format!("k{k}")}), vec![]));
        }
    }
    let t0 = unix_now();
    produce(&mut con, "events:default", &evs).await;
    // A rolling update of whichever pod holds the stream (SIGTERM, drain, a new pod), then
    // a crash of the holder (kill -9: the lease expires, the other takes over).
    for (at, graceful) in [(5_000, true), (12_000, false)] {
        wait_until("deliveries under way", T, || async { sink.delivered_ids("/e").len() >= at }).await;
        let mut leader = None;
        for (i, (_, p)) in pods.iter().enumerate() {
            if p.metric("stream_leader{stream=\"events:default\"}").await == 1.0 {
                leader = Some(i);
            }
        }
        let (name, mut pod) = pods.remove(leader.expect("one pod holds the ordering lease"));
        println!(
            "{} the leader ({name}) at {} delivered, {:.1}s",
            if graceful { "restarting" } else { "killing" },
            sink.delivered_ids("/e").len(),
            unix_now() - t0
        );
        if graceful {
            pod.sigterm();
            assert!(pod.wait_exit(T).await.is_some_and(|s| s.success()));
        } else {
            pod.kill9();
        }
        pods.push((name, Worker::start(&redis, &sink.url("/e"), &env(name))));
    }
    wait_until("all 20,000 delivered", Duration::from_secs(120), || async { sink.delivered_ids("/e").len() == 20_000 })
        .await;
    let by_key = arrivals(&sink);
    assert_eq!(by_key.len(), 1000);
    let mut again = 0;
    for (key, seqs) in by_key {
        // A crash may deliver what was in flight once more (at least once); no event of a
        // key ever arrives before an earlier one.
        let mut first = vec![];
        for s in &seqs {
            if !first.contains(s) {
                first.push(*s);
            }
        }
        again += seqs.len() - first.len();
        assert_eq!(first, (0..20).collect::<Vec<_>>(), "key {key} out of order: {seqs:?}");
    }
    println!("delivered again after the crash: {again}; all delivered after {:.1}s", unix_now() - t0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_retry_after_values_never_break_a_delivery() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    let odd = ["1e20", "-5", "NaN", "Thu, 01 Jan 1970 00:00:00 GMT", "999999999999999999999"];
    sink.respond(move |r, _| {
        let i: usize = r.header("x-event-id").and_then(|id| id.parse().ok()).unwrap_or(usize::MAX);
        match (i, r.header("x-event-attempt")) {
            (i, Some("1")) if i < odd.len() => Reply::status(429).header("retry-after", odd[i]),
            (i, Some("1")) if i < 2 * odd.len() => Reply::status(400).header("x-retry-after", odd[i - odd.len()]),
            _ => Reply::ok(),
        }
    });
    let w =
        Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast"), ("ORDERING", "none"), ("RETRY_BACKOFF", "0.5")]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    let evs: Vec<_> = (0..2 * odd.len()).map(|i| (meta(i, "t"), b"{}".to_vec())).collect();
    produce(&mut con, "events:fast", &evs).await;
    // Huge values are clamped to a week; the others come back soon.
    wait_until("the others delivered on their second attempt", T, || async {
        let ids = sink.delivered_ids("/e");
        ids.len() == 2 * odd.len() - 4
    })
    .await;
    let far = scheduled(&mut con).await;
    assert_eq!(far.len(), 4, "1e20 and 10^21, in both headers: {far:?}");
    let week = unix_now() + 7.0 * 86400.0;
    for (_, due) in far {
        assert!(due <= week + 60.0 && due >= week - 60.0, "due {due}, a week is {week}");
    }
    // The worker is alive and delivering.
    produce(&mut con, "events:fast", &[(meta("after", "t"), b"{}".to_vec())]).await;
    wait_until("a later event delivered", T, || async { sink.delivered_ids("/e").contains("after") }).await;
}

/// The hold scripts run again by a retried Redis call (its first reply lost) change nothing
/// the second time: no duplicate retry entry, no second hand-over of a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_scripts_are_safe_to_run_twice() {
    use eventworker::streams::{self, ReleaseReq, ScheduleReq, Scripts};
    let redis = RedisServer::start();
    let mut con = redis.con().await;
    let mut cm = streams::connect(&redis.url(), Duration::from_secs(5)).await.unwrap();
    let scripts = Scripts::default();
    streams::ensure_group(&mut cm, "events:fast", "g").await.unwrap();
    produce(&mut con, "events:fast", &[(meta("a", "t"), b"A".to_vec()), (meta("b", "t"), b"B".to_vec())]).await;
    let read = streams::read_group(&mut cm, "events:fast", "g", "c", ">", 10, None).await.unwrap();
    let (a, b) = (&read[0].id, &read[1].id);
    let sk = streams::StreamKeys::new(streams::Layout::Single, "g", "events:fast");
    let held = sk.held.clone();
    // Event a is scheduled for a retry and holds key k: twice.
    for _ in 0..2 {
        let req = ScheduleReq {
            keys: &sk,
            group: "g",
            entry_id: a,
            delete: true,
            due_unix: unix_now() + 60.0,
            meta_json: "{}",
            payload: b"A",
            timeout: None,
            hold: Some((&held, "k", "t1")),
            expect_by_ms: 0,
            drop_counter: None,
        };
        scripts.schedule(&mut cm, &req).await.unwrap();
    }
    assert_eq!(xlen(&mut con, "events:retry").await, 1, "one retry entry, not two");
    // Two events wait behind it.
    let keys = sk.hold("k");
    for payload in ["w1", "w2"] {
        let _: String = redis::cmd("XADD")
            .arg(&keys.back)
            .arg("*")
            .arg("meta")
            .arg("{}")
            .arg("payload")
            .arg(payload)
            .query_async(&mut con)
            .await
            .unwrap();
    }
    // Event b holds the key now (as if it were a's retry coming back) and is delivered: twice.
    let _: () = redis::cmd("HSET").arg(&held).arg("k").arg("t2 1 0").query_async(&mut con).await.unwrap();
    let before = xlen(&mut con, "events:fast").await;
    let mut answers = vec![];
    for _ in 0..2 {
        let req = ReleaseReq {
            stream_key: "events:fast",
            group: "g",
            finished: Some((b, "err_count:x")),
            delete: true,
            key: "k",
            keys: &keys,
            token: "t2",
            next_token: "t3",
            batch: 100,
            expect_by_ms: 42,
            cleanup: Some(("outbox:delivered", "row-b")),
        };
        answers.push(scripts.hold_release(&mut cm, &req).await.unwrap());
    }
    assert_eq!(answers, ["t3", "t3"], "the second run reports the key's state and changes nothing");
    assert_eq!(xlen(&mut con, "events:fast").await, before - 1 + 2, "b deleted, the two waiting events back once");
    let v: String = redis::cmd("HGET").arg(&held).arg("k").query_async(&mut con).await.unwrap();
    assert_eq!(v, "t3 2 42");
    let rows: Vec<String> = redis::cmd("SMEMBERS").arg("outbox:delivered").query_async(&mut con).await.unwrap();
    assert_eq!(rows, ["row-b"], "the delivered event's outbox clean-up is recorded with its acknowledgement");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_holder_never_comes_back_is_handed_on() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    let mut con = redis.con().await;
    // Key k is held by an event that is gone (trimmed from the stream, say) and was
    // expected back long ago; two events wait behind it.
    let sk = eventworker::streams::StreamKeys::new(eventworker::streams::Layout::Single, "workers", "events:fast");
    let (held, keys) = (sk.held.clone(), sk.hold("k"));
    let _: () = redis::cmd("HSET").arg(&held).arg("k").arg("gone 1 1000").query_async(&mut con).await.unwrap();
    for (i, id) in ["w1", "w2"].iter().enumerate() {
        let m = json!({"id": id, "type": "t", "orderingKey": "k"}).to_string();
        let _: String = redis::cmd("XADD")
            .arg(&keys.back)
            .arg("*")
            .arg("meta")
            .arg(m)
            .arg("payload")
            .arg(i.to_string())
            .query_async(&mut con)
            .await
            .unwrap();
    }
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast")]);
    w.wait_ready().await;
    wait_until("the waiting events delivered, in order", T, || async { sink.delivered_ids("/e").len() == 2 }).await;
    let order: Vec<_> = sink.posts("/e").iter().map(|r| r.header("x-event-id").unwrap().to_string()).collect();
    assert_eq!(order, ["w1", "w2"]);
    wait_until("the key is free", T, || async {
        let mut c = redis.con().await;
        let n: i64 = redis::cmd("HLEN").arg(&held).query_async(&mut c).await.unwrap();
        n == 0
    })
    .await;
    assert_eq!(w.metric("ordering_held_keys_expired_total{stream=\"events:fast\"}").await, 1.0);
}
