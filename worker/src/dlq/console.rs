use std::io::Write;

use super::DeadLetter;
use crate::{Error, Result};

/// One `DLQ:{json}` line per dead letter on stdout, as the original worker printed.
pub struct ConsoleSink;

impl ConsoleSink {
    pub fn send(&self, record: &DeadLetter) -> Result<()> {
        let json =
            serde_json::to_string(record).map_err(|e| Error::DeadLetter { sink: "console", msg: e.to_string() })?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "DLQ:{json}")
            .and_then(|_| out.flush())
            .map_err(|e| Error::DeadLetter { sink: "console", msg: e.to_string() })
    }
}
