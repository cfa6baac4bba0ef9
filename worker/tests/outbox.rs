//! The original's outbox table (DESIGN.md §2b) against real SQLite, PostgreSQL and
//! MariaDB: the application's `events` table as `DLQ_DB_TABLE`, delivered rows deleted,
//! dead letters marked, replays, a database outage, and the delivery audit.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::db::Database;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(90);

/// The table as the original's users have it.
const TABLE: &str =
    "CREATE TABLE events (id int PRIMARY KEY, type VARCHAR(255) NOT NULL, stream VARCHAR(255) NOT NULL, \
     dlq BOOLEAN NOT NULL DEFAULT FALSE, created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, payload TEXT)";

/// What a producer does: a row, then the event.
async fn publish(db: &Database, redis: &RedisServer, ids: std::ops::RangeInclusive<u32>) {
    let rows: Vec<String> =
        ids.clone().map(|i| format!("({i}, 'order.created', 'events:default', '{{\"n\":{i}}}')")).collect();
    for chunk in rows.chunks(250) {
        db.exec(&format!("INSERT INTO events (id, type, stream, payload) VALUES {}", chunk.join(", "))).await;
    }
    let evs: Vec<_> = ids
        .map(|i| {
            (json!({"id": i, "type": "order.created", "createdAt": iso_now()}), format!("{{\"n\":{i}}}").into_bytes())
        })
        .collect();
    produce(&mut redis.con().await, "events:default", &evs).await;
}

/// Whether a request is the first one for its event id.
fn first_attempts() -> impl Fn(&Received) -> bool + Send + Sync + 'static {
    let seen = std::sync::Mutex::new(std::collections::HashSet::new());
    move |r: &Received| seen.lock().unwrap().insert(r.header("x-event-id").unwrap_or_default().to_string())
}

/// Successful deliveries per event id.
fn delivered_counts(sink: &Sink) -> HashMap<String, usize> {
    let ok: Vec<Received> = sink.posts("/e").into_iter().filter(|r| (200..300).contains(&r.status)).collect();
    id_counts(&ok)
}

async fn rows(db: &Database, filter: &str) -> Vec<String> {
    let mut ids = db.column(&format!("SELECT id FROM events {filter}")).await;
    ids.sort_by_key(|s| s.parse::<u64>().unwrap_or(u64::MAX));
    ids
}

async fn the_original_outbox_table(db: Database) {
    db.exec(TABLE).await;
    let redis = RedisServer::start();
    let mut sink = Sink::start().await;
    // 13 always fails; 42 fails once with 500 (a dead letter) and is replayed; 77 asks for
    // a retry once (400 + X-Retry-After); everything else is taken.
    let first = first_attempts();
    sink.respond(move |r, _| match r.header("x-event-id") {
        Some("13") => Reply::status(404),
        Some("42") if first(r) => Reply::status(500),
        Some("77") if first(r) => Reply::status(400).header("x-retry-after", "1"),
        _ => Reply::ok(),
    });
    let url = db.sqlalchemy_url();
    let w = Worker::start(
        &redis,
        &sink.url("/e"),
        &[("STREAMS", "default"), ("DLQ_DB_CONNECTION", &url), ("DLQ_DB_TABLE", "events")],
    );
    w.wait_ready().await;
    publish(&db, &redis, 1..=250).await;
    wait_until("first half delivered", T, || async { delivered_counts(&sink).len() >= 200 }).await;
    // The receiver restarts mid-run: connections closed, refused for a moment.
    sink.restart(Duration::from_millis(500)).await;
    publish(&db, &redis, 251..=500).await;

    wait_until("all but 13 and 42 delivered", T, || async { delivered_counts(&sink).len() == 498 }).await;
    wait_until("delivered rows deleted, dead letters marked", T, || async { rows(&db, "").await == ["13", "42"] })
        .await;
    assert_eq!(rows(&db, "WHERE dlq = TRUE").await, ["13", "42"], "dead letters marked dlq = 1, not deleted");

    // The original's endpoint, without a token (none is configured), answers plain text.
    let (code, body) = w.get("/reprocess-dlq?gt=40&lt=50").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("reprocessed 42 -> events:default"), "{body}");
    assert!(body.contains("reprocessed 1 of 1"), "{body}");
    wait_until("42 delivered after its replay", T, || async { delivered_counts(&sink).contains_key("42") }).await;
    wait_until("only the failing event is left", T, || async { rows(&db, "").await == ["13"] }).await;
    assert_eq!(rows(&db, "WHERE dlq = TRUE").await, ["13"]);

    let counts = delivered_counts(&sink);
    assert_eq!(counts.len(), 499);
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    let replayed = sink.posts("/e").into_iter().rfind(|r| r.header("x-event-id") == Some("42")).unwrap();
    assert_eq!(&replayed.body[..], br#"{"n":42}"#, "the replay sends the row's payload");
    assert_eq!(w.metric("outbox_cleanups_pending").await, 0.0);
    assert!(w.metric("outbox_rows_deleted_total").await >= 498.0);
    let (code, body) = w.get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""outbox_cleanups_pending":0"#), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_sqlite() {
    the_original_outbox_table(Database::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_postgres() {
    the_original_outbox_table(Database::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_mariadb() {
    the_original_outbox_table(Database::mariadb()).await;
}

/// The database goes away while events are delivered: deliveries go on, the deletes wait
/// in Redis and are applied when it is back, nothing is delivered twice because of it.
async fn database_down_delays_the_clean_up_only(mut db: Database) {
    db.exec(TABLE).await;
    let redis = RedisServer::start();
    let sink = Sink::start_with(false).await;
    let w = Worker::start(
        &redis,
        &sink.url("/e"),
        &[("STREAMS", "default"), ("DLQ_DB_CONNECTION", &db.url()), ("DLQ_DB_TABLE", "events")],
    );
    w.wait_ready().await;
    publish(&db, &redis, 1..=100).await;
    wait_until("first rows deleted", T, || async { rows(&db, "").await.is_empty() }).await;
    // Rows of the next events exist before the database goes down.
    let rows_sql: Vec<String> = (101..=300).map(|i| format!("({i}, 't', 'events:default', 'x')")).collect();
    db.exec(&format!("INSERT INTO events (id, type, stream, payload) VALUES {}", rows_sql.join(", "))).await;
    db.stop();
    let evs: Vec<_> = (101..=300).map(|i| (json!({"id": i, "type": "t"}), b"x".to_vec())).collect();
    produce(&mut redis.con().await, "events:default", &evs).await;
    wait_until("delivered while the database is down", T, || async { delivered_counts(&sink).len() == 300 }).await;
    wait_until("acknowledged", T, || async { pending(&mut redis.con().await, "events:default", "workers").await == 0 })
        .await;
    wait_until("clean-ups waiting", T, || async { w.metric("outbox_cleanups_pending").await == 200.0 }).await;
    let (code, body) = w.get("/readyz").await;
    assert_eq!(code, 200, "delivery goes on: {body}");
    assert!(body.contains(r#""outbox_cleanups_pending":200"#), "{body}");
    assert!(body.contains("outbox_cleanup_error"), "{body}");

    db.start();
    wait_until("rows of delivered events deleted", T, || async { rows(&db, "").await.is_empty() }).await;
    wait_until("nothing waits", T, || async { w.metric("outbox_cleanups_pending").await == 0.0 }).await;
    let counts = delivered_counts(&sink);
    assert_eq!(counts.len(), 300);
    assert!(counts.values().all(|n| *n == 1), "the outage caused no re-delivery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_postgres_outage() {
    database_down_delays_the_clean_up_only(Database::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_mariadb_outage() {
    database_down_delays_the_clean_up_only(Database::mariadb()).await;
}

fn cli(redis: &RedisServer, db: &Database, args: &[&str]) -> (bool, String, String) {
    let (redis_url, db_url) = (redis.url(), db.sqlalchemy_url());
    let env = [
        ("REDIS_URL", redis_url.as_str()),
        ("DLQ_DB_CONNECTION", &db_url),
        ("DLQ_DB_TABLE", "events"),
        ("STREAMS", "default,fast"),
    ];
    run_cli(&env, args)
}

/// Rows whose event never reached the stream show up in the audit (metric and CLI); the
/// CLI replays dead-lettered rows, only into configured streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelivered_rows_are_audited_and_replays_stay_in_configured_streams() {
    let db = Database::postgres();
    db.exec(TABLE).await;
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    let first = first_attempts();
    sink.respond(
        move |r, _| if r.header("x-event-id") == Some("2") && first(r) { Reply::status(410) } else { Reply::ok() },
    );
    let w = Worker::start(
        &redis,
        &sink.url("/e"),
        &[
            ("STREAMS", "default,fast"),
            ("DLQ_DB_CONNECTION", &db.url()),
            ("DLQ_DB_TABLE", "events"),
            ("OUTBOX_AUDIT_AFTER", "1"),
        ],
    );
    w.wait_ready().await;
    publish(&db, &redis, 1..=3).await;
    // Row 9 was written, its event never published.
    db.exec("INSERT INTO events (id, type, stream, payload) VALUES (9, 'lost', 'events:default', 'x')").await;
    wait_until("2 dead-lettered, 1 and 3 deleted", T, || async { rows(&db, "").await == ["2", "9"] }).await;

    wait_until("the audit counts row 9", T, || async { w.metric("outbox_undelivered_rows").await == 1.0 }).await;
    let (ok, out, err) = cli(&redis, &db, &["dlq", "list", "--undelivered", "--older-than", "1s", "--json"]);
    assert!(ok, "{err}");
    let listed: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(listed.len(), 1, "{out}");
    assert_eq!((listed[0]["id"].as_str(), listed[0]["type"].as_str()), (Some("9"), Some("lost")));
    let (ok, out, _) = cli(&redis, &db, &["dlq", "list", "--json"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 1, "the dead letter (dlq = 1) only: {out}");
    assert!(out.contains(r#""id":"2""#), "{out}");

    // Not a configured stream: refused, nothing changes.
    let (ok, _, err) = cli(&redis, &db, &["dlq", "replay", "--ids", "2", "--stream", "retry"]);
    assert!(!ok && err.contains("not one of the worker's streams"), "{err}");
    assert_eq!(rows(&db, "WHERE dlq = TRUE").await, ["2"]);
    let (ok, out, err) = cli(&redis, &db, &["dlq", "replay", "--ids", "2", "--stream", "fast"]);
    assert!(ok, "{err}");
    assert!(out.contains("replayed 2 -> events:fast"), "{out}");
    wait_until("replayed row delivered and deleted", T, || async { rows(&db, "").await == ["9"] }).await;
    assert_eq!(delivered_counts(&sink).get("2"), Some(&1));
}

/// The outbox store's edges, through its API: a row marked as a dead letter survives a
/// late clean-up of an earlier delivery of the same id; a dead letter whose id belongs to
/// another stream's row is refused (kept in `events:dlq` by the worker) instead of
/// marking that row; ids of a PostgreSQL `uuid` column work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_store_edges() {
    use eventworker::config::DbMode;
    use eventworker::dlq::{DeadLetter, SqlSink};
    let letter = |id: &str, stream: &str| DeadLetter {
        id: id.into(),
        event_type: "t".into(),
        reason: "http_404".into(),
        payload: "p".into(),
        stream: stream.into(),
        attempts: 1,
        meta: None,
    };
    for db in [Database::sqlite(), Database::postgres()] {
        db.exec(TABLE).await;
        db.exec("INSERT INTO events (id, type, stream, payload) VALUES (5, 't', 'events:default', 'x'), (6, 't', 'events:default', 'y')").await;
        let sink = SqlSink::new(&db.url(), "events", None, DbMode::Auto).unwrap();
        sink.send(&letter("5", "events:default")).await.unwrap();
        assert_eq!(sink.delete_delivered(&["5".into(), "6".into()]).await.unwrap(), 1, "{}", db.name());
        assert_eq!(rows(&db, "").await, ["5"], "{}: the dead letter's row survives", db.name());
        let err = sink.send(&letter("5", "events:fast")).await.unwrap_err();
        assert!(matches!(err, eventworker::Error::Rejected { .. }), "{}: {err}", db.name());
        assert!(
            matches!(sink.send(&letter("abc", "events:default")).await, Err(eventworker::Error::Rejected { .. })),
            "{}: not a number for an int id",
            db.name()
        );
    }
    let db = Database::postgres();
    db.exec("CREATE TABLE events (id uuid PRIMARY KEY, type TEXT NOT NULL, dlq BOOLEAN NOT NULL DEFAULT FALSE, payload TEXT)")
        .await;
    let (a, b) = ("6f1c1f8e-3a39-4a57-9d0b-0c2f0f6a8e01", "6f1c1f8e-3a39-4a57-9d0b-0c2f0f6a8e02");
    db.exec(&format!("INSERT INTO events (id, type, payload) VALUES ('{a}', 't', 'x'), ('{b}', 't', 'y')")).await;
    let sink = SqlSink::new(&db.url(), "events", None, DbMode::Outbox).unwrap();
    sink.send(&letter(b, "events:default")).await.unwrap();
    assert_eq!(sink.delete_delivered(&[a.to_string()]).await.unwrap(), 1);
    assert_eq!(db.column("SELECT CAST(id AS TEXT) FROM events WHERE dlq").await, [b]);
}
