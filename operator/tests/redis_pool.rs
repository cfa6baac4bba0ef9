//! The operator's Redis pool against a real redis-server: a pooled connection survives a
//! Redis restart without a false "unreachable", and one connection serves many reads.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use eventworker_operator::redis_pool::RedisPool;

struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (.ci/run installs it)");
        let r = Self { child, port };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn a_pooled_connection_survives_a_redis_restart() {
    let mut redis = Redis::start(free_port());
    let pool = RedisPool::new(Duration::from_secs(2));
    let url = format!("redis://127.0.0.1:{}", redis.port);
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
    let _redis = Redis::start(port);
    // The pool still holds no connection or a dead one: either way the first read after
    // the restart answers.
    let (read, _) = pool.read_backlog(&url, &streams, "orders").await.expect("no false unreachable after a restart");
    assert_eq!(read[0].name, "events:fast");
}

#[tokio::test]
async fn a_dead_pooled_connection_is_replaced_within_the_same_read() {
    let mut redis = Redis::start(free_port());
    let pool = RedisPool::new(Duration::from_secs(2));
    let url = format!("redis://127.0.0.1:{}", redis.port);
    pool.read_backlog(&url, &["fast".into()], "g").await.unwrap();
    // Restart behind the pool's back: the pooled connection is dead, the server is back.
    let port = redis.port;
    redis.stop();
    let _redis = Redis::start(port);
    pool.read_backlog(&url, &["fast".into()], "g").await.expect("replaced at once, not reported unreachable");
}
