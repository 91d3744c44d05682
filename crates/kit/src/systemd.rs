//! The systemd notification protocol (`sd_notify(3)`), through the `sd-notify` crate.
//!
//! Every call is a no-op when `$NOTIFY_SOCKET` is unset, so daemons run the same way under
//! systemd, under the dev stack (which owns a notify socket of its own) and from a shell.
//!
//! Why a thread of its own: the notify socket is a datagram socket with a short queue
//! (`net.unix.max_dgram_qlen`, often 10). If the reader falls behind — a test that is not
//! reading, a stalled supervisor — `send` blocks. A blocked tokio worker would stall the
//! daemon, so notifications are handed to one dedicated thread through a bounded channel,
//! and when even that is full they are dropped (the next watchdog ping or status replaces
//! them) rather than ever blocking the caller.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::Duration;

use sd_notify::NotifyState;

/// One notification, owned so it can cross to the sender thread.
#[derive(Debug, Clone)]
enum Note {
    Ready(String),
    Status(String),
    Reloading,
    Stopping,
    Watchdog,
    /// Answered once every earlier note was sent.
    Flush(std::sync::mpsc::Sender<()>),
}

/// Sends notifications without ever blocking; cheap to clone and share.
#[derive(Debug, Clone)]
pub struct Notifier {
    tx: Option<SyncSender<Note>>,
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Notifier {
    /// Starts the sender thread when `$NOTIFY_SOCKET` is set; otherwise a no-op notifier.
    pub fn new() -> Self {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Notifier { tx: None };
        }
        let (tx, rx) = sync_channel::<Note>(64);
        let spawned = std::thread::Builder::new()
            .name("sd-notify".into())
            .spawn(move || {
                for note in rx {
                    let result = match &note {
                        Note::Ready(status) => sd_notify::notify(
                            false,
                            &[NotifyState::Ready, NotifyState::Status(status)],
                        ),
                        Note::Status(status) => {
                            sd_notify::notify(false, &[NotifyState::Status(status)])
                        }
                        Note::Reloading => sd_notify::notify(
                            false,
                            &[
                                NotifyState::Reloading,
                                NotifyState::Status("reloading configuration"),
                            ],
                        ),
                        Note::Stopping => sd_notify::notify(
                            false,
                            &[NotifyState::Stopping, NotifyState::Status("draining")],
                        ),
                        Note::Watchdog => sd_notify::notify(false, &[NotifyState::Watchdog]),
                        Note::Flush(done) => {
                            let _ = done.send(());
                            Ok(())
                        }
                    };
                    if let Err(e) = result {
                        tracing::warn!(error = %e, ?note, "sd_notify failed");
                    }
                }
            });
        match spawned {
            Ok(_) => Notifier { tx: Some(tx) },
            Err(e) => {
                tracing::error!(error = %e, "cannot start the sd-notify thread; notifications disabled");
                Notifier { tx: None }
            }
        }
    }

    fn send(&self, note: Note) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(note) {
            Ok(()) => {}
            Err(TrySendError::Full(note)) => {
                tracing::debug!(
                    ?note,
                    "notify socket is not being read; notification dropped"
                )
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// `READY=1` with a status line: the daemon listens and its dependencies answer.
    pub fn ready(&self, status: &str) {
        self.send(Note::Ready(status.to_owned()));
    }

    pub fn status(&self, status: &str) {
        self.send(Note::Status(status.to_owned()));
    }

    pub fn reloading(&self) {
        self.send(Note::Reloading);
    }

    pub fn stopping(&self) {
        self.send(Note::Stopping);
    }

    pub fn watchdog(&self) {
        self.send(Note::Watchdog);
    }

    /// Waits (at most `timeout`) until every notification handed over so far was sent, so
    /// `STOPPING=1` reaches the service manager before the process exits.
    ///
    /// Never blocks past `timeout`, even when the queue is full because the notify socket
    /// is not being read (a blocking `send` would hang the exit on a stuck manager).
    pub fn flush(&self, timeout: Duration) {
        let Some(tx) = &self.tx else { return };
        let deadline = std::time::Instant::now() + timeout;
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let mut note = Note::Flush(done_tx);
        loop {
            match tx.try_send(note) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(back)) => {
                    if std::time::Instant::now() >= deadline {
                        return;
                    }
                    note = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        let _ = done_rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A stalled sender thread (its queue full, nobody draining it) must not hang `flush`
    /// past its timeout: once it did, since `flush` used a blocking `send`.
    #[test]
    fn flush_returns_on_time_when_the_queue_is_full() {
        let (tx, _rx) = sync_channel::<Note>(2);
        let notifier = Notifier { tx: Some(tx) };
        notifier.watchdog();
        notifier.watchdog();
        let started = std::time::Instant::now();
        notifier.flush(Duration::from_millis(100));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "flush blocked for {:?}",
            started.elapsed()
        );
    }
}
