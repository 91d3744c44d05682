//! The proxies' shared metadata: the schema `taskflow_meta` on the auth cluster, which
//! every proxy in front of the same shards reads and writes.
//!
//! Why on the auth cluster: it is the one database every proxy already depends on that is
//! not a shard, so 2PC decisions, the registry of live proxies and the commit fence can be
//! shared without a new service. Why not in memory or in `state_dir`: a second proxy must
//! be able to finish (or safely abandon) what a dead one left prepared on the shards.
//!
//! [`schema`] migrates it at start-up (idempotent, under an advisory lock), [`registry`]
//! keeps heartbeats, [`decisions`] holds the 2PC outcome of each cross-shard transaction,
//! [`fence`] orders scatter reads against `COMMIT PREPARED` fan-outs across proxies,
//! [`moves`] records online migrations (state, owner, arcs moved) and the proxies'
//! acknowledgements.

pub mod begin;
pub mod decisions;
pub mod epochs;
pub mod fence;
pub mod moves;
pub mod registry;
pub mod schema;

use std::sync::Arc;
use std::time::Duration;

use crate::backend::{BackendError, Pool, PoolError};
use crate::config::{
    security_for_url, BackendConfig, BackendTarget, MetadataConfig, PoolConfig, ProxyConfig,
    SetupError,
};

pub use fence::{Fence, FenceGuard};

/// Why a metadata operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata database: {0}")]
    Pool(#[from] PoolError),
    #[error("metadata database: {0}")]
    Backend(#[from] BackendError),
    #[error("metadata: {0}")]
    Invalid(String),
    /// Another proxy recorded this ring epoch between our look and our write.
    #[error("another proxy recorded ring epoch {0} at the same time")]
    EpochTaken(i64),
}

/// A handle on the metadata schema: its own pool to the auth cluster (so scatter-read
/// fences never wait behind `auth` passthrough clients) and this proxy's identity.
pub struct Meta {
    pub pool: Arc<Pool>,
    /// This proxy's instance id (in every gid it creates and in the registry).
    pub instance: String,
    pub settings: MetadataConfig,
    /// `host:port` this proxy listens on, as recorded in the registry.
    pub addr: String,
    /// Backend credentials, TLS settings and pool settings, for shards known only from the
    /// stored ring.
    backend: BackendConfig,
    backend_password: Option<String>,
    pool_settings: PoolConfig,
}

impl Meta {
    /// A handle for `config` (connects lazily).
    pub fn new(config: &ProxyConfig, password: Option<&str>) -> Result<Meta, SetupError> {
        let target = BackendTarget::parse(&config.auth_database.url).map_err(|message| {
            SetupError::Config {
                key: "auth_database.url".into(),
                message,
            }
        })?;
        let security = security_for_url(
            &config.backend,
            "auth_database.url",
            &config.auth_database.url,
        )
        .map_err(|e| SetupError::Config {
            key: e.key.clone(),
            message: e.message.clone(),
        })?;
        let pool = Pool::new(
            "metadata".into(),
            config.auth_database.url.clone(),
            target,
            security,
            config.backend.user.clone(),
            password.map(str::to_owned),
            &PoolConfig {
                size: config.pool.size.max(4),
                ..config.pool.clone()
            },
        );
        let instance = config
            .metadata
            .instance_id(config.listen, &config.state_dir);
        Ok(Meta {
            pool,
            instance,
            settings: config.metadata.clone(),
            addr: config.listen.to_string(),
            backend: config.backend.clone(),
            backend_password: password.map(str::to_owned),
            pool_settings: config.pool.clone(),
        })
    }

    /// The role and password the proxy logs in to backends with.
    pub fn backend_login(&self) -> (&str, Option<&str>) {
        (&self.backend.user, self.backend_password.as_deref())
    }

    /// A pool to a shard known only by name and URL (e.g. from a stored ring epoch).
    pub fn pool_for(&self, name: &str, url: &str) -> Result<Arc<Pool>, MetaError> {
        let target = BackendTarget::parse(url)
            .map_err(|m| MetaError::Invalid(format!("stored URL of shard {name}: {m}")))?;
        let security = security_for_url(&self.backend, &format!("stored URL of shard {name}"), url)
            .map_err(|e| MetaError::Invalid(e.to_string()))?;
        Ok(Pool::new(
            name.to_owned(),
            url.to_owned(),
            target,
            security,
            self.backend.user.clone(),
            self.backend_password.clone(),
            &self.pool_settings,
        ))
    }

    /// A typed client to the shard at `url`, over the TLS the URL (or `backend.*`) asks
    /// for (5 s to connect).
    pub async fn connect_shard(&self, url: &str) -> Result<tokio_postgres::Client, String> {
        let target = BackendTarget::parse(url)?;
        let security =
            security_for_url(&self.backend, "shard url", url).map_err(|e| e.to_string())?;
        let (user, password) = self.backend_login();
        let connect = crate::backend::client::connect(&target, &security, user, password);
        tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .map_err(|_| {
                format!(
                    "connecting to {}:{}: timed out after 5 s",
                    target.host, target.port
                )
            })?
            .map_err(|e| e.to_string())
    }

    /// Applies `migrations/`' shard schema at `url`; returns the versions it applied.
    pub async fn apply_shard_schema(&self, url: &str) -> Result<Vec<String>, String> {
        let mut client = self.connect_shard(url).await?;
        taskflow_migrations::apply_shard(&mut client)
            .await
            .map(|r| r.applied)
            .map_err(|e| e.to_string())
    }

    /// Runs `sql` (simple protocol, possibly several statements) on a pooled connection.
    pub async fn query(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, MetaError> {
        let mut conn = self.pool.get().await?;
        match conn.conn().simple_query(sql).await {
            Ok(r) => {
                if conn.conn().status == b'I' {
                    conn.release();
                } else {
                    conn.discard();
                }
                Ok(r.rows)
            }
            Err(e) => {
                if matches!(e, BackendError::Server(_)) && conn.conn().status == b'I' {
                    conn.release();
                } else {
                    conn.discard();
                }
                Err(e.into())
            }
        }
    }

    /// How long after its last heartbeat a proxy counts as dead.
    pub fn dead_after(&self) -> Duration {
        Duration::from_secs(self.settings.dead_after_secs)
    }
}

/// `s` as an SQL string literal.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `items` as an SQL `text[]` literal.
pub fn text_array(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("ARRAY[{}]::text[]", inner.join(","))
}

/// The first column of every row, non-null ones only.
pub fn first_column(rows: Vec<Vec<Option<String>>>) -> Vec<String> {
    rows.into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect()
}
