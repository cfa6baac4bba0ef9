//! A real OTLP receiver for the tracing tests: Jaeger's all-in-one program (built from its
//! Go module by tests/tools/build.sh) on free ports, keeping traces in memory, read back
//! through its query API.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::free_port;

pub struct Jaeger {
    child: Child,
    otlp_port: u16,
    query_port: u16,
    dir: PathBuf,
}

/// One span as Jaeger's query API returns it.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub name: String,
    /// The span's CHILD_OF reference (its parent's span id), when it has one.
    pub parent: Option<String>,
    pub tags: Value,
}

impl Span {
    pub fn tag(&self, key: &str) -> Option<&Value> {
        self.tags.as_array()?.iter().find(|t| t["key"] == key).map(|t| &t["value"])
    }

    pub fn tag_str(&self, key: &str) -> Option<String> {
        self.tag(key).map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))
    }
}

/// The jaeger binary: `JAEGER_BIN`, else the one tests/tools/build.sh put in the cache.
/// None (the test says why and passes) when it was never built, unless `EW_REQUIRE_TOOLS`
/// is set (as `.ci/run` does): then its absence fails the test.
pub fn jaeger_bin() -> Option<PathBuf> {
    let path = std::env::var("JAEGER_BIN").map(PathBuf::from).unwrap_or_else(|_| {
        let cache = std::env::var("EVENTWORKER_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/eventworker"));
        cache.join("bin/jaeger")
    });
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os("EW_REQUIRE_TOOLS").is_some() {
        panic!("{} missing: tests/tools/build.sh jaeger builds it", path.display());
    }
    eprintln!("skipped: {} missing (tests/tools/build.sh jaeger builds it)", path.display());
    None
}

impl Jaeger {
    /// Starts Jaeger and waits until its query API answers; None when it is not built.
    pub async fn start() -> Option<Self> {
        let bin = jaeger_bin()?;
        let (otlp_port, query_port, grpc_port, health_port) = (free_port(), free_port(), free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("ew-jaeger-{otlp_port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            r#"service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 127.0.0.1:{health_port}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query_port}
    grpc:
      endpoint: 127.0.0.1:{grpc_port}
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp_port}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"#
        );
        let config_path = dir.join("config.yaml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.join("jaeger.log")).unwrap();
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config_path)
            .stdout(log.try_clone().unwrap())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start jaeger");
        let mut j = Self { child, otlp_port, query_port, dir };
        let up = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if j.get("/api/services").await.is_some() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        if up.is_err() || j.child.try_wait().ok().flatten().is_some() {
            panic!(
                "jaeger did not come up:\n{}",
                std::fs::read_to_string(j.dir.join("jaeger.log")).unwrap_or_default()
            );
        }
        Some(j)
    }

    /// The value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn otlp_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_port)
    }

    async fn get(&self, path: &str) -> Option<Value> {
        let url = format!("http://127.0.0.1:{}{path}", self.query_port);
        let resp = reqwest::Client::new().get(url).timeout(Duration::from_secs(5)).send().await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.json().await.ok()
    }

    /// Every span of `service` Jaeger holds.
    pub async fn spans(&self, service: &str) -> Vec<Span> {
        let Some(v) = self.get(&format!("/api/traces?service={service}&limit=10000&lookback=1h")).await else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for trace in v["data"].as_array().into_iter().flatten() {
            for s in trace["spans"].as_array().into_iter().flatten() {
                let parent = s["references"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|r| r["refType"] == "CHILD_OF")
                    .and_then(|r| r["spanID"].as_str())
                    .map(str::to_string);
                out.push(Span {
                    trace_id: s["traceID"].as_str().unwrap_or_default().to_string(),
                    span_id: s["spanID"].as_str().unwrap_or_default().to_string(),
                    name: s["operationName"].as_str().unwrap_or_default().to_string(),
                    parent,
                    tags: s["tags"].clone(),
                });
            }
        }
        out
    }

    /// Waits (30 s at most) until `service` has at least `n` spans that `keep` accepts,
    /// and returns them.
    pub async fn wait_spans(&self, service: &str, n: usize, keep: impl Fn(&Span) -> bool) -> Vec<Span> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let spans: Vec<Span> = self.spans(service).await.into_iter().filter(|s| keep(s)).collect();
            if spans.len() >= n {
                return spans;
            }
            if std::time::Instant::now() > deadline {
                panic!("timed out waiting for {n} spans of {service} in jaeger; found {spans:#?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
