//! Process-wide state shared by every client session: the current topology (ring, pools,
//! router), users, metrics, the cancel registry, and the PAUSE switch.
//!
//! Why one place: a reload (SIGHUP or admin `RELOAD`) must swap shards and users atomically
//! for *new* transactions while transactions in flight finish on the topology they began
//! with. Sessions take an `Arc<Topology>` snapshot per transaction; pools of shards whose
//! name and URL did not change are carried over, so a reload does not drop connections.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};
use taskflow_kit::config::ConfigError;

use tokio::sync::watch;

use crate::backend::Pool;
use crate::config::{parse_backend_url, ProxyConfig};
use crate::frontend::scram::Verifier;
use crate::metrics::Metrics;
use proxy_core::ring::Ring;
use proxy_core::router::{Router, ShardingRules};

/// Why a topology or user list could not be built from a configuration.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("configuration key `{key}`: {message}")]
    Config { key: String, message: String },
    #[error("cannot read secret for `{key}`: {source}")]
    Secret {
        key: String,
        #[source]
        source: taskflow_kit::secrets::SecretError,
    },
    #[error("ring: {0}")]
    Ring(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Load(String),
}

/// Shards, their pools, the ring and the router, as of one configuration.
pub struct Topology {
    pub generation: u64,
    pub ring: Ring,
    /// Indexed like `ring.shards()`.
    pub shards: Vec<Arc<Pool>>,
    pub auth: Arc<Pool>,
    pub router: Arc<Router>,
    pub sharded_database: String,
    pub sharded_tables: Vec<String>,
}

impl Topology {
    pub fn pool_by_name(&self, name: &str) -> Option<&Arc<Pool>> {
        self.shards.iter().find(|p| p.name == name)
    }

    /// Every pool: shards first, then the auth database.
    pub fn all_pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.shards.iter().chain(std::iter::once(&self.auth))
    }
}

/// What `SHOW CLIENTS` lists.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub addr: String,
    pub application_name: String,
    pub connected_at: SystemTime,
    pub tls: bool,
}

/// A backend a client's statement is running on, for cancel forwarding.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub host: String,
    pub port: u16,
    pub pid: i32,
    pub secret: i32,
}

/// Where cancel requests find the backends a client is using right now.
pub type CancelSlot = Arc<Mutex<Vec<CancelTarget>>>;

pub struct Proxy {
    pub config: RwLock<Arc<ProxyConfig>>,
    pub config_path: Option<PathBuf>,
    topology: RwLock<Arc<Topology>>,
    users: RwLock<Arc<HashMap<String, Verifier>>>,
    pub metrics: Arc<Metrics>,
    pub tls: RwLock<Option<Arc<rustls::ServerConfig>>>,
    cancels: Mutex<HashMap<(i32, i32), CancelSlot>>,
    pub clients: Mutex<HashMap<u64, ClientInfo>>,
    next_client: AtomicU64,
    next_pid: AtomicI32,
    /// `true` while PAUSEd: new transactions wait.
    pub paused: watch::Sender<bool>,
    pub started: Instant,
    pub state_dir: PathBuf,
    /// Counters for `SHOW STATS`.
    pub stats: ProxyStats,
    /// Makes a cross-shard commit atomic to scatter readers: the `COMMIT PREPARED` fan-out
    /// holds it exclusively, a scatter read holds it shared. Without it a read running
    /// between two shards' `COMMIT PREPARED` sees a row moved between shards on neither
    /// (or on both). Per process: several proxies in front of the same shards would need
    /// a shared fence.
    pub commit_fence: tokio::sync::RwLock<()>,
}

#[derive(Debug, Default)]
pub struct ProxyStats {
    pub statements: AtomicU64,
    pub transactions: AtomicU64,
    pub scatter_reads: AtomicU64,
    pub broadcasts: AtomicU64,
    pub two_phase: AtomicU64,
    pub errors: AtomicU64,
}

impl SetupError {
    /// The same problem as a configuration error naming its key, for the kit's exit 78.
    pub fn into_config_error(self) -> ConfigError {
        match self {
            SetupError::Config { key, message } => ConfigError::invalid(key, message),
            SetupError::Secret { key, source } => ConfigError::invalid(key, source.to_string()),
            other => ConfigError::Other(other.to_string()),
        }
    }
}

impl Proxy {
    /// Builds the proxy from a validated configuration (reads secrets and TLS files).
    pub fn new(
        config: ProxyConfig,
        config_path: Option<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Proxy>, SetupError> {
        let users = build_users(&config)?;
        let topology = build_topology(&config, None, 1)?;
        let tls = build_tls(&config)?;
        let (paused, _) = watch::channel(false);
        Ok(Arc::new(Proxy {
            state_dir: config.state_dir.clone(),
            config: RwLock::new(Arc::new(config)),
            config_path,
            topology: RwLock::new(Arc::new(topology)),
            users: RwLock::new(Arc::new(users)),
            metrics,
            tls: RwLock::new(tls),
            cancels: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(1),
            next_pid: AtomicI32::new(1),
            paused,
            started: Instant::now(),
            stats: ProxyStats::default(),
            commit_fence: tokio::sync::RwLock::new(()),
        }))
    }

    pub fn topology(&self) -> Arc<Topology> {
        match self.topology.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn config(&self) -> Arc<ProxyConfig> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn verifier(&self, user: &str) -> Option<Verifier> {
        let users = match self.users.read() {
            Ok(u) => u.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        users.get(user).cloned()
    }

    pub fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        match self.tls.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Applies a new configuration: shards, users, pools and TLS. Listeners and the state
    /// directory are fixed at start; changing them needs a restart (logged).
    pub fn apply(&self, config: ProxyConfig) -> Result<String, SetupError> {
        let old = self.config();
        if old.listen != config.listen || old.metrics_listen != config.metrics_listen {
            tracing::warn!("listen addresses changed: takes effect after a restart");
        }
        let users = build_users(&config)?;
        let current = self.topology();
        let topology = build_topology(&config, Some(&current), current.generation + 1)?;
        let tls = build_tls(&config)?;
        let summary = format!(
            "{} shard(s): {}; {} user(s)",
            topology.shards.len(),
            topology.ring.shards().join(", "),
            users.len()
        );
        if let Ok(mut u) = self.users.write() {
            *u = Arc::new(users);
        }
        if let Ok(mut t) = self.topology.write() {
            *t = Arc::new(topology);
        }
        if let Ok(mut t) = self.tls.write() {
            *t = tls;
        }
        if let Ok(mut c) = self.config.write() {
            *c = Arc::new(config);
        }
        Ok(summary)
    }

    /// Re-reads the configuration file and environment (admin `RELOAD`).
    pub async fn reload_from_disk(&self) -> Result<String, SetupError> {
        let cfg: ProxyConfig = taskflow_kit::config::load(self.config_path.as_deref())
            .map_err(|e| SetupError::Load(e.to_string()))?;
        self.check_ring_change(&cfg).await?;
        self.apply(cfg)
    }

    /// Refuses a configuration whose ring would re-route keys while a current shard holds
    /// rows of a sharded table: without online migration those rows would become
    /// unreachable. Shards may be added, removed or renamed freely while they are all empty
    /// (a new deployment), and a shard's URL may change at any time.
    pub async fn check_ring_change(&self, config: &ProxyConfig) -> Result<(), SetupError> {
        let current = self.topology();
        let mut old_names: Vec<&str> = current.ring.shards().iter().map(String::as_str).collect();
        let mut new_names: Vec<&str> = config.shards.iter().map(|s| s.name.as_str()).collect();
        old_names.sort_unstable();
        new_names.sort_unstable();
        if old_names == new_names && current.ring.virtual_nodes() == config.ring.virtual_nodes {
            return Ok(());
        }
        let probe = current
            .sharded_tables
            .iter()
            .map(|t| format!("(SELECT 1 FROM \"{}\" LIMIT 1)", t.replace('"', "\"\"")))
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let refuse = |message: String| SetupError::Config {
            key: "shards".into(),
            message,
        };
        for pool in &current.shards {
            let mut conn = pool.get().await.map_err(|e| {
                refuse(format!(
                    "the shard list or ring changes which shard owns which performer_id; cannot check that {} holds no rows: {e}",
                    pool.name
                ))
            })?;
            let result = conn.conn().simple_query(&probe).await;
            match result {
                Ok(r) => {
                    conn.release();
                    if !r.rows.is_empty() {
                        return Err(refuse(format!(
                            "the shard list or ring changes which shard owns which performer_id, and {} holds rows that would become unreachable; online migration is not available in this version, so the ring stays as it is",
                            pool.name
                        )));
                    }
                }
                Err(e) => {
                    conn.discard();
                    return Err(refuse(format!(
                        "the shard list or ring changes which shard owns which performer_id; cannot check that {} holds no rows: {e}",
                        pool.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Registers a new client; returns its id, the (pid, secret) it is told in
    /// BackendKeyData, and the slot cancel requests will read.
    pub fn register_client(&self, info: ClientInfo) -> (u64, i32, i32, CancelSlot) {
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
        let secret = i32::from_ne_bytes(
            crate::frontend::scram::random_bytes()[..4]
                .try_into()
                .unwrap_or([7, 7, 7, 7]),
        );
        let slot: CancelSlot = Arc::new(Mutex::new(Vec::new()));
        if let Ok(mut c) = self.cancels.lock() {
            c.insert((pid, secret), slot.clone());
        }
        if let Ok(mut c) = self.clients.lock() {
            c.insert(id, ClientInfo { id, ..info });
        }
        self.metrics.clients.inc();
        (id, pid, secret, slot)
    }

    pub fn unregister_client(&self, id: u64, pid: i32, secret: i32) {
        if let Ok(mut c) = self.cancels.lock() {
            c.remove(&(pid, secret));
        }
        if let Ok(mut c) = self.clients.lock() {
            c.remove(&id);
        }
        self.metrics.clients.dec();
    }

    /// The backends to cancel for a CancelRequest, if the key matches a client.
    pub fn cancel_targets(&self, pid: i32, secret: i32) -> Vec<CancelTarget> {
        let slot = self
            .cancels
            .lock()
            .ok()
            .and_then(|c| c.get(&(pid, secret)).cloned());
        slot.and_then(|s| s.lock().ok().map(|v| v.clone()))
            .unwrap_or_default()
    }

    /// Waits while the proxy is PAUSEd.
    pub async fn wait_unpaused(&self) {
        let mut rx = self.paused.subscribe();
        while *rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Refreshes pool gauges (called periodically).
    pub fn refresh_pool_metrics(&self) {
        let topo = self.topology();
        for p in topo.all_pools() {
            let l = crate::metrics::ShardLabel {
                shard: p.name.clone(),
            };
            self.metrics
                .pool_in_use
                .get_or_create(&l)
                .set(p.stats.in_use.load(Ordering::Relaxed) as i64);
            self.metrics
                .pool_idle
                .get_or_create(&l)
                .set(p.idle_count() as i64);
            self.metrics
                .pool_waiting
                .get_or_create(&l)
                .set(p.stats.waiting.load(Ordering::Relaxed) as i64);
            self.metrics
                .shard_up
                .get_or_create(&l)
                .set(i64::from(p.healthy.load(Ordering::Relaxed)));
        }
    }
}

pub(crate) fn build_users(config: &ProxyConfig) -> Result<HashMap<String, Verifier>, SetupError> {
    let mut users = HashMap::new();
    for (i, u) in config.users.iter().enumerate() {
        let password = match (&u.password_file, &u.password) {
            (Some(file), _) => {
                taskflow_kit::secrets::read_secret(file).map_err(|source| SetupError::Secret {
                    key: format!("users[{i}].password_file"),
                    source,
                })?
            }
            (None, Some(p)) => p.clone(),
            (None, None) => {
                return Err(SetupError::Config {
                    key: format!("users[{i}].password_file"),
                    message: "missing".into(),
                })
            }
        };
        users.insert(u.name.clone(), Verifier::from_password(&password));
    }
    Ok(users)
}

pub(crate) fn backend_password(config: &ProxyConfig) -> Result<Option<String>, SetupError> {
    match &config.backend.password_file {
        None => Ok(None),
        Some(f) => taskflow_kit::secrets::read_secret(f)
            .map(Some)
            .map_err(|source| SetupError::Secret {
                key: "backend.password_file".into(),
                source,
            }),
    }
}

fn build_topology(
    config: &ProxyConfig,
    previous: Option<&Topology>,
    generation: u64,
) -> Result<Topology, SetupError> {
    let password = backend_password(config)?;
    let make_pool = |name: &str, url: &str, key: String| -> Result<Arc<Pool>, SetupError> {
        if let Some(prev) = previous.and_then(|p| p.all_pools().find(|p| p.name == name).cloned()) {
            if prev.same_backend(
                url,
                &config.backend.user,
                password.as_deref(),
                config.pool.size,
            ) {
                return Ok(prev);
            }
        }
        let target =
            parse_backend_url(url).map_err(|message| SetupError::Config { key, message })?;
        Ok(Pool::new(
            name.to_owned(),
            url.to_owned(),
            target,
            config.backend.user.clone(),
            password.clone(),
            config.pool.size,
            config.pool.connect_timeout(),
        ))
    };
    let ring = Ring::new(
        config.shards.iter().map(|s| s.name.clone()),
        config.ring.virtual_nodes,
    )
    .map_err(|e| SetupError::Ring(e.to_string()))?;
    let mut shards = Vec::with_capacity(config.shards.len());
    for name in ring.shards() {
        let (i, s) = config
            .shards
            .iter()
            .enumerate()
            .find(|(_, s)| &s.name == name)
            .ok_or_else(|| SetupError::Ring(format!("ring names unknown shard {name}")))?;
        shards.push(make_pool(&s.name, &s.url, format!("shards[{i}].url"))?);
    }
    let auth = make_pool(
        "auth",
        &config.auth_database.url,
        "auth_database.url".into(),
    )?;
    let router = Arc::new(Router::new(ShardingRules {
        database: config.sharding.database.clone(),
        tables: config.sharding.tables.clone(),
        key_column: config.sharding.key_column.clone(),
    }));
    Ok(Topology {
        generation,
        ring,
        shards,
        auth,
        router,
        sharded_database: config.sharding.database.clone(),
        sharded_tables: config.sharding.tables.clone(),
    })
}

pub(crate) fn build_tls(
    config: &ProxyConfig,
) -> Result<Option<Arc<rustls::ServerConfig>>, SetupError> {
    let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) else {
        return Ok(None);
    };
    let cert_pem = std::fs::read(cert)
        .map_err(|e| SetupError::Tls(format!("tls.cert_file {}: {e}", cert.display())))?;
    let key_pem =
        taskflow_kit::secrets::read_secret_bytes(&key.to_string_lossy()).map_err(|source| {
            SetupError::Secret {
                key: "tls.key_file".into(),
                source,
            }
        })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| SetupError::Tls(format!("tls.cert_file: {e}")))?;
    if certs.is_empty() {
        return Err(SetupError::Tls("tls.cert_file holds no certificate".into()));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| SetupError::Tls(format!("tls.key_file: {e}")))?
        .ok_or_else(|| SetupError::Tls("tls.key_file holds no private key".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| SetupError::Tls(e.to_string()))?;
    Ok(Some(Arc::new(cfg)))
}
