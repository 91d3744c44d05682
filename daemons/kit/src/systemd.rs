//! The systemd notification protocol (`sd_notify(3)`), through the `sd-notify` crate.
//!
//! Every call is a no-op when `$NOTIFY_SOCKET` is unset, so daemons run the same way under
//! systemd, under the dev stack (which owns a notify socket of its own) and from a shell.

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends notifications; cheap to clone and share.
#[derive(Debug, Clone, Default)]
pub struct Notifier;

impl Notifier {
    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }

    /// `READY=1` with a status line: the daemon listens and its dependencies answer.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn reloading(&self) {
        self.send(&[
            NotifyState::Reloading,
            NotifyState::Status("reloading configuration"),
        ]);
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// The interval at which to ping the watchdog: half of `WATCHDOG_USEC`, as
    /// `sd_watchdog_enabled(3)` recommends; `None` when no watchdog is configured for us.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok()? != std::process::id() {
                return None;
            }
        }
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}
