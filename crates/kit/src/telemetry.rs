//! Logging: structured journald fields under systemd, text or JSON lines elsewhere.
//!
//! "Under systemd" means stdout *is* the journal stream: `$JOURNAL_STREAM` holds the
//! `device:inode` of that stream, and we compare it with stdout's, as `sd_journal_stream_fd(3)`
//! describes. A daemon started by hand from a systemd-run shell inherits the variable but not
//! the stream, and so keeps logging to its terminal.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.level`.
pub fn init(service: &str, log: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(&log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));

    let format = match log.format {
        LogFormat::Auto if stdout_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        other => other,
    };
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(layer) => registry
                .with(layer.with_syslog_identifier(service.to_owned()))
                .try_init(),
            Err(e) => {
                eprintln!("{service}: journald unavailable ({e}); logging to stdout");
                registry.with(tracing_subscriber::fmt::layer()).try_init()
            }
        },
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false),
            )
            .try_init(),
        LogFormat::Text | LogFormat::Auto => registry
            .with(tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal()))
            .try_init(),
    };
    // A second init (tests running several daemons in one process) keeps the first.
    let _ = result;
}

/// True when stdout is the stream named by `$JOURNAL_STREAM`.
pub fn stdout_is_journal() -> bool {
    let Ok(var) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = var.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let fd = std::io::stdout().as_raw_fd();
    let Ok(meta) = std::fs::metadata(format!("/proc/self/fd/{fd}")) else {
        return false;
    };
    use std::os::unix::fs::MetadataExt;
    meta.dev() == dev && meta.ino() == ino
}
