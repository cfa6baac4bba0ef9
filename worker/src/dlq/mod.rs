//! Dead-letter sinks. The first configured wins: SQL (next), HTTP, console. A sink either
//! accepts a record durably (`Ok`), fails for now (the caller holds the event and tries
//! again), or refuses the record for good (`Error::Rejected`: the caller puts it in the
//! Redis dead-letter stream, `stream.rs`, so it never blocks).

pub mod cli;
mod console;
mod http;
pub mod outbox;
pub mod redrive;
pub mod sql;
pub mod stream;

use base64::Engine;
use serde::Serialize;

pub use console::ConsoleSink;
pub use http::HttpSink;
pub use sql::SqlSink;

use crate::config::DlqConfig;
use crate::Result;

/// What the sinks receive: the original's four fields plus context for stores that keep it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetter {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub reason: String,
    pub payload: String,
    #[serde(skip)]
    pub stream: String,
    #[serde(skip)]
    pub attempts: u32,
    /// The event's original `meta` JSON, kept by the SQL store so a replay restores it.
    #[serde(skip)]
    pub meta: Option<String>,
}

/// Payload bytes as text: UTF-8 as is; anything else base64 with a `base64:` prefix, so
/// nothing is lost in a TEXT column or a JSON string.
pub fn payload_text(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(s) => s.to_string(),
        Err(_) => format!("base64:{}", base64::engine::general_purpose::STANDARD.encode(payload)),
    }
}

pub enum Sink {
    Console(ConsoleSink),
    Http(HttpSink),
    Sql(std::sync::Arc<SqlSink>),
}

impl Sink {
    pub fn from_config(cfg: &DlqConfig, client: reqwest::Client) -> Result<Self> {
        match cfg {
            DlqConfig::Console => Ok(Sink::Console(ConsoleSink::new())),
            DlqConfig::Http { uri } => Ok(Sink::Http(HttpSink::new(uri.clone(), client))),
            DlqConfig::Sql { url, table, event_table, mode } => {
                Ok(Sink::Sql(std::sync::Arc::new(SqlSink::new(url, table, event_table.as_deref(), *mode)?)))
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Sink::Console(_) => "console",
            Sink::Http(_) => "http",
            Sink::Sql(_) => "sql",
        }
    }

    pub async fn send(&self, record: &DeadLetter) -> Result<()> {
        match self {
            Sink::Console(s) => s.send(record).await,
            Sink::Http(s) => s.send(record).await,
            Sink::Sql(s) => s.send(record).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_json_has_the_original_fields_only() {
        let r = DeadLetter {
            id: "7".into(),
            event_type: "t".into(),
            reason: "http_404".into(),
            payload: "{}".into(),
            stream: "events:fast".into(),
            attempts: 1,
            meta: Some("{}".into()),
        };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"id":"7","type":"t","reason":"http_404","payload":"{}"}"#);
    }

    #[test]
    fn binary_payloads_survive() {
        assert_eq!(payload_text(b"hello"), "hello");
        assert_eq!(payload_text(&[0xff, 0x00]), "base64:/wA=");
    }
}
