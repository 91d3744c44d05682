//! Connection settings for PostgreSQL (the daemons reach the shard proxy this way).
//!
//! The URL in configuration never carries the password: it comes from a secret file, so it
//! stays out of the Nix store and out of `--check-config` output.

use crate::config::ConfigError;
use crate::secrets;

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
