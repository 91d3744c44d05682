//! Ring epochs: the shard set and virtual nodes every proxy over these shards routes by,
//! as durable shared state (`taskflow_meta.ring_epochs`).
//!
//! Why: the ring decides where every row lives. A proxy started or reloaded with a shard
//! list that disagrees with the stored ring would re-route keys away from their rows;
//! comparing against the stored epoch (not against this process's memory) catches it on
//! every proxy, at start-up as well as on reload. One row per epoch; the newest `active`
//! one is current. A new epoch is inserted with `epoch = current + 1`, so two proxies
//! racing to record different rings cannot both win (primary key).

use super::{first_column, quote, text_array, Meta, MetaError};
use crate::config::ShardConfig;

/// One stored ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRing {
    pub epoch: i64,
    pub shards: Vec<ShardConfig>,
    pub virtual_nodes: u32,
}

impl StoredRing {
    pub fn names(&self) -> Vec<String> {
        self.shards.iter().map(|s| s.name.clone()).collect()
    }
}

/// The current ring epoch, if any proxy recorded one.
pub async fn current(meta: &Meta) -> Result<Option<StoredRing>, MetaError> {
    read_one(meta, "state = 'active' ORDER BY epoch DESC LIMIT 1").await
}

/// Ring epoch `epoch`, whatever its state.
pub async fn load(meta: &Meta, epoch: i64) -> Result<Option<StoredRing>, MetaError> {
    read_one(meta, &format!("epoch = {epoch}")).await
}

async fn read_one(meta: &Meta, filter: &str) -> Result<Option<StoredRing>, MetaError> {
    let rows = meta
        .query(&format!(
            "SELECT epoch::text, array_to_string(shards, ','), array_to_string(urls, ' '), \
             virtual_nodes::text FROM taskflow_meta.ring_epochs WHERE {filter}"
        ))
        .await?;
    let Some(row) = rows.into_iter().next() else {
        return Ok(None);
    };
    let mut it = row.into_iter().map(Option::unwrap_or_default);
    let bad = || MetaError::Invalid("unreadable row in taskflow_meta.ring_epochs".into());
    let epoch = it.next().and_then(|e| e.parse().ok()).ok_or_else(bad)?;
    let names = it.next().ok_or_else(bad)?;
    let urls = it.next().ok_or_else(bad)?;
    let virtual_nodes = it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let shards = names
        .split(',')
        .zip(urls.split(' '))
        .map(|(name, url)| ShardConfig {
            name: name.to_owned(),
            url: url.to_owned(),
        })
        .collect();
    Ok(Some(StoredRing {
        epoch,
        shards,
        virtual_nodes,
    }))
}

/// Records `shards`/`virtual_nodes` as the next epoch after `after` (none: the first),
/// retiring `after`. Fails if another proxy recorded an epoch since.
pub async fn record(
    meta: &Meta,
    after: Option<i64>,
    shards: &[ShardConfig],
    virtual_nodes: u32,
) -> Result<i64, MetaError> {
    let epoch = after.unwrap_or(0) + 1;
    let names: Vec<String> = shards.iter().map(|s| s.name.clone()).collect();
    let urls: Vec<String> = shards.iter().map(|s| s.url.clone()).collect();
    let retire = after.map_or(String::new(), |a| {
        format!("UPDATE taskflow_meta.ring_epochs SET state = 'retired' WHERE epoch = {a};")
    });
    let rows = meta
        .query(&format!(
            "BEGIN; {retire} \
             INSERT INTO taskflow_meta.ring_epochs (epoch, shards, urls, virtual_nodes, state, created_by) \
             VALUES ({epoch}, {names}, {urls}, {virtual_nodes}, 'active', {me}) \
             ON CONFLICT (epoch) DO NOTHING RETURNING epoch::text; COMMIT",
            names = text_array(&names),
            urls = text_array(&urls),
            me = quote(&meta.instance),
        ))
        .await?;
    if first_column(rows).is_empty() {
        return Err(MetaError::EpochTaken(epoch));
    }
    Ok(epoch)
}

/// What a configuration's ring is, compared with the stored one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The stored epoch routes exactly like the configuration.
    Same(i64),
    /// No shard holds rows (or nothing is stored yet): record the configuration as the
    /// epoch after this one.
    Record(Option<i64>),
    /// Shards hold rows and the configuration changes who owns them: start the migration
    /// from this stored ring to the configuration's.
    Migrate(StoredRing),
    /// A migration to this epoch is in progress and the configuration is its source or
    /// target ring: route by the migration.
    Follow(i64),
}

/// Compares the configured ring (`shards`, `virtual_nodes`) with the stored epoch. A
/// difference is accepted only when no shard holds rows of a sharded table (`probe`: the
/// configured pools; a shard the configuration drops is checked at its stored URL, and
/// refuses when it cannot be); otherwise
/// the error names the difference — the proxy never silently re-routes keys over rows.
pub async fn check(
    meta: &Meta,
    shards: &[ShardConfig],
    virtual_nodes: u32,
    probe: &[std::sync::Arc<crate::backend::Pool>],
    tables: &[String],
    on_purpose: bool,
) -> Result<Verdict, crate::config::SetupError> {
    let refuse = |message: String| crate::config::SetupError::Config {
        key: "shards".into(),
        message,
    };
    let stored = current(meta)
        .await
        .map_err(|e| refuse(format!("cannot read the stored ring: {e}")))?;
    let Some(stored) = stored else {
        return Ok(Verdict::Record(None));
    };
    let names: Vec<String> = shards.iter().map(|s| s.name.clone()).collect();
    if let Some(verdict) = follow_migration(meta, &stored, &names, virtual_nodes).await? {
        return Ok(verdict);
    }
    let diff = proxy_core::reshard::RingDiff::of_names(
        &stored.names(),
        stored.virtual_nodes,
        &names,
        virtual_nodes,
    );
    if diff.is_empty() {
        return Ok(Verdict::Same(stored.epoch));
    }
    let why = |holder: String| {
        refuse(format!(
            "the configured ring differs from ring epoch {} stored in taskflow_meta.ring_epochs \
             ({}; {} virtual nodes): this configuration {diff}. {holder}, so the rows \
             cannot be moved online. Configure the stored shard list again",
            stored.epoch,
            stored.names().join(", "),
            stored.virtual_nodes,
        ))
    };
    // Shards the configuration drops are checked at the URL the stored ring knows.
    let mut pools = probe.to_vec();
    for gone in diff
        .removed
        .iter()
        .filter(|r| !probe.iter().any(|p| &&p.name == r))
    {
        let url = stored
            .shards
            .iter()
            .find(|s| &s.name == gone)
            .map(|s| &s.url);
        match url.map(|u| meta.pool_for(gone, u)) {
            Some(Ok(pool)) => pools.push(pool),
            _ => return Err(why(format!("{gone} cannot be checked for rows"))),
        }
    }
    match first_with_rows(&pools, tables).await {
        Ok(None) => Ok(Verdict::Record(Some(stored.epoch))),
        Ok(Some(_)) if !on_purpose && replaced(meta, &stored, &names, virtual_nodes).await => {
            Err(refuse(format!(
                "the configured shard list ({}) is the ring a finished migration replaced with \
                 ring epoch {} ({}): this configuration file predates it. Update the shard \
                 list; to move the rows back, use REMOVE SHARD/ADD SHARD in the admin console",
                names.join(", "),
                stored.epoch,
                stored.names().join(", "),
            )))
        }
        Ok(Some(holder)) => {
            tracing::info!(%holder, change = %diff, "the configured ring moves rows: starting an online migration");
            Ok(Verdict::Migrate(stored))
        }
        Err(e) => Err(why(e)),
    }
}

/// Whether `names`/`virtual_nodes` is the source ring of the finished migration that
/// made `stored` current (a stale configuration, not a new wish).
async fn replaced(meta: &Meta, stored: &StoredRing, names: &[String], virtual_nodes: u32) -> bool {
    let rows = meta
        .query(&format!(
            "SELECT from_epoch::text FROM taskflow_meta.migrations WHERE epoch = {} AND state = 'done'",
            stored.epoch
        ))
        .await
        .unwrap_or_default();
    let Some(from) = super::first_column(rows)
        .first()
        .and_then(|e| e.parse().ok())
    else {
        return false;
    };
    match load(meta, from).await {
        Ok(Some(ring)) => proxy_core::reshard::RingDiff::of_names(
            &ring.names(),
            ring.virtual_nodes,
            names,
            virtual_nodes,
        )
        .is_empty(),
        _ => false,
    }
}

/// When a migration is unfinished: follow it if the configuration is its source or target
/// ring, else refuse naming it.
async fn follow_migration(
    meta: &Meta,
    stored: &StoredRing,
    names: &[String],
    virtual_nodes: u32,
) -> Result<Option<Verdict>, crate::config::SetupError> {
    let refuse = |message: String| crate::config::SetupError::Config {
        key: "shards".into(),
        message,
    };
    let Some(active) = super::moves::active(meta)
        .await
        .map_err(|e| refuse(format!("cannot read the unfinished migrations: {e}")))?
    else {
        return Ok(None);
    };
    let target = load(meta, active.epoch)
        .await
        .map_err(|e| refuse(format!("cannot read ring epoch {}: {e}", active.epoch)))?
        .ok_or_else(|| {
            refuse(format!(
                "ring epoch {} of the migration is missing",
                active.epoch
            ))
        })?;
    let same = |ring: &StoredRing| {
        proxy_core::reshard::RingDiff::of_names(
            &ring.names(),
            ring.virtual_nodes,
            names,
            virtual_nodes,
        )
        .is_empty()
    };
    if same(&target) || same(stored) {
        return Ok(Some(Verdict::Follow(active.epoch)));
    }
    Err(refuse(format!(
        "a migration from ring epoch {} ({}) to epoch {} ({}) is unfinished ({}); the \
         configured shard list is neither: wait for it (SHOW MIGRATIONS), then change the ring",
        stored.epoch,
        stored.names().join(", "),
        target.epoch,
        target.names().join(", "),
        active.state
    )))
}

/// The first of `pools` that holds a row of one of `tables`; an error names a shard that
/// cannot be checked.
pub async fn first_with_rows(
    pools: &[std::sync::Arc<crate::backend::Pool>],
    tables: &[String],
) -> Result<Option<String>, String> {
    let probe = tables
        .iter()
        .map(|t| format!("(SELECT 1 FROM \"{}\" LIMIT 1)", t.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    for pool in pools {
        let mut conn = pool
            .get()
            .await
            .map_err(|e| format!("cannot check that {} holds no rows: {e}", pool.name))?;
        match conn.conn().simple_query(&probe).await {
            Ok(r) => {
                conn.release();
                if !r.rows.is_empty() {
                    return Ok(Some(pool.name.clone()));
                }
            }
            Err(e) => {
                conn.discard();
                return Err(format!(
                    "cannot check that {} holds no rows: {e}",
                    pool.name
                ));
            }
        }
    }
    Ok(None)
}
