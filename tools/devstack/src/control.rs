//! Commands that act on a background stack through its state directory:
//! `up`, `down`, `status`, `db-reset` (`add-shard`/`remove-shard` are in `crate::reshard`).

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::layout::{answers, Layout, SPARE_SERVICES};
use crate::{shards, supervisor};

/// The supervisor's pid, if a stack runs on `layout`.
pub fn running_pid(layout: &Layout) -> Option<i32> {
    // The lock, not the pid file, says whether a stack runs: a crashed supervisor leaves
    // its pid file behind but its lock dies with it.
    if supervisor::lock(layout).is_ok() {
        return None;
    }
    std::fs::read_to_string(layout.pid_file())
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

pub async fn up(layout: &Layout) -> anyhow::Result<()> {
    layout.ensure_dirs()?;
    if let Some(pid) = running_pid(layout) {
        println!("stack already running (pid {pid}); `make status` shows it");
        return Ok(());
    }
    let log_path = layout.log("devstack");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("dev-background")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .process_group(0)
        .spawn()
        .context("starting the background stack")?;
    println!(
        "starting the stack in the background (log: {})",
        log_path.display()
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if layout.ready_file().exists() {
            break;
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            bail!("the stack exited during start-up ({status})");
        }
        if Instant::now() > deadline {
            bail!(
                "the stack did not become ready in 10 minutes; see {}",
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("stack is up (pid {})", child.id());
    status(layout).await
}

pub async fn down(layout: &Layout) -> anyhow::Result<()> {
    let Some(pid) = running_pid(layout) else {
        println!("no stack running");
        return Ok(());
    };
    let pid = Pid::from_raw(pid);
    kill(pid, Signal::SIGTERM).context("signalling the stack")?;
    let deadline = Instant::now() + Duration::from_secs(90);
    // Until the supervisor lets go of the lock, not only until its pid file is gone: it
    // removes the file first and then checks the ports, still holding the lock, and an
    // `up` right after (`make restart`) would find the stack running.
    while supervisor::lock(layout).is_err() {
        if Instant::now() > deadline {
            let _ = kill(pid, Signal::SIGKILL);
            bail!("the stack did not stop within 90 s; killed pid {pid}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("stack stopped");
    Ok(())
}

pub async fn status(layout: &Layout) -> anyhow::Result<()> {
    match running_pid(layout) {
        Some(pid) => println!(
            "stack: running (pid {pid}), state in {}",
            layout.root.display()
        ),
        None => println!("stack: not running, state in {}", layout.root.display()),
    }
    println!("{:<16} {:>6}  {:<5} DETAIL", "SERVICE", "PORT", "STATE");
    let mut services = shards::services(layout);
    // A spare shard's cluster between `attach` and `join` (add-shard in progress).
    for svc in SPARE_SERVICES {
        if !services.iter().any(|s| s.name == svc.name) && answers(layout.port(svc.name)).await {
            services.push(*svc);
        }
    }
    for svc in services {
        let port = layout.port(svc.name);
        let up = if answers(port).await { "up" } else { "down" };
        let status_name = match svc.name {
            "shard-proxy" | "auth" | "gateway" => Some(svc.name),
            "notify-metrics" => Some("notify"),
            _ => None,
        };
        let detail = status_name
            .and_then(|n| std::fs::read_to_string(layout.status_dir().join(n)).ok())
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| svc.what.to_owned());
        println!("{:<16} {:>6}  {:<5} {}", svc.name, port, up, detail);
    }
    Ok(())
}

pub fn db_reset(layout: &Layout) -> anyhow::Result<()> {
    if let Some(pid) = running_pid(layout) {
        bail!("the stack is running (pid {pid}); `make down` first");
    }
    for dir in [
        layout.root.join("pg"),
        layout.redis_dir(),
        layout.root.join("proxy"),
        layout.mail_dir(),
    ] {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            println!("removed {}", dir.display());
        }
    }
    // The shards `make add-shard` added belong to the ring just deleted with pg-auth.
    let added = layout.added_shards_file();
    if added.exists() {
        std::fs::remove_file(&added).with_context(|| format!("removing {}", added.display()))?;
        println!(
            "removed {} (added shards are no longer part of the stack)",
            added.display()
        );
    }
    println!("databases reset; the next `make up` re-creates and migrates them");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// A stack's supervisor stops in this order: pid file removed, then the ports checked,
    /// then the lock released (at exit). `down` must return only after the last step, or
    /// the `up` of `make restart` finds the lock held and fails ("another stack is
    /// running"). Here a `sleep` stands in for the supervisor, and the test holds the lock
    /// for it, releasing it a second after removing the pid file.
    #[tokio::test]
    async fn down_waits_until_the_supervisor_releases_its_lock() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = Layout {
            root: dir.path().to_path_buf(),
        };
        layout.ensure_dirs().expect("dirs");
        let lock = supervisor::lock(&layout).expect("the fake supervisor's lock");
        let mut fake = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        std::fs::write(layout.pid_file(), format!("{}\n", fake.id())).expect("pid file");
        let pid_file = layout.pid_file();
        let released = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let _ = std::fs::remove_file(pid_file);
            std::thread::sleep(Duration::from_secs(1));
            let at = Instant::now();
            drop(lock);
            at
        });
        down(&layout).await.expect("down");
        let returned = Instant::now();
        let _ = fake.wait();
        let released = released.join().expect("fake supervisor");
        assert!(
            returned >= released,
            "down returned {:?} before the lock was released",
            released - returned
        );
        assert!(
            supervisor::lock(&layout).is_ok(),
            "the lock is free after down"
        );
    }
}
