//! The operator's Redis pool against a real redis-server: a pooled connection survives a
//! Redis restart without a false "unreachable", and one connection serves many reads.

#[path = "../../worker/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::RedisServer;
use eventworker_operator::redis_pool::RedisPool;

#[tokio::test]
async fn a_pooled_connection_survives_a_redis_restart() {
    let mut redis = RedisServer::start_with(false);
    let pool = RedisPool::new(Duration::from_secs(2));
    let url = redis.url();
    let streams = ["fast".to_string(), "slow".to_string()];
    for _ in 0..5 {
        let (read, scheduled) = pool.read_backlog(&url, &streams, "orders").await.expect("Redis answers");
        assert_eq!((read.len(), scheduled), (2, 0));
    }
    assert_eq!(pool.len(), 1, "one connection for every read of one Redis");
    let port = redis.port;
    redis.stop();
    let err = pool.read_backlog(&url, &streams, "orders").await.unwrap_err();
    assert!(err.starts_with(&format!("redis at 127.0.0.1:{port}: ")), "{err}");
    redis.restart();
    // The pool still holds no connection or a dead one: either way the first read after
    // the restart answers.
    let (read, _) = pool.read_backlog(&url, &streams, "orders").await.expect("no false unreachable after a restart");
    assert_eq!(read[0].name, "events:fast");
}

#[tokio::test]
async fn a_dead_pooled_connection_is_replaced_within_the_same_read() {
    let mut redis = RedisServer::start_with(false);
    let pool = RedisPool::new(Duration::from_secs(2));
    let url = redis.url();
    pool.read_backlog(&url, &["fast".into()], "g").await.unwrap();
    // Restart behind the pool's back: the pooled connection is dead, the server is back.
    redis.restart();
    pool.read_backlog(&url, &["fast".into()], "g").await.expect("replaced at once, not reported unreachable");
}

/// A Redis Cluster (`redis+cluster://` seeds): each stream's backlog read on its own master,
/// scheduled retries summed over the streams' own schedules and the original's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_is_read_stream_by_stream() {
    let cluster = common::cluster::RedisCluster::start();
    let url = cluster.url();
    let seeds = backlog::layout::cluster_seeds(&url).unwrap();
    let mut con = redis::cluster::ClusterClient::new(seeds).unwrap().get_async_connection().await.unwrap();
    let streams = ["critical".to_string(), "fast".to_string(), "slow".to_string()];
    for (i, s) in streams.iter().enumerate() {
        let evs: Vec<_> = (0..=i).map(|n| (common::meta(n, "t"), b"x".to_vec())).collect();
        common::produce(&mut con, &format!("events:{s}"), &evs).await;
    }
    for key in ["{events:fast}:retry:delays", "events:retry:delays"] {
        let _: i64 = redis::cmd("ZADD").arg(key).arg(1e10).arg("1-0").query_async(&mut con).await.unwrap();
    }
    let pool = RedisPool::new(Duration::from_secs(2));
    let (read, scheduled) = pool.read_backlog(&url, &streams, "orders").await.expect("the cluster answers");
    let backlog: Vec<(String, i64)> = read.iter().map(|s| (s.name.clone(), s.backlog)).collect();
    assert_eq!(
        backlog,
        [("events:critical".into(), 1), ("events:fast".into(), 2), ("events:slow".into(), 3)],
        "streams on different masters, one connection"
    );
    assert_eq!(scheduled, 2);
    assert_eq!(pool.len(), 1);
}
