//! The crate's error type.

use std::time::Duration;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while starting, probing or stopping infrastructure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation failed; `context` says which.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A required executable is missing; the message says how to get it.
    #[error("{0}")]
    BinaryNotFound(String),
    /// A readiness check or wait did not succeed in time.
    #[error("timed out after {after:?} waiting for {what}{}", last_error_suffix(.last_error))]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        after: Duration,
        /// The last error seen while polling, if any.
        last_error: Option<String>,
    },
    /// A managed process exited while we expected it to run.
    #[error("{name} exited unexpectedly ({status}); log {log_path}:\n{log_tail}")]
    ProcessExited {
        /// Component name.
        name: String,
        /// Exit status description.
        status: String,
        /// Where its output went.
        log_path: String,
        /// The last lines of that output.
        log_tail: String,
    },
    /// A helper command (e.g. `initdb`) returned a failure status.
    #[error("{program} failed ({status}):\n{output}")]
    CommandFailed {
        /// The program run.
        program: String,
        /// Exit status description.
        status: String,
        /// Its combined stdout and stderr.
        output: String,
    },
    /// The component is stopped but the call needs it running.
    #[error("{0} is not running")]
    NotRunning(String),
    /// A system user lookup failed (e.g. no `postgres` user while running as root).
    #[error("user lookup: {0}")]
    User(String),
    /// PostgreSQL client error.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// Redis client error.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Kafka client error.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// HTTP error talking to a component's web API.
    #[error("http: {0}")]
    Http(String),
    /// JSON decoding error.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

fn last_error_suffix(last: &Option<String>) -> String {
    match last {
        Some(e) => format!(" (last error: {e})"),
        None => String::new(),
    }
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Attach a context string to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}
