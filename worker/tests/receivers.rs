//! The receivers' page (`docs/receivers.md`): its signature checks, in Python and Go, run
//! against a real request the worker signed, and the page shows them as they are.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn docs() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

/// Run a checker with the request's headers in its environment and `body` on stdin.
fn check(cmd: &mut Command, secret: &str, r: &Received, body: &[u8]) -> bool {
    let mut child = cmd
        .env("WEBHOOK_SECRET", secret)
        .env("WEBHOOK_ID", r.header("webhook-id").unwrap())
        .env("WEBHOOK_TIMESTAMP", r.header("webhook-timestamp").unwrap())
        .env("WEBHOOK_SIGNATURE", r.header("webhook-signature").unwrap())
        .stdin(Stdio::piped())
        .spawn()
        .expect("the checker's interpreter or compiler (python3, go) is installed");
    child.stdin.take().unwrap().write_all(body).unwrap();
    let status = child.wait().unwrap();
    assert!(matches!(status.code(), Some(0 | 1)), "the checker ran: {status}");
    status.success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_signature_checks_accept_the_workers_signature_and_nothing_else() {
    let page = std::fs::read_to_string(docs().join("receivers.md")).unwrap();
    for file in ["verify.py", "verify.go"] {
        let code = std::fs::read_to_string(docs().join("receivers").join(file)).unwrap();
        assert!(page.contains(&code), "docs/receivers.md shows docs/receivers/{file} as it is");
    }

    let redis = RedisServer::start();
    let sink = Sink::start_with(true).await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast"), ("WEBHOOK_SECRET", secret)]);
    w.wait_ready().await;
    let body = "{\"name\":\"Zoë\",\"bytes\":\"\u{1}\u{7f}\"}".as_bytes().to_vec();
    produce(&mut redis.con().await, "events:fast", &[(meta("sig-1", "user.created"), body.clone())]).await;
    wait_until("the signed request", T, || async { !sink.posts("/e").is_empty() }).await;
    let r = sink.posts("/e").remove(0);
    assert_eq!(&r.body[..], &body[..], "the body arrives byte for byte");
    assert_eq!(r.header("webhook-id"), Some("sig-1"));

    let python = || {
        let mut c = Command::new("python3");
        c.arg(docs().join("receivers/verify.py"));
        c
    };
    let go = || {
        let mut c = Command::new("go");
        c.arg("run").arg(docs().join("receivers/verify.go")).env("GOFLAGS", "-mod=mod").env("GO111MODULE", "auto");
        c
    };
    let mut tampered = body.clone();
    tampered[2] ^= 1;
    for (name, mut make) in [("python", Box::new(python) as Box<dyn FnMut() -> Command>), ("go", Box::new(go))] {
        assert!(check(&mut make(), secret, &r, &body), "{name}: the worker's signature is valid");
        assert!(!check(&mut make(), secret, &r, &tampered), "{name}: a changed body is refused");
        assert!(!check(&mut make(), "whsec_b3RoZXIgc2VjcmV0", &r, &body), "{name}: another secret is refused");
    }
}
