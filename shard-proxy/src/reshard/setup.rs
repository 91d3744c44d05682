//! The `setup` step of a migration: each shard of both rings gets one `taskflow_moves` row
//! per moving arc it is the source (`owned`) or destination (`incoming`) of.
//!
//! Why before any proxy routes by the migration: a proxy's guard passes only on a shard
//! whose row says `owned`; without the rows every guarded statement would fail. The rows
//! are a pure function of the two stored rings, so re-running setup (a new owner after a
//! crash) inserts the same rows (`ON CONFLICT DO NOTHING`).

use proxy_core::placement::Placement;
use proxy_core::ring::Ring;

use crate::meta::epochs::StoredRing;
use crate::proxy::Proxy;

/// Writes the `taskflow_moves` rows of migration `to.epoch` on every shard of both rings.
pub async fn prepare(proxy: &Proxy, from: &StoredRing, to: &StoredRing) -> Result<usize, String> {
    let ring = |r: &StoredRing| Ring::new(r.names(), r.virtual_nodes).map_err(|e| e.to_string());
    let placement = Placement::moving(ring(from)?, ring(to)?, to.epoch, &[]);
    let Some(m) = placement.migration() else {
        return Ok(0);
    };
    let mut all = from.shards.clone();
    for s in &to.shards {
        if !all.iter().any(|a| a.name == s.name) {
            all.push(s.clone());
        }
    }
    for shard in &all {
        let Some(index) = placement.shards().iter().position(|n| n == &shard.name) else {
            continue;
        };
        let rows: Vec<String> = m
            .arcs
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                let state = if a.source == index {
                    "owned"
                } else if a.dest == index {
                    "incoming"
                } else {
                    return None;
                };
                Some(format!("({}, {i}, '{state}')", to.epoch))
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        let client = proxy
            .meta
            .connect_shard(&shard.url)
            .await
            .map_err(|e| format!("{}: {e}", shard.name))?;
        client
            .batch_execute(&format!(
                "INSERT INTO taskflow_moves (epoch, arc, state) VALUES {} ON CONFLICT DO NOTHING",
                rows.join(", ")
            ))
            .await
            .map_err(|e| format!("{}: {e}", shard.name))?;
    }
    Ok(m.arcs.len())
}
