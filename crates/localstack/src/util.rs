//! Small helpers: free ports, polling waits, locating binaries.

use std::collections::HashSet;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::error::{Error, IoContext, Result};

/// The loopback address every component binds to.
pub const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// Interval between polls in [`wait_until`] and the readiness checks.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(50);

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A free TCP port on 127.0.0.1, below the kernel's ephemeral range.
///
/// Tries random ports in [`TEST_PORTS_FROM`]`..`(start of the ephemeral range) and keeps
/// the first one that binds. Not the kernel's port 0: that picks from the ephemeral range,
/// which is also where every outgoing connection takes its source port, so between the
/// pick and the server's bind a client socket of any test (a proxy's connection to a
/// shard, a Kafka client) could take the port and the server would fail with "address
/// already in use". Ports already handed out by this process are never returned again, so
/// two components started by the same test binary cannot race for one port; nor, for
/// [`CLAIM_TTL`], are ports handed out by another process (a claim file per port under the
/// temp directory): nextest runs each test in its own process.
///
/// When the range below the ephemeral one is too small to pick from at random (a host
/// with a widened `ip_local_port_range`), it falls back to the kernel's choice.
pub fn free_port() -> Result<u16> {
    let (low, high) = (TEST_PORTS_FROM, ephemeral_ports_start());
    let below_ephemeral = high.saturating_sub(low) >= 1000;
    for _ in 0..1000 {
        let port = if below_ephemeral {
            let candidate = low + u16::try_from(random_u64() % u64::from(high - low)).unwrap_or(0);
            if TcpListener::bind(SocketAddr::from((LOCALHOST, candidate))).is_err() {
                continue;
            }
            candidate
        } else {
            kernel_chosen_port()?
        };
        let mut set = handed_out()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !set.contains(&port) && claim_across_processes(port) {
            set.insert(port);
            return Ok(port);
        }
    }
    Err(Error::io(
        "finding a free port",
        std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "no unused port after 1000 tries",
        ),
    ))
}

/// The lowest port [`free_port`] hands out: above every fixed port of the dev stack and
/// the well-known services it stands in for (5432, 6379, 9092, …).
pub const TEST_PORTS_FROM: u16 = 20_000;

/// The first port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), from
/// which it picks source ports for outgoing connections and port-0 binds; Linux's default
/// when unreadable.
pub fn ephemeral_ports_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

fn kernel_chosen_port() -> Result<u16> {
    let listener = TcpListener::bind(SocketAddr::from((LOCALHOST, 0)))
        .ctx(|| "binding 127.0.0.1:0 to find a free port".to_owned())?;
    Ok(listener
        .local_addr()
        .ctx(|| "reading the local address of a probe socket".to_owned())?
        .port())
}

/// A random number from std's randomly keyed hasher: enough to spread the ports of
/// concurrent test processes, which the claim files then keep apart exactly.
fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static DRAWS: AtomicU64 = AtomicU64::new(0);
    std::collections::hash_map::RandomState::new().hash_one(DRAWS.fetch_add(1, Ordering::Relaxed))
}

/// How long a port handed out by [`free_port`] stays claimed against other processes:
/// longer than any test keeps a server it started.
pub const CLAIM_TTL: Duration = Duration::from_secs(15 * 60);

/// Claims `port` for this process unless another process claimed it within [`CLAIM_TTL`].
/// Best effort: if the claim directory cannot be used, the port is taken unclaimed.
fn claim_across_processes(port: u16) -> bool {
    let dir = std::env::temp_dir().join("taskflow-port-claims");
    if std::fs::create_dir_all(&dir).is_err() {
        return true;
    }
    let file = dir.join(port.to_string());
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file)
    };
    match create() {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let stale = std::fs::metadata(&file)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > CLAIM_TTL);
            // Of two processes reclaiming one stale claim, only one re-creates it.
            stale && std::fs::remove_file(&file).is_ok() && create().is_ok()
        }
        Err(_) => true,
    }
}

/// Marks `port` as used so [`free_port`] never returns it (for fixed dev-stack ports).
pub fn reserve_port(port: u16) {
    handed_out()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(port);
}

/// Polls `condition` every 50 ms until it returns `true`, or fails after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_until_some(timeout, || {
        let fut = condition();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls `probe` every 50 ms until it returns `Some(value)`, or fails after `timeout`.
pub async fn wait_until_some<T, F, Fut>(timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: "condition".to_owned(),
                after: timeout,
                last_error: None,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Path of a workspace binary such as `taskflow-gateway`.
///
/// Looks in `$TASKFLOW_BIN_DIR` when set, else next to the running test executable
/// (`target/<profile>/`, the parent of `target/<profile>/deps/`).
pub fn binary_path(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("TASKFLOW_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe =
                std::env::current_exe().ctx(|| "locating the current executable".to_owned())?;
            let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::BinaryNotFound(format!(
            "binary `{name}` not found at {} (run `cargo build --workspace`, or set TASKFLOW_BIN_DIR)",
            path.display()
        )))
    }
}

/// Finds an executable named `name` on `$PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether a TCP connection to 127.0.0.1:`port` succeeds right now.
pub(crate) async fn tcp_connectable(port: u16) -> bool {
    tokio::net::TcpStream::connect((LOCALHOST, port))
        .await
        .is_ok()
}

/// `${TASKFLOW_CACHE:-/var/cache/taskflow}`.
pub(crate) fn cache_dir() -> PathBuf {
    std::env::var_os("TASKFLOW_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/taskflow"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_claimed_by_another_process_is_not_handed_out_again() {
        let port = free_port().expect("port");
        // This process holds the claim now: a second claim (as another process would try)
        // is refused while it is fresh.
        assert!(!claim_across_processes(port));
        for _ in 0..200 {
            assert_ne!(free_port().expect("port"), port);
        }
    }
}
