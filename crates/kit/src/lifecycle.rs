//! What a running daemon is handed: its configuration, its readiness/shutdown handle and
//! the stream of configuration reloads.
//!
//! Shutdown is a [`CancellationToken`] rather than a channel so that every listener, pool
//! and background task can hold a child token and stop on its own terms; the kit bounds the
//! whole drain with `shutdown_grace_secs`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::systemd::Notifier;

/// Everything a daemon's main future receives from [`crate::run`].
pub struct Daemon<C> {
    pub name: &'static str,
    pub config: Arc<C>,
    /// Path of the configuration file, if one was given (for daemons that reload parts of it).
    pub config_path: Option<std::path::PathBuf>,
    pub lifecycle: Lifecycle,
    /// One message per SIGHUP whose configuration loaded and validated. Drop the receiver
    /// if the daemon has nothing to reload; the kit then just re-validates and acknowledges.
    pub reloads: mpsc::Receiver<Reload<C>>,
}

/// Readiness, status and shutdown, shared by all of a daemon's tasks.
#[derive(Clone)]
pub struct Lifecycle {
    notifier: Notifier,
    /// Cancelled once SIGTERM or SIGINT arrives (after `STOPPING=1` was sent).
    pub shutdown: CancellationToken,
    /// How long the drain may take before the kit exits anyway.
    pub grace: Duration,
}

impl Lifecycle {
    pub(crate) fn new(notifier: Notifier, grace: Duration) -> Self {
        Lifecycle {
            notifier,
            shutdown: CancellationToken::new(),
            grace,
        }
    }

    /// Tells the service manager the daemon is ready, with a human status line.
    pub fn ready(&self, status: &str) {
        tracing::info!(status, "ready");
        self.notifier.ready(status);
    }

    pub fn status(&self, status: &str) {
        self.notifier.status(status);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}

/// A validated configuration delivered on SIGHUP. The kit sends `READY=1` again once the
/// daemon calls [`Reload::done`] (or drops the reload).
pub struct Reload<C> {
    pub config: C,
    pub(crate) done: oneshot::Sender<Result<(), String>>,
}

impl<C> Reload<C> {
    /// Reports the outcome; on `Err` the daemon keeps its previous configuration.
    pub fn done(self, result: Result<(), String>) {
        let _ = self.done.send(result);
    }
}
