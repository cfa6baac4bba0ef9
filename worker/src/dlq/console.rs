use std::io::Write;

use tokio::sync::{mpsc, oneshot};

use super::DeadLetter;
use crate::{Error, Result};

/// Lines waiting for the writer thread; beyond this, dead-lettering waits.
const QUEUE: usize = 1024;

type Line = (String, oneshot::Sender<std::io::Result<()>>);

/// One `DLQ:{json}` line per dead letter on stdout, as the original worker printed. A
/// thread of its own writes them, so a slow or blocked stdout (a full pipe) never stalls
/// a runtime thread; a letter counts as accepted once its line is written.
pub struct ConsoleSink {
    tx: mpsc::Sender<Line>,
}

impl Default for ConsoleSink {
    fn default() -> Self {
        Self::new()
    }
}

impl ConsoleSink {
    pub fn new() -> Self {
        let (tx, mut rx) = mpsc::channel::<Line>(QUEUE);
        let spawned = std::thread::Builder::new().name("dlq-console".into()).spawn(move || {
            while let Some((line, done)) = rx.blocking_recv() {
                let mut out = std::io::stdout().lock();
                let _ = done.send(out.write_all(line.as_bytes()).and_then(|_| out.flush()));
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the console dead-letter writer");
        }
        Self { tx }
    }

    pub async fn send(&self, record: &DeadLetter) -> Result<()> {
        let err = |msg: String| Error::DeadLetter { sink: "console", msg };
        let json = serde_json::to_string(record).map_err(|e| err(e.to_string()))?;
        let (done, written) = oneshot::channel();
        self.tx.send((format!("DLQ:{json}\n"), done)).await.map_err(|_| err("writer thread gone".into()))?;
        written.await.map_err(|_| err("writer thread gone".into()))?.map_err(|e| err(e.to_string()))
    }
}
