//! The systemd notification protocol (`sd_notify(3)`), through the `sd-notify` crate.
//!
//! Every call is a no-op when `$NOTIFY_SOCKET` is unset, so daemons run the same way under
//! systemd, under the dev stack (which owns a notify socket of its own) and from a shell.
//!
//! Why a thread of its own: the notify socket is a datagram socket with a short queue
//! (`net.unix.max_dgram_qlen`, often 10). If the reader falls behind — a test that is not
//! reading, a stalled supervisor — `send` blocks. A blocked tokio worker would stall the
//! daemon, so notifications are handed to one dedicated thread through a bounded channel,
//! and when even that is full they are dropped rather than ever blocking the caller. At
//! most one watchdog ping waits in that channel (a ping is idempotent): a reader that
//! falls behind for minutes must not fill the channel with stale pings, which would then
//! crowd out `STOPPING=1`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
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
    /// A watchdog ping is in the channel, not yet taken by the sender thread.
    watchdog_queued: Arc<AtomicBool>,
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Notifier {
    /// Starts the sender thread when `$NOTIFY_SOCKET` is set; otherwise a no-op notifier.
    pub fn new() -> Self {
        let watchdog_queued = Arc::new(AtomicBool::new(false));
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Notifier {
                tx: None,
                watchdog_queued,
            };
        }
        let (tx, rx) = sync_channel::<Note>(64);
        let queued = watchdog_queued.clone();
        let spawned = std::thread::Builder::new()
            .name("sd-notify".into())
            .spawn(move || {
                for note in rx {
                    if matches!(note, Note::Watchdog) {
                        // Taken: the next ping may be queued behind whatever follows.
                        queued.store(false, Ordering::Release);
                    }
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
            Ok(_) => Notifier {
                tx: Some(tx),
                watchdog_queued,
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot start the sd-notify thread; notifications disabled");
                Notifier {
                    tx: None,
                    watchdog_queued,
                }
            }
        }
    }

    /// Queues `note`; false when it was dropped.
    fn send(&self, note: Note) -> bool {
        let Some(tx) = &self.tx else { return false };
        match tx.try_send(note) {
            Ok(()) => true,
            Err(TrySendError::Full(note)) => {
                tracing::debug!(
                    ?note,
                    "notify socket is not being read; notification dropped"
                );
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
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

    /// A watchdog ping, unless one is still waiting to be sent (it would say the same).
    pub fn watchdog(&self) {
        if self.watchdog_queued.swap(true, Ordering::AcqRel) {
            return;
        }
        if !self.send(Note::Watchdog) {
            self.watchdog_queued.store(false, Ordering::Release);
        }
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

    /// A notifier whose sender thread never takes anything: its channel, to inspect.
    fn unread(capacity: usize) -> (Notifier, std::sync::mpsc::Receiver<Note>) {
        let (tx, rx) = sync_channel::<Note>(capacity);
        let notifier = Notifier {
            tx: Some(tx),
            watchdog_queued: Arc::default(),
        };
        (notifier, rx)
    }

    /// A stalled sender thread (its queue full, nobody draining it) must not hang `flush`
    /// past its timeout: once it did, since `flush` used a blocking `send`.
    #[test]
    fn flush_returns_on_time_when_the_queue_is_full() {
        let (notifier, _rx) = unread(2);
        notifier.status("one");
        notifier.status("two");
        let started = std::time::Instant::now();
        notifier.flush(Duration::from_millis(100));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "flush blocked for {:?}",
            started.elapsed()
        );
    }

    /// Minutes of watchdog pings while nobody reads the socket must not fill the channel:
    /// `STOPPING=1` after them was dropped, and a test waiting for it saw the daemon exit
    /// without it (e2e `notify_killed_mid_batch_loses_no_mail`, now and then).
    #[test]
    fn stale_pings_do_not_crowd_out_stopping() {
        let (notifier, rx) = unread(64);
        for _ in 0..200 {
            notifier.watchdog();
        }
        notifier.stopping();
        let queued: Vec<Note> = rx.try_iter().collect();
        let pings = queued
            .iter()
            .filter(|n| matches!(n, Note::Watchdog))
            .count();
        assert_eq!(pings, 1, "{queued:?}");
        assert!(matches!(queued.last(), Some(Note::Stopping)), "{queued:?}");
    }
}
