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
