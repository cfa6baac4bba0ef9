//! Real parts for the tests, the benchmark and the demo: a redis-server on a free port, an
//! HTTP sink that records what it receives, the worker binary as a child process.
#![allow(dead_code)]

pub mod cluster;
pub mod db;
pub mod jaeger;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use redis::aio::MultiplexedConnection;

/// A port nobody listens on, for a server a test starts. Picked below the kernel's
/// ephemeral range (32768 and up), where the many outgoing connections of a load test take
/// their ports, and never handed out twice by this process: port 0 would give each caller
/// a port that is free *now*, which a parallel test or an outgoing connection can take
/// before the server binds it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static USED: Mutex<Option<std::collections::HashSet<u16>>> = Mutex::new(None);
    static STATE: AtomicU64 = AtomicU64::new(0);
    if STATE.load(Relaxed) == 0 {
        let seed = unix_now().to_bits() ^ ((std::process::id() as u64) << 32) | 1;
        let _ = STATE.compare_exchange(0, seed, Relaxed, Relaxed);
    }
    loop {
        // xorshift64: no dependency, good enough to spread the picks.
        let mut x = STATE.load(Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        STATE.store(x, Relaxed);
        let port = 12_000 + (x % 20_000) as u16;
        let mut used = USED.lock().unwrap();
        let used = used.get_or_insert_with(Default::default);
        if used.contains(&port) {
            continue;
        }
        // Free on every address (a server may bind 0.0.0.0).
        if TcpListener::bind(("0.0.0.0", port)).is_ok() && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            used.insert(port);
            return port;
        }
    }
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Wait for `cond` with a deadline; panics with `what` when it never holds.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A redis-server of our own, with an append-only file fsynced on every write so that a
/// restart keeps everything.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    durable: bool,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(true)
    }

    /// `durable: false` keeps everything in memory (for the benchmark and the demo).
    pub fn start_with(durable: bool) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("ew-redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut s = Self { port, dir, durable, child: None };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let aof = if self.durable {
            ["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            ["--appendonly", "no", "--appendfsync", "no"]
        };
        // Loopback only, unless a suite needs it reachable from a kind cluster.
        let bind = std::env::var("EW_REDIS_BIND").unwrap_or_else(|_| "127.0.0.1".into());
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", &bind, "--protected-mode", "no", "--save", ""])
            .args(aof)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(c) = redis::Client::open(self.url()) {
                if let Ok(mut con) = c.get_connection() {
                    if redis::cmd("PING").query::<String>(&mut con).is_ok() {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start on port {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn con(&self) -> MultiplexedConnection {
        redis::Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.expect("redis connection")
    }

    /// Stop it (SIGTERM: it finishes the append-only file) and wait until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One request as the sink received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Bytes,
    /// Unix seconds.
    pub at: f64,
    /// The status the sink answered.
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// What the sink answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub delay: Option<Duration>,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self { status, headers: vec![], delay: None }
    }
    pub fn ok() -> Self {
        Self::status(200)
    }
    pub fn header(mut self, k: &'static str, v: impl Into<String>) -> Self {
        self.headers.push((k, v.into()));
        self
    }
    pub fn after(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }
}

type Behaviour = Arc<dyn Fn(&Received, usize) -> Reply + Send + Sync>;

#[derive(Clone)]
struct SinkState {
    log: Arc<Mutex<Vec<Received>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    record_bodies: bool,
    /// Like an application whose connection pool holds this many: beyond it, requests are
    /// answered `500 Too many connections` at once.
    pool: Arc<Mutex<Option<usize>>>,
    /// Requests seen per (method, path), so a reply can depend on it without a scan.
    seen: Arc<Mutex<HashMap<(Method, String), usize>>>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    peak: Arc<std::sync::atomic::AtomicUsize>,
}

/// A real HTTP server on 127.0.0.1 that records every request. The behaviour gets the
/// request and how many requests with the same method and path came before it.
pub struct Sink {
    pub port: u16,
    state: SinkState,
    task: tokio::task::JoinHandle<()>,
    stop: tokio_util::sync::CancellationToken,
}

impl Sink {
    pub async fn start() -> Self {
        Self::start_with(true).await
    }

    pub async fn start_with(record_bodies: bool) -> Self {
        let state = SinkState {
            log: Arc::new(Mutex::new(Vec::new())),
            behaviour: Arc::new(Mutex::new(Arc::new(|_: &Received, _| Reply::ok()))),
            record_bodies,
            pool: Arc::default(),
            seen: Arc::default(),
            in_flight: Arc::default(),
            peak: Arc::default(),
        };
        // EW_SINK_BIND: where pods of a real test node can reach it (its own network namespace).
        let bind = std::env::var("EW_SINK_BIND").unwrap_or_else(|_| "127.0.0.1".into());
        let listener = tokio::net::TcpListener::bind((bind.as_str(), 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = tokio_util::sync::CancellationToken::new();
        let task = Self::serve(listener, state.clone(), stop.clone());
        Self { port, state, task, stop }
    }

    fn serve(
        listener: tokio::net::TcpListener,
        state: SinkState,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let app = axum::Router::new().fallback(handle).with_state(state);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        })
    }

    /// Restart like an application does: answer what is in progress, close every
    /// connection, refuse connections for `down`, then listen on the same port again.
    pub async fn restart(&mut self, down: Duration) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.task).await;
        tokio::time::sleep(down).await;
        let bind = std::env::var("EW_SINK_BIND").unwrap_or_else(|_| "127.0.0.1".into());
        let listener = tokio::net::TcpListener::bind((bind.as_str(), self.port)).await.unwrap();
        self.stop = tokio_util::sync::CancellationToken::new();
        self.task = Self::serve(listener, self.state.clone(), self.stop.clone());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn respond(&self, f: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static) {
        *self.state.behaviour.lock().unwrap() = Arc::new(f);
    }

    /// Behave like an application with a pool of `n` connections (see [`SinkState::pool`]).
    pub fn pool(&self, n: usize) {
        *self.state.pool.lock().unwrap() = Some(n);
    }

    /// Most requests the sink had in progress at once.
    pub fn peak_concurrency(&self) -> usize {
        self.state.peak.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Requests answered with `status`.
    pub fn answered(&self, status: u16) -> usize {
        self.state.log.lock().unwrap().iter().filter(|r| r.status == status).count()
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn posts(&self, path_prefix: &str) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.method == Method::POST && r.path.starts_with(path_prefix)).collect()
    }

    /// Unique X-Event-Id values of POSTs under `path_prefix` that were answered 2xx.
    pub fn delivered_ids(&self, path_prefix: &str) -> std::collections::HashSet<String> {
        let log = self.state.log.lock().unwrap();
        log.iter()
            .filter(|r| r.method == Method::POST && r.path.starts_with(path_prefix) && (200..300).contains(&r.status))
            .filter_map(|r| r.header("x-event-id").map(str::to_string))
            .collect()
    }

    pub fn count(&self, method: Method, path_prefix: &str) -> usize {
        self.state.log.lock().unwrap().iter().filter(|r| r.method == method && r.path.starts_with(path_prefix)).count()
    }
}

struct Counted(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn handle(State(s): State<SinkState>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    use std::sync::atomic::Ordering::SeqCst;
    let now_in = s.in_flight.fetch_add(1, SeqCst) + 1;
    let _counted = Counted(s.in_flight.clone());
    s.peak.fetch_max(now_in, SeqCst);
    let over_pool = s.pool.lock().unwrap().is_some_and(|p| now_in > p);
    let req = Received {
        method,
        path: uri.path().to_string(),
        headers: headers.iter().map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())).collect(),
        body: if s.record_bodies { body } else { Bytes::new() },
        at: unix_now(),
        status: 0,
    };
    let behaviour = s.behaviour.lock().unwrap().clone();
    let reply = {
        let mut log = s.log.lock().unwrap();
        let seen = {
            let mut counts = s.seen.lock().unwrap();
            let n = counts.entry((req.method.clone(), req.path.clone())).or_insert(0);
            *n += 1;
            *n - 1
        };
        let reply = if over_pool { Reply::status(500) } else { behaviour(&req, seen) };
        log.push(Received { status: reply.status, ..req });
        reply
    };
    if let Some(d) = reply.delay {
        tokio::time::sleep(d).await;
    }
    let mut resp = StatusCode::from_u16(reply.status).unwrap().into_response();
    for (k, v) in reply.headers {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    resp
}

/// The demo's worker settings (`worker/examples/demo.rs`), which the compose quick start
/// (`compose.yaml`) repeats: the two are compared by `worker/tests/quickstart.rs`. The
/// receiver's paths: events at [`DEMO_EVENTS_PATH`], dead letters at [`DEMO_DLQ_PATH`].
pub const DEMO_SETTINGS: &[(&str, &str)] = &[("STREAMS", "critical,fast,default,slow"), ("RUST_LOG", "info")];
pub const DEMO_EVENTS_PATH: &str = "/events/[EVENT_TYPE]";
pub const DEMO_DLQ_PATH: &str = "/dlq";

/// The worker binary, run as users run it: configured through its environment.
pub struct Worker {
    pub child: Child,
    pub metrics_port: u16,
    stdout_path: PathBuf,
}

/// `eventworker <args>` as a user runs it, with only `env` set (and `RUST_LOG=warn`):
/// whether it succeeded, its stdout and its stderr.
pub fn run_cli(env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let out = Command::new(worker_bin())
        .env_clear()
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `XGROUP CREATE <key> <group> 0 MKSTREAM`.
pub async fn create_group(con: &mut MultiplexedConnection, key: &str, group: &str) {
    let _: () =
        redis::cmd("XGROUP").arg("CREATE").arg(key).arg(group).arg("0").arg("MKSTREAM").query_async(con).await.unwrap();
}

/// The worker binary: `EVENTWORKER_BIN` when set, else Cargo's for tests and benchmarks,
/// or the `eventworker` built next to the example.
pub fn worker_bin() -> PathBuf {
    // An explicit choice wins (e.g. to benchmark another build).
    if let Ok(p) = std::env::var("EVENTWORKER_BIN") {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_eventworker") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("own path");
    exe.parent().and_then(|d| d.parent()).map(|d| d.join("eventworker")).expect("target directory")
}

impl Worker {
    /// Start with the given environment on top of defaults for this test.
    pub fn start(redis: &RedisServer, sink_uri: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn(&redis.url(), sink_uri, env, Stdio::inherit())
    }

    /// Like [`Worker::start`], against the Redis at `redis_url` (a cluster's, say).
    pub fn start_at(redis_url: &str, sink_uri: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn(redis_url, sink_uri, env, Stdio::inherit())
    }

    /// Like [`Worker::start`], with the log (stderr) written to `log`.
    pub fn start_logging(redis: &RedisServer, sink_uri: &str, env: &[(&str, &str)], log: &std::path::Path) -> Self {
        Self::spawn(&redis.url(), sink_uri, env, Stdio::from(std::fs::File::create(log).expect("log file")))
    }

    fn spawn(redis_url: &str, sink_uri: &str, env: &[(&str, &str)], stderr: Stdio) -> Self {
        let metrics_port = free_port();
        let stdout_path = std::env::temp_dir().join(format!("ew-worker-{metrics_port}.out"));
        let stdout = std::fs::File::create(&stdout_path).unwrap();
        let mut cmd = Command::new(worker_bin());
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("REDIS_URL", redis_url)
            .env("METRICS_PORT", metrics_port.to_string())
            .env("DEFAULT_WORKER_URI", sink_uri)
            .env("CONSUMER_NAME", "test")
            .env("RUST_LOG", std::env::var("EW_TEST_LOG").unwrap_or_else(|_| "warn".into()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.stdout(stdout).stderr(stderr).spawn().expect("start eventworker");
        Self { child, metrics_port, stdout_path }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
    }

    /// Wait for the process to exit; its exit status or None on timeout.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the worker printed on stdout (the console dead-letter lines).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:{}{}", self.metrics_port, path);
        match reqwest::Client::new().get(url).timeout(Duration::from_secs(5)).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    pub async fn wait_ready(&self) {
        wait_until("worker /readyz answers 200", Duration::from_secs(20), || async {
            self.get("/readyz").await.0 == 200
        })
        .await;
    }

    /// Sum of every series of one metric (all label values).
    pub async fn metric_sum(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .fold(0.0, |a, b| a + b)
    }

    /// Value of one sample of `/metrics`, 0 when absent. `series` is the full name with labels.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stdout_path);
    }
}

/// Append events as producers do: `meta` JSON, `payload`, optional extra fields. Pipelined.
pub async fn produce<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream_key: &str,
    events: &[(serde_json::Value, Vec<u8>)],
) {
    for chunk in events.chunks(1000) {
        let mut p = redis::pipe();
        for (meta, payload) in chunk {
            p.cmd("XADD")
                .arg(stream_key)
                .arg("*")
                .arg("meta")
                .arg(meta.to_string())
                .arg("payload")
                .arg(payload.as_slice())
                .ignore();
        }
        let _: () = p.query_async(con).await.expect("XADD");
    }
}

pub fn meta(id: impl std::fmt::Display, event_type: &str) -> serde_json::Value {
    serde_json::json!({"id": id.to_string(), "type": event_type, "createdAt": iso_now()})
}

pub fn iso_now() -> String {
    let now = unix_now();
    let secs = now.floor() as i64;
    let micros = ((now - secs as f64) * 1e6) as i64;
    // Naive UTC timestamp with microseconds, as the PHP producers send.
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub async fn xlen<C: redis::aio::ConnectionLike>(con: &mut C, key: &str) -> i64 {
    redis::cmd("XLEN").arg(key).query_async(con).await.unwrap_or(-1)
}

/// Pending count of the group on `key` (0 when the group does not exist).
pub async fn pending<C: redis::aio::ConnectionLike>(con: &mut C, key: &str, group: &str) -> i64 {
    let v: redis::RedisResult<redis::Value> = redis::cmd("XPENDING").arg(key).arg(group).query_async(con).await;
    match v {
        Ok(redis::Value::Array(items)) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

/// Scheduled retries: ids in `events:retry:delays` with their due times (unix seconds).
pub async fn scheduled(con: &mut MultiplexedConnection) -> Vec<(String, f64)> {
    redis::cmd("ZRANGE").arg("events:retry:delays").arg(0).arg(-1).arg("WITHSCORES").query_async(con).await.unwrap()
}

/// Ids (X-Event-Id) the sink received on POSTs under `path_prefix`, with their counts.
pub fn id_counts(received: &[Received]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in received {
        if let Some(id) = r.header("x-event-id") {
            *m.entry(id.to_string()).or_insert(0) += 1;
        }
    }
    m
}
