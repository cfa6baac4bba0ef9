use eventworker::config::Config;
use eventworker::shutdown::Shutdown;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("eventworker: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    eventworker::telemetry::init(cfg.log_format);
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals();
    match eventworker::run(cfg, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("eventworker: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
