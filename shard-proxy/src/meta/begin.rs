//! Starting an online migration: the shard schema on every shard of both rings, then the
//! migration recorded (`setup`) with its ring epoch. Its own module because it joins the
//! stored ring ([`super::epochs`]) and the migration records ([`super::moves`]), which
//! must not depend on each other both ways.

use super::epochs::StoredRing;
use super::{moves, Meta};
use crate::config::{ProxyConfig, SetupError};
use proxy_core::placement::Placement;
use proxy_core::reshard::RingDiff;
use proxy_core::ring::Ring;

/// Starts the migration from the stored ring `from` to `config`'s ring: the shard schema
/// on every shard of both, then the record (`setup`). Returns the target epoch.
pub async fn begin(
    meta: &Meta,
    from: &StoredRing,
    config: &ProxyConfig,
) -> Result<i64, SetupError> {
    let fail = |message: String| SetupError::Config {
        key: "shards".into(),
        message,
    };
    let names: Vec<String> = config.shards.iter().map(|s| s.name.clone()).collect();
    let urls: Vec<String> = config.shards.iter().map(|s| s.url.clone()).collect();
    let diff = RingDiff::of_names(
        &from.names(),
        from.virtual_nodes,
        &names,
        config.ring.virtual_nodes,
    );
    for shard in from.shards.iter().chain(&config.shards) {
        let applied = meta.apply_shard_schema(&shard.url).await.map_err(|e| {
            fail(format!(
                "cannot apply the shard schema to {}: {e}",
                shard.name
            ))
        })?;
        if !applied.is_empty() {
            tracing::info!(shard = %shard.name, ?applied, "shard schema applied");
        }
    }
    let to_ring = Ring::new(names.iter().cloned(), config.ring.virtual_nodes)
        .map_err(|e| fail(e.to_string()))?;
    let from_ring = Ring::new(from.names(), from.virtual_nodes).map_err(|e| fail(e.to_string()))?;
    let arcs = Placement::moving(from_ring, to_ring, from.epoch + 1, &[])
        .migration()
        .map_or(0, |m| m.arcs.len());
    let record = moves::NewMigration {
        from_epoch: from.epoch,
        names: &names,
        urls: &urls,
        virtual_nodes: config.ring.virtual_nodes,
        change: &diff.to_string(),
        arcs_total: arcs,
        throttle: config.reshard.throttle_rows_per_sec,
    };
    let epoch = moves::start(meta, &record)
        .await
        .map_err(|e| fail(e.to_string()))?;
    tracing::info!(epoch, change = %diff, arcs, "online migration recorded");
    Ok(epoch)
}
