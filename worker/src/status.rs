//! `eventworker status`: what the worker's streams look like now, from Redis (the backlog
//! definition the gauges and the operator use, consumers, scheduled retries, kept dead
//! letters) and, when a worker's admin server answers, its paused hosts.

use std::time::Duration;

use serde::Serialize;

use crate::config::{stream_key, Config};
use crate::streams::{self, Conn};
use crate::Result;

#[derive(Debug, Serialize)]
pub struct Status {
    pub group: String,
    pub redis: String,
    pub streams: Vec<StreamStatus>,
    /// Retries scheduled for later, over the streams' schedules.
    pub scheduled_retries: i64,
    /// Letters kept in `events:dlq` (refused by the dead-letter sink).
    pub dlq_stream_length: i64,
    /// Hosts a worker has paused, from its admin server (None when none answered).
    pub paused_hosts: Option<Vec<String>>,
    /// Where the paused hosts were asked for.
    pub admin_url: String,
}

#[derive(Debug, Serialize)]
pub struct StreamStatus {
    pub stream: String,
    pub length: i64,
    pub backlog: i64,
    pub undelivered: i64,
    pub pending: i64,
    pub oldest_age_seconds: f64,
    pub exact: bool,
    pub group_exists: bool,
    pub consumers: Vec<ConsumerStatus>,
}

#[derive(Debug, Serialize)]
pub struct ConsumerStatus {
    pub name: String,
    pub pending: i64,
    pub idle_seconds: f64,
}

pub async fn read(cfg: &Config, con: &mut Conn, admin_url: &str) -> Result<Status> {
    let now = backlog::now_unix_ms();
    let mut out = Vec::new();
    for name in &cfg.streams {
        let key = stream_key(name);
        let b = backlog::read(con, &key, &cfg.group).await?;
        let consumers = if b.group_exists {
            streams::consumers(con, &key, &cfg.group)
                .await?
                .into_iter()
                .map(|c| ConsumerStatus { name: c.name, pending: c.pending, idle_seconds: c.idle.as_secs_f64() })
                .collect()
        } else {
            vec![]
        };
        out.push(StreamStatus {
            length: b.length,
            backlog: b.total(),
            undelivered: b.undelivered,
            pending: b.pending,
            oldest_age_seconds: (b.oldest_age_secs(now) * 10.0).round() / 10.0,
            exact: b.exact,
            group_exists: b.group_exists,
            consumers,
            stream: key,
        });
    }
    let scheduled_retries = streams::scheduled_count(con, cfg.layout, &cfg.stream_keys_all()).await?;
    let dlq_stream_length = crate::dlq::stream::len(con).await?;
    Ok(Status {
        group: cfg.group.clone(),
        redis: cfg.redis_address(),
        streams: out,
        scheduled_retries,
        dlq_stream_length,
        paused_hosts: paused_hosts(admin_url).await,
        admin_url: admin_url.to_string(),
    })
}

/// `host_circuit_open{host="..."} 1` series of a worker's `/metrics`.
async fn paused_hosts(admin_url: &str) -> Option<Vec<String>> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().ok()?;
    let text =
        client.get(format!("{}/metrics", admin_url.trim_end_matches('/'))).send().await.ok()?.text().await.ok()?;
    Some(parse_paused(&text))
}

fn parse_paused(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("host_circuit_open{"))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once("} ")?;
            let host = labels.split(',').find_map(|kv| kv.strip_prefix("host=\""))?.trim_end_matches('"');
            (value.trim().parse::<f64>().ok()? > 0.0).then(|| host.to_string())
        })
        .collect()
}

fn age(secs: f64) -> String {
    match secs {
        s if s <= 0.0 => "-".into(),
        s if s < 120.0 => format!("{s:.1}s"),
        s if s < 7200.0 => format!("{:.1}m", s / 60.0),
        s if s < 172_800.0 => format!("{:.1}h", s / 3600.0),
        s => format!("{:.1}d", s / 86400.0),
    }
}

/// Print the status once, or every `watch` seconds until interrupted.
pub async fn run(cfg: &Config, json: bool, watch: Option<f64>, admin_url: &str) -> Result<()> {
    let addr = cfg.redis_address();
    let mut con =
        tokio::time::timeout(Duration::from_secs(10), streams::connect(&cfg.redis_url, Duration::from_secs(5)))
            .await
            .map_err(|_| crate::Error::Invalid(format!("redis at {addr} did not answer within 10 s")))?
            .map_err(|e| crate::Error::Invalid(format!("redis at {addr}: {}", crate::redact(&e.to_string()))))?;
    let every = match watch {
        Some(s) if !(0.1..=3600.0).contains(&s) => {
            return Err(crate::Error::Invalid(format!("--watch {s}: between 0.1 and 3600 seconds")))
        }
        other => other.map(Duration::from_secs_f64),
    };
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let s = read(cfg, &mut con, admin_url).await?;
        let text = if json { format!("{}\n", serde_json::to_string(&s).unwrap_or_default()) } else { render(&s) };
        let clear = if every.is_some() && terminal && !json { "\x1b[2J\x1b[H" } else { "" };
        if !crate::print_out(&format!("{clear}{text}")) {
            return Ok(()); // the reader went away (`| head`)
        }
        match every {
            None => return Ok(()),
            Some(d) => tokio::time::sleep(d).await,
        }
    }
}

/// The human table.
pub fn render(s: &Status) -> String {
    let mut out = format!("redis {}  group {}\n\n", s.redis, s.group);
    out.push_str(&format!(
        "{:<24} {:>9} {:>9} {:>11} {:>8} {:>8}  CONSUMERS\n",
        "STREAM", "LENGTH", "BACKLOG", "UNDELIVERED", "PENDING", "OLDEST"
    ));
    for st in &s.streams {
        let consumers = if !st.group_exists {
            "(no group yet)".to_string()
        } else if st.consumers.is_empty() {
            "-".to_string()
        } else {
            st.consumers
                .iter()
                .map(|c| format!("{} ({} pending, idle {})", c.name, c.pending, age(c.idle_seconds.max(0.05))))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let backlog = if st.exact { st.backlog.to_string() } else { format!("~{}", st.backlog) };
        out.push_str(&format!(
            "{:<24} {:>9} {:>9} {:>11} {:>8} {:>8}  {consumers}\n",
            st.stream,
            st.length,
            backlog,
            st.undelivered,
            st.pending,
            age(st.oldest_age_seconds)
        ));
    }
    out.push_str(&format!("\nscheduled retries: {}\n", s.scheduled_retries));
    out.push_str(&format!("dead letters kept in events:dlq: {}\n", s.dlq_stream_length));
    match &s.paused_hosts {
        None => out.push_str(&format!("paused hosts: unknown (no worker answered at {}; --admin-url)\n", s.admin_url)),
        Some(h) if h.is_empty() => out.push_str("paused hosts: none\n"),
        Some(h) => out.push_str(&format!("paused hosts: {}\n", h.join(", "))),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paused_hosts_come_from_the_circuit_gauge() {
        let m = "# HELP host_circuit_open x\nhost_circuit_open{host=\"http://a:80\"} 1\nhost_circuit_open{host=\"http://b:80\"} 0\n";
        assert_eq!(parse_paused(m), ["http://a:80"]);
        assert_eq!(
            (age(0.0), age(3.0), age(600.0), age(7200.0)),
            ("-".into(), "3.0s".into(), "10.0m".into(), "2.0h".into())
        );
    }
}
