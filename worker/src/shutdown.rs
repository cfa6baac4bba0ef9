//! One shutdown signal for every task, in two stages: `stop` (stop reading, finish what is
//! in flight) and `hard` (grace period over: abandon in-flight work, leaving it pending).

use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
pub struct Shutdown {
    pub stop: CancellationToken,
    pub hard: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// SIGTERM or SIGINT begins a graceful stop; a second one stops at once.
    pub fn listen_for_signals(&self) {
        let s = self.clone();
        tokio::spawn(async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
            for stage in 0..2 {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                if stage == 0 {
                    tracing::info!("shutdown requested: no new reads, draining in-flight events");
                    s.stop.cancel();
                } else {
                    tracing::warn!("second signal: abandoning in-flight events (they stay pending)");
                    s.hard.cancel();
                }
            }
        });
    }
}
