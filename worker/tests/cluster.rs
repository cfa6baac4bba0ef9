//! Redis Cluster: the worker's connection against a real cluster (three masters, one
//! replica each) — commands routed by slot, scripts loaded where their key lives, and a
//! master killed under it.

mod common;

use std::time::{Duration, Instant};

use common::cluster::RedisCluster;
use eventworker::streams::{self, Conn, Scripts};

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
