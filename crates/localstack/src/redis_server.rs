//! A real `redis-server` on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use redis::aio::MultiplexedConnection;

use crate::error::{Error, IoContext, Result};
use crate::process::{ManagedChild, StopPolicy};
use crate::util::{free_port, reserve_port, which, POLL_INTERVAL};

const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Options for a [`RedisServer`]; defaults: free port, temporary directory, no persistence.
#[derive(Debug, Clone)]
pub struct RedisServerBuilder {
    port: Option<u16>,
    data_dir: Option<PathBuf>,
    appendonly: bool,
    log_file: Option<PathBuf>,
    startup_timeout: Duration,
}

impl RedisServerBuilder {
    /// Listen on this port instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Working directory (`--dir`) kept after drop; created if missing.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Persist with the append-only file (`--appendonly yes`); default off.
    pub fn appendonly(mut self, on: bool) -> Self {
        self.appendonly = on;
        self
    }

    /// Where the server's output goes. Default: `<dir>/redis.log`.
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_file = Some(path.into());
        self
    }

    /// How long to wait for PING to succeed (default 30 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Starts `redis-server` and waits until it answers PING.
    pub async fn start(self) -> Result<RedisServer> {
        let bin = std::env::var_os("TASKFLOW_REDIS_SERVER_BIN")
            .map(PathBuf::from)
            .or_else(|| which("redis-server"))
            .ok_or_else(|| {
                Error::BinaryNotFound(
                    "redis-server not found on $PATH: run scripts/install-deps.sh \
                     (or set TASKFLOW_REDIS_SERVER_BIN)"
                        .to_owned(),
                )
            })?;
        let port = match self.port {
            Some(p) => {
                reserve_port(p);
                p
            }
            None => free_port()?,
        };
        let (temp, dir) = match self.data_dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
                (None, dir)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("taskflow-redis-")
                    .tempdir()
                    .ctx(|| "creating a temporary directory for Redis".to_owned())?;
                let dir = temp.path().to_path_buf();
                (Some(temp), dir)
            }
        };
        let log_path = self.log_file.unwrap_or_else(|| dir.join("redis.log"));
        let mut server = RedisServer {
            bin,
            port,
            dir,
            log_path,
            appendonly: self.appendonly,
            startup_timeout: self.startup_timeout,
            child: None,
            _temp: temp,
        };
        server.start().await?;
        Ok(server)
    }
}

/// A running (or stopped) `redis-server` bound to 127.0.0.1, stopped on drop.
#[derive(Debug)]
pub struct RedisServer {
    bin: PathBuf,
    port: u16,
    dir: PathBuf,
    log_path: PathBuf,
    appendonly: bool,
    startup_timeout: Duration,
    child: Option<ManagedChild>,
    _temp: Option<tempfile::TempDir>,
}

impl RedisServer {
    /// Options with test defaults.
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder {
            port: None,
            data_dir: None,
            appendonly: false,
            log_file: None,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
        }
    }

    /// A throwaway server on a free port (same as `RedisServer::builder().start()`).
    pub async fn temp() -> Result<Self> {
        Self::builder().start().await
    }

    /// Starts the server again after [`Self::stop`] (no-op when running).
    pub async fn start(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if child.ensure_running().is_ok() {
                return Ok(());
            }
            self.child = None;
        }
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", if self.appendonly { "yes" } else { "no" }])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--daemonize", "no", "--logfile", ""])
            .current_dir(&self.dir);
        let policy = StopPolicy {
            signal: Signal::SIGTERM,
            grace: Duration::from_secs(10),
        };
        self.child = Some(ManagedChild::spawn(
            "redis-server",
            &mut cmd,
            &self.log_path,
            policy,
        )?);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.startup_timeout;
        loop {
            let err = match self.ping().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if let Some(child) = self.child.as_mut() {
                child.ensure_running()?;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("redis-server on 127.0.0.1:{}", self.port),
                    after: self.startup_timeout,
                    last_error: Some(err.to_string()),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn ping(&self) -> Result<()> {
        let mut conn = self.connection().await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Working directory of the server.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// A client for [`Self::url`].
    pub fn client(&self) -> Result<redis::Client> {
        Ok(redis::Client::open(self.url())?)
    }

    /// A new multiplexed async connection.
    pub async fn connection(&self) -> Result<MultiplexedConnection> {
        Ok(self.client()?.get_multiplexed_async_connection().await?)
    }

    /// Deletes every key in every database.
    pub async fn flushall(&self) -> Result<()> {
        let mut conn = self.connection().await?;
        let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await?;
        Ok(())
    }

    /// Pid of the server while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(ManagedChild::pid)
    }

    /// Whether the server process is alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.ensure_running().is_ok())
    }

    /// Stops the server (SIGTERM, then SIGKILL); [`Self::start`] brings it back.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.stop().await;
        }
        Ok(())
    }

    /// Leaves the server running after this value is dropped; returns its pid.
    pub fn detach(mut self) -> Option<u32> {
        self.child.as_mut().and_then(ManagedChild::detach)
    }
}
