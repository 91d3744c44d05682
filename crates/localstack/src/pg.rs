//! A real PostgreSQL cluster (`initdb` + `postgres`) on 127.0.0.1.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid, User};
use tokio_postgres::{Client, NoTls};

use crate::error::{Error, IoContext, Result};
use crate::process::{run_to_completion, ManagedChild, StopPolicy};
use crate::util::{free_port, is_executable, reserve_port, which, POLL_INTERVAL};

/// The rows of a simple-query answer as text, NULL as empty: how tests read `SHOW` output
/// and other small answers (of a cluster, or of the shard proxy's admin console).
pub fn text_rows(messages: &[tokio_postgres::SimpleQueryMessage]) -> Vec<Vec<String>> {
    messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or_default().to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Login role created on every cluster (dev-only credentials, see SPEC §8).
pub const PG_USER: &str = "taskflow";
/// Password of [`PG_USER`].
pub const PG_PASSWORD: &str = "taskflow";
/// Trusted bootstrap superuser (no password, loopback only).
pub const PG_SUPERUSER: &str = "postgres";

const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Paths of the PostgreSQL server programs.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    /// `initdb`.
    pub initdb: PathBuf,
    /// `postgres`.
    pub postgres: PathBuf,
    /// `pg_ctl`.
    pub pg_ctl: PathBuf,
}

impl PgBinaries {
    /// Finds the server programs: `$TASKFLOW_PG_BIN_DIR`, else the highest version under
    /// `/usr/lib/postgresql/*/bin`, else `$PATH`.
    pub fn locate() -> Result<Self> {
        if let Some(dir) = std::env::var_os("TASKFLOW_PG_BIN_DIR") {
            return Self::in_dir(Path::new(&dir)).ok_or_else(|| {
                Error::BinaryNotFound(format!(
                    "TASKFLOW_PG_BIN_DIR={} has no initdb/postgres/pg_ctl",
                    Path::new(&dir).display()
                ))
            });
        }
        let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let version: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
                version.map(|v| (v, e.path().join("bin")))
            })
            .collect();
        versions.sort();
        for (_, dir) in versions.iter().rev() {
            if let Some(bins) = Self::in_dir(dir) {
                return Ok(bins);
            }
        }
        match (which("initdb"), which("postgres"), which("pg_ctl")) {
            (Some(initdb), Some(postgres), Some(pg_ctl)) => Ok(Self {
                initdb,
                postgres,
                pg_ctl,
            }),
            _ => Err(Error::BinaryNotFound(
                "PostgreSQL server programs (initdb, postgres, pg_ctl) not found in \
                 /usr/lib/postgresql/*/bin or $PATH: run scripts/install-deps.sh \
                 (or set TASKFLOW_PG_BIN_DIR)"
                    .to_owned(),
            )),
        }
    }

    fn in_dir(dir: &Path) -> Option<Self> {
        let bins = Self {
            initdb: dir.join("initdb"),
            postgres: dir.join("postgres"),
            pg_ctl: dir.join("pg_ctl"),
        };
        (is_executable(&bins.initdb)
            && is_executable(&bins.postgres)
            && is_executable(&bins.pg_ctl))
        .then_some(bins)
    }
}

/// Options for a [`PgCluster`]; `PgCluster::builder()` gives the test defaults
/// (free port, temporary data directory deleted on drop, fsync off).
#[derive(Debug, Clone)]
pub struct PgClusterBuilder {
    port: Option<u16>,
    data_dir: Option<PathBuf>,
    log_file: Option<PathBuf>,
    fsync: Option<bool>,
    databases: Vec<String>,
    settings: Vec<(String, String)>,
    startup_timeout: Duration,
}

impl PgClusterBuilder {
    /// Listen on this port instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Keep the cluster in this directory (created if missing, `initdb` only when not yet
    /// initialized, never deleted). Without it a temporary directory is used.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Where the server's output goes. Default: `<tmp>/postgres.log`, or `<data_dir>.log`.
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_file = Some(path.into());
        self
    }

    /// Turn fsync on or off. Default: off for temporary clusters, on for a `data_dir`.
    pub fn fsync(mut self, on: bool) -> Self {
        self.fsync = Some(on);
        self
    }

    /// Create this database (owned by `taskflow`) once started, if missing.
    pub fn database(mut self, name: impl Into<String>) -> Self {
        self.databases.push(name.into());
        self
    }

    /// An extra server setting passed as `-c name=value`.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// How long to wait for the server to accept connections (default 60 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Initializes (if needed) and starts the cluster, waits until it accepts connections,
    /// creates the `taskflow` role and the requested databases.
    pub async fn start(self) -> Result<PgCluster> {
        let bins = PgBinaries::locate()?;
        let run_as = postgres_user_if_root()?;
        let port = match self.port {
            Some(p) => {
                reserve_port(p);
                p
            }
            None => free_port()?,
        };
        let (temp, data_dir, default_log) = match &self.data_dir {
            Some(dir) => {
                let log = dir.with_extension("log");
                (None, dir.clone(), log)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("taskflow-pg-")
                    .tempdir()
                    .ctx(|| "creating a temporary directory for PostgreSQL".to_owned())?;
                let data = temp.path().join("data");
                let log = temp.path().join("postgres.log");
                if let Some((uid, gid)) = run_as {
                    chown(temp.path(), uid, gid)?;
                }
                (Some(temp), data, log)
            }
        };
        let fsync = self.fsync.unwrap_or(temp.is_none());
        let mut cluster = PgCluster {
            bins,
            run_as,
            port,
            log_path: self.log_file.unwrap_or(default_log),
            data_dir,
            fsync,
            settings: self.settings,
            startup_timeout: self.startup_timeout,
            databases: self.databases,
            child: None,
            _temp: temp,
        };
        cluster.init_if_needed().await?;
        cluster.start().await?;
        Ok(cluster)
    }
}

/// A running (or stopped) PostgreSQL cluster listening only on 127.0.0.1.
///
/// Roles: `postgres` (trust, loopback only) and `taskflow`/`taskflow` (SCRAM-SHA-256,
/// superuser). Settings: `max_prepared_transactions = 64`, `max_connections = 200`,
/// small `shared_buffers`, unix socket inside the data directory. Dropping it stops the
/// server (fast shutdown, then SIGKILL) and deletes a temporary data directory.
#[derive(Debug)]
pub struct PgCluster {
    bins: PgBinaries,
    run_as: Option<(Uid, Gid)>,
    port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    fsync: bool,
    settings: Vec<(String, String)>,
    startup_timeout: Duration,
    databases: Vec<String>,
    child: Option<ManagedChild>,
    // Declared last: dropped after the child is stopped.
    _temp: Option<tempfile::TempDir>,
}

fn postgres_user_if_root() -> Result<Option<(Uid, Gid)>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    match User::from_name(PG_SUPERUSER) {
        Ok(Some(user)) => Ok(Some((user.uid, user.gid))),
        Ok(None) => Err(Error::User(
            "running as root but there is no `postgres` system user to run PostgreSQL as \
             (install the postgresql package: scripts/install-deps.sh)"
                .to_owned(),
        )),
        Err(e) => Err(Error::User(format!("looking up user `postgres`: {e}"))),
    }
}

fn chown(path: &Path, uid: Uid, gid: Gid) -> Result<()> {
    nix::unistd::chown(path, Some(uid), Some(gid))
        .map_err(|e| Error::io(format!("chown {} to postgres", path.display()), e.into()))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

const PG_HBA: &str = "\
# Written by taskflow-localstack. Dev/test only.
# TYPE  DATABASE  USER      ADDRESS        METHOD
local   all       all                      trust
host    all       postgres  127.0.0.1/32   trust
host    all       taskflow  127.0.0.1/32   scram-sha-256
host    all       all       127.0.0.1/32   scram-sha-256
host    all       postgres  ::1/128        trust
host    all       all       ::1/128        scram-sha-256
";

impl PgCluster {
    /// Options with test defaults.
    pub fn builder() -> PgClusterBuilder {
        PgClusterBuilder {
            port: None,
            data_dir: None,
            log_file: None,
            fsync: None,
            databases: Vec::new(),
            settings: Vec::new(),
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
        }
    }

    /// A temporary cluster on a free port (same as `PgCluster::builder().start()`).
    pub async fn temp() -> Result<Self> {
        Self::builder().start().await
    }

    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        // A working directory the server user can read (initdb checks it).
        cmd.current_dir("/");
        cmd.env("LC_ALL", "C").env_remove("PGDATA");
        cmd
    }

    async fn init_if_needed(&mut self) -> Result<()> {
        if self.data_dir.join("PG_VERSION").is_file() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.data_dir)
            .ctx(|| format!("creating {}", self.data_dir.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.data_dir, std::fs::Permissions::from_mode(0o700))
                .ctx(|| format!("chmod 700 {}", self.data_dir.display()))?;
        }
        if let Some((uid, gid)) = self.run_as {
            chown(&self.data_dir, uid, gid)?;
        }
        let mut cmd = self.command(&self.bins.initdb);
        cmd.arg("-D").arg(&self.data_dir).args([
            "-U",
            PG_SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if !self.fsync {
            cmd.arg("--no-sync");
        }
        run_to_completion(cmd, "initdb").await?;
        let hba = self.data_dir.join("pg_hba.conf");
        std::fs::write(&hba, PG_HBA).ctx(|| format!("writing {}", hba.display()))?;
        Ok(())
    }

    fn server_args(&self) -> Vec<String> {
        // Unix sockets have a ~107 byte path limit; skip the socket for deep data dirs.
        let socket_dir = self.data_dir.display().to_string();
        let socket_dir = if socket_dir.len() + 20 < 100 {
            socket_dir
        } else {
            String::new()
        };
        let mut settings: Vec<(String, String)> = vec![
            ("listen_addresses".into(), "127.0.0.1".into()),
            ("port".into(), self.port.to_string()),
            ("unix_socket_directories".into(), socket_dir),
            ("max_prepared_transactions".into(), "64".into()),
            ("max_connections".into(), "200".into()),
            ("shared_buffers".into(), "16MB".into()),
            ("password_encryption".into(), "scram-sha-256".into()),
            ("logging_collector".into(), "off".into()),
        ];
        if !self.fsync {
            settings.extend([
                ("fsync".into(), "off".into()),
                ("synchronous_commit".into(), "off".into()),
                ("full_page_writes".into(), "off".into()),
            ]);
        }
        settings.extend(self.settings.iter().cloned());
        let mut args = vec!["-D".to_owned(), self.data_dir.display().to_string()];
        for (k, v) in settings {
            args.push("-c".to_owned());
            args.push(format!("{k}={v}"));
        }
        args
    }

    /// Starts the server again after [`Self::stop`] (no-op when running), waits until it
    /// accepts connections and makes sure the role and databases exist.
    pub async fn start(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if child.ensure_running().is_ok() {
                return Ok(());
            }
            self.child = None;
        }
        let mut cmd = self.command(&self.bins.postgres);
        cmd.args(self.server_args());
        let policy = StopPolicy {
            // SIGINT = "fast" shutdown (what `pg_ctl stop -m fast` sends).
            signal: Signal::SIGINT,
            grace: Duration::from_secs(15),
        };
        let child = ManagedChild::spawn("postgres", &mut cmd, &self.log_path, policy)?;
        self.child = Some(child);
        self.wait_ready().await?;
        self.bootstrap().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.startup_timeout;
        let conn_str = self.superuser_connection_string("postgres");
        loop {
            let err = match tokio_postgres::connect(&conn_str, NoTls).await {
                Ok((client, conn)) => {
                    drop(client);
                    let _ = conn.await;
                    return Ok(());
                }
                Err(e) => e,
            };
            if let Some(child) = self.child.as_mut() {
                child.ensure_running()?;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("PostgreSQL on 127.0.0.1:{}", self.port),
                    after: self.startup_timeout,
                    last_error: Some(err.to_string()),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn bootstrap(&self) -> Result<()> {
        let client = self.superuser_client("postgres").await?;
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&PG_USER])
            .await?
            .is_some();
        if !exists {
            client
                .batch_execute(&format!(
                    "SET password_encryption = 'scram-sha-256'; \
                     CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}",
                    quote_ident(PG_USER),
                    quote_literal(PG_PASSWORD)
                ))
                .await?;
        }
        for db in &self.databases {
            Self::create_database_with(&client, db).await?;
        }
        Ok(())
    }

    async fn create_database_with(client: &Client, name: &str) -> Result<()> {
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await?
            .is_some();
        if !exists {
            let sql = format!(
                "CREATE DATABASE {} OWNER {}",
                quote_ident(name),
                quote_ident(PG_USER)
            );
            if let Err(e) = client.batch_execute(&sql).await {
                // Lost a race with a concurrent creator: fine.
                if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) {
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Creates database `name` owned by `taskflow` if it does not exist yet.
    pub async fn create_database(&mut self, name: &str) -> Result<()> {
        let client = self.superuser_client("postgres").await?;
        Self::create_database_with(&client, name).await?;
        if !self.databases.iter().any(|d| d == name) {
            self.databases.push(name.to_owned());
        }
        Ok(())
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Host the server listens on: `127.0.0.1`.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Key=value connection string for `taskflow` with its password.
    pub fn connection_string(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={PG_USER} password={PG_PASSWORD} dbname={db}",
            self.port
        )
    }

    /// `postgres://taskflow:taskflow@127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// Key=value connection string for the trusted `postgres` superuser (no password).
    pub fn superuser_connection_string(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={PG_SUPERUSER} dbname={db}",
            self.port
        )
    }

    /// A connected client as `taskflow` (SCRAM); its connection task is spawned on the
    /// current tokio runtime.
    pub async fn client(&self, db: &str) -> Result<Client> {
        connect(&self.connection_string(db)).await
    }

    /// A connected client as the trusted `postgres` superuser.
    pub async fn superuser_client(&self, db: &str) -> Result<Client> {
        connect(&self.superuser_connection_string(db)).await
    }

    /// Pid of the postmaster while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(ManagedChild::pid)
    }

    /// Whether the server process is alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.ensure_running().is_ok())
    }

    /// Fast shutdown (like `pg_ctl stop -m fast`): clients are disconnected, the data
    /// directory is kept, [`Self::start`] brings it back on the same port.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.stop().await;
        }
        Ok(())
    }

    /// Immediate shutdown (like `pg_ctl stop -m immediate`): simulates a crash; the next
    /// start runs crash recovery.
    pub async fn stop_immediate(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child
                .stop_with(StopPolicy {
                    signal: Signal::SIGQUIT,
                    grace: Duration::from_secs(10),
                })
                .await;
        }
        Ok(())
    }

    /// Stops then starts the server.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.start().await
    }

    /// Leaves the server running after this value is dropped (dev stack `up`); returns the
    /// postmaster pid. A temporary data directory would be deleted, so this is only
    /// meaningful with [`PgClusterBuilder::data_dir`].
    pub fn detach(mut self) -> Option<u32> {
        self.child.as_mut().and_then(ManagedChild::detach)
    }

    /// The `pg_ctl` program of the same installation.
    pub fn pg_ctl(&self) -> &Path {
        &self.bins.pg_ctl
    }
}

async fn connect(conn_str: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(conn_str, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "localstack postgres connection ended");
        }
    });
    Ok(client)
}
