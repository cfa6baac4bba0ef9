//! Each outcome of DESIGN.md §2, observed through a real redis-server, a real HTTP sink and
//! the worker binary.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_with_the_original_headers_and_acks() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    let w = Worker::start(
        &redis,
        &sink.url("/events/[EVENT_TYPE]"),
        &[("STREAMS", "fast,slow"), ("TARGET_HEADERS", r#"{"Authorization": "Bearer abc"}"#)],
    );
    w.wait_ready().await;
    let mut con = redis.con().await;
    produce(
        &mut con,
        "events:fast",
        &[(json!({"id": 17, "type": "user.created", "createdAt": iso_now()}), b"\x00binary body\xff".to_vec())],
    )
    .await;
    produce(
        &mut con,
        "events:slow",
        &[(json!({"type": "x", "queue": "billing", "url": sink.url("/custom")}), b"p2".to_vec())],
    )
    .await;
    wait_until("both delivered", T, || async { sink.posts("/").len() == 2 }).await;

    let first = sink.posts("/events/user.created").pop().expect("default URI with [EVENT_TYPE]");
    assert_eq!(&first.body[..], b"\x00binary body\xff", "payload delivered byte for byte");
    assert_eq!(first.header("content-type"), Some("application/octet-stream"));
    assert_eq!(first.header("x-event-id"), Some("17"));
    assert_eq!(first.header("x-event-type"), Some("user.created"));
    assert_eq!(first.header("x-event-queue"), Some("events:fast"));
    assert_eq!(first.header("x-event-attempt"), Some("1"));
    assert!(first.header("traceparent").is_some_and(|t| t.starts_with("00-") && t.len() == 55));
    assert!(first.header("webhook-signature").is_none(), "unsigned without WEBHOOK_SECRET");
    assert_eq!(first.header("authorization"), Some("Bearer abc"), "TARGET_HEADERS added");

    let second = sink.posts("/custom").pop().expect("meta.url wins");
    assert_eq!(second.header("x-event-queue"), Some("billing"));
    assert_eq!(second.header("x-event-id"), None, "no id, no header");
    assert_eq!(second.header("x-event-type"), Some("x"));

    // Acknowledged and deleted, as the original did.
    wait_until("acked and deleted", T, || async {
        let mut c = redis.con().await;
        xlen(&mut c, "events:fast").await == 0
            && pending(&mut c, "events:fast", "workers").await == 0
            && xlen(&mut c, "events:slow").await == 0
    })
    .await;
    assert_eq!(w.metric("events_processed_total{stream=\"events:fast\",type=\"user.created\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signs_requests_when_a_secret_is_set() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    let w = Worker::start(
        &redis,
        &sink.url("/e"),
        &[("STREAMS", "fast"), ("WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")],
    );
    w.wait_ready().await;
    let mut con = redis.con().await;
    produce(&mut con, "events:fast", &[(meta("msg_1", "t"), b"{\"a\":1}".to_vec())]).await;
    wait_until("delivered", T, || async { sink.posts("/e").len() == 1 }).await;
    let r = sink.posts("/e").pop().unwrap();
    assert_eq!(r.header("webhook-id"), Some("msg_1"));
    let ts: u64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
    let secret = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()
    };
    assert_eq!(r.header("webhook-signature").unwrap(), eventworker::delivery::sign(&secret, "msg_1", ts, &r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_statuses_are_dead_lettered_over_http() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink.respond(|r, _| match r.path.as_str() {
        "/dlq" => Reply::ok(),
        "/e/gone" => Reply::status(404),
        "/e/bad" => Reply::status(400),
        _ => Reply::status(500),
    });
    let w = Worker::start(&redis, &sink.url("/e/[EVENT_TYPE]"), &[("STREAMS", "fast"), ("DLQ_URI", &sink.url("/dlq"))]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    produce(
        &mut con,
        "events:fast",
        &[(meta("a", "gone"), b"pa".to_vec()), (meta("b", "bad"), b"pb".to_vec()), (meta("c", "boom"), b"pc".to_vec())],
    )
    .await;
    wait_until("three dead letters", T, || async { sink.posts("/dlq").len() == 3 }).await;
    let mut dl: Vec<_> = sink.posts("/dlq").iter().map(|r| r.json()).collect();
    dl.sort_by_key(|v| v["id"].as_str().unwrap().to_string());
    assert_eq!(dl[0], json!({"id": "a", "type": "gone", "reason": "http_404", "payload": "pa"}));
    assert_eq!(dl[1], json!({"id": "b", "type": "bad", "reason": "http_400", "payload": "pb"}));
    assert_eq!(dl[2], json!({"id": "c", "type": "boom", "reason": "http_500", "payload": "pc"}));
    assert_eq!(sink.posts("/e/").len(), 3, "a final status is not retried");
    wait_until("acked", T, || async {
        let mut c = redis.con().await;
        pending(&mut c, "events:fast", "workers").await == 0 && xlen(&mut c, "events:fast").await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_dead_letters_and_malformed_entries() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink.respond(|_, _| Reply::status(422));
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast")]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    // No meta at all, meta not JSON, meta not an object, and one well-formed event.
    let _: String = redis::cmd("XADD")
        .arg("events:fast")
        .arg("*")
        .arg("payload")
        .arg("orphan")
        .query_async(&mut con)
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg("events:fast")
        .arg("*")
        .arg("meta")
        .arg("{oops")
        .arg("payload")
        .arg("p2")
        .query_async(&mut con)
        .await
        .unwrap();
    let bad3: String = redis::cmd("XADD")
        .arg("events:fast")
        .arg("*")
        .arg("meta")
        .arg("[1]")
        .arg("other")
        .arg("x")
        .query_async(&mut con)
        .await
        .unwrap();
    produce(&mut con, "events:fast", &[(meta("ok1", "t"), b"body".to_vec())]).await;
    wait_until("four DLQ lines on stdout", T, || async {
        w.stdout().lines().filter(|l| l.starts_with("DLQ:")).count() == 4
    })
    .await;
    let lines: Vec<serde_json::Value> =
        w.stdout().lines().filter_map(|l| l.strip_prefix("DLQ:")).map(|j| serde_json::from_str(j).unwrap()).collect();
    let malformed: Vec<_> = lines.iter().filter(|l| l["reason"] == "malformed_entry").collect();
    assert_eq!(malformed.len(), 3, "{lines:?}");
    assert!(malformed.iter().any(|l| l["payload"] == "orphan"));
    assert!(malformed.iter().any(|l| l["payload"] == "p2"));
    let third = malformed.iter().find(|l| l["id"] == bad3.as_str()).expect("entry id used when meta is unreadable");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(third["payload"].as_str().unwrap()).unwrap(),
        json!({"meta": "[1]", "other": "x"})
    );
    assert!(lines.iter().any(|l| *l == json!({"id": "ok1", "type": "t", "reason": "http_422", "payload": "body"})));
    wait_until("nothing left pending", T, || async {
        let mut c = redis.con().await;
        pending(&mut c, "events:fast", "workers").await == 0
    })
    .await;
    assert_eq!(sink.posts("/e").len(), 1, "malformed entries are never sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_retry_fires_after_its_delay_not_before() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink.respond(|r, seen| match (r.path.as_str(), seen) {
        ("/e/a", 0) => Reply::status(400).header("x-retry-after", "2"),
        ("/e/b", 0) => Reply::status(429).header("retry-after", "1"),
        ("/e/c", 0) => Reply::status(503).header("retry-after", "1"),
        _ => Reply::ok(),
    });
    let w = Worker::start(&redis, &sink.url("/e/[EVENT_TYPE]"), &[("STREAMS", "default")]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    produce(
        &mut con,
        "events:default",
        &[(meta("1", "a"), b"A".to_vec()), (meta("2", "b"), b"B".to_vec()), (meta("3", "c"), b"C".to_vec())],
    )
    .await;

    // While waiting, the event lives in events:retry with its due time in events:retry:delays.
    wait_until("three retries scheduled", T, || async {
        let mut c = redis.con().await;
        sink.posts("/e/").len() >= 3 && xlen(&mut c, "events:retry").await >= 1
    })
    .await;
    assert!(!scheduled(&mut con).await.is_empty());
    let entries: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg("events:retry").arg("-").arg("+").query_async(&mut con).await.unwrap();
    let a = entries
        .ids
        .iter()
        .find(|e| e.get::<String>("payload").as_deref() == Some("A"))
        .expect("retry entry of event 1 with the original's fields");
    assert_eq!(a.get::<String>("stream").as_deref(), Some("events:default"));
    let m: serde_json::Value = serde_json::from_str(&a.get::<String>("meta").unwrap()).unwrap();
    assert!(m["nextAttemptAt"].is_string() && m["id"] == "1", "{m}");

    wait_until("all three delivered on a second attempt", T, || async { sink.posts("/e/").len() == 6 }).await;
    for (path, delay) in [("/e/a", 2.0), ("/e/b", 1.0), ("/e/c", 1.0)] {
        let tries = sink.posts(path);
        assert_eq!(tries.len(), 2, "{path}");
        let waited = tries[1].at - tries[0].at;
        assert!(waited >= delay, "{path}: retried after {waited:.3}s, asked for {delay}s");
        assert!(waited < delay + 5.0, "{path}: retried only after {waited:.3}s");
        assert_eq!(tries[1].header("x-event-attempt"), Some("2"));
    }
    wait_until("schedule empty and stream drained", T, || async {
        let mut c = redis.con().await;
        scheduled(&mut c).await.is_empty()
            && xlen(&mut c, "events:retry").await == 0
            && pending(&mut c, "events:default", "workers").await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_dead_letters_with_the_last_reason() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    // Always asks for a retry; the counter must end it.
    sink.respond(|r, _| if r.path == "/dlq" { Reply::ok() } else { Reply::status(400).header("x-retry-after", "0") });
    let w = Worker::start(
        &redis,
        &sink.url("/e"),
        &[("STREAMS", "fast"), ("DLQ_URI", &sink.url("/dlq")), ("MAX_ATTEMPTS", "3")],
    );
    w.wait_ready().await;
    let mut con = redis.con().await;
    produce(&mut con, "events:fast", &[(meta("m1", "t"), b"x".to_vec())]).await;
    wait_until("dead-lettered", T, || async { sink.posts("/dlq").len() == 1 }).await;
    assert_eq!(sink.posts("/dlq")[0].json(), json!({"id": "m1", "type": "t", "reason": "http_400", "payload": "x"}));
    let attempts: Vec<_> = sink.posts("/e").iter().map(|r| r.header("x-event-attempt").unwrap().to_string()).collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    wait_until("counter cleared", T, || async {
        let mut c = redis.con().await;
        let exists: i64 = redis::cmd("EXISTS").arg("err_count:events:fast:m1").query_async(&mut c).await.unwrap();
        exists == 0 && pending(&mut c, "events:fast", "workers").await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_without_options_is_resumed_after_a_brief_outage() {
    // Like Python's http.server: 501 to OPTIONS. Down for its first two POSTs.
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink.respond(|r, n| match r.method.as_str() {
        "OPTIONS" => Reply::status(501),
        _ if n < 2 => Reply::status(503),
        _ => Reply::ok(),
    });
    let w = Worker::start(&redis, &sink.url("/in"), &[("STREAMS", "fast"), ("BACKOFF_BASE", "0.2")]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    let events: Vec<_> = (0..5).map(|i| (meta(format!("e{i}"), "t"), b"x".to_vec())).collect();
    produce(&mut con, "events:fast", &events).await;
    wait_until("all delivered after the outage", T, || async { sink.answered(200) == 5 }).await;
    assert!(sink.count(axum::http::Method::OPTIONS, "/") >= 1, "the host was paused and probed");
    assert_eq!(w.metric_sum("events_dead_lettered_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_host_pauses_only_itself_and_resumes_after_a_probe() {
    let redis = RedisServer::start();
    let down = Sink::start().await;
    let up = Sink::start().await;
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = healthy.clone();
    down.respond(move |r, _| {
        let ok = h.load(std::sync::atomic::Ordering::SeqCst);
        match (r.method.as_str(), ok) {
            (_, true) if r.method == axum::http::Method::OPTIONS => Reply::status(405),
            ("POST", true) => Reply::ok(),
            _ => Reply::status(503),
        }
    });
    // More events for the paused host than read slots: they park, and the rest flows.
    let w = Worker::start(&redis, &up.url("/e"), &[("STREAMS", "fast"), ("ORDERING", "none"), ("MAX_IN_FLIGHT", "4")]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    let to_down: Vec<_> =
        (0..10).map(|i| (json!({"id": format!("d{i}"), "type": "t", "url": down.url("/in")}), b"d".to_vec())).collect();
    produce(&mut con, "events:fast", &to_down).await;
    wait_until("down host probed", T, || async { down.count(axum::http::Method::OPTIONS, "/") >= 2 }).await;
    let posts_while_down = down.posts("/in").len();
    let circuit = format!("host_circuit_open{{host=\"http://127.0.0.1:{}\"}}", down.port);
    assert_eq!(w.metric(&circuit).await, 1.0, "paused host shows in the circuit gauge");

    // Other hosts keep flowing meanwhile.
    let to_up: Vec<_> = (0..20).map(|i| (meta(format!("u{i}"), "t"), b"u".to_vec())).collect();
    produce(&mut con, "events:fast", &to_up).await;
    wait_until("other host delivered while one is paused", T, || async { up.posts("/e").len() == 20 }).await;
    assert!(down.posts("/in").len() <= posts_while_down + 1, "paused host gets no deliveries, only probes");

    let resumed_at = unix_now();
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_until("paused host's events delivered after it recovered", T, || async {
        let after: Vec<_> = down.posts("/in").into_iter().filter(|r| r.at >= resumed_at).collect();
        id_counts(&after).len() == 10
    })
    .await;
    // Events that were refused before the pause carry their attempt number when retried;
    // those that only waited at the paused host are on their first attempt.
    let all = down.posts("/in");
    let refused: std::collections::HashSet<_> =
        all.iter().filter(|r| r.at < resumed_at).filter_map(|r| r.header("x-event-id")).collect();
    assert!(!refused.is_empty());
    for r in all.iter().filter(|r| r.at >= resumed_at) {
        let id = r.header("x-event-id").unwrap();
        let attempt: u32 = r.header("x-event-attempt").unwrap().parse().unwrap();
        assert_eq!(attempt > 1, refused.contains(id), "{id}: attempt {attempt}");
    }
    wait_until("circuit closed", T, || async { w.metric(&circuit).await == 0.0 }).await;
    wait_until("everything acknowledged", T, || async {
        let mut c = redis.con().await;
        pending(&mut c, "events:fast", "workers").await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_dead_letter_sink_holds_the_event() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    let dlq_open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = dlq_open.clone();
    sink.respond(move |r, _| match r.path.as_str() {
        "/dlq" if d.load(std::sync::atomic::Ordering::SeqCst) => Reply::ok(),
        "/dlq" => Reply::status(500),
        _ => Reply::status(410),
    });
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast"), ("DLQ_URI", &sink.url("/dlq"))]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    produce(&mut con, "events:fast", &[(meta("h1", "t"), b"x".to_vec())]).await;
    wait_until("sink refused twice", T, || async { sink.posts("/dlq").len() >= 2 }).await;
    assert_eq!(pending(&mut con, "events:fast", "workers").await, 1, "held, not acknowledged");
    let (code, body) = w.get("/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("dead-letter sink failing"), "{body}");
    assert!(w.metric("dlq_sink_errors_total{sink=\"http\"}").await >= 2.0);
    dlq_open.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_until("accepted and acknowledged", T, || async {
        let mut c = redis.con().await;
        pending(&mut c, "events:fast", "workers").await == 0
    })
    .await;
    let accepted = sink.posts("/dlq").pop().unwrap();
    assert_eq!(accepted.json(), json!({"id": "h1", "type": "t", "reason": "http_410", "payload": "x"}));
    wait_until("ready again", T, || async { w.get("/readyz").await.0 == 200 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_in_order_other_keys_concurrently() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    // Random service times make overtaking likely if ordering were not enforced.
    sink.respond(|r, _| {
        let n: u64 =
            r.header("x-event-id").and_then(|id| id.rsplit('-').next()).and_then(|s| s.parse().ok()).unwrap_or(0);
        Reply::ok().after(Duration::from_millis((n * 7919) % 15))
    });
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast"), ("MAX_IN_FLIGHT", "64")]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    let keys = 10;
    let per_key = 40;
    let mut events = vec![];
    for seq in 0..per_key {
        for k in 0..keys {
            events.push((json!({"id": format!("k{k}-{seq}"), "type": "t", "orderingKey": format!("k{k}")}), vec![]));
        }
    }
    produce(&mut con, "events:fast", &events).await;
    wait_until("all delivered", Duration::from_secs(60), || async { sink.posts("/e").len() == keys * per_key }).await;
    let received = sink.posts("/e");
    for k in 0..keys {
        let seqs: Vec<u64> = received
            .iter()
            .filter_map(|r| r.header("x-event-id"))
            .filter(|id| id.starts_with(&format!("k{k}-")))
            .map(|id| id.rsplit('-').next().unwrap().parse().unwrap())
            .collect();
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(seqs, sorted, "key k{k} delivered out of order");
    }
    // And keys did run concurrently: some later-produced key finished before an earlier one.
    let order: Vec<&str> = received.iter().filter_map(|r| r.header("x-event-id")).collect();
    let produced: Vec<String> = events.iter().map(|(m, _)| m["id"].as_str().unwrap().to_string()).collect();
    assert_ne!(order, produced, "different keys were not delivered concurrently");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_stream_ordering_overrides_the_default() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink.respond(|r, _| {
        let n: u64 =
            r.header("x-event-id").and_then(|id| id.rsplit('-').next()).and_then(|s| s.parse().ok()).unwrap_or(0);
        Reply::ok().after(Duration::from_millis((n * 7919) % 10))
    });
    let w = Worker::start(
        &redis,
        &sink.url("/e"),
        &[
            ("STREAMS", "fast,slow"),
            ("ORDERING", "none"),
            ("STREAM_ORDERING", "slow=stream"),
            ("STREAM_MAX_IN_FLIGHT", "fast=32"),
        ],
    );
    w.wait_ready().await;
    let mut con = redis.con().await;
    let evs = |s: &str| (0..60).map(|i| (meta(format!("{s}-{i}"), "t"), vec![])).collect::<Vec<_>>();
    produce(&mut con, "events:fast", &evs("fast")).await;
    produce(&mut con, "events:slow", &evs("slow")).await;
    wait_until("all delivered", T, || async { sink.posts("/e").len() == 120 }).await;
    let seq = |prefix: &str| -> Vec<u64> {
        sink.posts("/e")
            .iter()
            .filter_map(|r| r.header("x-event-id"))
            .filter(|id| id.starts_with(prefix))
            .map(|id| id.rsplit('-').next().unwrap().parse().unwrap())
            .collect()
    };
    assert_eq!(seq("slow-"), (0..60).collect::<Vec<_>>(), "slow is strictly ordered");
    assert_ne!(seq("fast-"), (0..60).collect::<Vec<_>>(), "fast is concurrent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_host_with_one_ordering_key_resumes_in_order() {
    let redis = RedisServer::start();
    let down = Sink::start().await;
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = healthy.clone();
    down.respond(
        move |_, _| if h.load(std::sync::atomic::Ordering::SeqCst) { Reply::ok() } else { Reply::status(503) },
    );
    // More same-key events than read slots: the lane's queued events hold every slot while
    // its head waits for the host.
    let w = Worker::start(&redis, &down.url("/e"), &[("STREAMS", "fast"), ("MAX_IN_FLIGHT", "4")]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    let evs: Vec<_> =
        (0..12).map(|i| (json!({"id": format!("k-{i}"), "type": "t", "orderingKey": "k"}), vec![])).collect();
    produce(&mut con, "events:fast", &evs).await;
    wait_until("host paused", T, || async { down.count(axum::http::Method::OPTIONS, "/") >= 1 }).await;
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_until("all delivered after the host came back", T, || async { down.delivered_ids("/e").len() == 12 }).await;
    let order: Vec<u32> = down
        .posts("/e")
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.header("x-event-id").unwrap().trim_start_matches("k-").parse().unwrap())
        .collect();
    assert_eq!(order, (0..12).collect::<Vec<_>>(), "same key, same order");
}

/// The stream gauges are the backlog the operator scales on (crate `backlog`), also where
/// Redis has lost the group's lag (entries deleted ahead of the group) and `XLEN` keeps
/// delivered entries (`DELETE_ON_ACK=false`): 100 produced, 2 deleted by someone else, 20
/// delivered, the rest held by a receiver that does not answer yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_gauges_are_the_backlog_the_operator_scales_on() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    let answered = std::sync::atomic::AtomicUsize::new(0);
    sink.respond(move |_, _| {
        if answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 20 {
            Reply::ok()
        } else {
            Reply::ok().after(Duration::from_secs(120))
        }
    });
    let mut con = redis.con().await;
    let evs: Vec<_> = (0..100).map(|id| (meta(id, "order.created"), b"{}".to_vec())).collect();
    produce(&mut con, "events:fast", &evs).await;
    let ids: Vec<String> = redis::cmd("XRANGE")
        .arg("events:fast")
        .arg("-")
        .arg("+")
        .query_async::<Vec<(String, Vec<(String, String)>)>>(&mut con)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let _: i64 = redis::cmd("XDEL").arg("events:fast").arg(&ids[50]).arg(&ids[51]).query_async(&mut con).await.unwrap();
    let w = Worker::start(
        &redis,
        &sink.url("/e/[EVENT_TYPE]"),
        &[
            ("STREAMS", "fast"),
            ("MAX_IN_FLIGHT", "30"),
            ("DELETE_ON_ACK", "false"),
            ("ORDERING", "none"),
            ("READ_TIMEOUT", "300"),
        ],
    );
    w.wait_ready().await;
    wait_until("20 acknowledged", Duration::from_secs(20), || async {
        let b = backlog::read(&mut redis.con().await, "events:fast", "workers").await.unwrap();
        b.total() == 78
    })
    .await;
    let series = |name: &str| format!("{name}{{stream=\"events:fast\"}}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while w.metric(&series("stream_backlog")).await != 78.0 {
        let (_, text) = w.get("/metrics").await;
        let gauges: Vec<&str> = text.lines().filter(|l| l.starts_with("stream_")).collect();
        assert!(std::time::Instant::now() < deadline, "backlog gauge never 78: {gauges:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let b = backlog::read(&mut con, "events:fast", "workers").await.unwrap();
    assert_eq!((b.length, b.total(), b.exact), (98, 78, true), "{b:?}");
    assert_eq!(w.metric(&series("stream_length")).await, 98.0, "XLEN keeps the delivered ones");
    assert_eq!(w.metric(&series("stream_pending")).await as i64, b.pending);
    assert_eq!(w.metric(&series("stream_lag")).await as i64, b.undelivered);
    assert!(w.metric(&series("stream_oldest_age_seconds")).await >= 0.0);
}
