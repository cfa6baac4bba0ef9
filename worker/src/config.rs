//! Configuration: every setting is an environment variable (the original worker's names
//! and defaults) and a command-line flag.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::error::{Error, Result};

/// How events of one stream may overtake each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Ordering {
    /// Events with the same ordering key are delivered in order, the rest concurrently.
    Key,
    /// Strict order per stream: one event at a time (the original worker's behaviour).
    Stream,
    /// Fully concurrent.
    None,
}

/// How a host's concurrency limit is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostConcurrency {
    /// Found by measuring: grows while latency holds, cut on push-back.
    Adaptive,
    /// Always the cap.
    Fixed,
}

/// How the SQL table `DLQ_DB_TABLE` is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum DbMode {
    /// An outbox table when it has a `dlq` column, else a dead-letter table.
    #[default]
    Auto,
    /// A table of dead letters (created when missing).
    Deadletter,
    /// The application's event table (the original's outbox): delivered rows are deleted,
    /// dead letters marked `dlq = 1`. Never created or altered.
    Outbox,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// eventworker: delivers events from Redis Streams to HTTP endpoints.
#[derive(Debug, Clone, Parser)]
#[command(name = "eventworker", version, about, long_about = None)]
pub struct Args {
    /// Redis URL (redis:// or rediss:// for TLS; redis+cluster://host:port,host:port for a Redis
    /// Cluster's seed nodes); overrides REDIS_HOST / REDIS_PORT / REDIS_HOST_PORT.
    #[arg(long, global = true, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Redis host.
    #[arg(long, global = true, env = "REDIS_HOST", default_value = "localhost")]
    pub redis_host: String,
    /// Redis port.
    #[arg(long, global = true, env = "REDIS_PORT", default_value_t = 6379)]
    pub redis_port: u16,
    /// Redis address as host:port (alternative to REDIS_HOST and REDIS_PORT).
    #[arg(long, global = true, env = "REDIS_HOST_PORT")]
    pub redis_host_port: Option<String>,
    /// Redis password.
    #[arg(long, global = true, env = "REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    /// Redis Cluster: the Redis address is a seed node of a cluster (as a redis+cluster:// URL).
    #[arg(long, global = true, env = "REDIS_CLUSTER", default_value_t = false, action = clap::ArgAction::Set)]
    pub redis_cluster: bool,

    /// Consumer group shared by all workers.
    #[arg(long, global = true, env = "GROUP", default_value = "workers")]
    pub group: String,
    /// Prefix of consumer names: <prefix>-<stream>-<pod or host name>.
    #[arg(long, env = "CONSUMER_PREFIX", default_value = "worker")]
    pub consumer_prefix: String,
    /// Name of this worker instance in consumer names (defaults to POD_NAME, then HOSTNAME).
    #[arg(long, env = "CONSUMER_NAME")]
    pub consumer_name: Option<String>,
    /// Comma-separated stream names; each is read from key events:<name>, in this priority order.
    #[arg(long, global = true, env = "STREAMS", default_value = "critical,fast,default,slow")]
    pub streams: String,

    /// Target for events without meta.url; [EVENT_TYPE] is replaced by the event type.
    #[arg(long, env = "DEFAULT_WORKER_URI", default_value = "http://localhost:8000/events/[EVENT_TYPE]")]
    pub default_worker_uri: String,
    /// HTTP connect timeout in seconds.
    #[arg(long, env = "CONNECT_TIMEOUT", default_value_t = 2.0)]
    pub connect_timeout: f64,
    /// HTTP read timeout in seconds (an event's own `timeout` field overrides it).
    #[arg(long, env = "READ_TIMEOUT", default_value_t = 60.0)]
    pub read_timeout: f64,
    /// Standard Webhooks signing secret (whsec_<base64> or raw); when set, requests are signed.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// Port of the admin server (/metrics, /health, /healthz, /readyz).
    #[arg(long, env = "METRICS_PORT", default_value_t = 9000)]
    pub metrics_port: u16,

    /// Dead-letter HTTP endpoint: failed events are POSTed there as JSON.
    #[arg(long, global = true, env = "DLQ_URI")]
    pub dlq_uri: Option<String>,
    /// Dead-letter database URL (postgresql://, mysql://, sqlite://; +driver suffixes accepted).
    #[arg(long, global = true, env = "DLQ_DB_CONNECTION", hide_env_values = true)]
    pub dlq_db_connection: Option<String>,
    /// Dead-letter table.
    #[arg(long, global = true, env = "DLQ_DB_TABLE", default_value = "dlq")]
    pub dlq_db_table: String,
    /// Source table whose row (event_id = id) is deleted after dead-lettering.
    #[arg(long, global = true, env = "EVENT_DB_TABLE")]
    pub event_db_table: Option<String>,
    /// How DLQ_DB_TABLE is used: auto (an outbox table when it has a dlq column), deadletter, outbox.
    #[arg(long, global = true, env = "DLQ_DB_MODE", value_enum, default_value = "auto")]
    pub dlq_db_mode: DbMode,
    /// Outbox table: rows neither delivered nor dead-lettered this many seconds after
    /// created_at count as undelivered (metric outbox_undelivered_rows).
    #[arg(long, env = "OUTBOX_AUDIT_AFTER", default_value_t = 600.0)]
    pub outbox_audit_after: f64,
    /// Hosts (name, *.suffix, IP or CIDR) that per-event meta.url may target besides the
    /// default target's host, comma-separated; "*" allows any. Secrets (TARGET_HEADERS,
    /// signatures) go only to the default target's host and these.
    #[arg(long, env = "TARGET_ALLOWLIST", default_value = "*")]
    pub target_allowlist: String,
    /// Addresses never delivered to (IPs or CIDRs, comma-separated), checked after name
    /// resolution. Default: link-local and the cloud metadata addresses.
    #[arg(
        long,
        env = "TARGET_DENYLIST",
        default_value = "169.254.0.0/16,fe80::/10,100.100.100.200/32,fd00:ec2::254/128"
    )]
    pub target_denylist: String,
    /// Consumers of the group idle longer than this (seconds) with nothing pending are
    /// removed by the live workers; 0 never.
    #[arg(long, env = "CONSUMER_IDLE_TIMEOUT", default_value_t = 86400.0)]
    pub consumer_idle_timeout: f64,

    /// Attempts before an event is dead-lettered with its last failure reason.
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// Ordering: key (same ordering key in order), stream (strict), none.
    #[arg(long, env = "ORDERING", value_enum, default_value = "key")]
    pub ordering: Ordering,
    /// meta field that holds the ordering key.
    #[arg(long, env = "ORDERING_KEY_FIELD", default_value = "orderingKey")]
    pub ordering_key_field: String,
    /// Most events in flight per stream (read but not yet finished).
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 64)]
    pub max_in_flight: usize,
    /// Per-stream MAX_IN_FLIGHT overrides: name=N,name=N.
    #[arg(long, env = "STREAM_MAX_IN_FLIGHT")]
    pub stream_max_in_flight: Option<String>,
    /// Per-stream ORDERING overrides: name=key|stream|none,...
    #[arg(long, env = "STREAM_ORDERING")]
    pub stream_ordering: Option<String>,
    /// Extra headers on every delivery, as a JSON object of strings.
    #[arg(long, env = "TARGET_HEADERS")]
    pub target_headers: Option<String>,
    /// Extra headers whose values come from other environment variables (Secrets on
    /// Kubernetes): `Header-Name=ENV_VAR,...`. They join TARGET_HEADERS (and win over it).
    #[arg(long, env = "TARGET_HEADERS_FROM_ENV")]
    pub target_headers_from_env: Option<String>,
    /// Seconds an entry may sit idle in another consumer's pending list before it is taken over.
    #[arg(long, env = "CLAIM_IDLE", default_value_t = 60.0)]
    pub claim_idle: f64,
    /// Delete delivered entries from the stream (XDEL after XACK), as the original did.
    #[arg(long, env = "DELETE_ON_ACK", default_value_t = true, action = clap::ArgAction::Set)]
    pub delete_on_ack: bool,
    /// Seconds an attempt counter (err_count:<stream>:<id>) lives after its last failure.
    #[arg(long, env = "ATTEMPT_TTL", default_value_t = 604800)]
    pub attempt_ttl: u64,
    /// Seconds in-flight deliveries get to finish after SIGTERM.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value_t = 25.0)]
    pub shutdown_grace: f64,
    /// Delay used when a 429 carries no Retry-After, in seconds (doubles per attempt, capped at 1h).
    #[arg(long, env = "RETRY_BACKOFF", default_value_t = 5.0)]
    pub retry_backoff: f64,

    /// Most requests at once to one target host (scheme, host, port), per worker process.
    #[arg(long, env = "HOST_MAX_CONCURRENCY", default_value_t = 32)]
    pub host_max_concurrency: usize,
    /// Requests at once a host starts with; the adaptive limit grows from there.
    #[arg(long, env = "HOST_INITIAL_CONCURRENCY", default_value_t = 4)]
    pub host_initial_concurrency: usize,
    /// Per-host concurrency: adaptive (grow while latency holds, cut on 429/5xx/timeouts)
    /// or fixed (always HOST_MAX_CONCURRENCY).
    #[arg(long, env = "HOST_CONCURRENCY", value_enum, default_value = "adaptive")]
    pub host_concurrency: HostConcurrency,
    /// Most requests per second to one target host (0: no rate limit).
    #[arg(long, env = "HOST_RATE_LIMIT", default_value_t = 0.0)]
    pub host_rate_limit: f64,
    /// Most events waiting for a slot at one host; beyond, events are deferred to the
    /// retry schedule (no attempt counted).
    #[arg(long, env = "HOST_QUEUE", default_value_t = 4096)]
    pub host_queue: usize,
    /// Per-host overrides as JSON: {"https://api.example.com": {"maxConcurrency": 8,
    /// "rateLimit": 50, "concurrency": "fixed"}}.
    #[arg(long, env = "HOST_OVERRIDES")]
    pub host_overrides: Option<String>,
    /// Admission priority per stream, name=N (lower first); default: the order of STREAMS.
    #[arg(long, env = "STREAM_PRIORITY")]
    pub stream_priority: Option<String>,
    /// First delay after a 502/503/504, timeout or connect error, in seconds; doubles per
    /// failed attempt, with jitter.
    #[arg(long, env = "BACKOFF_BASE", default_value_t = 1.0)]
    pub backoff_base: f64,
    /// Longest such delay, in seconds.
    #[arg(long, env = "BACKOFF_MAX", default_value_t = 60.0)]
    pub backoff_max: f64,
    /// Age (from meta.createdAt, else first failure) after which an event that cannot be
    /// delivered is dead-lettered with reason max_age, in seconds.
    #[arg(long, env = "MAX_EVENT_AGE", default_value_t = 86400.0)]
    pub max_event_age: f64,
    /// Lifetime of an ordered stream's lease in seconds: how soon another replica takes
    /// over the stream when its deliverer dies without releasing it.
    #[arg(long, env = "ORDERING_LEASE", default_value_t = 15.0)]
    pub ordering_lease: f64,

    /// Runtime threads (default: one per CPU core).
    #[arg(long, env = "WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Token for the admin server's dead-letter endpoints (Authorization: Bearer <token>);
    /// when unset those endpoints are disabled.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    #[command(subcommand)]
    pub command: Option<Command>,

    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// OTLP/HTTP collector to export traces to (e.g. http://otel-collector:4318); no traces
    /// without it. The other standard OTEL_* variables apply (see the README).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_exporter_otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Inspect, replay and delete dead letters (the SQL store and events:dlq).
    Dlq {
        #[command(subcommand)]
        action: Box<DlqAction>,
    },
    /// Per stream: length, backlog, pending, oldest age, consumers; scheduled retries, kept
    /// dead letters and paused hosts.
    Status {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh every this many seconds until interrupted.
        #[arg(long, num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
        /// A worker's admin server, asked for its paused hosts (default: this machine's
        /// METRICS_PORT).
        #[arg(long)]
        admin_url: Option<String>,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum DlqAction {
    /// List the dead letters that match the filters.
    List {
        #[command(flatten)]
        filter: crate::dlq::redrive::Filter,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Outbox table: list rows neither delivered (deleted) nor dead-lettered instead,
        /// events that never reached the stream or are stuck.
        #[arg(long)]
        undelivered: bool,
        /// With --undelivered: only rows created longer ago than this (e.g. 90s, 10m, 2h, 1d).
        #[arg(long, value_parser = parse_age, default_value = "10m")]
        older_than: Duration,
    },
    /// Move the matching dead letters back into a stream, each row once.
    Replay {
        #[command(flatten)]
        filter: crate::dlq::redrive::Filter,
        /// Show what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Target stream (name or events:<name>); default: the stream each event came from.
        #[arg(long)]
        stream: Option<String>,
        /// Most rows replayed per second.
        #[arg(long)]
        rate: Option<f64>,
        /// Replay every dead letter (needed when no filter is given).
        #[arg(long)]
        all: bool,
    },
    /// Show dead letters in full: payload, meta, reason, attempts, where each is kept.
    Show {
        /// Dead-letter id(s).
        #[arg(required = true)]
        ids: Vec<String>,
        /// One JSON object per letter.
        #[arg(long)]
        json: bool,
    },
    /// Delete the matching dead letters for good (letters that must never be replayed).
    Delete {
        #[command(flatten)]
        filter: crate::dlq::redrive::Filter,
        /// Show what would be deleted; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Delete every dead letter (needed when no filter is given).
        #[arg(long)]
        all: bool,
    },
    /// Delete every dead letter (the same as `delete --all`).
    Purge {
        /// Show what would be deleted; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub redis_url: String,
    pub group: String,
    pub consumer_prefix: String,
    pub consumer_name: String,
    /// Stream names (without the `events:` prefix), in priority order.
    pub streams: Vec<String>,
    pub default_worker_uri: String,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub webhook_secret: Option<Vec<u8>>,
    pub metrics_port: u16,
    pub dlq: DlqConfig,
    pub max_attempts: u32,
    pub ordering: Ordering,
    pub ordering_key_field: String,
    pub max_in_flight: usize,
    /// Per-stream overrides of `max_in_flight` and `ordering`.
    pub stream_max_in_flight: BTreeMap<String, usize>,
    pub stream_ordering: BTreeMap<String, Ordering>,
    /// Extra request headers.
    pub target_headers: Vec<(String, String)>,
    pub claim_idle: Duration,
    pub delete_on_ack: bool,
    pub attempt_ttl: Duration,
    pub shutdown_grace: Duration,
    pub retry_backoff: Duration,
    pub hosts: crate::hosts::HostSettings,
    /// Admission priority per stream name (lower first).
    pub stream_priority: BTreeMap<String, u32>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub max_event_age: Duration,
    pub ordering_lease: Duration,
    pub log_format: LogFormat,
    pub otlp_endpoint: Option<String>,
    /// How the worker names its own keys: the original's (one Redis) or per stream slot (a
    /// Redis Cluster, from a redis+cluster:// URL or REDIS_CLUSTER).
    pub layout: crate::streams::Layout,
    pub worker_threads: Option<usize>,
    /// Settings that work but probably not as meant; logged at start-up.
    pub warnings: Vec<String>,
    pub admin_token: Option<String>,
    /// Outbox rows older than this that are neither delivered nor dead-lettered count as undelivered.
    pub outbox_audit_after: Duration,
    pub targets: crate::policy::TargetPolicy,
    /// Remove consumers idle this long with nothing pending (None: never).
    pub consumer_idle_timeout: Option<Duration>,
}

/// Where dead letters go; the first configured wins: SQL, then HTTP, then console.
#[derive(Debug, Clone, PartialEq)]
pub enum DlqConfig {
    Sql { url: String, table: String, event_table: Option<String>, mode: DbMode },
    Http { uri: String },
    Console,
}

pub const STREAM_PREFIX: &str = "events:";

pub fn stream_key(name: &str) -> String {
    format!("{STREAM_PREFIX}{name}")
}

impl Config {
    /// Parse the command line and environment: the configuration and the subcommand, if any.
    pub fn from_env() -> Result<(Self, Option<Command>)> {
        let args = Args::try_parse().map_err(invalid_value)?;
        let command = args.command.clone();
        Ok((Self::from_args(args)?, command))
    }

    pub fn from_args(a: Args) -> Result<Self> {
        let redis_url = redis_url(&a)?;
        let hosts = host_settings(&a)?;
        // A name (`fast`) or the stream's key (`events:fast`): both mean `events:fast`.
        let streams: Vec<String> = a
            .streams
            .split(',')
            .map(|s| s.trim())
            .map(|s| s.strip_prefix(STREAM_PREFIX).unwrap_or(s).to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if streams.is_empty() {
            return Err(bad("STREAMS", "needs at least one stream name"));
        }
        for s in &streams {
            if s.chars().any(|c| c.is_whitespace() || c.is_control()) || s == "retry" || s == "dlq" {
                return Err(bad("STREAMS", format!("{s:?} is not a usable stream name")));
            }
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = streams.iter().find(|s| !seen.insert(*s)) {
            return Err(bad("STREAMS", format!("{dup:?} is listed twice")));
        }
        if a.group.trim().is_empty() {
            return Err(bad("GROUP", "must not be empty"));
        }
        let layout = match crate::streams::cluster_seeds(&redis_url) {
            None => crate::streams::Layout::Single,
            Some(_) => {
                if a.group.contains(['{', '}']) {
                    return Err(bad("GROUP", "must not contain { or } in a Redis Cluster (they would choose the hash slot of the worker's keys)"));
                }
                for s in &streams {
                    if crate::streams::Layout::Cluster.tag(&stream_key(s)).is_none() {
                        return Err(bad("STREAMS", format!("{s:?}: in a Redis Cluster the worker's keys for a stream must share its hash slot, and no hash tag can follow a key whose {{...}} part holds a }}; rename the stream")));
                    }
                }
                crate::streams::Layout::Cluster
            }
        };
        if !a.default_worker_uri.starts_with("http://") && !a.default_worker_uri.starts_with("https://") {
            return Err(bad("DEFAULT_WORKER_URI", format!("{:?} is not an http(s) URL", a.default_worker_uri)));
        }
        reqwest::Url::parse(&a.default_worker_uri.replace("[EVENT_TYPE]", "x"))
            .map_err(|e| bad("DEFAULT_WORKER_URI", e.to_string()))?;
        let mut warnings = Vec::new();
        if a.dlq_db_connection.as_deref().is_some_and(|s| !s.is_empty())
            && a.dlq_uri.as_deref().is_some_and(|s| !s.is_empty())
        {
            warnings.push("both DLQ_DB_CONNECTION and DLQ_URI are set: dead letters go to the SQL store only; unset DLQ_URI (or DLQ_DB_CONNECTION) to make the choice explicit".to_string());
        }
        let dlq = if let Some(url) = a.dlq_db_connection.filter(|s| !s.is_empty()) {
            validate_identifier("DLQ_DB_TABLE", &a.dlq_db_table)?;
            if let Some(t) = &a.event_db_table {
                validate_identifier("EVENT_DB_TABLE", t)?;
            }
            DlqConfig::Sql { url, table: a.dlq_db_table, event_table: a.event_db_table, mode: a.dlq_db_mode }
        } else if let Some(uri) = a.dlq_uri.filter(|s| !s.is_empty()) {
            reqwest::Url::parse(&uri).map_err(|e| bad("DLQ_URI", format!("{uri:?}: {e}")))?;
            DlqConfig::Http { uri }
        } else {
            DlqConfig::Console
        };
        if a.max_attempts == 0 {
            return Err(bad("MAX_ATTEMPTS", "must be at least 1"));
        }
        if a.max_in_flight == 0 {
            return Err(bad("MAX_IN_FLIGHT", "must be at least 1"));
        }
        if a.ordering_key_field.is_empty() {
            return Err(bad("ORDERING_KEY_FIELD", "must not be empty"));
        }
        let stream_max_in_flight =
            overrides("STREAM_MAX_IN_FLIGHT", a.stream_max_in_flight.as_deref(), &streams, |v| {
                v.parse::<usize>().ok().filter(|n| *n > 0)
            })?;
        let stream_ordering =
            overrides("STREAM_ORDERING", a.stream_ordering.as_deref(), &streams, |v| Ordering::from_str(v, true).ok())?;
        let target_headers = match a.target_headers.as_deref().filter(|s| !s.trim().is_empty()) {
            None => vec![],
            Some(json) => {
                let map: BTreeMap<String, String> = serde_json::from_str(json)
                    .map_err(|e| bad("TARGET_HEADERS", format!("must be a JSON object of strings: {e}")))?;
                for (k, v) in &map {
                    if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err()
                        || reqwest::header::HeaderValue::from_str(v).is_err()
                    {
                        return Err(bad("TARGET_HEADERS", format!("{k:?} is not a valid header")));
                    }
                }
                map.into_iter().collect()
            }
        };
        let target_headers = merge_headers_from_env(target_headers, a.target_headers_from_env.as_deref())?;
        let mut stream_priority: BTreeMap<String, u32> =
            streams.iter().enumerate().map(|(i, s)| (s.clone(), i as u32)).collect();
        stream_priority
            .extend(overrides("STREAM_PRIORITY", a.stream_priority.as_deref(), &streams, |v| v.parse::<u32>().ok())?);
        let backoff_base = seconds("BACKOFF_BASE", a.backoff_base)?;
        let backoff_max = seconds("BACKOFF_MAX", a.backoff_max)?;
        if backoff_max < backoff_base {
            return Err(bad("BACKOFF_MAX", "must not be below BACKOFF_BASE"));
        }
        let ordering_lease = seconds("ORDERING_LEASE", a.ordering_lease)?;
        if ordering_lease < Duration::from_secs(1) {
            return Err(bad("ORDERING_LEASE", "must be at least 1 second"));
        }
        let targets =
            crate::policy::TargetPolicy::parse(&a.target_allowlist, &a.target_denylist, &a.default_worker_uri)?;
        let consumer_name = a
            .consumer_name
            .or_else(|| std::env::var("POD_NAME").ok())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(hostname);
        Ok(Config {
            redis_url,
            group: a.group,
            consumer_prefix: a.consumer_prefix,
            consumer_name,
            streams,
            default_worker_uri: a.default_worker_uri,
            connect_timeout: seconds("CONNECT_TIMEOUT", a.connect_timeout)?,
            read_timeout: seconds("READ_TIMEOUT", a.read_timeout)?,
            webhook_secret: a.webhook_secret.filter(|s| !s.is_empty()).map(decode_secret).transpose()?,
            metrics_port: a.metrics_port,
            dlq,
            max_attempts: a.max_attempts,
            ordering: a.ordering,
            ordering_key_field: a.ordering_key_field,
            max_in_flight: a.max_in_flight,
            stream_max_in_flight,
            stream_ordering,
            target_headers,
            claim_idle: seconds("CLAIM_IDLE", a.claim_idle)?,
            delete_on_ack: a.delete_on_ack,
            attempt_ttl: Duration::from_secs(a.attempt_ttl.max(1)),
            shutdown_grace: seconds("SHUTDOWN_GRACE", a.shutdown_grace)?,
            retry_backoff: seconds("RETRY_BACKOFF", a.retry_backoff)?,
            hosts,
            stream_priority,
            backoff_base,
            backoff_max,
            max_event_age: seconds("MAX_EVENT_AGE", a.max_event_age)?,
            ordering_lease,
            log_format: a.log_format,
            otlp_endpoint: a.otel_exporter_otlp_endpoint,
            layout,
            warnings,
            admin_token: a.admin_token.filter(|t| !t.is_empty()),
            outbox_audit_after: seconds("OUTBOX_AUDIT_AFTER", a.outbox_audit_after)?,
            targets,
            consumer_idle_timeout: Some(seconds("CONSUMER_IDLE_TIMEOUT", a.consumer_idle_timeout)?)
                .filter(|d| !d.is_zero()),
            worker_threads: match a.worker_threads {
                Some(0) => return Err(bad("WORKER_THREADS", "must be at least 1")),
                n => n,
            },
        })
    }

    pub fn max_in_flight_for(&self, stream: &str) -> usize {
        self.stream_max_in_flight.get(stream).copied().unwrap_or(self.max_in_flight)
    }

    pub fn ordering_for(&self, stream: &str) -> Ordering {
        self.stream_ordering.get(stream).copied().unwrap_or(self.ordering)
    }

    pub fn priority_for(&self, stream: &str) -> u32 {
        self.stream_priority.get(stream).copied().unwrap_or(u32::MAX)
    }

    pub fn consumer(&self, stream: &str) -> String {
        format!("{}-{}-{}", self.consumer_prefix, stream, self.consumer_name)
    }

    /// Where Redis is, for messages: `host:port` (a cluster's seeds comma-separated),
    /// without scheme, credentials or database.
    pub fn redis_address(&self) -> String {
        let rest = self.redis_url.split_once("://").map(|(_, r)| r).unwrap_or(&self.redis_url);
        let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
        rest.split(['/', '?']).next().unwrap_or_default().to_string()
    }

    /// The worker's keys for stream `name` (without the prefix).
    pub fn stream_keys(&self, name: &str) -> crate::streams::StreamKeys {
        crate::streams::StreamKeys::new(self.layout, &self.group, &stream_key(name))
    }

    /// The stream keys, in priority order.
    pub fn stream_keys_all(&self) -> Vec<String> {
        self.streams.iter().map(|s| stream_key(s)).collect()
    }

    /// Where delivered outbox rows wait for their delete: one set (single layout) or one per
    /// stream (cluster).
    pub fn cleanup_sets(&self) -> Vec<String> {
        let mut sets: Vec<String> = self.streams.iter().map(|s| self.stream_keys(s).cleanup).collect();
        sets.sort();
        sets.dedup();
        sets
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HostOverrideJson {
    max_concurrency: Option<usize>,
    rate_limit: Option<f64>,
    concurrency: Option<HostConcurrency>,
}

fn host_settings(a: &Args) -> Result<crate::hosts::HostSettings> {
    use crate::hosts::{HostOverride, HostSettings};
    if a.host_max_concurrency == 0 {
        return Err(bad("HOST_MAX_CONCURRENCY", "must be at least 1"));
    }
    if a.host_initial_concurrency == 0 {
        return Err(bad("HOST_INITIAL_CONCURRENCY", "must be at least 1"));
    }
    if a.host_queue == 0 {
        return Err(bad("HOST_QUEUE", "must be at least 1"));
    }
    let rate = |var, r: f64| -> Result<Option<f64>> {
        if !r.is_finite() || r < 0.0 {
            return Err(bad(var, format!("{r} is not a rate (requests per second, 0 for none)")));
        }
        Ok((r > 0.0).then_some(r))
    };
    let mut overrides = std::collections::HashMap::new();
    if let Some(json) = a.host_overrides.as_deref().filter(|s| !s.trim().is_empty()) {
        let raw: BTreeMap<String, HostOverrideJson> = serde_json::from_str(json).map_err(|e| {
            bad(
                "HOST_OVERRIDES",
                format!("must be a JSON object of host URL -> {{maxConcurrency, rateLimit, concurrency}}: {e}"),
            )
        })?;
        for (host, o) in raw {
            let url = reqwest::Url::parse(&host)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
                .ok_or_else(|| {
                    bad("HOST_OVERRIDES", format!("{host:?} is not an http(s) URL such as https://api.example.com"))
                })?;
            if o.max_concurrency == Some(0) {
                return Err(bad("HOST_OVERRIDES", format!("{host}: maxConcurrency must be at least 1")));
            }
            let r = match o.rate_limit {
                Some(r) => rate("HOST_OVERRIDES", r)?,
                None => None,
            };
            overrides.insert(
                crate::delivery::host_key(&url),
                HostOverride {
                    max: o.max_concurrency,
                    rate: r,
                    adaptive: o.concurrency.map(|c| c == HostConcurrency::Adaptive),
                },
            );
        }
    }
    Ok(HostSettings {
        limit: crate::limiter::LimitSettings {
            adaptive: a.host_concurrency == HostConcurrency::Adaptive,
            initial: a.host_initial_concurrency.min(a.host_max_concurrency),
            max: a.host_max_concurrency,
            ..Default::default()
        },
        rate: rate("HOST_RATE_LIMIT", a.host_rate_limit)?,
        queue: a.host_queue,
        overrides,
    })
}

/// `90`, `90s`, `10m`, `2h`, `1d`.
pub fn parse_age(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a duration like 90s, 10m, 2h or 1d"))?;
    let mult = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
    };
    crate::retry::bounded_secs(n * mult, Duration::from_secs(100 * 365 * 86400))
        .filter(|_| n >= 0.0)
        .ok_or_else(|| format!("{s:?} is not a usable duration"))
}

/// TARGET_HEADERS_FROM_ENV: `Header-Name=ENV_VAR,...`, each value read from that variable.
fn merge_headers_from_env(
    mut headers: Vec<(String, String)>,
    spec: Option<&str>,
) -> Result<Vec<(String, String)>, Error> {
    const VAR: &str = "TARGET_HEADERS_FROM_ENV";
    for item in spec.unwrap_or_default().split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((name, var)) = item.split_once('=') else {
            return Err(bad(VAR, format!("{item:?} is not Header-Name=ENV_VAR")));
        };
        let (name, var) = (name.trim(), var.trim());
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(bad(VAR, format!("{name:?} is not a valid header name")));
        }
        let value = std::env::var(var).map_err(|_| bad(VAR, format!("header {name}: variable {var} is not set")))?;
        if reqwest::header::HeaderValue::from_str(&value).is_err() {
            return Err(bad(VAR, format!("header {name}: the value of {var} is not a valid header value")));
        }
        headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        headers.push((name.to_string(), value));
    }
    Ok(headers)
}

fn bad(var: &'static str, msg: impl Into<String>) -> Error {
    Error::Config { var, msg: msg.into() }
}

/// `name=value,name=value` for streams in STREAMS.
fn overrides<T>(
    var: &'static str,
    raw: Option<&str>,
    streams: &[String],
    parse: impl Fn(&str) -> Option<T>,
) -> Result<BTreeMap<String, T>> {
    let mut out = BTreeMap::new();
    for item in raw.unwrap_or("").split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, value) = item.split_once('=').ok_or_else(|| bad(var, format!("{item:?} is not name=value")))?;
        let (name, value) = (name.trim(), value.trim());
        let name = name.strip_prefix(STREAM_PREFIX).unwrap_or(name);
        if !streams.iter().any(|s| s == name) {
            return Err(bad(var, format!("{name:?} is not in STREAMS")));
        }
        let v = parse(value).ok_or_else(|| bad(var, format!("{value:?} is not a valid value for {name}")))?;
        out.insert(name.to_string(), v);
    }
    Ok(out)
}

/// A value clap refused, named by its environment variable (where users set it) and its
/// flag; any other parse outcome (help, version, an unknown flag) is clap's to print.
fn invalid_value(e: clap::Error) -> Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(e.kind(), ErrorKind::InvalidValue | ErrorKind::ValueValidation) {
        e.exit();
    }
    let text = |k| match e.get(k) {
        Some(ContextValue::String(s)) => s.clone(),
        Some(ContextValue::Strings(v)) => v.join(", "),
        _ => String::new(),
    };
    let flag = text(ContextKind::InvalidArg);
    let long = flag.split_whitespace().next().unwrap_or_default().trim_start_matches("--").to_string();
    let cmd = <Args as clap::CommandFactory>::command();
    let env = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(long.as_str()))
        .and_then(|a| a.get_env())
        .map(|v| v.to_string_lossy().into_owned())
        .unwrap_or_else(|| flag.clone());
    let mut msg = format!("{:?} is not a valid value (--{long})", text(ContextKind::InvalidValue));
    let valid = text(ContextKind::ValidValue);
    if !valid.is_empty() {
        msg.push_str(&format!("; one of: {valid}"));
    }
    // The variable's name lives as long as the process (this is its last message).
    Error::Config { var: Box::leak(env.into_boxed_str()), msg }
}

fn seconds(var: &'static str, v: f64) -> Result<Duration> {
    if !v.is_finite() || v <= 0.0 || v > 1e9 {
        return Err(bad(var, format!("{v} is not a positive number of seconds")));
    }
    Ok(Duration::from_secs_f64(v))
}

/// The Redis URL: one server's (`redis://`, `rediss://`) or a cluster's seed nodes
/// (`redis+cluster://`, `rediss+cluster://`; also from a one-server address and
/// REDIS_CLUSTER=true).
fn redis_url(a: &Args) -> Result<String> {
    let pw = a.redis_password.as_deref().filter(|p| !p.is_empty());
    if let Some(url) = a.redis_url.as_deref().filter(|s| !s.is_empty()) {
        if let Some(seeds) = crate::streams::cluster_seeds(url) {
            return cluster_url(url, &seeds, pw);
        }
    }
    let url = single_url(a, pw)?;
    if !a.redis_cluster {
        return Ok(url);
    }
    let u = reqwest::Url::parse(&url).map_err(|e| bad("REDIS_URL", e.to_string()))?;
    let var = if a.redis_url.as_deref().is_some_and(|s| !s.is_empty()) { "REDIS_URL" } else { "REDIS_CLUSTER" };
    if !matches!(u.path(), "" | "/" | "/0") {
        return Err(bad(var, "a Redis Cluster has database 0 only; remove the database number"));
    }
    let auth = match (u.username(), u.password()) {
        ("", None) => String::new(),
        (user, None) => format!("{user}@"),
        (user, Some(p)) => format!("{user}:{p}@"),
    };
    let host = u.host_str().unwrap_or("localhost");
    Ok(format!("{}+cluster://{auth}{host}:{}", u.scheme(), u.port().unwrap_or(6379)))
}

/// A `redis+cluster://` URL checked seed by seed, with REDIS_PASSWORD joined when it carries
/// no password.
fn cluster_url(url: &str, seeds: &[String], pw: Option<&str>) -> Result<String> {
    if seeds.is_empty() {
        return Err(bad("REDIS_URL", "names no seed node (redis+cluster://host:port,host:port,...)"));
    }
    let mut first = None;
    for seed in seeds {
        let u =
            reqwest::Url::parse(seed).map_err(|e| bad("REDIS_URL", format!("seed {}: {e}", crate::redact(seed))))?;
        if u.host_str().is_none_or(str::is_empty) {
            return Err(bad("REDIS_URL", format!("seed {} has no host", crate::redact(seed))));
        }
        if !matches!(u.path(), "" | "/" | "/0") {
            return Err(bad("REDIS_URL", "a Redis Cluster has database 0 only; remove the database number"));
        }
        first.get_or_insert(u);
    }
    let first = first.expect("at least one seed");
    match pw {
        Some(pw) if first.password().is_none() => {
            let (scheme, rest) = url.split_once("://").expect("a cluster URL");
            let hosts = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
            Ok(format!("{scheme}://{}:{}@{hosts}", first.username(), percent_encode(pw)))
        }
        _ => Ok(url.to_string()),
    }
}

fn single_url(a: &Args, pw: Option<&str>) -> Result<String> {
    if let Some(url) = a.redis_url.as_deref().filter(|s| !s.is_empty()) {
        let parsed = reqwest::Url::parse(url).map_err(|e| bad("REDIS_URL", format!("{e}")))?;
        if !matches!(parsed.scheme(), "redis" | "rediss") {
            return Err(bad(
                "REDIS_URL",
                format!(
                    "scheme must be redis://, rediss://, redis+cluster:// or rediss+cluster://, got {}://",
                    parsed.scheme()
                ),
            ));
        }
        // A password kept in a Secret (REDIS_PASSWORD) joins a URL that carries none.
        if let Some(pw) = pw.filter(|_| parsed.password().is_none()) {
            let mut with = parsed.clone();
            with.set_password(Some(&percent_encode(pw))).map_err(|_| bad("REDIS_URL", "cannot carry a password"))?;
            return Ok(with.to_string());
        }
        return Ok(url.to_string());
    }
    let (host, port) = match a.redis_host_port.as_deref().filter(|s| !s.is_empty()) {
        Some(hp) => {
            let (h, p) =
                hp.rsplit_once(':').ok_or_else(|| bad("REDIS_HOST_PORT", format!("{hp:?} is not host:port")))?;
            let p: u16 = p.parse().map_err(|_| bad("REDIS_HOST_PORT", format!("{p:?} is not a port")))?;
            (h.to_string(), p)
        }
        None => (a.redis_host.clone(), a.redis_port),
    };
    if host.is_empty() {
        return Err(bad("REDIS_HOST", "must not be empty"));
    }
    let auth = match pw {
        Some(p) => format!(":{}@", percent_encode(p)),
        None => String::new(),
    };
    Ok(format!("redis://{auth}{host}:{port}"))
}

/// Percent-encode everything but RFC 3986 unreserved characters.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode_secret(s: String) -> Result<Vec<u8>> {
    use base64::Engine;
    match s.strip_prefix("whsec_") {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| bad("WEBHOOK_SECRET", format!("whsec_ secret is not base64: {e}"))),
        None => Ok(s.into_bytes()),
    }
}

/// A SQL identifier (optionally schema-qualified): letters, digits and underscores, not
/// starting with a digit. Anything else is refused so configuration cannot inject SQL.
pub fn validate_identifier(var: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.split('.').count() <= 2
        && name.split('.').all(|part| {
            let mut chars = part.chars();
            matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(bad(var, format!("{name:?} is not a valid table name (letters, digits, _; optionally schema.table)")))
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".into())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use clap::CommandFactory;

    pub(crate) fn parse(args: &[&str]) -> Result<Config> {
        let mut v = vec!["eventworker"];
        v.extend_from_slice(args);
        Config::from_args(Args::try_parse_from(v).expect("clap parse"))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults_match_the_original_worker() {
        let c = parse(&["--consumer-name", "pod-1"]).unwrap();
        assert_eq!(c.streams, ["critical", "fast", "default", "slow"]);
        assert_eq!(c.group, "workers");
        assert_eq!(c.metrics_port, 9000);
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.read_timeout, Duration::from_secs(60));
        assert_eq!(c.max_attempts, 5);
        assert_eq!(c.ordering, Ordering::Key);
        assert_eq!(c.dlq, DlqConfig::Console);
        assert_eq!(c.consumer("fast"), "worker-fast-pod-1");
        assert_eq!(c.default_worker_uri, "http://localhost:8000/events/[EVENT_TYPE]");
    }

    #[test]
    fn redis_address_forms() {
        assert!(parse(&[]).unwrap().redis_url.ends_with("localhost:6379"));
        let c = parse(&["--redis-host-port", "redis.svc:6380", "--redis-password", "p@ss word"]).unwrap();
        assert_eq!(c.redis_url, "redis://:p%40ss%20word@redis.svc:6380");
        let c = parse(&["--redis-url", "rediss://r:6379/0", "--redis-host", "ignored"]).unwrap();
        assert_eq!(c.redis_url, "rediss://r:6379/0");
        let c = parse(&["--redis-url", "redis://r:6379", "--redis-password", "s/cret"]).unwrap();
        assert_eq!(c.redis_url, "redis://:s%2Fcret@r:6379");
        let c = parse(&["--redis-url", "redis://:own@r:6379", "--redis-password", "other"]).unwrap();
        assert_eq!(c.redis_url, "redis://:own@r:6379");
        assert_eq!(c.layout, crate::streams::Layout::Single);
    }

    #[test]
    fn the_redis_address_carries_no_credentials() {
        let c = parse(&["--redis-url", "rediss://u:p%40ss@r.shop:6380/2"]).unwrap();
        assert_eq!(c.redis_address(), "r.shop:6380");
        let c = parse(&["--redis-url", "redis+cluster://:pw@a:7000,b:7001"]).unwrap();
        assert_eq!(c.redis_address(), "a:7000,b:7001");
    }

    #[test]
    fn two_dead_letter_sinks_are_warned_about() {
        let c = parse(&["--dlq-db-connection", "sqlite:///tmp/x.db", "--dlq-uri", "http://dlq/x"]).unwrap();
        assert!(matches!(c.dlq, DlqConfig::Sql { .. }));
        assert!(c.warnings[0].contains("DLQ_URI"), "{:?}", c.warnings);
        assert!(parse(&[]).unwrap().warnings.is_empty());
    }

    #[test]
    fn streams_by_name_or_by_key() {
        let c = parse(&["--streams", "events:fast,slow", "--stream-max-in-flight", "events:slow=4"]).unwrap();
        assert_eq!(c.streams, ["fast", "slow"]);
        assert_eq!(c.stream_max_in_flight.get("slow"), Some(&4));
        assert!(parse(&["--streams", "fast,events:fast"]).unwrap_err().to_string().contains("listed twice"));
    }

    #[test]
    fn cluster_addresses() {
        let c = parse(&["--redis-url", "redis+cluster://a:7000,b:7001", "--redis-password", "p w"]).unwrap();
        assert_eq!(c.redis_url, "redis+cluster://:p%20w@a:7000,b:7001");
        assert_eq!(c.layout, crate::streams::Layout::Cluster);
        let c = parse(&["--redis-url", "rediss+cluster://u:own@a:7000", "--redis-password", "other"]).unwrap();
        assert_eq!(c.redis_url, "rediss+cluster://u:own@a:7000");
        let c = parse(&["--redis-host-port", "redis.svc:7000", "--redis-cluster", "true", "--redis-password", "x"])
            .unwrap();
        assert_eq!(
            (c.redis_url.as_str(), c.layout),
            ("redis+cluster://:x@redis.svc:7000", crate::streams::Layout::Cluster)
        );
        let c = parse(&["--redis-url", "rediss://r:6380/0", "--redis-cluster", "true"]).unwrap();
        assert_eq!(c.redis_url, "rediss+cluster://r:6380");
        let refused: &[(&[&str], &str)] = &[
            (&["--redis-url", "redis+cluster://"], "REDIS_URL"),
            (&["--redis-url", "redis+cluster://a:7000/3"], "REDIS_URL"),
            (&["--redis-url", "redis+cluster://a:notaport"], "REDIS_URL"),
            (&["--redis-url", "redis://r:6379/2", "--redis-cluster", "true"], "REDIS_URL"),
            (&["--redis-url", "redis+cluster://a:7000", "--group", "g{1}"], "GROUP"),
            (&["--redis-url", "redis+cluster://a:7000", "--streams", "fast,a}b"], "STREAMS"),
        ];
        for (args, var) in refused {
            let err = parse(args).expect_err(var).to_string();
            assert!(err.contains(var), "{args:?}: {err}");
        }
        // Braces in a stream name are fine where a tag can follow them.
        let c = parse(&["--redis-url", "redis+cluster://a:7000", "--streams", "{orders}:eu,fast"]).unwrap();
        assert_eq!(c.streams.len(), 2);
    }

    #[test]
    fn errors_name_the_variable() {
        let cases: &[(&[&str], &str)] = &[
            (&["--redis-url", "http://x"], "REDIS_URL"),
            (&["--redis-host-port", "nohost"], "REDIS_HOST_PORT"),
            (&["--streams", " , "], "STREAMS"),
            (&["--streams", "a,a"], "STREAMS"),
            (&["--max-attempts", "0"], "MAX_ATTEMPTS"),
            (&["--read-timeout=-1"], "READ_TIMEOUT"),
            (&["--default-worker-uri", "ftp://x"], "DEFAULT_WORKER_URI"),
            (&["--dlq-uri", "not a url"], "DLQ_URI"),
            (&["--dlq-db-connection", "sqlite://x", "--dlq-db-table", "dlq; drop table x"], "DLQ_DB_TABLE"),
            (&["--dlq-db-connection", "sqlite://x", "--event-db-table", "a-b"], "EVENT_DB_TABLE"),
            (&["--webhook-secret", "whsec_***"], "WEBHOOK_SECRET"),
            (&["--host-max-concurrency", "0"], "HOST_MAX_CONCURRENCY"),
            (&["--host-rate-limit=-1"], "HOST_RATE_LIMIT"),
            (&["--host-overrides", "{\"ftp://x\": {}}"], "HOST_OVERRIDES"),
            (&["--host-overrides", "{\"http://x\": {\"max\": 3}}"], "HOST_OVERRIDES"),
            (&["--stream-priority", "fast=first"], "STREAM_PRIORITY"),
            (&["--backoff-base", "10", "--backoff-max", "1"], "BACKOFF_MAX"),
            (&["--max-event-age", "0"], "MAX_EVENT_AGE"),
            (&["--ordering-lease", "0.1"], "ORDERING_LEASE"),
        ];
        for (args, var) in cases {
            let err = parse(args).expect_err(var).to_string();
            assert!(err.contains(var), "{args:?}: {err}");
        }
    }

    #[test]
    fn per_stream_overrides_and_extra_headers() {
        let c = parse(&[
            "--streams",
            "fast,slow",
            "--stream-max-in-flight",
            "slow=4",
            "--stream-ordering",
            "fast=stream",
            "--target-headers",
            r#"{"Authorization":"Bearer x"}"#,
        ])
        .unwrap();
        assert_eq!((c.max_in_flight_for("slow"), c.max_in_flight_for("fast")), (4, 64));
        assert_eq!((c.ordering_for("fast"), c.ordering_for("slow")), (Ordering::Stream, Ordering::Key));
        assert_eq!(c.target_headers, [("Authorization".to_string(), "Bearer x".to_string())]);
        for (args, var) in [
            (vec!["--stream-max-in-flight", "nope=3"], "STREAM_MAX_IN_FLIGHT"),
            (vec!["--stream-max-in-flight", "fast=0"], "STREAM_MAX_IN_FLIGHT"),
            (vec!["--stream-ordering", "fast=random"], "STREAM_ORDERING"),
            (vec!["--target-headers", "[1]"], "TARGET_HEADERS"),
            (vec!["--target-headers", r#"{"bad header":"x"}"#], "TARGET_HEADERS"),
        ] {
            let err = parse(&args).expect_err(var).to_string();
            assert!(err.contains(var), "{err}");
        }
    }

    #[test]
    fn headers_from_other_variables_join_and_override_target_headers() {
        let path = std::env::var("PATH").expect("PATH is set");
        let base = vec![("X-Token".to_string(), "plain".to_string()), ("A".to_string(), "1".to_string())];
        let merged = merge_headers_from_env(base, Some("x-token=PATH")).unwrap();
        assert_eq!(merged, [("A".to_string(), "1".to_string()), ("x-token".to_string(), path)]);
        for bad_spec in ["X-Token", "bad header=PATH", "X-Token=EVENTWORKER_TEST_SURELY_UNSET"] {
            let err = merge_headers_from_env(vec![], Some(bad_spec)).expect_err(bad_spec).to_string();
            assert!(err.contains("TARGET_HEADERS_FROM_ENV"), "{err}");
        }
    }

    #[test]
    fn flow_control_settings() {
        let c = parse(&[]).unwrap();
        assert_eq!((c.hosts.limit.max, c.hosts.limit.initial, c.hosts.limit.adaptive), (32, 4, true));
        assert_eq!((c.hosts.rate, c.hosts.queue), (None, 4096));
        assert_eq!(c.priority_for("critical"), 0);
        assert_eq!(c.priority_for("slow"), 3);
        let c = parse(&[
            "--streams",
            "fast,slow",
            "--stream-priority",
            "slow=0,fast=5",
            "--host-concurrency",
            "fixed",
            "--host-max-concurrency",
            "8",
            "--host-rate-limit",
            "100",
            "--host-overrides",
            r#"{"https://api.example.com": {"maxConcurrency": 2, "rateLimit": 5, "concurrency": "adaptive"}}"#,
        ])
        .unwrap();
        assert!(c.priority_for("slow") < c.priority_for("fast"));
        assert_eq!((c.hosts.limit.max, c.hosts.limit.adaptive, c.hosts.rate), (8, false, Some(100.0)));
        let o = c.hosts.overrides["https://api.example.com:443"];
        assert_eq!((o.max, o.rate, o.adaptive), (Some(2), Some(5.0), Some(true)));
    }

    #[test]
    fn dlq_priority_sql_then_http_then_console() {
        let c = parse(&["--dlq-uri", "http://d/x", "--dlq-db-connection", "sqlite:///tmp/x.db"]).unwrap();
        assert!(matches!(c.dlq, DlqConfig::Sql { .. }));
        let c = parse(&["--dlq-uri", "http://d/x"]).unwrap();
        assert_eq!(c.dlq, DlqConfig::Http { uri: "http://d/x".into() });
    }

    #[test]
    fn identifiers() {
        for ok in ["dlq", "public.dlq", "_x1"] {
            validate_identifier("T", ok).unwrap();
        }
        for bad in ["", "1x", "a b", "a;b", "a.b.c", "\"x\"", "x--"] {
            assert!(validate_identifier("T", bad).is_err(), "{bad}");
        }
    }
}
