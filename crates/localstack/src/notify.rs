//! A fake systemd notification socket (`$NOTIFY_SOCKET`) for testing `sd_notify` calls.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::UnixDatagram;

use crate::error::{Error, IoContext, Result};

/// A unix datagram socket bound at a temporary path. Point a daemon's `NOTIFY_SOCKET` at
/// [`Self::path`] and read what it reports (`READY=1`, `STATUS=…`, `WATCHDOG=1`,
/// `STOPPING=1`, …).
#[derive(Debug)]
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    state: Mutex<State>,
    _dir: tempfile::TempDir,
}

#[derive(Debug, Default)]
struct State {
    /// Every assignment received, in order.
    history: Vec<String>,
    /// Index into `history` of the first assignment `wait_for` has not looked past.
    cursor: usize,
}

impl NotifySocket {
    /// Binds a new socket in a fresh temporary directory.
    pub fn bind() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("taskflow-notify-")
            .tempdir()
            .ctx(|| "creating a temporary directory for the notify socket".to_owned())?;
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).ctx(|| format!("binding {}", path.display()))?;
        Ok(Self {
            socket,
            path,
            state: Mutex::new(State::default()),
            _dir: dir,
        })
    }

    /// The socket path, the value for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Receives one datagram and returns it whole (it may hold several newline-separated
    /// assignments). Its assignments are also recorded for [`Self::wait_for`] and
    /// [`Self::history`].
    pub async fn recv(&self) -> Result<String> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = self
            .socket
            .recv(&mut buf)
            .await
            .ctx(|| format!("receiving on {}", self.path.display()))?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let mut state = self.lock();
        state.history.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned),
        );
        Ok(text)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until an assignment (one `KEY=value` line) matching `predicate` arrives and
    /// returns it. Assignments already received but not yet passed over by an earlier
    /// `wait_for` are checked first, so nothing sent between two calls is missed.
    pub async fn wait_for<P>(&self, mut predicate: P, timeout: Duration) -> Result<String>
    where
        P: FnMut(&str) -> bool,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let mut state = self.lock();
                let start = state.cursor;
                let found = state.history[start..]
                    .iter()
                    .position(|a| predicate(a))
                    .map(|i| start + i);
                match found {
                    Some(i) => {
                        state.cursor = i + 1;
                        return Ok(state.history[i].clone());
                    }
                    None => state.cursor = state.history.len(),
                }
            }
            match tokio::time::timeout_at(deadline, self.recv()).await {
                Ok(r) => {
                    r?;
                }
                Err(_) => {
                    return Err(Error::Timeout {
                        what: format!("a matching notification on {}", self.path.display()),
                        after: timeout,
                        last_error: Some(format!("received: {:?}", self.history())),
                    })
                }
            }
        }
    }

    /// Waits for exactly the assignment `assignment` (e.g. `"READY=1"`).
    pub async fn wait_for_assignment(&self, assignment: &str, timeout: Duration) -> Result<()> {
        self.wait_for(|a| a == assignment, timeout)
            .await
            .map(|_| ())
    }

    /// Every assignment received so far, in order.
    pub fn history(&self) -> Vec<String> {
        self.lock().history.clone()
    }
}
