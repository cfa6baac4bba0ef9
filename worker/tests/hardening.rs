//! Bad input and hostile configurations: dead letters a sink refuses for good, id
//! collisions, attempt counters of id-less events, where events may go and what secrets
//! they carry, credentials in errors, and consumers that would pile up in the group.

mod common;

use std::time::Duration;

use common::db::Database;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(60);

async fn xrange_len(redis: &RedisServer, key: &str) -> i64 {
    xlen(&mut redis.con().await, key).await
}

/// A payload PostgreSQL's TEXT refuses (a NUL byte) is stored base64; an id longer than the
/// column is refused for good and kept in `events:dlq` instead of being retried forever:
/// nothing blocks, nothing is lost, and the same commands list and replay it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_the_table_refuses_go_to_the_redis_stream() {
    let db = Database::postgres();
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink.respond(|r, _| if r.header("x-event-type") == Some("bad") { Reply::status(404) } else { Reply::ok() });
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast"), ("DLQ_DB_CONNECTION", &db.url())]);
    w.wait_ready().await;
    let long_id = "x".repeat(300);
    let mut con = redis.con().await;
    produce(
        &mut con,
        "events:fast",
        &[
            (json!({"id": "nul", "type": "bad"}), b"a\0b".to_vec()),
            (json!({"id": long_id, "type": "bad"}), b"long".to_vec()),
            (meta("after", "good"), b"ok".to_vec()),
        ],
    )
    .await;
    wait_until("both letters kept", T, || async {
        db.column("SELECT id FROM dlq").await.len() == 1 && xrange_len(&redis, "events:dlq").await == 1
    })
    .await;
    wait_until("all acknowledged", T, || async {
        pending(&mut redis.con().await, "events:fast", "workers").await == 0
    })
    .await;
    assert_eq!(db.column("SELECT payload FROM dlq WHERE id = 'nul'").await, ["base64:YQBi"]);
    assert_eq!(xrange_len(&redis, "events:dlq").await, 1, "the refused letter is kept in Redis");
    assert_eq!(w.metric("dlq_refused_total{sink=\"sql\"}").await, 1.0);
    let (code, body) = w.get("/readyz").await;
    assert_eq!(code, 200, "a refused letter does not make the worker unready: {body}");
    wait_until("later events not blocked", T, || async { sink.delivered_ids("/e").contains("after") }).await;

    let (redis_url, db_url) = (redis.url(), db.url());
    let cli = |args: &[&str]| {
        run_cli(&[("REDIS_URL", &redis_url), ("DLQ_DB_CONNECTION", &db_url), ("STREAMS", "fast")], args)
    };
    let (ok, out, err) = cli(&["dlq", "list", "--json"]);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2, "{out}");
    let kept = rows.iter().find(|r| r["store"] == "redis").expect("the Redis letter is listed");
    assert_eq!(kept["id"].as_str(), Some(long_id.as_str()));
    sink.respond(|_, _| Reply::ok());
    let (ok, out, err) = cli(&["dlq", "replay", "--ids", &long_id]);
    assert!(ok, "{err}");
    assert!(out.contains("-> events:fast"), "{out}");
    wait_until("replayed from events:dlq", T, || async { sink.delivered_ids("/e").contains(&long_id) }).await;
    assert_eq!(xrange_len(&redis, "events:dlq").await, 0);
    let replayed = sink.posts("/e").into_iter().rfind(|r| r.header("x-event-id") == Some(long_id.as_str())).unwrap();
    assert_eq!(&replayed.body[..], b"long");
}

/// An HTTP dead-letter endpoint that answers 422 will never take the letter: it is kept in
/// `events:dlq` and the event is acknowledged, not retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_sink_refusing_a_letter_does_not_hold_it_forever() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink.respond(|r, _| if r.path == "/dlq" { Reply::status(422) } else { Reply::status(404) });
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast"), ("DLQ_URI", &sink.url("/dlq"))]);
    w.wait_ready().await;
    produce(&mut redis.con().await, "events:fast", &[(meta(1, "t"), b"x".to_vec())]).await;
    wait_until("kept in events:dlq", T, || async { xrange_len(&redis, "events:dlq").await == 1 }).await;
    wait_until("acknowledged", T, || async { pending(&mut redis.con().await, "events:fast", "workers").await == 0 })
        .await;
    assert_eq!(sink.count(http::Method::POST, "/dlq"), 1, "a 422 is not retried");
    assert_eq!(w.get("/readyz").await.0, 200);
}

/// The same `meta.id` in two streams is two events: two dead letters, neither overwrites
/// the other.
async fn dead_letters_sharing_an_id_do_not_overwrite_each_other(db: Database) {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink.respond(|_, _| Reply::status(404));
    let url = db.sqlalchemy_url();
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast,slow"), ("DLQ_DB_CONNECTION", &url)]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    produce(&mut con, "events:fast", &[(meta("dup", "t"), b"from fast".to_vec())]).await;
    wait_until("first stored", T, || async { db.column("SELECT id FROM dlq").await.len() == 1 }).await;
    produce(&mut con, "events:slow", &[(meta("dup", "t"), b"from slow".to_vec())]).await;
    wait_until("second stored beside it", T, || async { db.column("SELECT id FROM dlq").await.len() == 2 }).await;
    let mut payloads = db.column("SELECT payload FROM dlq").await;
    payloads.sort();
    assert_eq!(payloads, ["from fast", "from slow"]);
    assert_eq!(db.column("SELECT id FROM dlq WHERE stream = 'events:slow'").await, ["dup@events:slow"]);
    // The same event dead-lettered again still updates its own row.
    produce(&mut con, "events:fast", &[(meta("dup", "t"), b"fast again".to_vec())]).await;
    wait_until("updated in place", T, || async {
        db.column("SELECT payload FROM dlq WHERE id = 'dup'").await == ["fast again"]
    })
    .await;
    assert_eq!(db.column("SELECT id FROM dlq").await.len(), 2);
    assert_eq!(db.column("SELECT dead_lettered FROM dlq WHERE id = 'dup'").await, ["2"]);
    assert_eq!(db.column("SELECT dead_lettered FROM dlq WHERE id = 'dup@events:slow'").await, ["1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_ids_sqlite() {
    dead_letters_sharing_an_id_do_not_overwrite_each_other(Database::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_ids_postgres() {
    dead_letters_sharing_an_id_do_not_overwrite_each_other(Database::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_ids_mariadb() {
    dead_letters_sharing_an_id_do_not_overwrite_each_other(Database::mariadb()).await;
}

/// An event without `meta.id` is counted under its entry id, which every retry changes:
/// no counter of an old entry is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_of_id_less_events_leave_no_counters() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink.respond(|_, seen| if seen < 2 { Reply::status(429).header("retry-after", "0") } else { Reply::ok() });
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast")]);
    w.wait_ready().await;
    produce(&mut redis.con().await, "events:fast", &[(json!({"type": "t"}), b"x".to_vec())]).await;
    wait_until("delivered on the third attempt", T, || async { sink.answered(200) == 1 }).await;
    assert_eq!(sink.posts("/e").last().unwrap().header("x-event-attempt"), Some("3"));
    wait_until("acknowledged", T, || async { pending(&mut redis.con().await, "events:fast", "workers").await == 0 })
        .await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("err_count:*").query_async(&mut redis.con().await).await.unwrap();
    assert!(keys.is_empty(), "counters left behind: {keys:?}");
}

/// `meta.url` may not reach the cloud metadata address, nor hosts outside an allowlist;
/// TARGET_HEADERS and signatures go only to the default target's host (and allowlisted ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_are_bounded_and_secrets_stay_with_trusted_hosts() {
    let redis = RedisServer::start();
    let own = Sink::start().await;
    let other = Sink::start().await;
    let secrets = [
        ("STREAMS", "fast"),
        ("TARGET_HEADERS", r#"{"Authorization": "Bearer s3cret"}"#),
        ("WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    ];
    let w = Worker::start(&redis, &own.url("/e"), &secrets);
    w.wait_ready().await;
    let elsewhere = format!("http://localhost:{}/x", other.port);
    produce(
        &mut redis.con().await,
        "events:fast",
        &[
            (meta(1, "t"), b"a".to_vec()),
            (json!({"id": 2, "type": "t", "url": elsewhere}), b"b".to_vec()),
            (json!({"id": 3, "type": "t", "url": "http://169.254.169.254/latest/meta-data/"}), b"c".to_vec()),
        ],
    )
    .await;
    wait_until("delivered", T, || async { own.answered(200) == 1 && other.answered(200) == 1 }).await;
    wait_until("metadata address refused", T, || async { w.stdout().contains(r#""reason":"target_denied""#) }).await;
    let mine = &own.posts("/e")[0];
    assert_eq!(mine.header("authorization"), Some("Bearer s3cret"));
    assert!(mine.header("webhook-signature").is_some());
    let theirs = &other.posts("/x")[0];
    assert_eq!(theirs.header("authorization"), None, "a producer-chosen host gets no secrets");
    assert_eq!(theirs.header("webhook-signature"), None, "nor valid signatures");
    drop(w);

    // With an allowlist, other hosts are refused; allowlisted ones get the secrets.
    let redis = RedisServer::start();
    let mut env = secrets.to_vec();
    env.push(("TARGET_ALLOWLIST", "127.0.0.1"));
    let w = Worker::start(&redis, &format!("http://localhost:{}/e", own.port), &env);
    w.wait_ready().await;
    let allowed = other.url("/allowed");
    produce(
        &mut redis.con().await,
        "events:fast",
        &[
            (json!({"id": 4, "type": "t", "url": allowed}), b"d".to_vec()),
            (json!({"id": 5, "type": "t", "url": "http://example.invalid/x"}), b"e".to_vec()),
        ],
    )
    .await;
    wait_until("allowlisted host reached", T, || async { other.posts("/allowed").len() == 1 }).await;
    assert_eq!(other.posts("/allowed")[0].header("authorization"), Some("Bearer s3cret"));
    wait_until("other host refused", T, || async { w.stdout().contains(r#""reason":"target_not_allowed""#) }).await;
}

/// A password in REDIS_URL never shows in an error message.
#[test]
fn credentials_are_redacted_from_errors() {
    let url = format!("redis://:hunter2@127.0.0.1:{}/0", free_port());
    let (ok, _, err) = run_cli(&[("REDIS_URL", &url)], &["dlq", "replay", "--ids", "1"]);
    assert!(!ok);
    assert!(err.contains("redis://***@127.0.0.1"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

/// Every pod name becomes a consumer. A worker that stops cleanly with nothing pending
/// removes its own; consumers idle for long with nothing pending are removed by the live
/// workers; a consumer with pending entries is never removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_do_not_pile_up() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    let mut con = redis.con().await;
    create_group(&mut con, "events:fast", "workers").await;
    let _: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg("events:fast")
        .arg("workers")
        .arg("gone-pod")
        .query_async(&mut con)
        .await
        .unwrap();
    // A consumer that read an entry and died: its entry stays its own until claimed.
    produce(&mut con, "events:fast", &[(meta(1, "t"), b"x".to_vec())]).await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("busy-pod")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg("events:fast")
        .arg(">")
        .query_async(&mut con)
        .await
        .unwrap();
    let consumers = |c: redis::aio::MultiplexedConnection| {
        let mut c = c;
        async move {
            let v: Vec<redis::Value> = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg("events:fast")
                .arg("workers")
                .query_async(&mut c)
                .await
                .unwrap();
            let mut names: Vec<String> = v
                .into_iter()
                .map(|c| {
                    let m: std::collections::HashMap<String, redis::Value> = redis::from_redis_value(c).unwrap();
                    redis::from_redis_value(m["name"].clone()).unwrap()
                })
                .collect();
            names.sort();
            names
        }
    };
    // Unordered: a new holder of an ordered stream's lease takes over everything pending.
    let mut w = Worker::start(
        &redis,
        &sink.url("/e"),
        &[("STREAMS", "fast"), ("CONSUMER_IDLE_TIMEOUT", "1"), ("CLAIM_IDLE", "3600"), ("ORDERING", "none")],
    );
    w.wait_ready().await;
    wait_until("the idle consumer without pending entries is removed", T, || async {
        consumers(con.clone()).await == ["busy-pod", "worker-fast-test"]
    })
    .await;
    assert!(w.metric("consumers_removed_total").await >= 1.0);
    w.sigterm();
    assert!(w.wait_exit(T).await.is_some_and(|s| s.success()));
    assert_eq!(consumers(con.clone()).await, ["busy-pod"], "a clean stop removes its own consumer, not a busy one");
}

/// A log written to a file carries no terminal colour codes; dead letters to the HTTP
/// sink are logged at the default level; `STREAMS` may name a stream by its key
/// (`events:fast`) as well as by its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_logs_are_plain_name_dead_letters_and_streams_may_be_named_by_key() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink.respond(|r, _| if r.header("x-event-id") == Some("2") { Reply::status(404) } else { Reply::ok() });
    let log = std::env::temp_dir().join(format!("ew-plain-{}.log", free_port()));
    let env = [("STREAMS", "events:fast"), ("DLQ_URI", &sink.url("/dlq")), ("RUST_LOG", "info")];
    let w = Worker::start_logging(&redis, &sink.url("/e"), &env, &log);
    w.wait_ready().await;
    produce(&mut redis.con().await, "events:fast", &[(meta(1, "t"), b"x".to_vec()), (meta(2, "gone"), b"y".to_vec())])
        .await;
    wait_until("delivered from events:fast", T, || async { sink.delivered_ids("/e").contains("1") }).await;
    wait_until("2 dead-lettered and logged", T, || async {
        std::fs::read_to_string(&log).unwrap_or_default().contains("dead-lettered")
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text.lines().find(|l| l.contains("dead-lettered")).unwrap();
    for part in ["id=2", "type=gone", "reason=http_404", "sink=\"http\""] {
        assert!(line.contains(part), "{part} in {line}");
    }
    assert!(text.contains("ADMIN_TOKEN is not set"), "the start-up warning is logged: {text}");
    assert!(!text.contains('\u{1b}'), "no ANSI escapes in a file: {text:?}");
    assert_eq!(xlen(&mut redis.con().await, "events:events:fast").await, 0, "no stream under a doubled prefix");
}

/// The `dlq` commands as a new user types them: connection flags after the subcommand, a
/// replay without a filter refused before anything is touched, and a dry run that shows the
/// SQL store's letters while Redis cannot be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_commands_take_flags_after_the_subcommand_and_never_replay_everything_by_accident() {
    let nobody = format!("redis://127.0.0.1:{}", free_port());
    let (ok, _, err) = run_cli(&[], &["dlq", "replay", "--redis-url", &nobody]);
    assert!(!ok && err.contains("--all"), "refused without a filter: {err}");
    let (ok, _, err) = run_cli(&[], &["dlq", "replay", "--all", "--redis-url", &nobody]);
    assert!(!ok && err.contains(nobody.trim_start_matches("redis://")), "the flag after `replay` was used: {err}");

    let db = Database::sqlite();
    let url = db.sqlalchemy_url();
    let (ok, _, err) = run_cli(&[], &["dlq", "list", "--dlq-db-connection", &url, "--redis-url", &nobody]);
    assert!(ok, "the table is created, Redis missing is a warning: {err}");
    db.exec("INSERT INTO dlq (id, type, reason, payload) VALUES ('7', 'order.paid', 'http_404', '{}')").await;
    let (ok, out, err) = run_cli(
        &[],
        &["dlq", "replay", "--ids", "7", "--dry-run", "--dlq-db-connection", &url, "--redis-url", &nobody],
    );
    assert!(ok, "{err}");
    assert!(out.contains("would replay 7 -> events:"), "{out}");
    assert!(err.contains("events:dlq is not looked at"), "{err}");
    assert_eq!(db.column("SELECT id FROM dlq").await, ["7"], "a dry run changes nothing");
}

/// A wrong setting stops start-up with exit code 2 and one message that names it.
#[test]
fn bad_settings_stop_start_up_once_with_exit_code_2() {
    let busy = std::net::TcpListener::bind(("0.0.0.0", free_port())).unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let redis = format!("redis://127.0.0.1:{}", free_port());
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("METRICS_PORT", &port)], "METRICS_PORT"),
        (&[("DLQ_DB_CONNECTION", "bogus://x")], "DLQ_DB_CONNECTION"),
        (&[("DLQ_DB_CONNECTION", "sqlite:///nonexistent/dir/x.db")], "DLQ_DB_CONNECTION"),
        (&[("ORDERING", "fifo")], "ORDERING"),
    ];
    for (env, var) in cases {
        let out = std::process::Command::new(worker_bin())
            .env_clear()
            .env("REDIS_URL", &redis)
            .env("METRICS_PORT", free_port().to_string())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {err}");
        assert!(err.contains(var), "{var} named: {err}");
        assert_eq!(err.lines().filter(|l| !l.trim().is_empty()).count(), 1, "{var}: one message: {err}");
    }
}

/// `dlq show` prints a letter in full, `GET /dlq/{id}` answers it as JSON, `dlq delete`
/// removes letters that must never be replayed from whichever store keeps them (dry run
/// first, never everything without `--all`), and `dlq purge` removes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_can_be_shown_and_deleted_for_good() {
    let redis = RedisServer::start();
    let db = Database::sqlite();
    let url = db.sqlalchemy_url();
    let env = [("REDIS_URL", redis.url()), ("DLQ_DB_CONNECTION", url.clone()), ("STREAMS", "fast".to_string())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cli = |args: &[&str]| run_cli(&env, args);
    assert!(cli(&["dlq", "list"]).0, "the table is created");
    db.exec(
        "INSERT INTO dlq (id, type, reason, payload, meta) VALUES \
         ('1', 'order.paid', 'http_410', '{\"n\":1}', '{\"id\":\"1\",\"orderingKey\":\"c-1\"}'), \
         ('2', 'order.paid', 'http_410', '{\"n\":2}', NULL), ('3', 'order.paid', 'http_500', '{\"n\":3}', NULL)",
    )
    .await;
    let _: String = redis::cmd("XADD")
        .arg("events:dlq")
        .arg("*")
        .arg("id")
        .arg("4")
        .arg("type")
        .arg("order.paid")
        .arg("reason")
        .arg("http_410")
        .arg("payload")
        .arg("{\"n\":4}")
        .query_async(&mut redis.con().await)
        .await
        .unwrap();

    let (ok, out, err) = cli(&["dlq", "show", "1"]);
    assert!(ok, "{err}");
    for part in ["reason:     http_410", "payload:    {\"n\":1}", "\"orderingKey\": \"c-1\"", "kept in:    sql"] {
        assert!(out.contains(part), "{part} in {out}");
    }
    let (ok, out, _) = cli(&["dlq", "show", "4", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(ok && v["store"] == "redis" && v["payload"] == "{\"n\":4}", "{out}");
    let (ok, _, err) = cli(&["dlq", "show", "99"]);
    assert!(!ok && err.contains("no dead letter with id \"99\""), "{err}");

    let w = Worker::start(
        &redis,
        "http://127.0.0.1:9/e",
        &[("STREAMS", "fast"), ("DLQ_DB_CONNECTION", &url), ("ADMIN_TOKEN", "t")],
    );
    w.wait_ready().await;
    let (code, body) = w.get("/dlq/1?token=t").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["rows"][0]["payload"].as_str(), v["rows"][0]["meta"]["orderingKey"].as_str()),
        (Some("{\"n\":1}"), Some("c-1"))
    );
    assert_eq!(w.get("/dlq/99?token=t").await.0, 404);
    drop(w);

    let (ok, _, err) = cli(&["dlq", "delete"]);
    assert!(!ok && err.contains("--all"), "{err}");
    let (ok, out, err) = cli(&["dlq", "delete", "--reason", "http_410", "--dry-run"]);
    assert!(ok && out.contains("would delete 1 (sql)") && out.contains("would delete 4 (redis)"), "{out}{err}");
    assert_eq!(db.column("SELECT id FROM dlq ORDER BY id").await, ["1", "2", "3"], "a dry run changes nothing");
    let (ok, out, err) = cli(&["dlq", "delete", "--reason", "http_410"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 3, "{out}");
    assert_eq!(db.column("SELECT id FROM dlq ORDER BY id").await, ["3"]);
    assert_eq!(xlen(&mut redis.con().await, "events:dlq").await, 0);
    let (ok, out, _) = cli(&["dlq", "purge"]);
    assert!(ok && out.contains("deleted 3 (sql)"), "{out}");
    assert!(db.column("SELECT id FROM dlq").await.is_empty());
}

/// `eventworker status`: the streams' backlog and consumers from Redis, scheduled retries,
/// and the paused hosts of the worker whose admin server it asks; a table, or JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_streams_consumers_retries_and_paused_hosts() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    sink.respond(|_, _| Reply::status(503));
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast")]);
    w.wait_ready().await;
    let evs: Vec<_> = (1..=3).map(|i| (meta(i, "t"), b"x".to_vec())).collect();
    produce(&mut redis.con().await, "events:fast", &evs).await;
    wait_until("the receiver's host paused", T, || async { w.metric_sum("host_circuit_open").await == 1.0 }).await;
    let admin = format!("http://127.0.0.1:{}", w.metrics_port);
    let url = redis.url();
    let env = [("REDIS_URL", url.as_str()), ("STREAMS", "fast,slow")];

    let (ok, out, err) = run_cli(&env, &["status", "--json", "--admin-url", &admin]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["streams"][0]["stream"], "events:fast");
    assert_eq!(v["streams"][0]["group_exists"], true);
    assert!(v["streams"][0]["consumers"][0]["name"].as_str().unwrap().contains("fast"), "{v}");
    assert_eq!(v["streams"][1]["group_exists"], false, "slow has no group: {v}");
    let host = sink.url("").trim_end_matches('/').to_string();
    assert_eq!(v["paused_hosts"], json!([host]), "{v}");
    let held = v["streams"][0]["backlog"].as_i64().unwrap() + v["scheduled_retries"].as_i64().unwrap();
    // Each event is pending, waiting or scheduled (one may be between the two reads).
    assert!((2..=3).contains(&held), "events in the backlog or scheduled: {v}");

    let (ok, out, _) = run_cli(&env, &["status", "--admin-url", &admin]);
    assert!(ok && out.contains("STREAM") && out.contains("events:fast") && out.contains("(no group yet)"), "{out}");
    assert!(out.contains(&format!("paused hosts: {host}")), "{out}");
    let (ok, out, _) = run_cli(&env, &["status", "--admin-url", "http://127.0.0.1:9"]);
    assert!(ok && out.contains("paused hosts: unknown"), "{out}");
}
