//! The proxy's configuration (`docs/configuration.md`, section taskflow-shard-proxy).
//!
//! Why its own module: the key names are a contract with operators and the NixOS module, so
//! they live in one typed struct that the kit loads (TOML + `TASKFLOW_` overrides) and that
//! [`DaemonConfig::validate`] checks, naming the offending key on every error.

use std::collections::HashSet;
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
    pub ring: RingConfig,
    pub sharding: ShardingConfig,
    pub backend: BackendConfig,
    pub auth_database: AuthDatabaseConfig,
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
            }],
            tls: TlsConfig::default(),
            pool: PoolConfig::default(),
            ring: RingConfig::default(),
            sharding: ShardingConfig::default(),
            backend: BackendConfig::default(),
            auth_database: AuthDatabaseConfig::default(),
            shards: Vec::new(),
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
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct TlsConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct PoolConfig {
    /// Server connections per shard.
    pub size: usize,
    pub connect_timeout_secs: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size: 20,
            connect_timeout_secs: 5,
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct BackendConfig {
    pub user: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            user: "taskflow".into(),
            password_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AuthDatabaseConfig {
    pub url: String,
}

impl Default for AuthDatabaseConfig {
    fn default() -> Self {
        AuthDatabaseConfig {
            url: "postgres://taskflow@127.0.0.1:5435/auth".into(),
        }
    }
}

/// One named shard.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct ShardConfig {
    pub name: String,
    pub url: String,
}

/// Where a backend lives, parsed from a `postgres://user@host:port/db` URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendTarget {
    pub host: String,
    pub port: u16,
    pub database: String,
    /// User from the URL, if it names one (else `backend.user`).
    pub user: Option<String>,
}

/// Parses the subset of libpq URLs the proxy accepts: `postgres[ql]://[user@]host[:port][/db]`.
/// Passwords inside URLs are refused: they belong in `backend.password_file`.
pub fn parse_backend_url(url: &str) -> Result<BackendTarget, String> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| "must start with postgres://".to_string())?;
    let rest = rest.split('?').next().unwrap_or_default();
    let (authority, database) = match rest.split_once('/') {
        Some((a, d)) => (a, d),
        None => (rest, ""),
    };
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => {
            if u.contains(':') {
                return Err("must not contain a password (use backend.password_file)".into());
            }
            (Some(u.to_string()).filter(|u| !u.is_empty()), h)
        }
        None => (None, authority),
    };
    let (host, port) = if let Some(stripped) = hostport.strip_prefix('[') {
        let (h, p) = stripped
            .split_once(']')
            .ok_or_else(|| "unterminated [ipv6] host".to_string())?;
        (h.to_string(), p.strip_prefix(':').unwrap_or(""))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (hostport.to_string(), ""),
        }
    };
    if host.is_empty() {
        return Err("has no host".into());
    }
    let port = if port.is_empty() {
        5432
    } else {
        port.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("invalid port `{port}`"))?
    };
    let database = if database.is_empty() {
        user.clone().unwrap_or_else(|| "postgres".into())
    } else {
        database.to_string()
    };
    Ok(BackendTarget {
        host,
        port,
        database,
        user,
    })
}

impl DaemonConfig for ProxyConfig {
    fn common(&self) -> &CommonConfig {
        &self.common
    }

    /// At start-up and on reload (not `--check-config`): users' and the backend's password
    /// files and the TLS files are readable.
    fn check_secrets(&self) -> Result<(), ConfigError> {
        use crate::proxy::{backend_password, build_tls, build_users, SetupError};
        build_users(self).map_err(SetupError::into_config_error)?;
        backend_password(self).map_err(SetupError::into_config_error)?;
        build_tls(self).map_err(SetupError::into_config_error)?;
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.port() == 0 {
            return Err(ConfigError::invalid("listen", "port must not be 0"));
        }
        if self.users.is_empty() {
            return Err(ConfigError::invalid(
                "users",
                "at least one user is required",
            ));
        }
        let mut seen = HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            if u.name.is_empty() {
                return Err(ConfigError::invalid(
                    format!("users[{i}].name"),
                    "must not be empty",
                ));
            }
            if !seen.insert(u.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("users[{i}].name"),
                    format!("duplicate user `{}`", u.name),
                ));
            }
            match (&u.password_file, &u.password) {
                (None, None) => {
                    return Err(ConfigError::invalid(
                        format!("users[{i}].password_file"),
                        "each user needs password_file (or password, dev only)",
                    ))
                }
                (Some(_), Some(_)) => {
                    return Err(ConfigError::invalid(
                        format!("users[{i}].password"),
                        "set either password_file or password, not both",
                    ))
                }
                _ => {}
            }
        }
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "tls.key_file",
                    "required when tls.cert_file is set",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "tls.cert_file",
                    "required when tls.key_file is set",
                ))
            }
            _ => {}
        }
        if self.pool.size == 0 || self.pool.size > 10_000 {
            return Err(ConfigError::invalid(
                "pool.size",
                "must be between 1 and 10000",
            ));
        }
        if self.pool.connect_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                "pool.connect_timeout_secs",
                "must be at least 1",
            ));
        }
        if self.ring.virtual_nodes == 0 || self.ring.virtual_nodes > 65_536 {
            return Err(ConfigError::invalid(
                "ring.virtual_nodes",
                "must be between 1 and 65536",
            ));
        }
        for (key, db) in [("sharding.database", &self.sharding.database)] {
            if db.is_empty() || db == "admin" || db == "auth" {
                return Err(ConfigError::invalid(
                    key,
                    "must be a non-empty name other than `admin` and `auth`",
                ));
            }
        }
        if self.sharding.tables.is_empty() {
            return Err(ConfigError::invalid(
                "sharding.tables",
                "must name at least one table",
            ));
        }
        if self.sharding.key_column.is_empty() {
            return Err(ConfigError::invalid(
                "sharding.key_column",
                "must not be empty",
            ));
        }
        if self.backend.user.is_empty() {
            return Err(ConfigError::invalid("backend.user", "must not be empty"));
        }
        parse_backend_url(&self.auth_database.url)
            .map_err(|m| ConfigError::invalid("auth_database.url", m))?;
        let mut names = HashSet::new();
        for (i, s) in self.shards.iter().enumerate() {
            if s.name.is_empty() || s.name.len() > 40 {
                return Err(ConfigError::invalid(
                    format!("shards[{i}].name"),
                    "must be 1 to 40 characters",
                ));
            }
            if !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError::invalid(
                    format!("shards[{i}].name"),
                    "may contain only ASCII letters, digits, `-` and `_`",
                ));
            }
            if !names.insert(s.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("shards[{i}].name"),
                    format!("duplicate shard `{}`", s.name),
                ));
            }
            parse_backend_url(&s.url)
                .map_err(|m| ConfigError::invalid(format!("shards[{i}].url"), m))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = parse_backend_url("postgres://taskflow@127.0.0.1:5435/auth").expect("valid");
        assert_eq!(t.host, "127.0.0.1");
        assert_eq!(t.port, 5435);
        assert_eq!(t.database, "auth");
        assert_eq!(t.user.as_deref(), Some("taskflow"));
        let t = parse_backend_url("postgresql://[::1]/tasks").expect("valid");
        assert_eq!((t.host.as_str(), t.port), ("::1", 5432));
        assert!(parse_backend_url("postgres://u:pw@h/db").is_err());
        assert!(parse_backend_url("mysql://h/db").is_err());
        assert!(parse_backend_url("postgres://h:0/db").is_err());
    }

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
}
