//! Validation of a [`ProxyConfig`], one section at a time, naming the offending key on
//! every error (the kit turns it into exit 78 with that key).

use std::collections::HashSet;

use taskflow_kit::config::ConfigError;

use super::{BackendTarget, ProxyConfig};

/// Checks every section; the first problem found wins.
pub(super) fn validate(c: &ProxyConfig) -> Result<(), ConfigError> {
    if c.listen.port() == 0 {
        return Err(ConfigError::invalid("listen", "port must not be 0"));
    }
    users(c)?;
    tls(c)?;
    limits(c)?;
    sharding(c)?;
    metadata(c)?;
    backends(c)
}

fn metadata(c: &ProxyConfig) -> Result<(), ConfigError> {
    let m = &c.metadata;
    if let Some(id) = &m.instance_id {
        if id.is_empty()
            || id.len() > 40
            || !id.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
        {
            return Err(ConfigError::invalid(
                "metadata.instance_id",
                "must be 1 to 40 ASCII letters, digits or `-`",
            ));
        }
    }
    if m.heartbeat_secs == 0 {
        return Err(ConfigError::invalid(
            "metadata.heartbeat_secs",
            "must be at least 1",
        ));
    }
    if m.dead_after_secs < 2 * m.heartbeat_secs {
        return Err(ConfigError::invalid(
            "metadata.dead_after_secs",
            "must be at least twice metadata.heartbeat_secs",
        ));
    }
    if m.fence_wait_ms == 0 || m.fence_wait_ms > 60_000 {
        return Err(ConfigError::invalid(
            "metadata.fence_wait_ms",
            "must be between 1 and 60000",
        ));
    }
    Ok(())
}

fn users(c: &ProxyConfig) -> Result<(), ConfigError> {
    if c.users.is_empty() {
        return Err(ConfigError::invalid(
            "users",
            "at least one user is required",
        ));
    }
    let mut seen = HashSet::new();
    for (i, u) in c.users.iter().enumerate() {
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
        user_databases(c, i, u)?;
    }
    Ok(())
}

/// A user's `databases` names only databases the proxy serves, and `admin` only for an
/// admin user.
fn user_databases(c: &ProxyConfig, i: usize, u: &super::UserConfig) -> Result<(), ConfigError> {
    let Some(list) = &u.databases else {
        return Ok(());
    };
    let key = format!("users[{i}].databases");
    if list.is_empty() {
        return Err(ConfigError::invalid(key, "must name at least one database"));
    }
    for db in list {
        if db == "admin" && !u.admin {
            return Err(ConfigError::invalid(
                key,
                "`admin` is only for users with `admin = true`",
            ));
        }
        if db != "admin" && db != "auth" && *db != c.sharding.database {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "unknown database `{db}` (the proxy serves `{}`, `auth` and `admin`)",
                    c.sharding.database
                ),
            ));
        }
    }
    Ok(())
}

fn tls(c: &ProxyConfig) -> Result<(), ConfigError> {
    match (&c.tls.cert_file, &c.tls.key_file) {
        (Some(_), None) => Err(ConfigError::invalid(
            "tls.key_file",
            "required when tls.cert_file is set",
        )),
        (None, Some(_)) => Err(ConfigError::invalid(
            "tls.cert_file",
            "required when tls.key_file is set",
        )),
        _ => Ok(()),
    }
}

/// A pool's server connections: at least one, at most 10000.
fn pool_size(key: &str, n: usize) -> Result<(), ConfigError> {
    if n == 0 || n > 10_000 {
        return Err(ConfigError::invalid(key, "must be between 1 and 10000"));
    }
    Ok(())
}

fn limits(c: &ProxyConfig) -> Result<(), ConfigError> {
    pool_size("pool.size", c.pool.size)?;
    if let Some(n) = c.auth_database.pool_size {
        pool_size("auth_database.pool_size", n)?;
    }
    if c.pool.connect_timeout_secs == 0 {
        return Err(ConfigError::invalid(
            "pool.connect_timeout_secs",
            "must be at least 1",
        ));
    }
    if c.pool.checkout_timeout_secs == 0 {
        return Err(ConfigError::invalid(
            "pool.checkout_timeout_secs",
            "must be at least 1",
        ));
    }
    client_limits(&c.limits)?;
    reshard(&c.reshard)?;
    if c.ring.virtual_nodes == 0 || c.ring.virtual_nodes > 65_536 {
        return Err(ConfigError::invalid(
            "ring.virtual_nodes",
            "must be between 1 and 65536",
        ));
    }
    Ok(())
}

fn client_limits(l: &super::LimitsConfig) -> Result<(), ConfigError> {
    let max = proxy_core::wire::frontend::MAX_MESSAGE_LEN;
    let checks: [(&str, usize, usize, usize); 4] = [
        ("limits.max_clients", l.max_clients, 1, 1_000_000),
        (
            "limits.pre_auth_message_bytes",
            l.pre_auth_message_bytes,
            512,
            1 << 20,
        ),
        (
            "limits.max_pipeline_messages",
            l.max_pipeline_messages,
            1,
            1_000_000,
        ),
        (
            "limits.max_pipeline_bytes",
            l.max_pipeline_bytes,
            1024,
            16 * max,
        ),
    ];
    for (key, value, low, high) in checks {
        if !(low..=high).contains(&value) {
            return Err(ConfigError::invalid(
                key,
                format!("must be between {low} and {high}"),
            ));
        }
    }
    if l.pause_timeout_secs == 0 {
        return Err(ConfigError::invalid(
            "limits.pause_timeout_secs",
            "must be at least 1",
        ));
    }
    Ok(())
}

fn sharding(c: &ProxyConfig) -> Result<(), ConfigError> {
    let db = &c.sharding.database;
    if db.is_empty() || db == "admin" || db == "auth" {
        return Err(ConfigError::invalid(
            "sharding.database",
            "must be a non-empty name other than `admin` and `auth`",
        ));
    }
    if c.sharding.tables.is_empty() {
        return Err(ConfigError::invalid(
            "sharding.tables",
            "must name at least one table",
        ));
    }
    if c.sharding.key_column.is_empty() {
        return Err(ConfigError::invalid(
            "sharding.key_column",
            "must not be empty",
        ));
    }
    Ok(())
}

fn backends(c: &ProxyConfig) -> Result<(), ConfigError> {
    if c.backend.user.is_empty() {
        return Err(ConfigError::invalid("backend.user", "must not be empty"));
    }
    if let Some(ca) = &c.backend.sslrootcert {
        if !ca.is_absolute() {
            return Err(ConfigError::invalid(
                "backend.sslrootcert",
                "must be an absolute path",
            ));
        }
    }
    let auth = BackendTarget::parse(&c.auth_database.url)
        .map_err(|m| ConfigError::invalid("auth_database.url", m))?;
    backend_tls(c, "auth_database.url", &auth)?;
    let mut names = HashSet::new();
    for (i, s) in c.shards.iter().enumerate() {
        if s.name.is_empty() || s.name.len() > 40 {
            return Err(ConfigError::invalid(
                format!("shards[{i}].name"),
                "must be 1 to 40 characters",
            ));
        }
        if !s
            .name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
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
        let key = format!("shards[{i}].url");
        let target =
            BackendTarget::parse(&s.url).map_err(|m| ConfigError::invalid(key.clone(), m))?;
        backend_tls(c, &key, &target)?;
    }
    Ok(())
}

/// verify-ca and verify-full need a CA: the URL's `sslrootcert` or `backend.sslrootcert`.
fn backend_tls(c: &ProxyConfig, key: &str, target: &BackendTarget) -> Result<(), ConfigError> {
    let mode = target.sslmode.unwrap_or(c.backend.sslmode);
    if mode.verifies() && super::backend_tls::ca_file(&c.backend, target).is_none() {
        return Err(ConfigError::invalid(
            key,
            format!(
                "sslmode={mode} needs a CA: add sslrootcert=/path/ca.pem to the URL or set \
                 backend.sslrootcert"
            ),
        ));
    }
    Ok(())
}

/// `[reshard]`: each key within its range.
fn reshard(r: &super::ReshardConfig) -> Result<(), ConfigError> {
    let check = |key: &str, value: u64, lo: u64, hi: u64| {
        if (lo..=hi).contains(&value) {
            Ok(())
        } else {
            Err(ConfigError::invalid(
                key,
                format!("must be between {lo} and {hi}, got {value}"),
            ))
        }
    };
    check("reshard.batch_rows", u64::from(r.batch_rows), 1, 1_000_000)?;
    check("reshard.write_pause_ms", r.write_pause_ms, 10, 60_000)?;
    check("reshard.poll_ms", r.poll_ms, 10, 10_000)?;
    Ok(())
}
