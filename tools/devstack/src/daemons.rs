//! The four TaskFlow daemons as children of the stack, each with a notify socket of its own.
//!
//! Why a socket per daemon: `READY=1` must be attributed to the daemon that sent it, and the
//! stack (like systemd) waits for each one before starting those that depend on it.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use taskflow_localstack::NotifySocket;

use crate::layout::Layout;

/// What to run: the stack's name for it, its binary and its configuration file.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    pub name: &'static str,
    pub binary: &'static str,
    pub config: PathBuf,
}

/// A running daemon; dropping it stops it (SIGTERM, then SIGKILL after 15 s).
pub struct DaemonProcess {
    pub name: &'static str,
    pub spec: DaemonSpec,
    child: Child,
    status_task: tokio::task::JoinHandle<()>,
}

/// Where the daemon binaries are: `$TASKFLOW_DEVSTACK_BIN_DIR`, else next to this binary
/// (`target/debug`, where `cargo build --workspace` puts them all).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TASKFLOW_DEVSTACK_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating taskflow-devstack")?;
    exe.parent()
        .map(Path::to_path_buf)
        .context("taskflow-devstack has no parent directory")
}

pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{} not found; run `cargo build --workspace` (or set TASKFLOW_DEVSTACK_BIN_DIR)",
            path.display()
        );
    }
    Ok(path)
}

impl DaemonProcess {
    /// Starts `binary --config <config>` and waits until it sends `READY=1`, fails, or
    /// `timeout` passes. Its pid goes to `status/<name>.pid`.
    pub async fn start(
        layout: &Layout,
        spec: &DaemonSpec,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let name = spec.name;
        let config = &spec.config;
        let bin = binary(spec.binary)?;
        let socket = NotifySocket::bind().context("binding a notify socket")?;
        let log_path = layout.log(name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut child = Command::new(&bin)
            .arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", socket.path())
            .env("WATCHDOG_USEC", "30000000")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;

        let status_file = layout.status_dir().join(name);
        let _ = std::fs::write(&status_file, "starting\n");
        let _ = std::fs::write(
            layout.status_dir().join(format!("{name}.pid")),
            format!("{}\n", child.id()),
        );
        let (mut ready_rx, status_task) = follow_notifications(socket, status_file);

        let deadline = Instant::now() + timeout;
        loop {
            if *ready_rx.borrow() {
                break;
            }
            if let Some(status) = child.try_wait()? {
                status_task.abort();
                bail!(
                    "{name} exited ({status}) before it was ready; see {}{}",
                    log_path.display(),
                    log_tail(&log_path)
                );
            }
            if Instant::now() > deadline {
                let mut me = DaemonProcess {
                    name,
                    spec: spec.clone(),
                    child,
                    status_task,
                };
                me.stop();
                bail!(
                    "{name} did not report READY=1 within {} s; see {}{}",
                    timeout.as_secs(),
                    log_path.display(),
                    log_tail(&log_path)
                );
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), ready_rx.changed()).await;
        }
        Ok(DaemonProcess {
            name,
            spec: spec.clone(),
            child,
            status_task,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Has it exited on its own? Returns its exit status if so.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM to its process group, up to 15 s for the drain, then SIGKILL.
    pub fn stop(&mut self) {
        if self.exited().is_some() {
            self.status_task.abort();
            return;
        }
        let Ok(raw) = i32::try_from(self.child.id()) else {
            return;
        };
        let pgid = Pid::from_raw(raw);
        let _ = killpg(pgid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                self.status_task.abort();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
        self.status_task.abort();
    }
}

/// Reads the daemon's notify socket: `STATUS=` lines go to its status file (for `make
/// status`), `READY=1` flips the returned flag.
/// The last lines of a daemon's log, to print with a start-up failure (the state directory
/// may be gone by the time someone looks, e.g. a test's).
fn log_tail(path: &Path) -> String {
    const LINES: usize = 15;
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(LINES)..];
    if tail.is_empty() {
        return String::new();
    }
    format!("; its last lines:\n  {}", tail.join("\n  "))
}

fn follow_notifications(
    socket: NotifySocket,
    status_file: PathBuf,
) -> (
    tokio::sync::watch::Receiver<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let Ok(msg) = socket.recv().await else { break };
            for line in msg.lines() {
                if let Some(status) = line.strip_prefix("STATUS=") {
                    let _ = std::fs::write(&status_file, format!("{status}\n"));
                } else if line == "READY=1" {
                    let _ = ready_tx.send(true);
                }
            }
        }
    });
    (ready_rx, task)
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
