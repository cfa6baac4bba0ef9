use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use eventworker_operator::admin::{self, AdminState};
use eventworker_operator::controller::{self, Context, Liveness, Settings};
use eventworker_operator::leader::Elector;
use eventworker_operator::metrics::Metrics;
use tokio_util::sync::CancellationToken;

/// eventworker-operator: reconciles EventWorker resources into worker Deployments.
#[derive(Parser)]
#[command(name = "eventworker-operator", version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Port of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, env = "METRICS_PORT", default_value_t = 8080)]
    metrics_port: u16,
    /// Name of the leader-election Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "eventworker-operator")]
    lease_name: String,
    /// Namespace of the Lease (defaults to the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease (defaults to the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a leader's lease lasts without renewal (at least 2).
    #[arg(long, env = "LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// Seconds between a standby's tries for the lease and the leader's renewals (less than
    /// LEASE_DURATION).
    #[arg(long, env = "LEASE_RETRY_SECONDS", default_value_t = 2.0)]
    lease_retry_seconds: f64,
    /// Seconds between looks at a healthy EventWorker (backlog, readiness), ±10 %.
    #[arg(long, env = "RESYNC_SECONDS", default_value_t = 30)]
    resync_seconds: u64,
    /// Most EventWorkers reconciled at once.
    #[arg(long, env = "MAX_CONCURRENT_RECONCILES", default_value_t = 8)]
    max_concurrent_reconciles: u16,
    /// Worker image of EventWorkers that set no spec.image (the chart's `workerImage`).
    #[arg(long, env = "DEFAULT_WORKER_IMAGE", default_value = eventworker_operator::crd::DEFAULT_IMAGE)]
    default_worker_image: String,
    /// Secret salt of the worker pods' config hash (the chart generates one).
    #[arg(long, env = "CONFIG_HASH_SALT", default_value = "", hide_env_values = true)]
    config_hash_salt: String,
    /// Seconds to wait for an EventWorker's Redis when reading its backlog.
    #[arg(long, env = "REDIS_TIMEOUT_SECONDS", default_value_t = 3.0)]
    redis_timeout_seconds: f64,
    /// Only reconcile EventWorkers in this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Port of the External metrics API (`external.metrics.k8s.io`, for `autoscaling.mode:
    /// hpa`); off when unset. Needs METRICS_API_CERT_FILE and METRICS_API_KEY_FILE.
    #[arg(long, env = "METRICS_API_PORT")]
    metrics_api_port: Option<u16>,
    /// PEM certificate (chain) the External metrics API serves.
    #[arg(long, env = "METRICS_API_CERT_FILE")]
    metrics_api_cert_file: Option<String>,
    /// PEM private key of that certificate.
    #[arg(long, env = "METRICS_API_KEY_FILE")]
    metrics_api_key_file: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// OTLP/HTTP collector to export traces to (a span per reconcile); no traces without
    /// it. The other standard OTEL_* variables apply.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otel_exporter_otlp_endpoint: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the EventWorker CustomResourceDefinition as YAML.
    Crd,
    /// Print the alerting rules for every EventWorker and the operator (Prometheus rules
    /// file; the chart ships it as a PrometheusRule).
    PrometheusRules {
        /// Only the alerts of one EventWorker, with default thresholds.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        eventworker: Option<String>,
    },
    /// Run the controller (the default).
    Run,
}

/// A setting that cannot work stops start-up, naming it.
fn check(args: &Args) -> Result<(), String> {
    if args.lease_duration < 2 {
        return Err(format!("LEASE_DURATION={}: must be at least 2 seconds", args.lease_duration));
    }
    if !(args.lease_retry_seconds >= 0.1 && args.lease_retry_seconds < args.lease_duration as f64) {
        return Err(format!(
            "LEASE_RETRY_SECONDS={}: must be at least 0.1 and less than LEASE_DURATION ({})",
            args.lease_retry_seconds, args.lease_duration
        ));
    }
    if args.resync_seconds == 0 {
        return Err("RESYNC_SECONDS=0: must be at least 1".into());
    }
    if args.max_concurrent_reconciles == 0 {
        return Err("MAX_CONCURRENT_RECONCILES=0: must be at least 1".into());
    }
    if !(args.redis_timeout_seconds >= 0.1 && args.redis_timeout_seconds <= 60.0) {
        return Err(format!("REDIS_TIMEOUT_SECONDS={}: must be between 0.1 and 60", args.redis_timeout_seconds));
    }
    if args.default_worker_image.trim().is_empty() || args.default_worker_image.contains(char::is_whitespace) {
        return Err(format!("DEFAULT_WORKER_IMAGE={:?}: not an image reference", args.default_worker_image));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let printed = match &args.command {
        Some(Cmd::Crd) => Some(eventworker_operator::crd_yaml()),
        Some(Cmd::PrometheusRules { eventworker }) => {
            let one = match eventworker.as_deref().map(|e| e.split_once('/')) {
                None => None,
                Some(Some((ns, name))) if !ns.is_empty() && !name.is_empty() => Some((ns, name)),
                Some(_) => {
                    eprintln!("eventworker-operator: --eventworker must be NAMESPACE/NAME");
                    std::process::exit(2);
                }
            };
            Some(eventworker_operator::resources::prometheus_rule::rules_yaml(one))
        }
        _ => None,
    };
    if let Some(text) = printed {
        use std::io::Write;
        // A closed pipe (`| head`) ends the command quietly.
        let _ = std::io::stdout().write_all(text.as_bytes());
        return Ok(());
    }
    if let Err(e) = check(&args) {
        eprintln!("eventworker-operator: {e}");
        std::process::exit(2);
    }
    let format = if args.log_format == "json" { ew_otel::LogFormat::Json } else { ew_otel::LogFormat::Text };
    // Kept until the end: dropping it exports the spans still queued.
    let _telemetry = match ew_otel::init("eventworker-operator", format, args.otel_exporter_otlp_endpoint.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("eventworker-operator: {e}");
            std::process::exit(2);
        }
    };

    let metrics = Arc::new(Metrics::new());
    let config = kube::Config::infer()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the Kubernetes API (KUBECONFIG / in-cluster config): {e}"))?;
    let client =
        metrics.counted_client(config).map_err(|e| anyhow::anyhow!("cannot build a Kubernetes client: {e}"))?;
    let settings = Settings {
        defaults: eventworker_operator::resources::Defaults {
            image: args.default_worker_image.clone(),
            hash_salt: args.config_hash_salt.clone(),
        },
        redis_timeout: Duration::from_secs_f64(args.redis_timeout_seconds),
        resync: Duration::from_secs(args.resync_seconds),
        concurrency: args.max_concurrent_reconciles,
    };
    let liveness = Arc::new(Liveness::new(settings.resync));
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", args.metrics_port))
        .await
        .map_err(|e| anyhow::anyhow!("METRICS_PORT {}: {e}", args.metrics_port))?;
    let app = admin::router(AdminState { metrics: metrics.clone(), ready: ready.clone(), liveness: liveness.clone() });
    tokio::spawn(async move { axum::serve(listener, app).await });

    let shutdown = CancellationToken::new();
    if let Some(port) = args.metrics_api_port {
        let (Some(cert), Some(key)) = (args.metrics_api_cert_file.clone(), args.metrics_api_key_file.clone()) else {
            anyhow::bail!("METRICS_API_PORT is set: METRICS_API_CERT_FILE and METRICS_API_KEY_FILE are required");
        };
        let (client, stop, timeout) = (client.clone(), shutdown.clone(), settings.redis_timeout);
        tokio::spawn(async move {
            if let Err(e) = eventworker_operator::metrics_api::serve(client, port, &cert, &key, timeout, stop).await {
                tracing::error!(error = %e, "external metrics API stopped");
                std::process::exit(2);
            }
        });
    }
    tokio::spawn({
        let s = shutdown.clone();
        async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return,
            };
            tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
            tracing::info!("shutting down");
            s.cancel();
        }
    });

    let identity = args.identity.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "operator".into())
    });
    let elector = Arc::new(Elector::new(
        client.clone(),
        &args.lease_namespace,
        &args.lease_name,
        &identity,
        Duration::from_secs(args.lease_duration),
        Duration::from_secs_f64(args.lease_retry_seconds),
    ));
    // Stand by until we hold the lease.
    loop {
        match tokio::time::timeout(elector.retry_period().max(Duration::from_secs(2)), elector.try_acquire_or_renew())
            .await
        {
            Ok(Ok(true)) => break,
            Ok(Ok(false)) => {
                ready.store(true, Ordering::Relaxed);
                tracing::debug!("another replica leads; standing by");
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "leader election failed; retrying"),
            Err(_) => tracing::warn!("leader election timed out; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(elector.retry_period()) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    ready.store(true, Ordering::Relaxed);
    metrics.leader.set(1);
    tracing::info!(%identity, "leader: reconciling EventWorkers");

    // Keep the lease. If it cannot be renewed well before it could expire (2/3 of its
    // duration, counted from the start of the last successful renewal), or another replica
    // holds it, exit at once: a standby may take over after the full duration, and draining
    // first could leave two leaders for a moment. Kubernetes restarts this pod as a standby.
    // Renewal stops only once the controller has drained (the lease must cover every write).
    let stop_renewing = CancellationToken::new();
    let renewing = tokio::spawn({
        let (shutdown, elector) = (stop_renewing.clone(), elector.clone());
        let deadline = Duration::from_secs(args.lease_duration) * 2 / 3;
        async move {
            let mut renewed_at = std::time::Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(elector.retry_period()) => {}
                    _ = shutdown.cancelled() => return,
                }
                let started = std::time::Instant::now();
                let left = deadline.saturating_sub(renewed_at.elapsed());
                match tokio::time::timeout(left, elector.try_acquire_or_renew()).await {
                    Ok(Ok(true)) => renewed_at = started,
                    Ok(Ok(false)) => {
                        tracing::error!("leader lease taken by another replica; exiting");
                        std::process::exit(1);
                    }
                    Ok(Err(e)) if renewed_at.elapsed() < deadline => {
                        tracing::warn!(error = %e, "lease renewal failed; retrying")
                    }
                    _ => {
                        tracing::error!("lease could not be renewed in time; exiting");
                        std::process::exit(1);
                    }
                }
            }
        }
    });
    let ctx = Context::new(client, metrics.clone(), settings).with_liveness(liveness);
    controller::run(Arc::new(ctx), shutdown, args.watch_namespace.filter(|n| !n.is_empty())).await;
    // Stopped (SIGTERM): no more reconciles; hand the lease over at once.
    stop_renewing.cancel();
    let _ = renewing.await;
    metrics.leader.set(0);
    match tokio::time::timeout(Duration::from_secs(5), elector.release()).await {
        Ok(Ok(())) => tracing::info!("leader lease released"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not release the leader lease; a standby takes it when it expires")
        }
        Err(_) => tracing::warn!("releasing the leader lease timed out"),
    }
    Ok(())
}
