//! Redis Cluster, on a real one (three masters, one replica each): the connection
//! (commands routed by slot, scripts run where their key lives, a master killed under it),
//! and the worker run as users run it: deliveries, retries, ordering, dead letters and
//! replays with every key in its stream's slot, the original's global schedule, and a
//! worker killed, a master killed and slots moved under load.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{cli, RedisCluster};
use common::*;
use eventworker::streams::{self, Conn, Scripts};
use serde_json::json;

const T: Duration = Duration::from_secs(90);

const STREAMS: [&str; 4] = ["events:critical", "events:fast", "events:default", "events:slow"];

async fn xadd(con: &mut Conn, key: &str, id: &str) -> redis::RedisResult<String> {
    redis::cmd("XADD")
        .arg(key)
        .arg("*")
        .arg("meta")
        .arg(format!(r#"{{"id":"{id}"}}"#))
        .arg("payload")
        .arg("x")
        .query_async(con)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_follows_slots_and_a_failover() {
    let mut cluster = RedisCluster::start();
    assert!(matches!(streams::connect_lazy(&cluster.url(), Duration::from_secs(5)).unwrap(), Conn::Cluster(_)));
    let mut con = streams::connect(&cluster.url(), Duration::from_secs(5)).await.expect("cluster connection");
    let masters: std::collections::BTreeSet<u16> = STREAMS.iter().map(|s| cluster.master_of(s)).collect();
    assert!(masters.len() >= 2, "the four streams live on more than one master: {masters:?}");

    for key in STREAMS {
        streams::ensure_group(&mut con, key, "workers").await.unwrap();
        xadd(&mut con, key, key).await.unwrap();
        let got = streams::read_group(&mut con, key, "workers", "c1", ">", 10, None).await.unwrap();
        assert_eq!(got.len(), 1, "{key}");
        streams::ack(&mut con, key, "workers", &[got[0].id.clone()], true, &[], None).await.unwrap();
        // A script runs on the node of its key.
        let scripts = Scripts::default();
        assert!(scripts.lease(&mut con, &format!("{{{key}}}:lease"), "me", Duration::from_secs(5)).await.unwrap());
        assert!(!scripts.lease(&mut con, &format!("{{{key}}}:lease"), "other", Duration::from_secs(5)).await.unwrap());
    }

    // kill -9 the master of events:fast: its replica is promoted and the same connection
    // carries on there.
    let old = cluster.master_of("events:fast");
    // Replication is asynchronous: what the master had not passed on yet would go with it
    // (the worker's own guard against that is the next part of cluster mode).
    cluster.wait_replicated(old);
    cluster.kill(old);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match xadd(&mut con, "events:fast", "after-failover").await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "no write after the failover within 60 s: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_ne!(cluster.master_of("events:fast"), old, "a replica took over");
    let got = streams::read_group(&mut con, "events:fast", "workers", "c1", ">", 10, None).await.unwrap();
    assert_eq!(got.len(), 1, "the group survived the failover (replicated)");
}

/// Every key of a cluster (from each master), with the master's port.
fn all_keys(cluster: &RedisCluster) -> Vec<String> {
    let mut keys = Vec::new();
    for n in &cluster.nodes {
        let Some(role) = cli(n.port, &["ROLE"]) else { continue };
        if role.starts_with("master") {
            keys.extend(cli(n.port, &["--scan"]).unwrap_or_default().lines().map(str::to_string));
        }
    }
    keys.sort();
    keys
}

fn slot(cluster: &RedisCluster, key: &str) -> u16 {
    cli(cluster.live(), &["CLUSTER", "KEYSLOT", key]).unwrap().trim().parse().unwrap()
}

/// Per event id: how many requests, and whether one was answered 2xx.
type Tries = Arc<Mutex<HashMap<String, usize>>>;

fn count_try(tries: &Tries, r: &Received) -> usize {
    let id = r.header("x-event-id").unwrap_or_default().to_string();
    let mut t = tries.lock().unwrap();
    let n = t.entry(id).or_insert(0);
    *n += 1;
    *n
}

fn ok_ids(sink: &Sink, prefix: &str) -> HashSet<String> {
    sink.posts(prefix)
        .into_iter()
        .filter(|r| (200..300).contains(&r.status))
        .filter_map(|r| r.header("x-event-id").map(str::to_string))
        .collect()
}

/// The scenarios of one Redis, on a cluster: deliveries on four streams spread over the
/// masters, scheduled retries (X-Retry-After), retries after a host failure (502: paused,
/// probed, deferred), an ordering key held
/// behind its retry, dead letters that the sink refuses (kept in `events:dlq`) and their
/// replay. Every key the worker wrote lives in the slot of the stream it belongs to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_retries_and_dead_letters_keep_to_their_streams_slots() {
    let cluster = RedisCluster::start();
    let mut con = streams::connect(&cluster.url(), Duration::from_secs(5)).await.unwrap();
    let sink = Sink::start().await;
    let tries: Tries = Arc::default();
    let t = tries.clone();
    sink.respond(move |r, _| {
        if r.path.starts_with("/dlq") {
            return Reply::status(400); // refused for good: kept in events:dlq
        }
        let Some(id) = r.header("x-event-id") else { return Reply::ok() };
        let n = count_try(&t, r);
        match id.split('-').next() {
            Some("r") if n == 1 => Reply::status(400).header("x-retry-after", "1"),
            Some("b") if n <= 2 => Reply::status(502),
            Some("k0") if n == 1 => Reply::status(429).header("retry-after", "1"),
            Some("d") => Reply::status(422),
            _ => Reply::ok(),
        }
    });
    let url = cluster.url();
    let env = [
        ("STREAMS", "critical,fast,default,slow"),
        ("DLQ_URI", &sink.url("/dlq")),
        ("MAX_ATTEMPTS", "3"),
        ("BACKOFF_BASE", "0.2"),
        ("BACKOFF_MAX", "0.5"),
    ];
    let mut w = Worker::start_at(&url, &sink.url("/e"), &env);
    w.wait_ready().await;

    let mut expected = HashSet::new();
    for (i, key) in STREAMS.iter().enumerate() {
        let mut evs = Vec::new();
        for n in 0..50 {
            evs.push((meta(format!("ok-{i}-{n}"), "t"), b"x".to_vec()));
        }
        for n in 0..5 {
            evs.push((meta(format!("r-{i}-{n}"), "t"), b"x".to_vec()));
            evs.push((meta(format!("b-{i}-{n}"), "t"), b"x".to_vec()));
        }
        // One ordering key: its first event asks for a retry, the others wait behind it.
        for n in 0..5 {
            let mut m = meta(format!("k{}-{i}-{n}", n.min(1)), "t");
            m["orderingKey"] = json!(format!("customer-{i}"));
            evs.push((m, format!("{n}").into_bytes()));
        }
        evs.push((meta(format!("d-{i}"), "t"), b"dead".to_vec()));
        expected.extend(
            evs.iter()
                .filter(|(m, _)| !m["id"].as_str().unwrap().starts_with("d-"))
                .map(|(m, _)| m["id"].as_str().unwrap().to_string()),
        );
        produce(&mut con, key, &evs).await;
    }
    wait_until("every event but the dead letters delivered", T, || async { ok_ids(&sink, "/e") == expected }).await;
    wait_until("four dead letters in events:dlq", T, || async { xlen(&mut con.clone(), "events:dlq").await == 4 })
        .await;

    // The held key's events arrived in order, after its first event's retry.
    for i in 0..STREAMS.len() {
        let of_key = |id: &str| {
            let parts: Vec<&str> = id.split('-').collect();
            parts[0].starts_with('k') && parts[1] == i.to_string()
        };
        let order: Vec<String> = sink
            .posts("/e")
            .into_iter()
            .filter(|r| r.status == 200 && r.header("x-event-id").is_some_and(of_key))
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .collect();
        assert_eq!(order, ["0", "1", "2", "3", "4"], "stream {i}: the ordering key's events in order");
    }

    // The worker's keys: each in the slot of its stream, none of the single-Redis layout's.
    let keys = all_keys(&cluster);
    let stream_slots: HashMap<u16, &str> = STREAMS.iter().map(|s| (slot(&cluster, s), *s)).collect();
    assert!(keys.iter().any(|k| k.ends_with(":retry")), "per-stream schedules were used: {keys:?}");
    for k in &keys {
        if k == "events:dlq" || STREAMS.contains(&k.as_str()) {
            continue;
        }
        let s = slot(&cluster, k);
        assert!(stream_slots.contains_key(&s), "{k} lives in slot {s}, not in a stream's: {keys:?}");
        let owner = stream_slots[&s];
        assert!(k.contains(&format!("{{{owner}}}")), "{k} carries its stream's hash tag");
    }
    assert!(!keys.contains(&"events:retry".to_string()) && !keys.contains(&"events:retry:delays".to_string()));

    // Nothing left behind: no pending entries, no scheduled retries.
    for key in STREAMS {
        assert_eq!(pending(&mut con, key, "workers").await, 0, "{key}");
    }
    assert!(!keys.iter().any(|k| k.ends_with(":retry:delays")), "no retry waits: {keys:?}");
    wait_until("the gauge sees no scheduled retry", T, || async { w.metric_sum("scheduled_retries").await == 0.0 })
        .await;

    // The dead letters go back where they came from (the dead-letter stream and the streams
    // are in different slots) once the receiver takes them.
    sink.respond(|r, _| if r.path.starts_with("/dlq") { Reply::status(400) } else { Reply::ok() });
    let (ok, out, err) = run_cli(
        &[("REDIS_URL", &url), ("STREAMS", "critical,fast,default,slow")],
        &["dlq", "replay", "--ids", "d-0,d-1,d-2,d-3"],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("d-1 -> events:fast"), "{out}");
    let dead: HashSet<String> = (0..4).map(|i| format!("d-{i}")).collect();
    wait_until("the replayed letters delivered", T, || async { ok_ids(&sink, "/e").is_superset(&dead) }).await;
    assert_eq!(xlen(&mut con, "events:dlq").await, 0);
    w.sigterm();
    assert!(w.wait_exit(T).await.is_some_and(|s| s.success()));
}

/// Retries the original worker scheduled in its global keys (`events:retry`,
/// `events:retry:delays`) are still put back into their streams in a cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_the_original_scheduled_are_picked_up() {
    let cluster = RedisCluster::start();
    let mut con = streams::connect(&cluster.url(), Duration::from_secs(5)).await.unwrap();
    let sink = Sink::start().await;
    for (i, target) in ["fast", "events:default"].iter().enumerate() {
        let m = meta(format!("old-{i}"), "t").to_string();
        let rid: String = redis::cmd("XADD")
            .arg("events:retry")
            .arg("*")
            .arg("meta")
            .arg(&m)
            .arg("stream")
            .arg(target)
            .arg("payload")
            .arg("p")
            .query_async(&mut con)
            .await
            .unwrap();
        let _: i64 = redis::cmd("ZADD")
            .arg("events:retry:delays")
            .arg(unix_now())
            .arg(&rid)
            .query_async(&mut con)
            .await
            .unwrap();
    }
    let w = Worker::start_at(&cluster.url(), &sink.url("/e"), &[("STREAMS", "fast,default")]);
    w.wait_ready().await;
    let want: HashSet<String> = ["old-0".to_string(), "old-1".to_string()].into();
    wait_until("the original's retries delivered", T, || async { ok_ids(&sink, "/e") == want }).await;
    wait_until("and taken out of its schedule", T, || async {
        let n: i64 = redis::cmd("ZCARD").arg("events:retry:delays").query_async(&mut con.clone()).await.unwrap();
        n == 0 && xlen(&mut con.clone(), "events:retry").await == 0
    })
    .await;
}

/// The worker under load while it is killed (kill -9) and restarted, while the master of
/// one stream is killed (its replica takes over), and while every slot of another master
/// moves to a third (`redis-cli --cluster reshard`): every event is delivered, none lost.
/// The producer waits for a replica after its writes (WAIT), as producers must for their
/// events to survive a master's death; the worker's own writes need not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_a_master_failover_and_resharding_under_load_lose_nothing() {
    const N: usize = 5_000;
    let mut cluster = RedisCluster::start();
    let url = cluster.url();
    let sink = Sink::start().await;
    let tries: Tries = Arc::default();
    let t = tries.clone();
    // Some events ask for a retry once: scheduled retries are in flight through it all.
    sink.respond(move |r, _| {
        let Some(id) = r.header("x-event-id").and_then(|i| i.parse::<usize>().ok()) else { return Reply::ok() };
        let n = count_try(&t, r);
        if id % 10 == 0 && n == 1 {
            Reply::status(400).header("x-retry-after", "1")
        } else {
            Reply::ok().after(Duration::from_millis(20))
        }
    });
    let env = [
        ("STREAMS", "critical,fast,default,slow"),
        ("CLAIM_IDLE", "2"),
        ("SHUTDOWN_GRACE", "2"),
        ("HOST_MAX_CONCURRENCY", "4"),
        ("HOST_CONCURRENCY", "fixed"),
    ];
    let mut w = Worker::start_at(&url, &sink.url("/e"), &env);
    w.wait_ready().await;

    let producer = {
        let url = url.clone();
        tokio::spawn(async move {
            let mut con = streams::connect(&url, Duration::from_secs(5)).await.unwrap();
            let mut next = 0;
            while next < N {
                let batch: Vec<usize> = (next..(next + 20).min(N)).collect();
                // Written, and on a replica of every master (WAIT goes to all), or written
                // again (a duplicate at worst).
                loop {
                    let mut ok = true;
                    for i in &batch {
                        let key = STREAMS[i % STREAMS.len()];
                        ok &= produce_one(&mut con, key, *i).await.is_ok();
                    }
                    let replicas: redis::RedisResult<i64> =
                        redis::cmd("WAIT").arg(1).arg(2000).query_async(&mut con).await;
                    if ok && replicas.is_ok_and(|n| n >= 1) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                next += batch.len();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let delivered = |sink: &Sink| ok_ids(sink, "/e").len();

    // The receiver takes 4 at a time, 20 ms each (about 200 events/s): a backlog waits in
    // Redis through everything below.
    wait_until("1,000 delivered", T, || async { delivered(&sink) >= 1_000 }).await;
    w.kill9();
    let mut w = Worker::start_at(&url, &sink.url("/e"), &env);
    println!("worker killed (kill -9) and restarted after {} deliveries", delivered(&sink));

    wait_until("2,000 delivered", T, || async { delivered(&sink) >= 2_000 }).await;
    let old = cluster.master_of("events:fast");
    cluster.kill(old);
    println!("master {old} of events:fast killed (kill -9) after {} deliveries", delivered(&sink));
    // Its replica takes over; the old master comes back, as a replica of the new one (until
    // then the new master has no replica, and the producer's WAIT holds it back).
    cluster.wait_failover(old);
    cluster.restart(old);
    println!("a replica took over, the old master is back as its replica after {} deliveries", delivered(&sink));

    wait_until("3,000 delivered", T, || async { delivered(&sink) >= 3_000 }).await;
    // Every slot of another master (events:critical's, or events:slow's if that one is the
    // same as the failed one) moves while events flow.
    let from = [cluster.master_of("events:critical"), cluster.master_of("events:slow")]
        .into_iter()
        .find(|p| *p != old)
        .unwrap();
    let to = cluster.masters().into_iter().find(|p| *p != from).unwrap();
    let before = delivered(&sink);
    let cluster = Arc::new(cluster);
    let moved = {
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.reshard_all(from, to)).await.unwrap()
    };
    println!("{moved} slots moved from {from} to {to} while {} events were delivered", delivered(&sink) - before);
    assert!(delivered(&sink) > before, "deliveries went on during the reshard");
    assert_ne!(cluster.master_of("events:critical"), from);

    producer.await.unwrap();
    let want: HashSet<String> = (0..N).map(|i| i.to_string()).collect();
    wait_until("every event delivered", Duration::from_secs(240), || async { ok_ids(&sink, "/e") == want }).await;
    let counts = id_counts(&sink.posts("/e").into_iter().filter(|r| r.status == 200).collect::<Vec<_>>());
    let twice = counts.values().filter(|n| **n > 1).count();
    println!("{N} events, 0 lost, {twice} delivered more than once (at least once through the kills)");
    w.sigterm();
    assert!(w.wait_exit(T).await.is_some(), "the worker stops");
}

async fn produce_one(con: &mut Conn, key: &str, i: usize) -> redis::RedisResult<String> {
    redis::cmd("XADD")
        .arg(key)
        .arg("*")
        .arg("meta")
        .arg(meta(i, "load").to_string())
        .arg("payload")
        .arg("x")
        .query_async(con)
        .await
}

/// The original's outbox table with a cluster: the deletes of delivered rows are recorded
/// per stream (in each stream's slot, with the acknowledgement) and all applied; a dead
/// letter is marked, not deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_clean_ups_are_recorded_per_stream_and_applied() {
    let cluster = RedisCluster::start();
    let mut con = streams::connect(&cluster.url(), Duration::from_secs(5)).await.unwrap();
    let db = common::db::Database::sqlite();
    db.exec(
        "CREATE TABLE events (id int PRIMARY KEY, type VARCHAR(255) NOT NULL, stream VARCHAR(255) NOT NULL, \
         dlq BOOLEAN NOT NULL DEFAULT FALSE, created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, payload TEXT)",
    )
    .await;
    let sink = Sink::start().await;
    sink.respond(|r, _| if r.header("x-event-id") == Some("7") { Reply::status(404) } else { Reply::ok() });
    let streams = ["critical", "fast", "default", "slow"];
    let rows: Vec<String> =
        (1..=200).map(|i| format!("({i}, 't', 'events:{}', '{{}}')", streams[i % streams.len()])).collect();
    db.exec(&format!("INSERT INTO events (id, type, stream, payload) VALUES {}", rows.join(", "))).await;
    for (n, s) in streams.iter().enumerate() {
        let evs: Vec<_> =
            (1..=200usize).filter(|i| i % streams.len() == n).map(|i| (meta(i, "t"), b"{}".to_vec())).collect();
        produce(&mut con, &format!("events:{s}"), &evs).await;
    }
    let url = db.sqlalchemy_url();
    let env =
        [("STREAMS", "critical,fast,default,slow"), ("DLQ_DB_CONNECTION", url.as_str()), ("DLQ_DB_TABLE", "events")];
    let w = Worker::start_at(&cluster.url(), &sink.url("/e"), &env);
    w.wait_ready().await;
    wait_until("199 delivered", T, || async { ok_ids(&sink, "/e").len() == 199 }).await;
    wait_until("their rows deleted, the dead letter's kept", T, || async {
        db.column("SELECT id FROM events").await == ["7"]
    })
    .await;
    assert_eq!(db.column("SELECT id FROM events WHERE dlq = TRUE").await, ["7"]);
    wait_until("nothing waits", T, || async { w.metric("outbox_cleanups_pending").await == 0.0 }).await;
    assert!(w.metric("outbox_rows_deleted_total").await >= 199.0);
}

/// Two streams whose keys share one hash tag (`events:{orders}:eu`, `events:{orders}:us`)
/// live in one slot and still keep their own schedule, lease and held keys: both ordered
/// streams are delivered, in order, and each retry comes back to its own stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_sharing_a_hash_tag_keep_their_own_keys() {
    let cluster = RedisCluster::start();
    let mut con = streams::connect(&cluster.url(), Duration::from_secs(5)).await.unwrap();
    let sink = Sink::start().await;
    let tries: Tries = Arc::default();
    let t = tries.clone();
    sink.respond(move |r, _| {
        let Some(id) = r.header("x-event-id") else { return Reply::ok() };
        if id.ends_with("-0") && count_try(&t, r) == 1 {
            Reply::status(400).header("x-retry-after", "1")
        } else {
            Reply::ok()
        }
    });
    let env = [("STREAMS", "{orders}:eu,{orders}:us"), ("ORDERING", "stream")];
    let w = Worker::start_at(&cluster.url(), &sink.url("/e"), &env);
    w.wait_ready().await;
    for region in ["eu", "us"] {
        let evs: Vec<_> = (0..5).map(|n| (meta(format!("{region}-{n}"), "t"), format!("{n}").into_bytes())).collect();
        produce(&mut con, &format!("events:{{orders}}:{region}"), &evs).await;
    }
    wait_until("both streams delivered", T, || async { ok_ids(&sink, "/e").len() == 10 }).await;
    for region in ["eu", "us"] {
        let got: Vec<(String, String)> = sink
            .posts("/e")
            .into_iter()
            .filter(|r| r.status == 200 && r.header("x-event-id").is_some_and(|id| id.starts_with(region)))
            .map(|r| {
                (r.header("x-event-queue").unwrap_or_default().to_string(), String::from_utf8_lossy(&r.body).into())
            })
            .collect();
        let queue = format!("events:{{orders}}:{region}");
        let want: Vec<(String, String)> = (0..5).map(|n| (queue.clone(), n.to_string())).collect();
        assert_eq!(got, want, "{region}: in order, each from its own stream");
    }
    let keys = all_keys(&cluster);
    for k in keys.iter().filter(|k| k.contains("{orders}")) {
        assert_eq!(slot(&cluster, k), slot(&cluster, "events:{orders}:eu"), "{k}");
    }
    assert!(keys.iter().any(|k| k.starts_with("eventworker:lease:workers:events:{orders}:eu")));
    assert!(keys.iter().any(|k| k.starts_with("eventworker:lease:workers:events:{orders}:us")));
}
