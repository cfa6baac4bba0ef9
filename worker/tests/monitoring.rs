//! The shipped dashboard and alerts (monitoring/) read only series the worker really
//! exports: every metric name in their queries is in a running worker's `/metrics`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// Metric names in a PromQL expression: identifiers outside strings, `{matchers}`,
/// `[ranges]` and the label lists of `by (...)` and the like, that are neither functions
/// nor keywords.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 21] = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan", // operators and literals
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "limitk",
        "limit_ratio", // aggregations, which may take `by (...)` first
    ];
    const LISTS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
    let mut cleaned = vec![];
    let (mut depth, mut quote) = (0, None::<char>);
    for c in expr.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '{' | '[') => depth += 1,
            (None, '}' | ']') => depth -= 1,
            (None, c) if depth == 0 => cleaned.push(c),
            _ => {}
        }
    }
    let ident = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < cleaned.len() {
        let c = cleaned[i];
        if c.is_ascii_digit() || c == '.' {
            while i < cleaned.len() && (ident(cleaned[i]) || cleaned[i] == '.') {
                i += 1;
            }
        } else if ident(c) {
            let start = i;
            while i < cleaned.len() && ident(cleaned[i]) {
                i += 1;
            }
            let tok: String = cleaned[start..i].iter().collect();
            let mut j = i;
            while j < cleaned.len() && cleaned[j].is_whitespace() {
                j += 1;
            }
            let call = cleaned.get(j) == Some(&'(');
            if LISTS.contains(&tok.as_str()) && call {
                // Skip the label list.
                while i < cleaned.len() && cleaned[i] != ')' {
                    i += 1;
                }
            } else if !call && !KEYWORDS.contains(&tok.to_lowercase().as_str()) && !LISTS.contains(&tok.as_str()) {
                names.insert(tok);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every `expr` of the shipped dashboard and rules files.
fn shipped_exprs() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("monitoring/grafana-dashboard.json")).unwrap())
            .unwrap();
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string()))
        .collect();
    let rules = std::fs::read_to_string(root.join("monitoring/prometheus-rules.yaml")).unwrap();
    exprs.extend(rules.lines().filter_map(|l| l.trim().strip_prefix("expr: ")).map(str::to_string));
    exprs
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(event_age_seconds_bucket{namespace="x",service=~"$a"}[$__rate_interval]))) > 3 and max by (stream) (stream_backlog) > 0"#,
    );
    assert_eq!(names, BTreeSet::from(["event_age_seconds_bucket".to_string(), "stream_backlog".to_string()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alerts_use_only_exported_series() {
    let mut redis = RedisServer::start();
    let sink = Sink::start().await;
    // Every outcome once, so that every labelled series exists: delivered, dead-lettered
    // (404), scheduled (429), and a Redis error (a restart below).
    sink.respond(|r, _| match r.path.as_str() {
        "/gone" => Reply::status(404),
        "/later" => Reply::status(429).header("retry-after", "600"),
        _ => Reply::ok(),
    });
    let w = Worker::start(&redis, &sink.url("/e"), &[("STREAMS", "fast")]);
    w.wait_ready().await;
    let mut con = redis.con().await;
    let with_url = |id: &str, path: &str| {
        let mut m = meta(id, "t");
        m["url"] = json!(sink.url(path));
        (m, b"x".to_vec())
    };
    produce(&mut con, "events:fast", &[with_url("ok", "/e"), with_url("gone", "/gone"), with_url("later", "/later")])
        .await;
    wait_until("three answers", T, || async { sink.received().len() >= 3 }).await;
    wait_until("outcomes counted", T, || async {
        w.metric_sum("events_dead_lettered_total").await >= 1.0
            && w.metric_sum("events_retry_scheduled_total").await >= 1.0
    })
    .await;
    redis.restart();
    wait_until("a Redis error counted", T, || async { w.metric_sum("redis_errors_total").await >= 1.0 }).await;

    let (_, text) = w.get("/metrics").await;
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    let mut missing = vec![];
    for expr in shipped_exprs() {
        for name in metric_names(&expr) {
            // The operator's own series are checked against its registry (operator crate).
            if !name.starts_with("eventworker_operator_") && !exported.contains(&name) {
                missing.push(format!("{name} (in {expr})"));
            }
        }
    }
    assert!(missing.is_empty(), "not exported by the worker: {missing:#?}\nexported: {exported:?}");
}
