//! Shared harness for the proxy's integration tests: three real shard clusters, an auth
//! cluster, migrations applied, and the proxy started in-process on a free port.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use taskflow_localstack::{AuthDb, Shards};
use taskflow_shard_proxy::config::{ProxyConfig, ShardConfig, UserConfig};
use taskflow_shard_proxy::proxy_core::ring::Ring;
use taskflow_shard_proxy::server::{self, Running};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

pub const PASSWORD: &str = "taskflow";
/// The operator's login: the only one that may open the `admin` console.
pub const ADMIN_USER: &str = "taskflow_admin";

pub struct Env {
    pub shards: Shards,
    pub auth: AuthDb,
    pub dir: tempfile::TempDir,
    pub config: ProxyConfig,
    /// When set, the proxy is told to (re)load this file on RELOAD.
    pub config_path: Option<PathBuf>,
    pub proxy: Option<Running>,
}

/// The rows of a simple-query answer as text, NULL as empty (`SHOW` output and other small
/// answers). Allowed unused like the rest of this module: not every test binary reads rows.
#[allow(unused_imports)]
pub use taskflow_localstack::text_rows as rows;

/// Connection string for `db` through a proxy on `port`: the operator's login for
/// `admin`, the daemons' otherwise.
pub fn conn_string_at(port: u16, db: &str) -> String {
    let user = if db == "admin" {
        ADMIN_USER
    } else {
        "taskflow"
    };
    format!("host=127.0.0.1 port={port} user={user} password={PASSWORD} dbname={db}")
}

/// A tokio-postgres client through a proxy on `port` (e.g. one of several proxies).
pub async fn client_at(port: u16, db: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(&conn_string_at(port, db), NoTls)
        .await
        .expect("connect through proxy");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Prepared (two-phase) transactions left on all shards together.
pub async fn prepared_count(env: &Env) -> i64 {
    let mut n = 0;
    for i in 0..env.shards.len() {
        n += env
            .shard(i)
            .await
            .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
            .await
            .expect("count prepared")
            .get::<_, i64>(0);
    }
    n
}

pub fn shard_url(port: u16) -> String {
    format!("postgres://taskflow@127.0.0.1:{port}/tasks")
}

impl Env {
    pub async fn start(n: usize) -> Env {
        let shards = Shards::start(n).await.expect("shards");
        let auth = AuthDb::start().await.expect("auth db");
        let mut c = auth.client().await.expect("auth client");
        taskflow_migrations::apply_auth(&mut c)
            .await
            .expect("auth migration");
        for s in shards.iter() {
            let mut c = s.client("tasks").await.expect("shard client");
            taskflow_migrations::apply_shard(&mut c)
                .await
                .expect("shard migration");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let pw = dir.path().join("backend-password");
        std::fs::write(&pw, "taskflow\n").expect("write password");
        let mut config = ProxyConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            metrics_listen: "127.0.0.1:0".parse().expect("addr"),
            state_dir: dir.path().join("state"),
            users: vec![
                UserConfig {
                    name: "taskflow".into(),
                    password: Some(PASSWORD.into()),
                    password_file: None,
                    databases: None,
                    admin: false,
                },
                UserConfig {
                    name: ADMIN_USER.into(),
                    password: Some(PASSWORD.into()),
                    password_file: None,
                    databases: None,
                    admin: true,
                },
            ],
            ..ProxyConfig::default()
        };
        config.pool.size = 8;
        config.backend.password_file = Some(pw.to_string_lossy().into_owned());
        config.auth_database.url = format!("postgres://taskflow@127.0.0.1:{}/auth", auth.port());
        config.shards = shards
            .ports()
            .iter()
            .enumerate()
            .map(|(i, p)| ShardConfig {
                name: format!("shard-{}", i + 1),
                url: shard_url(*p),
            })
            .collect();
        let mut env = Env {
            shards,
            auth,
            dir,
            config,
            config_path: None,
            proxy: None,
        };
        env.start_proxy().await;
        env
    }

    pub async fn start_proxy(&mut self) {
        let (running, _registry) = server::start(
            self.config.clone(),
            self.config_path.clone(),
            CancellationToken::new(),
        )
        .await
        .expect("proxy start");
        self.proxy = Some(running);
    }

    pub async fn stop_proxy(&mut self) {
        if let Some(p) = self.proxy.take() {
            p.stop(Duration::from_secs(2)).await;
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.proxy.as_ref().expect("proxy running").addr
    }

    /// The configuration as a TOML file (inline passwords, dev style) plus `extra` lines.
    pub fn config_toml(&self, extra: &str) -> String {
        let mut text =
            format!(
            "listen = \"{listen}\"\nmetrics_listen = \"127.0.0.1:0\"\nstate_dir = \"{state}\"\n\
             {extra}\n\
             [[users]]\nname = \"taskflow\"\npassword = \"taskflow\"\n\
             [[users]]\nname = \"taskflow_admin\"\npassword = \"taskflow\"\nadmin = true\n\
             [backend]\nuser = \"taskflow\"\npassword_file = \"{pw}\"\n\
             [auth_database]\nurl = \"{auth}\"\n",
            listen = self.proxy.as_ref().map(|p| p.addr).unwrap_or(self.config.listen),
            state = self.state_dir().display(),
            pw = self.config.backend.password_file.clone().unwrap_or_default(),
            auth = self.config.auth_database.url,
        );
        for s in &self.config.shards {
            text.push_str(&format!(
                "[[shards]]\nname = \"{}\"\nurl = \"{}\"\n",
                s.name, s.url
            ));
        }
        text
    }

    pub fn state_dir(&self) -> PathBuf {
        self.config.state_dir.clone()
    }

    /// Connection string for `db` through this proxy (see [`conn_string_at`]).
    pub fn conn_string(&self, db: &str) -> String {
        conn_string_at(self.addr().port(), db)
    }

    /// A tokio-postgres client through the proxy.
    pub async fn client(&self, db: &str) -> Client {
        client_at(self.addr().port(), db).await
    }

    /// A direct client on shard `i`.
    pub async fn shard(&self, i: usize) -> Client {
        self.shards[i]
            .client("tasks")
            .await
            .expect("direct shard client")
    }

    pub fn ring(&self) -> Ring {
        Ring::new(
            self.config.shards.iter().map(|s| s.name.clone()),
            self.config.ring.virtual_nodes,
        )
        .expect("ring")
    }

    /// Which shards hold a task with this id (queried directly).
    pub async fn holders(&self, id: i64) -> Vec<usize> {
        let mut out = Vec::new();
        for i in 0..self.shards.len() {
            let c = self.shard(i).await;
            let n: i64 = c
                .query_one("SELECT count(*) FROM tasks WHERE id = $1", &[&id])
                .await
                .expect("count")
                .get(0);
            if n > 0 {
                out.push(i);
            }
        }
        out
    }
}

/// A proxy run as its own process (the binary), so a test can SIGKILL it: its port and
/// configuration file.
pub struct ProxyProc {
    pub port: u16,
    pub cfg: std::path::PathBuf,
}

impl ProxyProc {
    pub fn new(env: &Env, name: &str) -> ProxyProc {
        Self::with(env, name, "")
    }

    /// With `extra` configuration: whole sections (`[reshard]\n…`), appended.
    pub fn with(env: &Env, name: &str, extra: &str) -> ProxyProc {
        let port = taskflow_localstack::free_port().expect("free port");
        let cfg = env.dir.path().join(format!("{name}.toml"));
        let mut text = format!(
            "listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:0\"\n\
             state_dir = \"{state}\"\n\
             [metadata]\ninstance_id = \"{name}\"\nheartbeat_secs = 1\ndead_after_secs = 3\n\
             [[users]]\nname = \"taskflow\"\npassword = \"taskflow\"\n\
             [[users]]\nname = \"taskflow_admin\"\npassword = \"taskflow\"\nadmin = true\n\
             [backend]\nuser = \"taskflow\"\npassword_file = \"{pw}\"\n\
             [auth_database]\nurl = \"{auth}\"\n",
            state = env.dir.path().join(format!("state-{name}")).display(),
            pw = env.config.backend.password_file.clone().unwrap_or_default(),
            auth = env.config.auth_database.url,
        );
        text.push_str(extra);
        text.push('\n');
        for s in &env.config.shards {
            text.push_str(&format!(
                "[[shards]]\nname = \"{}\"\nurl = \"{}\"\n",
                s.name, s.url
            ));
        }
        std::fs::write(&cfg, text).expect("write config");
        ProxyProc { port, cfg }
    }

    /// Runs the proxy binary with an optional 2PC test hook.
    pub async fn spawn(&self, hook: Option<&str>) -> tokio::process::Child {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskflow-shard-proxy"));
        cmd.arg("--config")
            .arg(&self.cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .env("TASKFLOW_LOG__FORMAT", "text");
        match hook {
            Some(h) => cmd.env("TFSP_TEST_2PC_HOOK", h),
            None => cmd.env_remove("TFSP_TEST_2PC_HOOK"),
        };
        let child = cmd.spawn().expect("spawn proxy");
        for _ in 0..150 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return child;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("proxy did not start");
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        client_at(self.port, "tasks").await
    }
}
