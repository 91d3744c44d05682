//! The proxy's configuration (`docs/configuration.md`, section taskflow-shard-proxy).
//!
//! Why its own module: the key names are a contract with operators and the NixOS module, so
//! they live in one typed struct that the kit loads (TOML + `TASKFLOW_` overrides) and that
//! [`DaemonConfig::validate`] checks, naming the offending key on every error.

mod backend_tls;
mod resolve;
mod target;
mod validate;

pub use backend_tls::{backend_security, security_for_url, BackendSecurity, BackendTlsError};
pub use resolve::{resolve, Resolved, SetupError, User};
pub use target::{BackendTarget, SslMode};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use taskflow_kit::config::{CommonConfig, ConfigError, DaemonConfig};

/// Top-level configuration of `taskflow-shard-proxy`.
///
/// No `deny_unknown_fields`: the kit refuses unknown keys in the *file* itself (naming
/// them) and only warns about unknown `TASKFLOW_*` environment variables, which other
/// tools share.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ProxyConfig {
    #[serde(flatten)]
    pub common: CommonConfig,
    /// PostgreSQL wire listener.
    pub listen: SocketAddr,
    /// Prometheus `/metrics`, `/healthz`, `/readyz`.
    pub metrics_listen: SocketAddr,
    /// Durable proxy state (2PC decisions, migration progress).
    pub state_dir: PathBuf,
    /// Client logins (SCRAM-SHA-256).
    pub users: Vec<UserConfig>,
    pub tls: TlsConfig,
    pub pool: PoolConfig,
    pub limits: LimitsConfig,
    pub ring: RingConfig,
    pub reshard: ReshardConfig,
    pub sharding: ShardingConfig,
    pub backend: BackendConfig,
    pub auth_database: AuthDatabaseConfig,
    /// The proxies' shared state on the auth cluster (schema `taskflow_meta`).
    pub metadata: MetadataConfig,
    pub shards: Vec<ShardConfig>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            common: CommonConfig::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 6432)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9930)),
            state_dir: PathBuf::from("/var/lib/taskflow-shard-proxy"),
            users: vec![UserConfig {
                name: "taskflow".into(),
                password_file: Some("proxy-password".into()),
                password: None,
                databases: None,
                admin: false,
            }],
            tls: TlsConfig::default(),
            pool: PoolConfig::default(),
            limits: LimitsConfig::default(),
            ring: RingConfig::default(),
            reshard: ReshardConfig::default(),
            sharding: ShardingConfig::default(),
            backend: BackendConfig::default(),
            auth_database: AuthDatabaseConfig::default(),
            metadata: MetadataConfig::default(),
            shards: Vec::new(),
        }
    }
}

impl ProxyConfig {
    /// The pool settings of the passthrough database `auth`: `pool`, with
    /// `auth_database.pool_size` when set.
    pub fn auth_pool(&self) -> PoolConfig {
        PoolConfig {
            size: self.auth_database.pool_size.unwrap_or(self.pool.size),
            ..self.pool.clone()
        }
    }
}

/// One client login.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct UserConfig {
    pub name: String,
    /// A secret file holding the password (absolute, or a name in `$CREDENTIALS_DIRECTORY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// Inline password: accepted for development only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Databases this user may open. Unset: the sharded database and `auth` (plus `admin`
    /// for an admin user). `admin` may be listed only by an admin user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub databases: Option<Vec<String>>,
    /// May open the `admin` console (`PAUSE`, `RELOAD`, …), like pgbouncer's `admin_users`.
    #[serde(default)]
    pub admin: bool,
}

impl UserConfig {
    /// The databases this user may open, given the sharded database's name.
    pub fn allowed_databases(&self, sharded: &str) -> std::collections::BTreeSet<String> {
        match &self.databases {
            Some(list) => list.iter().cloned().collect(),
            None => {
                let mut all: std::collections::BTreeSet<String> =
                    [sharded.to_owned(), "auth".to_owned()].into();
                if self.admin {
                    all.insert("admin".into());
                }
                all
            }
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct TlsConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct PoolConfig {
    /// Server connections per shard.
    pub size: usize,
    pub connect_timeout_secs: u64,
    /// How long a statement waits for a free server connection before it fails (53300).
    pub checkout_timeout_secs: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size: 20,
            connect_timeout_secs: 5,
            checkout_timeout_secs: 60,
        }
    }
}

/// Limits on what one client, or all of them, may take; each breach is an error for that
/// client alone.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct LimitsConfig {
    /// Client connections served at once; more are refused (53300, as PostgreSQL does).
    pub max_clients: usize,
    /// Largest message a client may send before it has authenticated.
    pub pre_auth_message_bytes: usize,
    /// Extended-protocol messages a client may queue before Sync.
    pub max_pipeline_messages: usize,
    /// Bytes those queued messages may hold.
    pub max_pipeline_bytes: usize,
    /// How long a new transaction waits while the proxy is PAUSEd before it fails (57P03,
    /// retryable).
    pub pause_timeout_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_clients: 10_000,
            pre_auth_message_bytes: 8 * 1024,
            max_pipeline_messages: 10_000,
            max_pipeline_bytes: 64 * 1024 * 1024,
            pause_timeout_secs: 30,
        }
    }
}

impl PoolConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct RingConfig {
    pub virtual_nodes: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig { virtual_nodes: 256 }
    }
}

/// Online migration (`[reshard]`): how rows move when the ring changes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ReshardConfig {
    /// Rows moved per batch (one two-phase commit; its arcs' writes pause meanwhile).
    pub batch_rows: u32,
    /// Longest a statement on a moving key waits for a batch to commit before it fails
    /// with a retryable error (SQLSTATE 40001); also the batch's own lock wait.
    pub write_pause_ms: u64,
    /// Initial throttle in rows per second (0: none); `SET MIGRATION THROTTLE` changes it.
    pub throttle_rows_per_sec: u32,
    /// How often a proxy reads which arcs are moved (milliseconds).
    pub poll_ms: u64,
}

impl Default for ReshardConfig {
    fn default() -> Self {
        ReshardConfig {
            batch_rows: 5000,
            write_pause_ms: 1000,
            throttle_rows_per_sec: 0,
            poll_ms: 250,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ShardingConfig {
    pub database: String,
    pub tables: Vec<String>,
    pub key_column: String,
}

impl Default for ShardingConfig {
    fn default() -> Self {
        ShardingConfig {
            database: "tasks".into(),
            tables: vec!["tasks".into(), "task_observers".into(), "outbox".into()],
            key_column: "performer_id".into(),
        }
    }
}

/// How the proxy logs in to every backend (shards and the auth database).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct BackendConfig {
    pub user: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// TLS to backends whose URL has no `sslmode` parameter (libpq's values; default
    /// `disable`).
    pub sslmode: SslMode,
    /// CA certificates (PEM) for backends whose URL has no `sslrootcert` parameter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<PathBuf>,
    /// Answer a server's cleartext or MD5 password request (refused by default: SCRAM only).
    pub allow_insecure_auth: bool,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            user: "taskflow".into(),
            password_file: None,
            sslmode: SslMode::Disable,
            sslrootcert: None,
            allow_insecure_auth: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AuthDatabaseConfig {
    pub url: String,
    /// Server connections to the passthrough database; unset: `pool.size`. Its own knob
    /// (pgbouncer's per-database `pool_size`) because its load has nothing to do with a
    /// shard's: several shards may share one PostgreSQL server, each with `pool.size`
    /// connections, while `auth` is one database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<usize>,
}

impl Default for AuthDatabaseConfig {
    fn default() -> Self {
        AuthDatabaseConfig {
            url: "postgres://taskflow@127.0.0.1:5435/auth".into(),
            pool_size: None,
        }
    }
}

/// How proxies over the same shards coordinate: through the schema `taskflow_meta` on
/// the auth cluster (2PC decisions, the proxies registry, the cross-proxy commit fence).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct MetadataConfig {
    /// This proxy's name in every 2PC gid and in the registry; ASCII letters, digits and
    /// `-`, at most 40 characters. Unset: derived from the host name and listen port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// How often this proxy records that it is alive.
    pub heartbeat_secs: u64,
    /// A proxy whose last heartbeat is older than this is dead: another proxy may roll
    /// back its undecided prepared transactions.
    pub dead_after_secs: u64,
    /// `cluster`: scatter reads and cross-shard commits of every proxy are fenced against
    /// each other by an advisory lock on the auth cluster. `process`: only within this
    /// process (one proxy, one less round trip per scatter read).
    pub fence: FenceScope,
    /// Longest a cross-shard commit waits for running scatter reads before it goes ahead.
    pub fence_wait_ms: u64,
}

impl Default for MetadataConfig {
    fn default() -> Self {
        MetadataConfig {
            instance_id: None,
            heartbeat_secs: 5,
            dead_after_secs: 30,
            fence: FenceScope::Cluster,
            fence_wait_ms: 2000,
        }
    }
}

/// Where the scatter-read/commit fence holds (`metadata.fence`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FenceScope {
    Cluster,
    Process,
}

impl MetadataConfig {
    /// The configured instance id, or `<host>-<port>` (`<host>-<hash of state_dir>` when
    /// the port is chosen by the system), made of valid characters only.
    pub fn instance_id(&self, listen: SocketAddr, state_dir: &std::path::Path) -> String {
        if let Some(id) = &self.instance_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "proxy".into());
        let host: String = host
            .trim()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(24)
            .collect();
        let suffix = if listen.port() == 0 {
            let h = xxhash_rust::xxh64::xxh64(state_dir.as_os_str().as_encoded_bytes(), 0);
            format!("{:08x}", h as u32)
        } else {
            listen.port().to_string()
        };
        format!("{host}-{suffix}")
    }
}

/// One named shard.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct ShardConfig {
    pub name: String,
    pub url: String,
}

impl DaemonConfig for ProxyConfig {
    fn common(&self) -> &CommonConfig {
        &self.common
    }

    /// At start-up and on reload (not `--check-config`): users' and the backend's password
    /// files and the TLS files are readable — by resolving them exactly as the runtime will.
    fn check_secrets(&self) -> Result<(), ConfigError> {
        resolve(self)
            .map(drop)
            .map_err(SetupError::into_config_error)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        validate::validate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_keys() {
        let mut c = ProxyConfig::default();
        c.shards.push(ShardConfig {
            name: "shard 1".into(),
            url: "postgres://h/db".into(),
        });
        let e = c.validate().expect_err("bad name");
        assert!(e.to_string().contains("shards[0].name"), "{e}");
        c.shards[0].name = "shard-1".into();
        c.shards[0].url = "nope".into();
        let e = c.validate().expect_err("bad url");
        assert!(e.to_string().contains("shards[0].url"), "{e}");
    }

    #[test]
    fn the_auth_pool_is_pool_size_unless_set() {
        let mut c = ProxyConfig::default();
        c.pool.size = 7;
        assert_eq!(c.auth_pool().size, 7);
        c.auth_database.pool_size = Some(20);
        assert_eq!(c.auth_pool().size, 20);
        assert_eq!(
            c.auth_pool().checkout_timeout_secs,
            c.pool.checkout_timeout_secs
        );
        c.validate().expect("valid");
        for bad in [0, 10_001] {
            c.auth_database.pool_size = Some(bad);
            let e = c.validate().expect_err("out of range");
            assert!(e.to_string().contains("auth_database.pool_size"), "{e}");
        }
    }

    #[test]
    fn verifying_sslmodes_need_a_ca() {
        let mut c = ProxyConfig::default();
        c.shards.push(ShardConfig {
            name: "shard-1".into(),
            url: "postgres://h/db?sslmode=verify-full".into(),
        });
        let e = c.validate().expect_err("no CA");
        assert!(e.to_string().contains("shards[0].url"), "{e}");
        assert!(e.to_string().contains("needs a CA"), "{e}");
        c.backend.sslrootcert = Some("ca.pem".into());
        let e = c.validate().expect_err("relative CA");
        assert!(e.to_string().contains("backend.sslrootcert"), "{e}");
        c.backend.sslrootcert = Some("/etc/ca.pem".into());
        c.validate().expect("CA from backend.sslrootcert");
        c.backend.sslrootcert = None;
        c.backend.sslmode = SslMode::VerifyCa;
        let e = c.validate().expect_err("default mode needs a CA too");
        assert!(e.to_string().contains("auth_database.url"), "{e}");
        c.shards[0].url = "postgres://h/db?sslmode=require".into();
        c.auth_database.url = "postgres://h/auth?sslmode=verify-ca&sslrootcert=/ca.pem".into();
        c.validate().expect("require needs no CA");
    }
}
