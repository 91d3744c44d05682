//! The infrastructure the gateway's integration tests share: PostgreSQL (auth database and
//! one task shard, migrated), Redis, the tansu broker with the task topics, a key pair, and
//! the real auth daemon; plus the processes they start, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use taskflow_localstack::{binary_path, free_port, AuthDb, KafkaBroker, PgCluster, RedisServer};

/// A daemon started by a test; killed (SIGKILL) when dropped.
pub struct Proc {
    child: Option<Child>,
}

impl Proc {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.child.as_ref().unwrap().id()).unwrap())
    }

    /// Hands the process over (it is no longer killed on drop), e.g. to wait for its exit.
    pub fn take(&mut self) -> Option<Child> {
        self.child.take()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits for `/healthz` on the API port (the daemons bind it only once their
/// dependencies answer; `/readyz` is on the ops listener). Fails at once, with the exit
/// status, if `child` exits first (e.g. its port was taken), rather than after a minute.
pub async fn wait_ready(base: &str, what: &str, child: &mut Child) {
    let http = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited ({status}) before answering at {base}; see its log above");
        }
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} at {base} did not become ready");
}

pub struct Infra {
    pub auth_db: AuthDb,
    pub shard: PgCluster,
    pub redis: RedisServer,
    pub kafka: KafkaBroker,
    /// Configurations and the key pair (`jwt-private.pem`, `jwt-public.pem`).
    pub dir: tempfile::TempDir,
}

impl Infra {
    /// Starts everything but the daemons; `redis_appendonly` makes Redis keep its data
    /// across a restart.
    pub async fn start(redis_appendonly: bool) -> Infra {
        let (auth_db, shard, redis, kafka) = tokio::join!(
            AuthDb::start(),
            PgCluster::builder().database("tasks").start(),
            RedisServer::builder().appendonly(redis_appendonly).start(),
            KafkaBroker::temp()
        );
        let (auth_db, shard, redis, mut kafka) = (
            auth_db.unwrap(),
            shard.unwrap(),
            redis.unwrap(),
            kafka.unwrap(),
        );
        taskflow_migrations::apply_auth(&mut auth_db.client().await.unwrap())
            .await
            .unwrap();
        taskflow_migrations::apply_shard(&mut shard.client("tasks").await.unwrap())
            .await
            .unwrap();
        kafka.create_topic("task_events", 3).await.unwrap();
        kafka.create_topic("notify_events", 3).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let auth_bin = binary_path("taskflow-auth")
            .expect("build the auth daemon first: cargo build -p taskflow-auth");
        assert!(Command::new(&auth_bin)
            .arg("--generate-keys")
            .arg(dir.path())
            .status()
            .unwrap()
            .success());
        Infra {
            auth_db,
            shard,
            redis,
            kafka,
            dir,
        }
    }

    /// An auth daemon named `name` with `extra` top-level settings; the process and its
    /// base URL, once it answers.
    pub async fn auth(&self, name: &str, extra: &str) -> (Proc, String) {
        let port = free_port().unwrap();
        let cfg = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:{port}\"\nops_listen = \"127.0.0.1:0\"\ndatabase_url = \"{}\"\n\
                 jwt_private_key_file = \"{}\"\n{extra}\n[log]\nlevel = \"warn\"\n",
                self.auth_db.url(),
                self.dir.path().join("jwt-private.pem").display()
            ),
        )
        .unwrap();
        let mut child = Command::new(binary_path("taskflow-auth").unwrap())
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        wait_ready(&base, name, &mut child).await;
        (Proc { child: Some(child) }, base)
    }

    /// Writes gateway `name`'s configuration: API on `port`, ops on a free port, in front
    /// of `auth_url`, `extra` appended (top-level keys, then tables).
    pub fn gateway_config(&self, name: &str, port: u16, auth_url: &str, extra: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "listen = \"127.0.0.1:{port}\"\nops_listen = \"127.0.0.1:{}\"\nauth_url = \"{auth_url}\"\n\
                 jwt_public_key_file = \"{}\"\ndatabase_url = \"{}\"\nredis_url = \"{}\"\n\
                 kafka_brokers = \"{}\"\ncors_origins = [\"http://localhost:5173\"]\n\
                 outbox_poll_ms = 100\n{extra}\n[log]\nlevel = \"warn\"\n",
                free_port().unwrap(),
                self.dir.path().join("jwt-public.pem").display(),
                self.shard.url("tasks"),
                self.redis.url(),
                self.kafka.bootstrap(),
            ),
        )
        .unwrap();
        path
    }

    /// Starts the gateway whose configuration is `cfg` (API on `port`), with
    /// `NOTIFY_SOCKET` set when `notify` is given; returns once it answers.
    pub async fn spawn_gateway(
        &self,
        name: &str,
        cfg: &Path,
        port: u16,
        notify: Option<&Path>,
    ) -> (Proc, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskflow-gateway"));
        cmd.arg("--config").arg(cfg).stdin(Stdio::null());
        if let Some(n) = notify {
            cmd.env("NOTIFY_SOCKET", n);
        }
        let mut child = cmd.spawn().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        wait_ready(&base, name, &mut child).await;
        (Proc { child: Some(child) }, base)
    }

    /// `http://` + the `ops_listen` address written into gateway `name`'s configuration.
    pub fn ops_base(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.toml"))).unwrap();
        let addr = text
            .lines()
            .find_map(|l| l.strip_prefix("ops_listen = "))
            .unwrap()
            .trim_matches('"');
        format!("http://{addr}")
    }
}
