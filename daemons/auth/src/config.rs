//! The auth daemon's configuration (docs/configuration.md, "taskflow-auth").
//!
//! Everything that can be checked before the daemon starts is checked in
//! [`DaemonConfig::validate`], so a bad value — including an unreadable or malformed
//! signing key — fails `--check-config` and start-up with exit 78 naming the key, rather
//! than surfacing later as a failed login.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use taskflow_kit::config::{CommonConfig, ConfigError, DaemonConfig};
use taskflow_kit::web::ServerLimits;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AuthConfig {
    #[serde(flatten)]
    pub common: CommonConfig,
    /// HTTP listener.
    pub listen: SocketAddr,
    /// Listener of `/metrics` and `/readyz`, off the API port; loopback by default.
    pub ops_listen: SocketAddr,
    /// Read timeouts and connection caps of the API listener.
    pub server: ServerLimits,
    /// The `auth` database, normally through the shard proxy's passthrough.
    pub database_url: String,
    /// File holding the database password (secret-file rules); unset = none/URL's.
    pub database_password_file: Option<String>,
    /// Connections kept to the database.
    pub database_pool_size: usize,
    /// Ed25519 private key, PKCS#8 PEM (secret-file rules).
    pub jwt_private_key_file: String,
    /// Lifetime of issued tokens.
    pub token_ttl_secs: u64,
    /// bcrypt work factor, 4–31.
    pub bcrypt_cost: u32,
    /// Threads hashing at once; 0: one per CPU.
    pub bcrypt_workers: usize,
    /// Requests allowed to wait for a hashing thread; more are answered 503 at once.
    pub bcrypt_queue: usize,
    /// Milliseconds a request waits for a hashing thread before it is answered 503.
    pub bcrypt_queue_timeout_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            common: CommonConfig::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            ops_listen: SocketAddr::from(([127, 0, 0, 1], 9933)),
            server: ServerLimits::default(),
            database_url: "postgres://taskflow@127.0.0.1:6432/auth".into(),
            database_password_file: None,
            database_pool_size: 8,
            jwt_private_key_file: "jwt-private.pem".into(),
            token_ttl_secs: 86_400,
            bcrypt_cost: 12,
            bcrypt_workers: 0,
            bcrypt_queue: 16,
            bcrypt_queue_timeout_ms: 1_000,
        }
    }
}

impl DaemonConfig for AuthConfig {
    fn common(&self) -> &CommonConfig {
        &self.common
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(4..=31).contains(&self.bcrypt_cost) {
            return Err(ConfigError::invalid(
                "bcrypt_cost",
                "must be between 4 and 31",
            ));
        }
        if self.bcrypt_queue_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "bcrypt_queue_timeout_ms",
                "must be at least 1",
            ));
        }
        if self.ops_listen == self.listen && self.listen.port() != 0 {
            return Err(ConfigError::invalid(
                "ops_listen",
                "must differ from `listen` (ops endpoints are not served on the API port)",
            ));
        }
        self.server.validate("server")?;
        if self.token_ttl_secs == 0 {
            return Err(ConfigError::invalid("token_ttl_secs", "must be at least 1"));
        }
        if self.token_ttl_secs > 366 * 86_400 {
            return Err(ConfigError::invalid(
                "token_ttl_secs",
                "must be at most a year",
            ));
        }
        if self.database_pool_size == 0 {
            return Err(ConfigError::invalid(
                "database_pool_size",
                "must be at least 1",
            ));
        }
        self.database_url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| ConfigError::invalid("database_url", e.to_string()))?;
        if self.jwt_private_key_file.is_empty() {
            return Err(ConfigError::invalid(
                "jwt_private_key_file",
                "must name a file",
            ));
        }
        // Secret files are read at start-up, not here: `--check-config` must work where
        // the secrets are not (a build sandbox). A bad secret still exits 78 naming its
        // key, from `check_secrets` at start-up.
        Ok(())
    }

    /// At start-up (not `--check-config`): the secret files exist and parse.
    fn check_secrets(&self) -> Result<(), ConfigError> {
        self.pg_config()?;
        crate::keys::SigningKeys::load(&self.jwt_private_key_file)
            .map_err(|e| ConfigError::invalid("jwt_private_key_file", e.to_string()))?;
        Ok(())
    }
}

impl AuthConfig {
    /// The database connection settings, with the password from its secret file.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, ConfigError> {
        taskflow_kit::postgres::daemon_database(
            &self.database_url,
            self.database_password_file.as_deref(),
            "taskflow-auth",
        )
    }
}
