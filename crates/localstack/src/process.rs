//! A child process in its own process group that is torn down on drop.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::error::{Error, IoContext, Result};

/// How a [`ManagedChild`] is asked to stop before it is killed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StopPolicy {
    /// The polite signal (SIGTERM for most, SIGINT = "fast shutdown" for PostgreSQL).
    pub signal: Signal,
    /// How long to wait after it before SIGKILL.
    pub grace: Duration,
}

/// A spawned process, leader of its own process group, with output sent to a log file.
///
/// Dropping it stops the whole process group: the polite signal, a short wait, then SIGKILL.
#[derive(Debug)]
pub(crate) struct ManagedChild {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
    policy: StopPolicy,
}

impl ManagedChild {
    /// Spawns `cmd` (stdin null, stdout+stderr appended to `log_path`) in a new process group.
    pub(crate) fn spawn(
        name: &str,
        cmd: &mut Command,
        log_path: &Path,
        policy: StopPolicy,
    ) -> Result<Self> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .ctx(|| format!("opening log file {}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .ctx(|| format!("duplicating log file {}", log_path.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0);
        let child = cmd
            .spawn()
            .ctx(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log_path: log_path.to_path_buf(),
            policy,
        })
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn pgid(&self) -> Option<Pid> {
        self.pid()
            .and_then(|p| i32::try_from(p).ok())
            .map(Pid::from_raw)
    }

    /// Whether the leader has exited (without reaping it, so its pid stays reserved).
    fn has_exited(&self) -> bool {
        let Some(pid) = self.pgid() else {
            return true;
        };
        match waitid(
            Id::Pid(pid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ) {
            Ok(WaitStatus::StillAlive) => false,
            Ok(_) => true,
            // ECHILD: already reaped — treat as gone.
            Err(_) => true,
        }
    }

    /// Errors with the exit status and log tail if the process has exited.
    pub(crate) fn ensure_running(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Err(Error::NotRunning(self.name.clone()));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.child = None;
                Err(Error::ProcessExited {
                    name: self.name.clone(),
                    status: status.to_string(),
                    log_path: self.log_path.display().to_string(),
                    log_tail: log_tail(&self.log_path, 40),
                })
            }
            Err(e) => Err(Error::io(format!("checking on {}", self.name), e)),
        }
    }

    fn signal_group(&self, signal: Signal) {
        if let Some(pgid) = self.pgid() {
            // ESRCH (nothing left in the group) is fine.
            let _ = killpg(pgid, signal);
        }
    }

    /// Kills stragglers in the group, then reaps the leader.
    fn finish(&mut self) {
        self.signal_group(Signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Stops the process group and waits for it (async: polls without blocking the runtime).
    pub(crate) async fn stop(&mut self) {
        self.stop_with(self.policy).await;
    }

    /// Like [`Self::stop`] with a different signal/grace.
    pub(crate) async fn stop_with(&mut self, policy: StopPolicy) {
        if self.child.is_none() {
            return;
        }
        self.signal_group(policy.signal);
        let deadline = tokio::time::Instant::now() + policy.grace;
        while !self.has_exited() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.finish();
    }

    fn stop_blocking(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.signal_group(self.policy.signal);
        let deadline = Instant::now() + self.policy.grace;
        while !self.has_exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.finish();
    }

    /// Gives up ownership: the process keeps running after this value is dropped.
    pub(crate) fn detach(&mut self) -> Option<u32> {
        self.child.take().map(|c| c.id())
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        self.stop_blocking();
    }
}

/// The last `lines` lines of a log file (best effort; empty on error).
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(MAX))).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs a short-lived helper command to completion, capturing its output.
pub(crate) async fn run_to_completion(mut cmd: Command, what: &str) -> Result<String> {
    cmd.stdin(Stdio::null()).process_group(0);
    let what_owned = what.to_owned();
    let output = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .output()
        .await
        .ctx(|| format!("running {what_owned}"))?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    if output.status.success() {
        Ok(text)
    } else {
        Err(Error::CommandFailed {
            program: what.to_owned(),
            status: output.status.to_string(),
            output: text,
        })
    }
}
