//! Connection settings for PostgreSQL (the daemons reach the shard proxy this way).
//!
//! The URL in configuration never carries the password: it comes from a secret file, so it
//! stays out of the Nix store and out of `--check-config` output.

use crate::config::ConfigError;
use crate::secrets;

/// How long a connection attempt may take unless the URL says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The settings of a daemon's `database_url` + `database_password_file` keys: parses the URL
/// (`postgres://user@host:port/db` or `key=value` form), adds the password read from the
/// secret file if one is named, a 5 s connect timeout unless the URL sets one, and the
/// daemon's name as `application_name` (so `SHOW CLIENTS` and `pg_stat_activity` tell who
/// is who). Errors name the key they are about.
pub fn daemon_database(
    url: &str,
    password_file: Option<&str>,
    application_name: &str,
) -> Result<tokio_postgres::Config, ConfigError> {
    let mut cfg = client_config(url, "database_url", password_file, "database_password_file")?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    cfg.application_name(application_name);
    Ok(cfg)
}

/// Parses `url` (`postgres://user@host:port/db` or `key=value` form) and adds the password
/// read from `password_file`, if given. Errors name `url_key` / `password_key`.
pub fn client_config(
    url: &str,
    url_key: &str,
    password_file: Option<&str>,
    password_key: &str,
) -> Result<tokio_postgres::Config, ConfigError> {
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| ConfigError::invalid(url_key, e.to_string()))?;
    if let Some(file) = password_file {
        let pw = secrets::read_secret(file)
            .map_err(|e| ConfigError::invalid(password_key, e.to_string()))?;
        cfg.password(pw);
    }
    Ok(cfg)
}

/// The connection pool a daemon uses for its database (through the shard proxy): deadpool
/// with fast recycling, and bounded waits — a proxy that does not answer costs a clear
/// error after [`DEFAULT_CONNECT_TIMEOUT`], never a hang.
pub fn pool(
    config: tokio_postgres::Config,
    size: usize,
) -> Result<deadpool_postgres::Pool, deadpool_postgres::BuildError> {
    let manager = deadpool_postgres::Manager::from_config(
        config,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(DEFAULT_CONNECT_TIMEOUT))
        .create_timeout(Some(DEFAULT_CONNECT_TIMEOUT))
        .build()
}
