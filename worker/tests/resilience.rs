//! Crashes, restarts and shutdowns: nothing produced is ever lost.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn events(prefix: &str, n: usize) -> Vec<(serde_json::Value, Vec<u8>)> {
    (0..n).map(|i| (meta(format!("{prefix}{i}"), "t"), format!("payload {i}").into_bytes())).collect()
}

/// Every id delivered at least once; returns how many deliveries were duplicates.
fn check_all_delivered(sink: &Sink, prefix: &str, n: usize) -> usize {
    let counts = id_counts(&sink.posts("/e"));
    let missing: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).filter(|id| !counts.contains_key(id)).collect();
    assert!(missing.is_empty(), "{} events lost, e.g. {:?}", missing.len(), &missing[..missing.len().min(5)]);
    counts.values().map(|c| c - 1).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_20000_event_load_loses_nothing() {
    let redis = RedisServer::start();
    let sink = Sink::start_with(false).await;
    let env = [("STREAMS", "critical,fast,default,slow")];
    let mut w = Worker::start(&redis, &sink.url("/e"), &env);
    w.wait_ready().await;
    let mut con = redis.con().await;
    let n = 20_000;
    let all = events("k", n);
    for (i, chunk) in all.chunks(n / 4).enumerate() {
        let key = ["events:critical", "events:fast", "events:default", "events:slow"][i];
        produce(&mut con, key, chunk).await;
    }
    // Kill it mid-load, twice, at different points.
    for target in [n / 4, n / 2] {
        wait_until("worker made progress", T, || async { sink.posts("/e").len() >= target }).await;
        w.kill9();
        w = Worker::start(&redis, &sink.url("/e"), &env);
    }
    wait_until("every id delivered", Duration::from_secs(120), || async { id_counts(&sink.posts("/e")).len() == n })
        .await;
    let dups = check_all_delivered(&sink, "k", n);
    println!("kill -9 x2 during {n} events: 0 lost, {dups} delivered twice (at-least-once)");
    wait_until("all acknowledged", T, || async {
        let mut c = redis.con().await;
        let mut left = 0;
        for k in ["events:critical", "events:fast", "events:default", "events:slow"] {
            left += pending(&mut c, k, "workers").await + xlen(&mut c, k).await;
        }
        left == 0
    })
    .await;
    assert!(dups < n / 10, "duplicates are only what was in flight: {dups}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_load_is_survived() {
    let mut redis = RedisServer::start();
    let sink = Sink::start_with(false).await;
    sink.respond(|_, _| Reply::ok().after(Duration::from_millis(2)));
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast")]);
    w.wait_ready().await;
    let n = 3000;
    {
        let mut con = redis.con().await;
        produce(&mut con, "events:fast", &events("r", n)).await;
    }
    wait_until("progress", T, || async { sink.posts("/e").len() >= 300 }).await;
    redis.stop();
    wait_until("readiness reports redis down", T, || async { w.get("/readyz").await.0 == 503 }).await;
    redis.restart();
    wait_until("every id delivered after the restart", T, || async { id_counts(&sink.posts("/e")).len() == n }).await;
    let dups = check_all_delivered(&sink, "r", n);
    println!("redis restarted mid-load: 0 lost, {dups} duplicates");
    wait_until("ready again", T, || async { w.get("/readyz").await.0 == 200 }).await;
    let mut con = redis.con().await;
    wait_until("drained", T, || async { pending(&mut con.clone(), "events:fast", "workers").await == 0 }).await;
    assert_eq!(xlen(&mut con, "events:fast").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_group_or_stream_is_recreated() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast")]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    produce(&mut con, "events:fast", &events("a", 10)).await;
    wait_until("first batch", T, || async { sink.posts("/e").len() == 10 }).await;

    let _: i64 =
        redis::cmd("XGROUP").arg("DESTROY").arg("events:fast").arg("workers").query_async(&mut con).await.unwrap();
    produce(&mut con, "events:fast", &events("b", 10)).await;
    wait_until("delivered after the group was destroyed", T, || async { id_counts(&sink.posts("/e")).len() == 20 })
        .await;

    let _: i64 = redis::cmd("DEL").arg("events:fast").query_async(&mut con).await.unwrap();
    wait_until("group recreated with the stream", T, || async {
        let mut c = redis.con().await;
        let groups: redis::RedisResult<redis::Value> =
            redis::cmd("XINFO").arg("GROUPS").arg("events:fast").query_async(&mut c).await;
        groups.is_ok()
    })
    .await;
    produce(&mut con, "events:fast", &events("c", 10)).await;
    wait_until("delivered after the stream was deleted", T, || async { id_counts(&sink.posts("/e")).len() == 30 })
        .await;
    check_all_delivered(&sink, "c", 10);
    assert_eq!(w.get("/readyz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_and_leaves_the_rest_pending() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink.respond(|_, _| Reply::ok().after(Duration::from_millis(1500)));
    let mut w =
        Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast"), ("MAX_IN_FLIGHT", "4"), ("ORDERING", "none")]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    produce(&mut con, "events:fast", &events("s", 20)).await;
    wait_until("four in flight", T, || async { sink.posts("/e").len() == 4 }).await;
    w.sigterm();
    let status = w.wait_exit(Duration::from_secs(20)).await.expect("exits within the grace period");
    assert!(status.success(), "clean exit: {status:?}");
    // The four in flight finished and were acknowledged; nothing else was started.
    assert_eq!(sink.posts("/e").len(), 4);
    let left = xlen(&mut con, "events:fast").await;
    assert_eq!(left, 16, "delivered ones acknowledged and deleted, the rest untouched");
    // The group survives the exit, and the next worker picks up the rest.
    sink.respond(|_, _| Reply::ok());
    let _w2 = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast")]);
    wait_until("rest delivered by the next worker", T, || async { id_counts(&sink.posts("/e")).len() == 20 }).await;
    assert_eq!(check_all_delivered(&sink, "s", 20), 0, "a graceful stop causes no duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_expiry_leaves_in_flight_events_pending() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink.respond(|_, seen| if seen < 2 { Reply::ok().after(Duration::from_secs(30)) } else { Reply::ok() });
    let mut w = Worker::start(
        &redis,
        &sink.url("/e"),
        &[("STREAMS", "fast"), ("SHUTDOWN_GRACE", "1"), ("ORDERING", "none"), ("MAX_IN_FLIGHT", "2")],
    );
    w.wait_ready().await;
    let mut con = redis.con().await;
    produce(&mut con, "events:fast", &events("g", 2)).await;
    wait_until("both in flight", T, || async { sink.posts("/e").len() == 2 }).await;
    w.sigterm();
    let status = w.wait_exit(Duration::from_secs(10)).await.expect("exits once the grace period is over");
    assert!(status.success());
    assert_eq!(pending(&mut con, "events:fast", "workers").await, 2, "abandoned events stay pending");
    // Same consumer name on restart: its own pending list is re-read.
    let w2 = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast")]);
    w2.wait_ready().await;
    wait_until("redelivered from the pending list", T, || async { sink.posts("/e").len() == 4 }).await;
    check_all_delivered(&sink, "g", 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_consumers_entries_are_taken_over() {
    // Unordered streams take idle entries over after CLAIM_IDLE; an ordered stream's new
    // lease holder takes over everything left pending at once, before reading new entries.
    for (ordering, source) in [("none", "autoclaim"), ("key", "lease_takeover")] {
        let redis = RedisServer::start();
        let sink = Sink::start().await;
        let mut con = redis.con().await;
        create_group(&mut con, "events:fast", "workers").await;
        produce(&mut con, "events:fast", &events("d", 5)).await;
        // A consumer on another pod reads them and dies.
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("workers")
            .arg("worker-fast-dead-pod")
            .arg("COUNT")
            .arg(5)
            .arg("STREAMS")
            .arg("events:fast")
            .arg(">")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(pending(&mut con, "events:fast", "workers").await, 5);
        let w =
            Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast"), ("CLAIM_IDLE", "1"), ("ORDERING", ordering)]);
        wait_until("taken over and delivered", T, || async { id_counts(&sink.posts("/e")).len() == 5 }).await;
        wait_until("acknowledged", T, || async { pending(&mut con.clone(), "events:fast", "workers").await == 0 })
            .await;
        let series = format!("events_claimed_total{{source=\"{source}\",stream=\"events:fast\"}}");
        assert_eq!(w.metric(&series).await, 5.0, "{ordering}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_stops_start_up_naming_the_setting() {
    let cases: &[(&str, &str)] = &[
        ("MAX_ATTEMPTS", "abc"),
        ("MAX_ATTEMPTS", "0"),
        ("ORDERING", "random"),
        ("READ_TIMEOUT", "-3"),
        ("REDIS_URL", "http://localhost"),
        ("REDIS_HOST_PORT", "no-port"),
        ("STREAMS", ","),
        ("DLQ_URI", "::"),
        ("METRICS_PORT", "99999"),
        ("DEFAULT_WORKER_URI", "localhost:8000"),
    ];
    for (var, value) in cases {
        let out = std::process::Command::new(worker_bin()).env_clear().env(var, value).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} was accepted");
        assert!(stderr.contains(var), "{var}={value}: message does not name it: {stderr}");
        assert!(stderr.trim().lines().filter(|l| !l.is_empty()).count() <= 3, "one clear message: {stderr}");
    }
    let help = std::process::Command::new(worker_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for var in [
        "REDIS_HOST",
        "REDIS_PORT",
        "REDIS_HOST_PORT",
        "REDIS_PASSWORD",
        "REDIS_URL",
        "GROUP",
        "CONSUMER_PREFIX",
        "STREAMS",
        "DEFAULT_WORKER_URI",
        "METRICS_PORT",
        "CONNECT_TIMEOUT",
        "READ_TIMEOUT",
        "DLQ_URI",
        "DLQ_DB_CONNECTION",
        "DLQ_DB_TABLE",
        "EVENT_DB_TABLE",
        "MAX_ATTEMPTS",
        "ORDERING",
        "CLAIM_IDLE",
    ] {
        assert!(help.contains(&format!("[env: {var}")), "--help lacks {var}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_is_reported() {
    let redis = RedisServer::start();
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = std::process::Command::new(worker_bin())
        .env_clear()
        .env("REDIS_URL", redis.url())
        .env("METRICS_PORT", &port)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("METRICS_PORT"));
}
