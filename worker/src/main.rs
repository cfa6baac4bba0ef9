use eventworker::config::{Command, Config, LogFormat};

// glibc malloc contends between runtime threads at this request rate; mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use eventworker::shutdown::Shutdown;

fn main() -> std::process::ExitCode {
    let (cfg, command) = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("eventworker: {}", eventworker::redact(&e.to_string()));
            return std::process::ExitCode::from(2);
        }
    };
    let format = match cfg.log_format {
        LogFormat::Text => ew_otel::LogFormat::Text,
        LogFormat::Json => ew_otel::LogFormat::Json,
    };
    // Kept until the end: dropping it exports the spans still queued.
    let _telemetry = match ew_otel::init("eventworker", format, cfg.otlp_endpoint.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("eventworker: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cfg.worker_threads {
        rt.worker_threads(n);
    }
    match rt.enable_all().build() {
        Ok(rt) => rt.block_on(async move {
            match command {
                Some(Command::Dlq { action }) => match eventworker::dlq::cli::run(&cfg, *action).await {
                    Ok(()) => std::process::ExitCode::SUCCESS,
                    Err(e) => failed(&e),
                },
                Some(Command::Status { json, watch, admin_url }) => {
                    let admin = admin_url.unwrap_or_else(|| format!("http://127.0.0.1:{}", cfg.metrics_port));
                    match eventworker::status::run(&cfg, json, watch, &admin).await {
                        Ok(()) => std::process::ExitCode::SUCCESS,
                        Err(e) => failed(&e),
                    }
                }
                None => run(cfg).await,
            }
        }),
        Err(e) => {
            eprintln!("eventworker: cannot start the runtime: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(cfg: Config) -> std::process::ExitCode {
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals();
    match eventworker::run(cfg, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => failed(&e),
    }
}

/// One message; exit code 2 for a setting that is wrong (it names the variable), 1 otherwise.
fn failed(e: &eventworker::Error) -> std::process::ExitCode {
    eprintln!("eventworker: {}", eventworker::redact(&e.to_string()));
    std::process::ExitCode::from(if matches!(e, eventworker::Error::Config { .. }) { 2 } else { 1 })
}
