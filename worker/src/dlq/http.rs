use std::time::Duration;

use super::DeadLetter;
use crate::{Error, Result};

/// POSTs `{"id","type","reason","payload"}` to `DLQ_URI`; only a 2xx counts as accepted.
pub struct HttpSink {
    uri: String,
    client: reqwest::Client,
}

impl HttpSink {
    pub fn new(uri: String, client: reqwest::Client) -> Self {
        Self { uri, client }
    }

    pub async fn send(&self, record: &DeadLetter) -> Result<()> {
        let err = |msg: String| Error::DeadLetter { sink: "http", msg };
        let resp = self
            .client
            .post(&self.uri)
            .json(record)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| err(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else if matches!(status.as_u16(), 400 | 413 | 415 | 422) {
            // This record will never be taken, however often it is sent. (401, 403, 404...
            // say the sink is misconfigured: the letter is held until it is fixed.)
            Err(Error::Rejected { sink: "http", msg: format!("{} answered {status}", crate::redact(&self.uri)) })
        } else {
            Err(err(format!("{} answered {status}", crate::redact(&self.uri))))
        }
    }
}
