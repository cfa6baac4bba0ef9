//! Each case against a real redis-server (on a Unix socket of its own).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;

use super::layout::{scheduled, Layout, RETRY_DELAYS};
use super::*;

struct Redis {
    child: Child,
    dir: std::path::PathBuf,
}

impl Redis {
    fn start() -> (Self, redis::Client) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ew-backlog-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("redis.sock");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no", "--unixsocket"])
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "redis-server did not create {}", sock.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        let client = redis::Client::open(format!("unix://{}", sock.display())).unwrap();
        (Self { child, dir }, client)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn setup() -> (Redis, MultiplexedConnection) {
    let (r, client) = Redis::start();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.get_multiplexed_async_connection().await {
            Ok(con) => return (r, con),
            Err(e) => assert!(Instant::now() < deadline, "redis: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn add(con: &mut MultiplexedConnection, key: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id: String = con.xadd(key, "*", &[("data", i.to_string())]).await.unwrap();
        ids.push(id);
    }
    ids
}

async fn create(con: &mut MultiplexedConnection, key: &str, group: &str, at: &str) {
    let _: () = redis::cmd("XGROUP").arg("CREATE").arg(key).arg(group).arg(at).query_async(con).await.unwrap();
}

/// XREADGROUP `n` entries; returns their IDs.
async fn take(con: &mut MultiplexedConnection, key: &str, group: &str, n: usize) -> Vec<String> {
    let r: redis::streams::StreamReadReply = con
        .xread_options(&[key], &[">"], &redis::streams::StreamReadOptions::default().group(group, "c").count(n))
        .await
        .unwrap();
    r.keys.into_iter().flat_map(|k| k.ids.into_iter().map(|e| e.id)).collect()
}

/// What the worker does with DELETE_ON_ACK: acknowledge and delete.
async fn ack_del(con: &mut MultiplexedConnection, key: &str, group: &str, ids: &[String]) {
    let _: () = redis::pipe().xack(key, group, ids).xdel(key, ids).query_async(con).await.unwrap();
}

#[tokio::test]
async fn missing_stream_and_missing_group() {
    let (_r, mut con) = setup().await;
    let b = read(&mut con, "events:none", "g").await.unwrap();
    assert_eq!(b, Backlog { exact: true, ..Default::default() });
    let ids = add(&mut con, "events:a", 3).await;
    let b = read(&mut con, "events:a", "g").await.unwrap();
    assert!(!b.group_exists);
    assert_eq!((b.length, b.undelivered, b.pending, b.total()), (3, 3, 0, 3));
    assert_eq!(b.oldest_id.as_deref(), Some(ids[0].as_str()));
}

#[tokio::test]
async fn delete_on_ack_with_lag_known() {
    let (_r, mut con) = setup().await;
    let ids = add(&mut con, "s", 10).await;
    create(&mut con, "s", "g", "0").await;
    let read4 = take(&mut con, "s", "g", 4).await;
    ack_del(&mut con, "s", "g", &read4[..3]).await;
    let b = read(&mut con, "s", "g").await.unwrap();
    // 6 unread + 1 in flight; the 3 delivered are gone.
    assert_eq!((b.length, b.undelivered, b.pending, b.total(), b.exact), (7, 6, 1, 7, true));
    assert_eq!(b.oldest_id.as_deref(), Some(ids[3].as_str()), "the oldest is the one in flight");
    assert_eq!(b.oldest_pending_id, b.oldest_id);
    let ahead = read(&mut con, "s", "other").await.unwrap();
    assert_eq!((ahead.oldest_id.as_deref(), ahead.oldest_pending_id.as_deref()), (Some(ids[3].as_str()), None));
    assert_eq!(b.oldest_undelivered_id.as_deref(), Some(ids[4].as_str()));
    // All delivered: nothing left, whatever XLEN had been.
    let rest = take(&mut con, "s", "g", 100).await;
    ack_del(&mut con, "s", "g", &rest).await;
    ack_del(&mut con, "s", "g", &read4[3..]).await;
    let b = read(&mut con, "s", "g").await.unwrap();
    assert_eq!((b.length, b.total(), b.oldest_id.clone()), (0, 0, None));
}

#[tokio::test]
async fn without_delete_on_ack_acknowledged_entries_are_not_backlog() {
    let (_r, mut con) = setup().await;
    add(&mut con, "s", 10).await;
    create(&mut con, "s", "g", "0").await;
    let got = take(&mut con, "s", "g", 6).await;
    let _: i64 = con.xack("s", "g", &got[..4]).await.unwrap();
    let b = read(&mut con, "s", "g").await.unwrap();
    assert_eq!((b.length, b.undelivered, b.pending, b.total()), (10, 4, 2, 6));
}

#[tokio::test]
async fn tombstones_ahead_of_the_group_are_counted() {
    // Another group (or the original worker) deleted entries this group has not read: Redis
    // reports lag as nil, XLEN would count the other group's leftovers.
    let (_r, mut con) = setup().await;
    let ids = add(&mut con, "s", 10).await;
    create(&mut con, "s", "fast", "0").await;
    create(&mut con, "s", "slow", "0").await;
    let got = take(&mut con, "s", "fast", 5).await;
    // Acknowledged out of order, as concurrent deliveries are.
    ack_del(&mut con, "s", "fast", &[got[1].clone(), got[3].clone()]).await;
    take(&mut con, "s", "slow", 2).await;
    let info: redis::Value = redis::cmd("XINFO").arg("GROUPS").arg("s").query_async(&mut con).await.unwrap();
    assert!(format!("{info:?}").contains("nil"), "precondition: Redis has lost a lag: {info:?}");
    let b = read(&mut con, "s", "slow").await.unwrap();
    // 8 entries left: "slow" holds 0 and 2, 4..=9 are unread.
    assert_eq!((b.length, b.undelivered, b.pending, b.total(), b.exact), (8, 6, 2, 8, true));
    assert_eq!(b.oldest_id.as_deref(), Some(ids[0].as_str()));
    let f = read(&mut con, "s", "fast").await.unwrap();
    assert_eq!((f.undelivered, f.pending, f.total()), (5, 3, 8));
}

#[tokio::test]
async fn a_group_created_behind_deletions() {
    let (_r, mut con) = setup().await;
    add(&mut con, "s", 8).await;
    create(&mut con, "s", "old", "0").await;
    let got = take(&mut con, "s", "old", 3).await;
    ack_del(&mut con, "s", "old", &got[1..2]).await;
    create(&mut con, "s", "new", "0").await;
    let b = read(&mut con, "s", "new").await.unwrap();
    assert_eq!((b.length, b.undelivered, b.pending, b.exact), (7, 7, 0, true));
}

#[tokio::test]
async fn scheduled_retries_are_reported_apart_and_count_again_when_due() {
    // The retry scheduler acknowledges and deletes the entry, keeps it in events:retry
    // with its due time, and adds it to its stream again when due.
    let (_r, mut con) = setup().await;
    add(&mut con, "events:default", 3).await;
    create(&mut con, "events:default", "g", "0").await;
    let got = take(&mut con, "events:default", "g", 3).await;
    let retry_id: String = con.xadd("events:retry", "*", &[("stream", "events:default")]).await.unwrap();
    let _: i64 = con.zadd(RETRY_DELAYS, &retry_id, 9_999_999_999.0).await.unwrap();
    ack_del(&mut con, "events:default", "g", &got[..1]).await;
    ack_del(&mut con, "events:default", "g", &got[1..]).await;
    let b = read(&mut con, "events:default", "g").await.unwrap();
    assert_eq!((b.total(), scheduled(&mut con, Layout::Single, &[]).await.unwrap()), (0, 1));
    // Due: moved back.
    let _: i64 = con.zrem(RETRY_DELAYS, &retry_id).await.unwrap();
    add(&mut con, "events:default", 1).await;
    let b = read(&mut con, "events:default", "g").await.unwrap();
    assert_eq!((b.undelivered, b.total(), scheduled(&mut con, Layout::Single, &[]).await.unwrap()), (1, 1, 0));
    // In a cluster each stream has its own schedule, and the original's is still counted.
    let streams = ["events:default".to_string(), "events:fast".to_string()];
    let _: i64 = con.zadd("{events:fast}:retry:delays", "1-0", 9_999_999_999.0).await.unwrap();
    let _: i64 = con.zadd(RETRY_DELAYS, "2-0", 9_999_999_999.0).await.unwrap();
    assert_eq!(scheduled(&mut con, Layout::Cluster, &streams).await.unwrap(), 2);
    assert_eq!(scheduled(&mut con, Layout::Single, &streams).await.unwrap(), 1);
}

#[tokio::test]
async fn beyond_the_cap_an_estimate() {
    let (_r, mut con) = setup().await;
    add(&mut con, "s", 3_500).await;
    create(&mut con, "s", "a", "0").await;
    create(&mut con, "s", "b", "0").await;
    // "a" takes 2,000 and deletes one in the middle: "b" is behind a tombstone.
    let got = take(&mut con, "s", "a", 2_000).await;
    ack_del(&mut con, "s", "a", &got[1_000..1_001]).await;
    take(&mut con, "s", "b", 10).await;
    let exact = read_capped(&mut con, "s", "b", 10_000).await.unwrap();
    assert_eq!((exact.undelivered, exact.exact), (3_489, true));
    // Both sides of "b"'s position hold more than the cap.
    let _ = take(&mut con, "s", "b", 1_500).await;
    let capped = read_capped(&mut con, "s", "b", 1_000).await.unwrap();
    assert_eq!((capped.pending, capped.exact), (1_510, false));
    assert!((1_000..=3_499 - 1_000).contains(&capped.undelivered), "an estimate within bounds: {capped:?}");
    let uncapped = read_capped(&mut con, "s", "b", 10_000).await.unwrap();
    assert_eq!((uncapped.undelivered, uncapped.exact), (1_989, true));
}

#[test]
fn oldest_age_from_the_entry_id() {
    let b = Backlog { oldest_id: Some("1000-3".into()), ..Default::default() };
    assert_eq!(b.oldest_age_secs(4_500), 3.5);
    assert_eq!(Backlog::default().oldest_age_secs(4_500), 0.0);
}
