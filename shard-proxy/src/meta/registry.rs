//! The registry of proxies: who serves these shards, and who is alive (heartbeat).
//!
//! Why: recovery may presume a prepared transaction abandoned only when its owner is dead
//! (or is this very proxy, restarted); a live owner is still deciding. Liveness uses the
//! auth cluster's clock only (`now()`), so proxies' clocks need not agree.

use std::collections::HashSet;

use super::{quote, Meta, MetaError};

/// Records this proxy at start-up. Refuses when another live proxy, listening elsewhere,
/// already uses this instance id (two proxies with one id could finish each other's
/// transactions while both are running).
pub async fn register(meta: &Meta) -> Result<(), MetaError> {
    let rows = meta
        .query(&format!(
            "SELECT addr FROM taskflow_meta.proxies WHERE instance_id = {id} \
             AND heartbeat_at > now() - interval '{dead} seconds'",
            id = quote(&meta.instance),
            dead = meta.settings.dead_after_secs,
        ))
        .await?;
    if let Some(addr) = super::first_column(rows).first() {
        if addr != &meta.addr {
            return Err(MetaError::Invalid(format!(
                "instance id `{}` is in use by a live proxy at {addr}; set metadata.instance_id to a unique name",
                meta.instance
            )));
        }
    }
    meta.query(&format!(
        "INSERT INTO taskflow_meta.proxies (instance_id, addr, pid, version) \
         VALUES ({id}, {addr}, {pid}, {version}) \
         ON CONFLICT (instance_id) DO UPDATE SET addr = excluded.addr, pid = excluded.pid, \
         version = excluded.version, started_at = now(), heartbeat_at = now()",
        id = quote(&meta.instance),
        addr = quote(&meta.addr),
        pid = std::process::id(),
        version = quote(env!("CARGO_PKG_VERSION")),
    ))
    .await?;
    Ok(())
}

/// Records that this proxy is alive.
pub async fn heartbeat(meta: &Meta) -> Result<(), MetaError> {
    meta.query(&format!(
        "UPDATE taskflow_meta.proxies SET heartbeat_at = now() WHERE instance_id = {}",
        quote(&meta.instance)
    ))
    .await
    .map(drop)
}

/// Removes this proxy from the registry (clean shutdown): its leftovers may be resolved
/// by others at once.
pub async fn deregister(meta: &Meta) -> Result<(), MetaError> {
    meta.query(&format!(
        "DELETE FROM taskflow_meta.proxies WHERE instance_id = {}",
        quote(&meta.instance)
    ))
    .await
    .map(drop)
}

/// Instance ids whose heartbeat is recent enough (this proxy included).
pub async fn live(meta: &Meta) -> Result<HashSet<String>, MetaError> {
    let rows = meta
        .query(&format!(
            "SELECT instance_id FROM taskflow_meta.proxies \
             WHERE heartbeat_at > now() - interval '{} seconds'",
            meta.settings.dead_after_secs
        ))
        .await?;
    Ok(super::first_column(rows).into_iter().collect())
}

/// Every registered proxy: (instance id, addr, seconds since its heartbeat, alive).
pub async fn list(meta: &Meta) -> Result<Vec<Vec<Option<String>>>, MetaError> {
    meta.query(&format!(
        "SELECT instance_id, addr, pid::text, version, \
         round(extract(epoch FROM now() - heartbeat_at))::text, \
         (heartbeat_at > now() - interval '{} seconds')::text \
         FROM taskflow_meta.proxies ORDER BY instance_id",
        meta.settings.dead_after_secs
    ))
    .await
}
