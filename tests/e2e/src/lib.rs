//! taskflow-e2e: helpers for end-to-end tests that run the real TaskFlow binaries, each
//! with a systemd notify socket the test owns, against real infrastructure.
//!
//! The scenarios mirror the NixOS VM tests in `tests/vm/`, which cannot run on machines
//! without KVM and a Nix store; these run everywhere `make test` does.

pub mod ws;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use taskflow_localstack::{binary_path, NotifySocket};

/// Watchdog interval handed to daemons under test: they must ping every 0.3 s.
pub const WATCHDOG_USEC: u64 = 600_000;

/// A TaskFlow daemon started by a test. Killed on drop if still running.
pub struct Daemon {
    pub name: String,
    pub child: tokio::process::Child,
    pub notify: NotifySocket,
    pub log: PathBuf,
    pub config: PathBuf,
}

/// A scratch directory holding a test's configs, secrets and logs.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a file and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, contents).expect("write scratch file");
        p
    }

    /// An Ed25519 key pair as `(private PKCS#8 PEM path, public PEM path)`.
    pub fn jwt_keys(&self) -> (PathBuf, PathBuf) {
        let private = self.path("jwt-private.pem");
        let public = self.path("jwt-public.pem");
        let ok = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "ed25519", "-out"])
            .arg(&private)
            .status()
            .expect("openssl")
            .success()
            && std::process::Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(&private)
                .arg("-out")
                .arg(&public)
                .status()
                .expect("openssl")
                .success();
        assert!(ok, "openssl could not generate an Ed25519 key pair");
        (private, public)
    }
}

impl Scratch {
    /// A taskflow-notify configuration against the given dependencies, with the database
    /// password (`taskflow`, the test clusters' role) in a secret file.
    pub fn notify_config(
        &self,
        db_port: u16,
        kafka: &str,
        redis_url: &str,
        smtp_port: u16,
    ) -> PathBuf {
        let pw = self.write("database-password", taskflow_localstack::PG_PASSWORD);
        self.write(
            "notify.toml",
            &format!(
                r#"metrics_listen = "127.0.0.1:{metrics}"
database_url = "postgres://taskflow@127.0.0.1:{db_port}/auth"
database_password_file = "{pw}"
kafka_brokers = "{kafka}"
redis_url = "{redis_url}"
[smtp]
host = "127.0.0.1"
port = {smtp_port}
"#,
                metrics = taskflow_localstack::free_port().expect("port"),
                pw = pw.display(),
            ),
        )
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Daemon {
    /// Starts `binary --config <config>` with a fresh notify socket and a short watchdog.
    pub fn start(binary: &str, config: &Path, extra_args: &[&str]) -> Daemon {
        let bin = binary_path(binary).expect("daemon binary (cargo build --workspace)");
        let notify = NotifySocket::bind().expect("notify socket");
        let log = config.with_extension("log");
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = tokio::process::Command::new(bin)
            .arg("--config")
            .arg(config)
            .args(extra_args)
            .env("NOTIFY_SOCKET", notify.path())
            .env("WATCHDOG_USEC", WATCHDOG_USEC.to_string())
            .env("TASKFLOW_LOG__FORMAT", "text")
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn daemon");
        Daemon {
            name: binary.to_owned(),
            child,
            notify,
            log,
            config: config.to_owned(),
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for an exact notify assignment such as `READY=1`, failing with the daemon's log.
    pub async fn expect_notify(&mut self, assignment: &str, timeout: Duration) {
        let wait = self.notify.wait_for_assignment(assignment, timeout);
        // `biased`: when the assignment and the exit arrive together, the assignment wins.
        // Unbiased, select could pick the exit after the wait had already found (and
        // moved its cursor past) the assignment, which the late check below then missed.
        tokio::select! {
            biased;
            r = wait => {
                if let Err(e) = r {
                    panic!("{}: no {assignment}: {e}\n--- log ---\n{}", self.name, self.logs());
                }
            }
            status = self.child.wait() => {
                // Datagrams sent just before exit may still be queued on our socket.
                let late = self
                    .notify
                    .wait_for_assignment(assignment, Duration::from_millis(500))
                    .await;
                if late.is_err() {
                    panic!("{} exited ({status:?}) before {assignment}\n--- log ---\n{}", self.name, self.logs());
                }
            }
        }
    }

    pub fn signal(&self, signal: Signal) {
        let pid = self.child.id().expect("daemon still running");
        kill(Pid::from_raw(pid as i32), signal).expect("signal daemon");
    }

    /// Waits for the process to exit within `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!(
                "{} did not exit within {timeout:?}\n--- log ---\n{}",
                self.name,
                self.logs()
            ),
        }
    }

    /// The systemd contract: READY=1, periodic WATCHDOG=1, then on SIGTERM STOPPING=1 and a
    /// clean exit within the grace period.
    pub async fn check_systemd_contract(&mut self) {
        self.expect_notify("READY=1", Duration::from_secs(90)).await;
        self.check_systemd_contract_after_ready().await;
    }

    /// While `dependency` is down: no `READY=1` within `quiet`, and a
    /// `STATUS=waiting for dependencies…` line naming it within `status_within`.
    pub async fn expect_waiting_for(
        &mut self,
        dependency: &str,
        quiet: Duration,
        status_within: Duration,
    ) {
        let early = self.notify.wait_for_assignment("READY=1", quiet).await;
        assert!(early.is_err(), "READY=1 sent while {dependency} was down");
        let status = self
            .notify
            .wait_for(
                |a| a.starts_with("STATUS=waiting for dependencies"),
                status_within,
            )
            .await
            .expect("a status line naming what it waits for");
        assert!(status.contains(dependency), "{status}");
    }

    /// [`Self::check_systemd_contract`] for a daemon that already sent `READY=1`.
    pub async fn check_systemd_contract_after_ready(&mut self) {
        for _ in 0..3 {
            self.expect_notify("WATCHDOG=1", Duration::from_secs(3))
                .await;
        }
        self.signal(Signal::SIGTERM);
        self.expect_notify("STOPPING=1", Duration::from_secs(10))
            .await;
        let status = self.wait_exit(Duration::from_secs(30)).await;
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM\n--- log ---\n{}",
            self.name,
            self.logs()
        );
    }
}

/// A temporary PostgreSQL cluster with database `db` (`auth` or `tasks`) and its schema.
pub async fn migrated_db(db: &str) -> taskflow_localstack::PgCluster {
    let pg = taskflow_localstack::PgCluster::builder()
        .database(db)
        .start()
        .await
        .expect("PostgreSQL cluster");
    let mut c = pg.client(db).await.expect("client");
    let schema = if db == "auth" {
        taskflow_migrations::Schema::Auth
    } else {
        taskflow_migrations::Schema::Shard
    };
    taskflow_migrations::apply(&mut c, schema)
        .await
        .expect("migrate");
    pg
}

/// Runs `binary` with `args` to completion and returns (exit code, stderr + stdout).
pub fn run_to_exit(binary: &str, args: &[&str]) -> (Option<i32>, String) {
    let bin = binary_path(binary).expect("binary (cargo build --workspace)");
    let out = std::process::Command::new(bin)
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .expect("run binary");
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    (out.status.code(), text)
}
