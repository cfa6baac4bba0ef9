//! The compose quick start (`compose.yaml`) cannot run here (no Docker), so it is kept in
//! step with the demo it mirrors: the worker's settings are the demo's, its receiver is the
//! documented example receiver, and that receiver answers as the demo's sink does.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `KEY: "value"` lines of the compose file's `worker` service environment.
fn worker_env(compose: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut in_worker = false;
    let mut in_env = false;
    for line in compose.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() {
            in_worker = false;
        }
        if line.starts_with("  ") && !line.starts_with("   ") {
            in_worker = line.trim() == "worker:";
            in_env = false;
            continue;
        }
        if in_worker && line.trim() == "environment:" {
            in_env = true;
            continue;
        }
        if in_worker && in_env && line.starts_with("      ") {
            if let Some((k, v)) = line.trim().split_once(": ") {
                out.push((k.to_string(), v.trim_matches('"').to_string()));
            }
        }
    }
    out
}

#[test]
fn compose_runs_the_worker_with_the_demos_settings() {
    let compose = std::fs::read_to_string(repo().join("compose.yaml")).unwrap();
    let env = worker_env(&compose);
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    for (k, v) in DEMO_SETTINGS {
        assert_eq!(get(k).as_deref(), Some(*v), "compose.yaml's worker sets {k} as the demo does");
    }
    assert_eq!(get("DEFAULT_WORKER_URI"), Some(format!("http://receiver:8000{DEMO_EVENTS_PATH}")));
    assert_eq!(get("DLQ_URI"), Some(format!("http://receiver:8000{DEMO_DLQ_PATH}")));
    assert_eq!(get("REDIS_URL").as_deref(), Some("redis://redis:6379"));
    assert!(compose.contains("example_receiver.py") && compose.contains("dockerfile: worker/Dockerfile"));
}

struct Receiver(Child);

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The example receiver compose runs, run here with python3 against the worker binary with
/// the demo's settings: the demo's outcomes (delivered, a scheduled retry, a dead letter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_receiver_answers_like_the_demos_sink() {
    let port = free_port();
    let _receiver = Receiver(
        Command::new("python3")
            .arg("-u")
            .arg("example_receiver.py")
            .current_dir(repo().join("docs/receivers"))
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("python3"),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_until("the receiver listens", T, || async { std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() }).await;
    let redis = RedisServer::start();
    let dlq = format!("{base}{DEMO_DLQ_PATH}");
    let mut settings: Vec<(&str, &str)> = DEMO_SETTINGS.to_vec();
    settings.push(("DLQ_URI", &dlq));
    let w = Worker::start(&redis, &format!("{base}{DEMO_EVENTS_PATH}"), &settings);
    w.wait_ready().await;
    let evs = [("1", "user.created"), ("2", "invoice.sent"), ("3", "legacy.ping")];
    let evs: Vec<_> = evs.iter().map(|(id, t)| (meta(id, t), b"{}".to_vec())).collect();
    produce(&mut redis.con().await, "events:default", &evs).await;
    wait_until("two delivered (one after its scheduled retry), one dead-lettered", T, || async {
        w.metric_sum("events_processed_total").await == 2.0 && w.metric_sum("events_dead_lettered_total").await == 1.0
    })
    .await;
    // invoice.sent failed once (400 + X-Retry-After), legacy.ping once (410).
    assert_eq!(w.metric_sum("events_failed_total").await, 2.0);
}
