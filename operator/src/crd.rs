//! The `EventWorker` custom resource: what users `kubectl apply`. Doc comments here are what
//! `kubectl explain eventworker.spec...` shows.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Worker image of EventWorkers without `spec.image` when the operator is given none
/// (`DEFAULT_WORKER_IMAGE`, chart value `workerImage`): the operator's own version, so an
/// operator upgrade moves such workers to the matching worker.
pub const DEFAULT_IMAGE: &str = concat!("eventworker:", env!("CARGO_PKG_VERSION"));

/// An eventworker deployment: Redis streams delivered to an HTTP target, with retries and a
/// dead-letter sink.
// Several printcolumn(...) entries share keys, which clippy takes for repeated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "eventworker.io",
    version = "v1alpha1",
    kind = "EventWorker",
    namespaced,
    shortname = "ew",
    status = "EventWorkerStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Backlog", type_ = "integer", json_path = ".status.totalBacklog"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.autoscaling.desiredReplicas", priority = 1),
    printcolumn(name = "Oldest", type_ = "number", json_path = ".status.oldestAgeSeconds", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    doc = "An eventworker deployment: Redis streams delivered to an HTTP target"
)]
#[x_kube(
    validation = Rule::new("!has(self.autoscaling) || self.autoscaling.minReplicas <= self.autoscaling.maxReplicas")
        .message("autoscaling.minReplicas must not be greater than autoscaling.maxReplicas"),
    validation = Rule::new("!has(self.disruptionBudget) || !(has(self.disruptionBudget.minAvailable) && has(self.disruptionBudget.maxUnavailable))")
        .message("disruptionBudget: set minAvailable or maxUnavailable, not both"),
    validation = Rule::new("!has(self.group) || !self.group.matches('[{}]') || !((has(self.redis.cluster) && self.redis.cluster) || (has(self.redis.url) && self.redis.url.contains('+cluster://')))")
        .message("group must not contain { or } with a Redis Cluster (they would choose the hash slot of the worker's keys)")
)]
#[serde(rename_all = "camelCase")]
pub struct EventWorkerSpec {
    /// How to reach Redis.
    pub redis: RedisSpec,
    /// Streams to consume, highest priority first; each is read from the key `events:<name>`.
    #[serde(default = "default_streams")]
    #[x_kube(validation = Rule::new("self.all(s, s.name.matches('^[A-Za-z0-9][A-Za-z0-9_.-]*$') && s.name != 'retry' && s.name != 'dlq')")
        .message("stream names are letters, digits, '.', '_' and '-', and 'retry' and 'dlq' are reserved"))]
    #[x_kube(validation = Rule::new("size(self) > 0").message("at least one stream is required"))]
    #[x_kube(validation = Rule::new("self.all(x, self.exists_one(y, y.name == x.name))").message("stream names must be unique"))]
    // Bounds keep the API server's CEL cost estimate within budget.
    #[schemars(length(max = 32))]
    pub streams: Vec<StreamSpec>,
    /// Consumer group shared by the workers of this EventWorker. Default: the EventWorker's
    /// name, so two EventWorkers reading the same streams on one Redis each get every event
    /// instead of splitting them. Set `workers` to take over the group of the original
    /// Python worker (and its pending entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200))]
    pub group: Option<String>,
    /// Prefix of consumer names (`<prefix>-<stream>-<pod>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_prefix: Option<String>,
    /// Where events are delivered.
    pub target: TargetSpec,
    /// Retry behaviour.
    #[serde(default)]
    pub retry: RetrySpec,
    /// Where events go that cannot be delivered.
    #[serde(default)]
    pub dead_letter: DeadLetterSpec,
    /// key: events with the same ordering key in order, others concurrently; stream: strict
    /// order per stream; none: fully concurrent.
    #[serde(default)]
    pub ordering: Ordering,
    /// Most events in flight per stream and pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxInFlight must be at least 1"))]
    pub max_in_flight: Option<i32>,
    /// Seconds an ordered stream's lease lives without renewal: an ordered stream (ordering
    /// key or stream) is delivered by one pod at a time, and another pod takes it over this
    /// long after that pod died (at once after a graceful stop). Default 15.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1.0").message("orderingLeaseSeconds must be at least 1"))]
    pub ordering_lease_seconds: Option<f64>,
    /// How hard the workers may push each target host (scheme, host, port).
    #[serde(default)]
    pub flow_control: FlowControlSpec,

    /// Worker container image (registry/repository:tag or @digest). Default: the operator's
    /// worker image (chart value `workerImage`), which follows operator upgrades; the image
    /// in use is in `status.image`. `eventworker:0.1.0`, which 0.1 stored as the default,
    /// counts as unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Image pull policy (Always, IfNotPresent, Never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self in ['Always', 'IfNotPresent', 'Never']")
        .message("imagePullPolicy must be Always, IfNotPresent or Never"))]
    pub image_pull_policy: Option<String>,
    /// Secrets for pulling the worker image from a private registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    /// PriorityClass of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// How the worker pods spread over zones and nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// Extra environment variables of the worker container (e.g. RUST_LOG, OTEL_*); names
    /// the operator renders from the spec are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,
    /// Extra volumes of the worker pods (CA bundles, a writable directory for a `sqlite://`
    /// dead-letter store: the root filesystem is read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<Volume>>,
    /// Where the extra volumes are mounted in the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mounts: Option<Vec<VolumeMount>>,
    /// Number of worker pods (not applied while `autoscaling` is set: the autoscaler owns
    /// the count). `kubectl scale` and a HorizontalPodAutoscaler (`kubectl autoscale ew`)
    /// set it through the scale subresource.
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self >= 0").message("replicas must not be negative"))]
    pub replicas: i32,
    /// CPU and memory of the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels the pods must run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Affinity of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Extra labels on the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_labels: Option<BTreeMap<String, String>>,
    /// Extra annotations on the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_annotations: Option<BTreeMap<String, String>>,
    /// Service account of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Seconds a pod gets to finish in-flight deliveries when it stops.
    #[serde(default = "default_grace")]
    #[x_kube(validation = Rule::new("self >= 5").message("terminationGracePeriodSeconds must be at least 5"))]
    pub termination_grace_period_seconds: i64,
    /// Prometheus scraping.
    #[serde(default)]
    pub metrics: MetricsSpec,
    /// PodDisruptionBudget for the worker pods; none when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption_budget: Option<DisruptionBudgetSpec>,
    /// Scaling on stream lag; fixed `replicas` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// The workers' admin API (dead-letter listing and replay).
    #[serde(default)]
    pub admin: AdminSpec,
}

/// The workers' admin API on the metrics port: `/dlq`, `/dlq/replay`, `/reprocess-dlq`.
/// It always requires a token: the one in `tokenSecretRef`, or one the operator generates
/// into the Secret `<name>-admin` (key `token`) when none is given.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AdminSpec {
    /// Secret key holding the admin token; generated into `<name>-admin` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
}

/// One stream and how it is consumed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StreamSpec {
    /// Stream name; the key is `events:<name>`.
    #[schemars(length(min = 1, max = 100))]
    pub name: String,
    /// Most events in flight for this stream and pod (default: spec.maxInFlight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("streams[].maxInFlight must be at least 1"))]
    pub max_in_flight: Option<i32>,
    /// Ordering for this stream (default: spec.ordering).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering: Option<Ordering>,
    /// Admission priority at a busy host, lower first (default: the stream's position in
    /// `streams`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("streams[].priority must not be negative"))]
    pub priority: Option<i32>,
    /// How much this stream's backlog counts for autoscaling (builtin and keda modes):
    /// with weight 4 on `critical`, 100 waiting critical events count as 400. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("streams[].autoscalingWeight must be greater than 0"))]
    pub autoscaling_weight: Option<f64>,
}

impl StreamSpec {
    pub fn named(name: &str) -> Self {
        Self { name: name.into(), ..Default::default() }
    }
}

/// Redis connection. Set `url`, or `host` (and `port`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("has(self.url) != has(self.host)").message("redis: set exactly one of url and host"),
    validation = Rule::new("!has(self.url) || self.url.startsWith('redis://') || self.url.startsWith('rediss://') || self.url.startsWith('redis+cluster://') || self.url.startsWith('rediss+cluster://')")
        .message("redis.url must start with redis://, rediss://, redis+cluster:// or rediss+cluster://"),
    validation = Rule::new("!has(self.url) || !((has(self.cluster) && self.cluster) || self.url.contains('+cluster://')) || !self.url.matches('^[a-z+]+://[^/]*/0*[1-9]')")
        .message("redis: a Redis Cluster has database 0 only; remove the database number from redis.url")
)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// `redis://host:port/db` or `rediss://` for TLS, without the password; for a Redis
    /// Cluster `redis+cluster://host:port,host:port` (seed nodes), or a seed's URL with
    /// `cluster: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub url: Option<String>,
    /// Redis host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Redis port.
    #[serde(default = "default_redis_port")]
    pub port: i32,
    /// Connect with TLS (when `host` is used).
    #[serde(default)]
    pub tls: bool,
    /// A Redis Cluster: `url` or `host` is a seed node. The worker keeps each stream's own
    /// keys in the stream's hash slot (see the README's "Redis Cluster").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
    /// Secret key holding the Redis password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
}

/// A key of a Secret in the EventWorker's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SecretKeyRef {
    /// Secret name.
    pub name: String,
    /// Key within the Secret.
    pub key: String,
}

/// The HTTP endpoint events are POSTed to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TargetSpec {
    /// URI for events without `meta.url`; `[EVENT_TYPE]` is replaced by the event type.
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')")
        .message("target.uri must start with http:// or https://"))]
    #[schemars(length(max = 2048))]
    pub uri: String,
    /// Connect timeout in seconds (0.1 to 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0.1 && self <= 300.0").message("target.connectTimeoutSeconds must be between 0.1 and 300"))]
    pub connect_timeout_seconds: Option<f64>,
    /// Response timeout in seconds (0.1 to 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0.1 && self <= 3600.0").message("target.readTimeoutSeconds must be between 0.1 and 3600"))]
    pub read_timeout_seconds: Option<f64>,
    /// Extra headers sent with every delivery (plain values; use `headersFrom` for secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
    /// Extra headers whose values come from Secret keys (API keys, bearer tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.all(x, self.exists_one(y, y.name.lowerAscii() == x.name.lowerAscii()))").message("target.headersFrom names must be unique"))]
    #[schemars(length(max = 16))]
    pub headers_from: Option<Vec<HeaderFromSecret>>,
    /// Secret key holding a Standard Webhooks signing secret; requests are signed when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret_ref: Option<SecretKeyRef>,
    /// Hosts a per-event `meta.url` may target besides this URI's host: names,
    /// `*.domain`, IP addresses or CIDRs; `*` (the default) allows any. Headers and
    /// signatures are sent only to this URI's host and these (never to `*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.all(h, h.matches('^([*]|([*][.])?[A-Za-z0-9_-]+([.][A-Za-z0-9_-]+)*|[0-9A-Fa-f:.]+(/[0-9]{1,3})?)$'))")
        .message("target.allowedHosts items are host names, *.domain, IP addresses, CIDRs or *"))]
    #[schemars(length(max = 64), inner(length(max = 253)))]
    pub allowed_hosts: Option<Vec<String>>,
    /// Addresses never delivered to, checked after name resolution (IPs or CIDRs).
    /// Default: link-local (169.254.0.0/16, fe80::/10) and the cloud metadata addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.all(n, n.matches('^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$'))")
        .message("target.deniedNetworks items are IP addresses or CIDRs"))]
    #[schemars(length(max = 64), inner(length(max = 64)))]
    pub denied_networks: Option<Vec<String>>,
}

/// A delivery header whose value is a Secret key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HeaderFromSecret {
    /// Header name, e.g. `Authorization`.
    #[x_kube(validation = Rule::new("self.matches('^[!#$%&\\'*+.^_`|~0-9A-Za-z-]+$')").message("target.headersFrom[].name must be an HTTP header name"))]
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// The Secret key holding the value.
    pub secret_key_ref: SecretKeyRef,
}

/// Per-host flow control: a concurrency limit per target host (adaptive by default, never
/// above `maxConcurrencyPerHost` per pod), an optional rate limit, and per-host overrides.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FlowControlSpec {
    /// Most requests at once to one host, per pod (default 32). With N replicas a host
    /// receives up to N times this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("flowControl.maxConcurrencyPerHost must be at least 1"))]
    pub max_concurrency_per_host: Option<i32>,
    /// Requests at once a host starts with (default 4); the adaptive limit grows from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("flowControl.initialConcurrencyPerHost must be at least 1"))]
    pub initial_concurrency_per_host: Option<i32>,
    /// adaptive (default): grow while latency holds, cut on 429, 5xx, timeouts and rising
    /// latency; fixed: always maxConcurrencyPerHost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<HostConcurrency>,
    /// Most requests per second to one host, per pod (none when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("flowControl.rateLimitPerHost must be positive"))]
    pub rate_limit_per_host: Option<f64>,
    /// Overrides for particular hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub hosts: Vec<HostFlowSpec>,
    /// Seconds after which an event that cannot be delivered (its host paused, or failing)
    /// is dead-lettered with reason max_age, counted from meta.createdAt (default 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("flowControl.maxEventAgeSeconds must be positive"))]
    pub max_event_age_seconds: Option<f64>,
}

/// Settings for one target host.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("self.url.startsWith('http://') || self.url.startsWith('https://')")
        .message("flowControl.hosts[].url must start with http:// or https://")
)]
#[serde(rename_all = "camelCase")]
pub struct HostFlowSpec {
    /// The host, as a URL: `https://api.example.com` or `http://svc.ns:8080` (the path is
    /// ignored).
    #[schemars(length(min = 1, max = 512))]
    pub url: String,
    /// Most requests at once to this host, per pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("flowControl.hosts[].maxConcurrency must be at least 1"))]
    pub max_concurrency: Option<i32>,
    /// Most requests per second to this host, per pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("flowControl.hosts[].rateLimit must be positive"))]
    pub rate_limit: Option<f64>,
    /// adaptive or fixed, for this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<HostConcurrency>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HostConcurrency {
    Adaptive,
    Fixed,
}

/// Retry behaviour.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("!has(self.hostBackoffSeconds) || !has(self.hostBackoffMaxSeconds) || self.hostBackoffSeconds <= self.hostBackoffMaxSeconds")
        .message("retry.hostBackoffSeconds must not be greater than retry.hostBackoffMaxSeconds")
)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Failed attempts before an event is dead-lettered (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("retry.maxAttempts must be at least 1"))]
    pub max_attempts: Option<i32>,
    /// Base delay in seconds for a 429 without Retry-After (doubles per attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("retry.backoffSeconds must be positive"))]
    pub backoff_seconds: Option<f64>,
    /// Seconds before another consumer's idle pending entry is taken over (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1.0").message("retry.claimIdleSeconds must be at least 1"))]
    pub claim_idle_seconds: Option<f64>,
    /// First retry delay in seconds after a 502/503/504, timeout or connect error (default
    /// 1; doubles per failed attempt, with jitter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("retry.hostBackoffSeconds must be positive"))]
    pub host_backoff_seconds: Option<f64>,
    /// Longest such delay in seconds (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("retry.hostBackoffMaxSeconds must be positive"))]
    pub host_backoff_max_seconds: Option<f64>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    #[default]
    Key,
    Stream,
    None,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterMode {
    /// One `DLQ:{json}` line per dead letter in the pod log.
    #[default]
    Console,
    /// POST to `httpUri`.
    Http,
    /// Rows in a SQL table (`sql`).
    Sql,
}

/// Where undeliverable events go: exactly one mode.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("self.mode == 'http' ? has(self.httpUri) : !has(self.httpUri)")
        .message("deadLetter.httpUri is required with mode http and only allowed with it"),
    validation = Rule::new("self.mode == 'sql' ? has(self.sql) : !has(self.sql)")
        .message("deadLetter.sql is required with mode sql and only allowed with it"),
    validation = Rule::new("!has(self.httpUri) || self.httpUri.startsWith('http://') || self.httpUri.startsWith('https://')")
        .message("deadLetter.httpUri must start with http:// or https://")
)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterSpec {
    /// console, http or sql.
    #[serde(default)]
    pub mode: DeadLetterMode,
    /// Endpoint dead letters are POSTed to (mode http).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub http_uri: Option<String>,
    /// SQL store (mode sql).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<SqlDeadLetterSpec>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SqlDeadLetterSpec {
    /// Secret key holding the database URL (postgresql://, mysql://, sqlite://).
    pub connection_secret_ref: SecretKeyRef,
    /// Dead-letter table (default dlq).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)?$')")
        .message("deadLetter.sql.table must be a SQL identifier"))]
    #[schemars(length(max = 128))]
    pub table: Option<String>,
    /// Source table whose row (`event_id` = id) is deleted after dead-lettering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)?$')")
        .message("deadLetter.sql.eventTable must be a SQL identifier"))]
    #[schemars(length(max = 128))]
    pub event_table: Option<String>,
    /// How the table is used: auto (default: the application's event table when it has a
    /// `dlq` column, else a dead-letter table), deadletter, or outbox (the original's
    /// event table: delivered rows deleted, dead letters marked `dlq = 1`; never altered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_mode: Option<SqlTableMode>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SqlTableMode {
    Auto,
    Deadletter,
    Outbox,
}

/// Prometheus scraping of the worker pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSpec {
    /// A ServiceMonitor for the Prometheus operator (created only when its CRD is installed).
    #[serde(default)]
    pub service_monitor: ServiceMonitorSpec,
    /// Alerts for this EventWorker as a PrometheusRule (created only when its CRD is
    /// installed). Its worker alerts read the series the ServiceMonitor scrapes.
    #[serde(default)]
    pub prometheus_rule: PrometheusRuleSpec,
}

const DURATION_RULE: &str = "self.matches('^(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?$') && self != ''";

/// Alert thresholds; each alert is described in the README's Runbooks.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusRuleSpec {
    /// Create the PrometheusRule.
    #[serde(default)]
    pub enabled: bool,
    /// Extra labels (for the Prometheus instance's ruleSelector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// EventWorkerBacklogGrowing: a stream's backlog has grown for this long.
    #[serde(default = "default_backlog_growing_for")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("metrics.prometheusRule.backlogGrowingFor must be a duration such as 15m"))]
    #[schemars(length(max = 16))]
    pub backlog_growing_for: String,
    /// EventWorkerOldestEventTooOld: the oldest waiting event is older than this (seconds).
    #[serde(default = "default_oldest_event_age")]
    #[schemars(range(min = 1))]
    pub oldest_event_age_seconds: u32,
    /// EventWorkerDeadLetters: dead letters per second (5-minute rate) above this.
    #[serde(default = "default_dead_letter_rate")]
    #[schemars(range(min = 0.0))]
    pub dead_letter_rate_per_second: f64,
    /// EventWorkerHostPaused: deliveries to a host have been paused for this long.
    #[serde(default = "default_host_paused_for")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("metrics.prometheusRule.hostPausedFor must be a duration such as 15m"))]
    #[schemars(length(max = 16))]
    pub host_paused_for: String,
    /// EventWorkerNotReady: fewer worker pods ready than desired for this long.
    #[serde(default = "default_not_ready_for")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("metrics.prometheusRule.notReadyFor must be a duration such as 10m"))]
    #[schemars(length(max = 16))]
    pub not_ready_for: String,
}

fn default_backlog_growing_for() -> String {
    "15m".into()
}
fn default_oldest_event_age() -> u32 {
    300
}
fn default_dead_letter_rate() -> f64 {
    0.1
}
fn default_host_paused_for() -> String {
    "15m".into()
}
fn default_not_ready_for() -> String {
    "10m".into()
}

impl Default for PrometheusRuleSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            labels: None,
            backlog_growing_for: default_backlog_growing_for(),
            oldest_event_age_seconds: default_oldest_event_age(),
            dead_letter_rate_per_second: default_dead_letter_rate(),
            host_paused_for: default_host_paused_for(),
            not_ready_for: default_not_ready_for(),
        }
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    /// Create the ServiceMonitor.
    #[serde(default)]
    pub enabled: bool,
    /// Scrape interval, e.g. 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$') && self != ''")
        .message("metrics.serviceMonitor.interval must be a Prometheus duration such as 30s or 1m"))]
    #[schemars(length(max = 32))]
    pub interval: Option<String>,
    /// Extra labels (for the Prometheus instance's selector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

/// PodDisruptionBudget: one of minAvailable or maxUnavailable.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionBudgetSpec {
    /// Pods that must stay available (number or percentage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<IntOrString>,
    /// Pods that may be unavailable (number or percentage); default 1 when neither is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AutoscalingMode {
    /// The operator scales the Deployment from the backlog it reads (no other component).
    #[default]
    Builtin,
    /// A KEDA ScaledObject (redis-streams triggers) scales the Deployment; needs KEDA.
    Keda,
    /// A HorizontalPodAutoscaler on this EventWorker with the External metric
    /// `eventworker-backlog`, served by the operator (chart value `externalMetrics.enabled`);
    /// minReplicas at least 1.
    Hpa,
}

/// Scaling on the streams' backlog (undelivered + pending entries, see the README).
/// While set, the replica count belongs to the autoscaler: builtin and keda set the worker
/// Deployment's (`spec.replicas` is not applied), hpa sets `spec.replicas` through the scale
/// subresource.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("!has(self.mode) || self.mode != 'hpa' || !has(self.minReplicas) || self.minReplicas >= 1")
        .message("autoscaling.minReplicas must be at least 1 with mode hpa (a HorizontalPodAutoscaler does not scale to zero)"),
    validation = Rule::new("!has(self.targetOldestAgeSeconds) || !has(self.mode) || self.mode == 'builtin'")
        .message("autoscaling.targetOldestAgeSeconds is used by mode builtin only"),
    validation = Rule::new("!has(self.pollIntervalSeconds) || !has(self.mode) || self.mode != 'hpa'")
        .message("autoscaling.pollIntervalSeconds is not used with mode hpa (the controller-manager's HPA sync period applies)")
)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Fewest pods; 0 scales to zero when there is no backlog and no scheduled retry, and
    /// wakes on the first event.
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self >= 0").message("autoscaling.minReplicas must not be negative"))]
    pub min_replicas: i32,
    /// Most pods.
    #[x_kube(validation = Rule::new("self >= 1").message("autoscaling.maxReplicas must be at least 1"))]
    pub max_replicas: i32,
    /// Backlog (weighted undelivered + pending entries) one pod is expected to absorb:
    /// desired pods = ceil(weighted backlog / targetLagPerReplica).
    #[serde(default = "default_target_lag")]
    #[x_kube(validation = Rule::new("self >= 1").message("autoscaling.targetLagPerReplica must be at least 1"))]
    pub target_lag_per_replica: i64,
    /// Scale up while the oldest event in the backlog has waited longer than this many
    /// seconds, whatever the count (builtin mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1.0").message("autoscaling.targetOldestAgeSeconds must be at least 1"))]
    pub target_oldest_age_seconds: Option<f64>,
    /// Seconds between two reads of the backlog (builtin: by the operator; keda: KEDA's
    /// pollingInterval). Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 300").message("autoscaling.pollIntervalSeconds must be between 1 and 300"))]
    pub poll_interval_seconds: Option<i32>,
    /// Scale-up and scale-down speed, as a HorizontalPodAutoscaler's `behavior`
    /// (stabilization windows, policies, selectPolicy); the HPA's defaults when unset: up
    /// at once by max(4 pods, 100%) per 15 s, down by up to 100% per 15 s after a 300 s
    /// window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behavior: Option<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerBehavior>,
    /// builtin (default), keda or hpa.
    #[serde(default)]
    pub mode: AutoscalingMode,
}

impl AutoscalingSpec {
    pub fn poll_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.poll_interval_seconds.unwrap_or(10).clamp(1, 300) as u64)
    }
}

/// What the operator observed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EventWorkerStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded, RedisReachable (and ScalingActive / ScalingLimited
    /// with autoscaling), one per type.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The worker image the Deployment runs (spec.image or the operator's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The consumer group the workers use (spec.group or the EventWorker's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Worker pods desired by the Deployment.
    #[serde(default)]
    pub replicas: i32,
    /// Worker pods ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the worker pods (for the scale subresource).
    #[serde(default)]
    pub selector: String,
    /// Per-stream backlog read from Redis, one per stream key.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub streams: Vec<StreamStatus>,
    /// Sum of the streams' undelivered entries.
    #[serde(default)]
    pub total_lag: i64,
    /// Sum of the streams' backlog (undelivered + pending).
    #[serde(default)]
    pub total_backlog: i64,
    /// Age in seconds of the oldest event in any stream's backlog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_age_seconds: Option<f64>,
    /// Retries scheduled for later on this Redis (all streams; not backlog until due).
    #[serde(default)]
    pub scheduled_retries: i64,
    /// What the autoscaler did last (when autoscaling is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// The autoscaler's view.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// builtin, keda or hpa.
    pub mode: String,
    /// Pods the autoscaler wants now (builtin), after windows and step limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// When the replica count last changed (builtin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
    /// Why it last changed, e.g. "backlog 5200 (weighted) / 1000 per pod: 2 -> 6".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,
}

/// A condition with `metav1.Condition`'s semantics: the transition time moves only when
/// the status does.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Ready, Progressing, Degraded, RedisReachable, ScalingActive or ScalingLimited.
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 316))]
    pub type_: String,
    /// True, False or Unknown.
    #[schemars(extend("enum" = ["True", "False", "Unknown"]))]
    pub status: String,
    /// One-word reason, CamelCase.
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"))]
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: Option<String>,
    /// The generation this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StreamStatus {
    /// Stream key.
    pub name: String,
    /// XLEN.
    pub length: i64,
    /// Delivered to the group, not acknowledged.
    pub pending: i64,
    /// Not yet read by the group (undelivered).
    pub lag: i64,
    /// Undelivered + pending: the work left.
    #[serde(default)]
    pub backlog: i64,
    /// Age in seconds of the oldest entry in the backlog.
    #[serde(default)]
    pub oldest_age_seconds: f64,
    /// Age in seconds of the oldest entry not read yet (what `targetOldestAgeSeconds`
    /// looks at).
    #[serde(default)]
    pub oldest_undelivered_age_seconds: f64,
    /// False when the undelivered count is a lower bound (Redis lost the group's lag and
    /// more entries than the counting cap wait).
    #[serde(default = "yes")]
    pub exact: bool,
}

fn yes() -> bool {
    true
}

fn default_streams() -> Vec<StreamSpec> {
    ["critical", "fast", "default", "slow"].map(StreamSpec::named).to_vec()
}
fn default_replicas() -> i32 {
    1
}
fn default_grace() -> i64 {
    30
}
fn default_redis_port() -> i32 {
    6379
}
fn default_target_lag() -> i64 {
    1000
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crd_has_names_columns_scale_and_rules() {
        let crd = EventWorker::crd();
        assert_eq!(crd.spec.group, "eventworker.io");
        assert_eq!(crd.spec.names.short_names, Some(vec!["ew".to_string()]));
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        let cols: Vec<_> = v.additional_printer_columns.as_ref().unwrap().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(cols, ["Ready", "Replicas", "Backlog", "Desired", "Oldest", "Age"]);
        let sub = v.subresources.as_ref().unwrap();
        assert!(sub.status.is_some());
        assert_eq!(sub.scale.as_ref().unwrap().spec_replicas_path, ".spec.replicas");
        let yaml = serde_yaml::to_string(&crd).unwrap();
        for msg in [
            "redis: set exactly one of url and host",
            "target.uri must start with http:// or https://",
            "deadLetter.httpUri is required with mode http",
            "autoscaling.minReplicas must not be greater than autoscaling.maxReplicas",
            "autoscaling.minReplicas must be at least 1 with mode hpa",
            "autoscaling.targetOldestAgeSeconds is used by mode builtin only",
            "autoscaling.pollIntervalSeconds is not used with mode hpa",
            "stream names are letters",
            "stream names must be unique",
        ] {
            assert!(yaml.contains(msg), "missing rule: {msg}");
        }
    }

    #[test]
    fn minimal_spec_gets_defaults() {
        let spec: EventWorkerSpec = serde_json::from_value(
            serde_json::json!({"redis": {"host": "redis"}, "target": {"uri": "http://svc/events"}}),
        )
        .unwrap();
        assert_eq!(
            spec.streams.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["critical", "fast", "default", "slow"]
        );
        assert_eq!((spec.group.as_deref(), spec.image.as_deref()), (None, None), "resolved per object at reconcile");
        assert_eq!(spec.replicas, 1);
        assert_eq!(spec.redis.port, 6379);
        assert_eq!(spec.dead_letter.mode, DeadLetterMode::Console);
        assert_eq!(spec.ordering, Ordering::Key);
    }
}
