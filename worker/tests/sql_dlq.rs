//! The SQL dead-letter store against real SQLite, PostgreSQL and MariaDB, and redrive.

mod common;

use std::time::Duration;

use common::db::Database;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(60);

/// Events whose type is `bad` are answered 404, everything else 200.
fn sink_rejecting_bad(sink: &Sink) {
    sink.respond(|r, _| if r.header("x-event-type") == Some("bad") { Reply::status(404) } else { Reply::ok() });
}

async fn dead_letters_stored_upserted_and_sources_removed(db: Database) {
    db.exec("CREATE TABLE events (event_id VARCHAR(64) PRIMARY KEY, body TEXT); INSERT INTO events VALUES ('e1', 'x'); INSERT INTO events VALUES ('e2', 'x'); INSERT INTO events VALUES ('e3', 'x')").await;
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink_rejecting_bad(&sink);
    let url = db.sqlalchemy_url();
    let w = Worker::start(
        &redis,
        &sink.url("/e"),
        &[("STREAMS", "fast"), ("DLQ_DB_CONNECTION", &url), ("EVENT_DB_TABLE", "events")],
    );
    w.wait_ready().await;
    let mut con = redis.con().await;
    produce(
        &mut con,
        "events:fast",
        &[
            (json!({"id": "e1", "type": "bad", "url": sink.url("/e")}), b"p1".to_vec()),
            (json!({"id": "e2", "type": "bad"}), vec![0xff, 0xfe]),
            (json!({"id": "e3", "type": "good"}), b"p3".to_vec()),
        ],
    )
    .await;
    wait_until("two dead-letter rows", T, || async { db.column("SELECT id FROM dlq").await.len() == 2 }).await;
    assert_eq!(db.column("SELECT reason FROM dlq ORDER BY id").await, ["http_404", "http_404"]);
    assert_eq!(db.column("SELECT type FROM dlq ORDER BY id").await, ["bad", "bad"]);
    assert_eq!(db.column("SELECT payload FROM dlq ORDER BY id").await, ["p1", "base64://4="]);
    assert_eq!(db.column("SELECT stream FROM dlq ORDER BY id").await, ["events:fast", "events:fast"]);
    let meta: serde_json::Value =
        serde_json::from_str(&db.column("SELECT meta FROM dlq WHERE id = 'e1'").await[0]).unwrap();
    assert_eq!(meta["url"], sink.url("/e"), "original meta kept for replays");
    assert_eq!(db.column("SELECT event_id FROM events").await, ["e3"], "source rows of dead letters removed");
    wait_until("acknowledged", T, || async { pending(&mut redis.con().await, "events:fast", "workers").await == 0 })
        .await;

    // The same id dead-lettered again updates its row.
    produce(&mut con, "events:fast", &[(json!({"id": "e1", "type": "bad"}), b"p1-again".to_vec())]).await;
    wait_until("row updated", T, || async {
        db.column("SELECT payload FROM dlq WHERE id = 'e1'").await == ["p1-again"]
    })
    .await;
    assert_eq!(db.column("SELECT dead_lettered FROM dlq WHERE id = 'e1'").await, ["2"]);
    assert_eq!(db.column("SELECT id FROM dlq").await.len(), 2);
    assert_eq!(w.metric("events_dead_lettered_total{reason=\"http_404\",stream=\"events:fast\"}").await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store() {
    dead_letters_stored_upserted_and_sources_removed(Database::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store() {
    dead_letters_stored_upserted_and_sources_removed(Database::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_store() {
    dead_letters_stored_upserted_and_sources_removed(Database::mariadb()).await;
}

async fn database_outage_loses_nothing(mut db: Database) {
    let redis = RedisServer::start();
    let sink = Sink::start_with(false).await;
    sink_rejecting_bad(&sink);
    let url = db.url();
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast,slow"), ("DLQ_DB_CONNECTION", &url)]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    produce(&mut con, "events:fast", &(0..20).map(|i| (meta(format!("a{i}"), "bad"), vec![])).collect::<Vec<_>>())
        .await;
    wait_until("first rows stored", T, || async { db.column("SELECT id FROM dlq").await.len() == 20 }).await;

    db.stop();
    let n = 100;
    let evs: Vec<_> =
        (0..n).map(|i| (meta(format!("b{i}"), if i % 2 == 0 { "bad" } else { "good" }), vec![])).collect();
    produce(&mut con, "events:slow", &evs).await;
    wait_until("sink errors counted", T, || async { w.metric("dlq_sink_errors_total{sink=\"sql\"}").await >= 1.0 })
        .await;
    let (code, body) = w.get("/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("dead-letter sink failing"), "{body}");
    wait_until("good ones delivered meanwhile", T, || async { sink.delivered_ids("/e").len() == n / 2 }).await;
    assert_eq!(
        pending(&mut con, "events:slow", "workers").await,
        (n / 2) as i64,
        "dead letters held, not acknowledged"
    );

    db.start();
    wait_until("held dead letters stored", T, || async { db.column("SELECT id FROM dlq").await.len() == 20 + n / 2 })
        .await;
    wait_until("all acknowledged", T, || async {
        pending(&mut redis.con().await, "events:slow", "workers").await == 0
    })
    .await;
    let stored = db.column("SELECT id FROM dlq").await;
    for i in (0..n).step_by(2) {
        assert!(stored.contains(&format!("b{i}")), "b{i} lost");
    }
    wait_until("ready again", T, || async { w.get("/readyz").await.0 == 200 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage() {
    database_outage_loses_nothing(Database::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_outage() {
    database_outage_loses_nothing(Database::mariadb()).await;
}

/// How many entries were ever added to a stream (XINFO STREAM's entries-added), so that
/// "nothing was added" needs no waiting.
async fn entries_added(redis: &RedisServer, key: &str) -> i64 {
    let mut con = redis.con().await;
    let info: Vec<redis::Value> = redis::cmd("XINFO").arg("STREAM").arg(key).query_async(&mut con).await.unwrap();
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    };
    info.chunks(2)
        .find(|kv| text(&kv[0]) == "entries-added")
        .and_then(|kv| if let redis::Value::Int(n) = kv[1] { Some(n) } else { None })
        .expect("entries-added (Redis 7)")
}

/// `eventworker dlq <args>` with the environment a user would give it.
fn dlq_cmd(redis_url: &str, db_url: &str, args: &[&str]) -> (bool, String, String) {
    let args: Vec<&str> = std::iter::once("dlq").chain(args.iter().copied()).collect();
    run_cli(&[("REDIS_URL", redis_url), ("DLQ_DB_CONNECTION", db_url)], &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_moves_a_filtered_set_back_exactly_once() {
    let db = Database::postgres();
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink.respond(|_, _| Reply::status(500));
    let url = db.url();
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast,default"), ("DLQ_DB_CONNECTION", &url)]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    let evs: Vec<_> =
        (1..=10).map(|i| (meta(i, if i <= 6 { "a" } else { "b" }), format!("body{i}").into_bytes())).collect();
    produce(&mut con, "events:fast", &evs).await;
    wait_until("ten dead letters", T, || async { db.column("SELECT id FROM dlq").await.len() == 10 }).await;
    assert_eq!(sink.posts("/e").len(), 10);
    sink.respond(|_, _| Reply::ok());

    // Dry run: says what it would do, changes nothing.
    let (ok, out, err) =
        dlq_cmd(&redis.url(), &db.sqlalchemy_url(), &["replay", "--type", "a", "--gt", "2", "--dry-run"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().filter(|l| l.starts_with("would replay")).count(), 4, "{out}");
    assert!(err.contains("would replay 4 of 4"), "{err}");
    assert_eq!(db.column("SELECT id FROM dlq").await.len(), 10);
    assert_eq!(entries_added(&redis, "events:fast").await, 10, "a dry run puts nothing back into a stream");
    assert_eq!(sink.posts("/e").len(), 10);

    // List with the same filter.
    let (ok, out, _) = dlq_cmd(&redis.url(), &db.sqlalchemy_url(), &["list", "--type", "a", "--gt", "2", "--json"]);
    assert!(ok);
    let ids: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["3", "4", "5", "6"]);

    // Two replays at once: each row goes back once.
    let (r, d) = (redis.url(), db.sqlalchemy_url());
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (r, d) = (r.clone(), d.clone());
            std::thread::spawn(move || dlq_cmd(&r, &d, &["replay", "--type", "a", "--gt", "2"]))
        })
        .collect();
    let outs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let replayed: usize = outs.iter().map(|o| o.1.lines().filter(|l| l.starts_with("replayed")).count()).sum();
    assert_eq!(replayed, 4, "{outs:?}");
    wait_until("replayed events delivered", T, || async { sink.delivered_ids("/e").len() == 4 }).await;
    let again: Vec<_> = sink.posts("/e").into_iter().skip(10).collect();
    let counts = id_counts(&again);
    assert_eq!(counts.len(), 4);
    assert!(counts.values().all(|c| *c == 1), "each replayed exactly once more: {counts:?}");
    let replayed_body = again.iter().find(|r| r.header("x-event-id") == Some("3")).unwrap();
    assert_eq!(&replayed_body.body[..], b"body3");
    assert_eq!(replayed_body.header("x-event-attempt"), Some("1"), "a replay starts with fresh attempts");
    let mut left = db.column("SELECT id FROM dlq").await;
    left.sort_by_key(|s| s.parse::<u32>().unwrap());
    assert_eq!(left, ["1", "2", "7", "8", "9", "10"]);
    let (_, _, err) = dlq_cmd(&redis.url(), &db.sqlalchemy_url(), &["replay", "--type", "a", "--gt", "2"]);
    assert!(err.contains("replayed 0 of 0"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_need_the_token_and_keep_the_original_alias() {
    let db = Database::sqlite();
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink.respond(|_, _| Reply::status(422));
    let url = db.sqlalchemy_url();
    let w = Worker::start(
        &redis,
        &sink.url("/e"),
        &[("STREAMS", "fast"), ("DLQ_DB_CONNECTION", &url), ("ADMIN_TOKEN", "t0ken")],
    );
    w.wait_ready().await;
    let mut con = redis.con().await;
    produce(&mut con, "events:fast", &(1..=5).map(|i| (meta(i, "x"), vec![])).collect::<Vec<_>>()).await;
    wait_until("five dead letters", T, || async { db.column("SELECT id FROM dlq").await.len() == 5 }).await;
    sink.respond(|_, _| Reply::ok());

    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}", w.metrics_port);
    for (path, token) in [
        ("/dlq", None),
        ("/dlq", Some("wrong")),
        ("/reprocess-dlq?gt=1", None),
        ("/reprocess-dlq?gt=1&token=nope", None),
    ] {
        let mut req = client.get(format!("{base}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        assert_eq!(req.send().await.unwrap().status(), 401, "{path} {token:?}");
    }
    assert_eq!(client.post(format!("{base}/dlq/replay")).send().await.unwrap().status(), 401);
    assert_eq!(db.column("SELECT id FROM dlq").await.len(), 5, "refused requests change nothing");

    let list: serde_json::Value = client
        .get(format!("{base}/dlq?reason=http_422"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["count"], 5);
    let dry: serde_json::Value = client
        .get(format!("{base}/reprocess-dlq?gte=2&lte=4&neq=3&dry_run=true&token=t0ken"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        dry["replayed"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect::<Vec<_>>(),
        ["2", "4"]
    );
    assert_eq!(db.column("SELECT id FROM dlq").await.len(), 5);
    let done: serde_json::Value =
        client.get(format!("{base}/reprocess-dlq?in=2,4&token=t0ken")).send().await.unwrap().json().await.unwrap();
    assert_eq!(done["replayed"].as_array().unwrap().len(), 2, "{done}");
    wait_until("replayed via the API", T, || async { sink.delivered_ids("/e").len() == 2 }).await;
    let done: serde_json::Value = client
        .post(format!("{base}/dlq/replay?ids=5"))
        .header("x-admin-token", "t0ken")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(done["replayed"][0]["id"], "5");
    wait_until("replayed via POST", T, || async { sink.delivered_ids("/e").len() == 3 }).await;
    let mut left = db.column("SELECT id FROM dlq").await;
    left.sort();
    assert_eq!(left, ["1", "3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_names_are_validated_at_start_up() {
    let db = Database::sqlite();
    let redis = RedisServer::start();
    let url = db.sqlalchemy_url();
    for (var, value) in [
        ("DLQ_DB_TABLE", "dlq; DROP TABLE users"),
        ("DLQ_DB_TABLE", "dlq--"),
        ("EVENT_DB_TABLE", "events WHERE 1=1"),
        ("EVENT_DB_TABLE", "no_such_table"),
    ] {
        let out = std::process::Command::new(worker_bin())
            .env_clear()
            .env("REDIS_URL", redis.url())
            .env("METRICS_PORT", free_port().to_string())
            .env("DLQ_DB_CONNECTION", &url)
            .env(var, value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} accepted");
        assert!(err.contains(var), "{var}={value}: {err}");
    }
    let (ok, _, err) = {
        let out = std::process::Command::new(worker_bin()).env_clear().args(["dlq", "list"]).output().unwrap();
        (out.status.success(), (), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    assert!(!ok && err.contains("DLQ_DB_CONNECTION"), "{err}");
}
