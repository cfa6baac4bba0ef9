use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("invalid configuration: {var}: {msg}")]
    Config { var: &'static str, msg: String },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("dead-letter sink {sink}: {msg}")]
    DeadLetter { sink: &'static str, msg: String },
    /// The sink refuses this record for good (a value its table cannot hold, a 4xx): trying
    /// again cannot help.
    #[error("dead-letter sink {sink} refuses the record: {msg}")]
    Rejected { sink: &'static str, msg: String },
    #[error("admin server: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
