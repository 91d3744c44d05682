//! Online migrations as shared records: `taskflow_meta.migrations` (one row per ring change
//! that moves rows) and `taskflow_meta.migration_arcs` (one row per arc moved).
//!
//! Why here and not in one proxy's memory: every proxy routes moving keys by which arcs
//! are moved, any proxy may own (drive) the move, and a proxy that dies mid-move leaves the
//! record another one resumes from. The shards hold the authoritative per-arc state next to
//! the data (`taskflow_moves`, flipped in the same 2PC as the rows); these rows are the
//! index every proxy reads, written after each batch commits, and re-derived from the
//! shards when a new owner takes over.
//!
//! Life of a migration: `setup` (each shard's `taskflow_moves` rows) → `waiting` (every
//! live proxy must acknowledge routing by it, `proxies.ring_view`, before a row moves) → `moving` ⇄ `paused` → `done` (the target
//! ring epoch becomes `active`, the old one `retired`) or `failed`.

use super::{first_column, quote, Meta, MetaError};

/// A migration that is not finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Active {
    /// The ring epoch it leads to (`ring_epochs.state = 'migrating'` until done).
    pub epoch: i64,
    pub from_epoch: i64,
    pub state: String,
    pub throttle_rows_per_sec: u32,
    /// Owner instance, and whether it is alive (heartbeat in the registry).
    pub owner: Option<String>,
    pub owner_alive: bool,
}

/// The unfinished migration, if any.
pub async fn active(meta: &Meta) -> Result<Option<Active>, MetaError> {
    let rows = meta
        .query(&format!(
            "SELECT m.epoch::text, m.from_epoch::text, m.state, m.throttle_rows_per_sec::text, \
             m.owner, (p.heartbeat_at > now() - interval '{dead} seconds')::text \
             FROM taskflow_meta.migrations m \
             LEFT JOIN taskflow_meta.proxies p ON p.instance_id = m.owner \
             WHERE m.state NOT IN ('done', 'failed') ORDER BY m.epoch DESC LIMIT 1",
            dead = meta.settings.dead_after_secs
        ))
        .await?;
    let Some(row) = rows.into_iter().next() else {
        return Ok(None);
    };
    let bad = || MetaError::Invalid("unreadable row in taskflow_meta.migrations".into());
    let mut it = row.into_iter();
    let mut next = || it.next().flatten();
    let epoch = next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let from_epoch = next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let state = next().ok_or_else(bad)?;
    let throttle_rows_per_sec = next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let owner = next();
    let owner_alive = next().as_deref() == Some("true");
    Ok(Some(Active {
        epoch,
        from_epoch,
        state,
        throttle_rows_per_sec,
        owner,
        owner_alive,
    }))
}

/// A migration to record: from ring epoch `from_epoch` to a new epoch holding the shards
/// `names` at `urls`.
pub struct NewMigration<'a> {
    pub from_epoch: i64,
    pub names: &'a [String],
    pub urls: &'a [String],
    pub virtual_nodes: u32,
    /// What changes, as `RingDiff` says it (`adds shard-4`).
    pub change: &'a str,
    pub arcs_total: usize,
    pub throttle: u32,
}

/// Records `m` — atomically with its ring epoch row (`migrating`). Fails when another
/// migration is unfinished or another proxy recorded the epoch first.
pub async fn start(meta: &Meta, m: &NewMigration<'_>) -> Result<i64, MetaError> {
    let NewMigration {
        from_epoch,
        names,
        urls,
        virtual_nodes,
        change,
        arcs_total,
        throttle,
    } = *m;
    let epoch = from_epoch + 1;
    let rows = meta
        .query(&format!(
            "BEGIN; LOCK TABLE taskflow_meta.migrations IN EXCLUSIVE MODE; \
             INSERT INTO taskflow_meta.ring_epochs (epoch, shards, urls, virtual_nodes, state, created_by) \
             SELECT {epoch}, {names}, {urls}, {virtual_nodes}, 'migrating', {me} \
             WHERE NOT EXISTS (SELECT 1 FROM taskflow_meta.migrations WHERE state NOT IN ('done', 'failed')) \
             ON CONFLICT (epoch) DO NOTHING RETURNING epoch::text; \
             INSERT INTO taskflow_meta.migrations (epoch, from_epoch, change, state, arcs_total, throttle_rows_per_sec) \
             SELECT {epoch}, {from_epoch}, {change}, 'setup', {arcs_total}, {throttle} \
             WHERE EXISTS (SELECT 1 FROM taskflow_meta.ring_epochs WHERE epoch = {epoch} AND state = 'migrating' AND created_by = {me}) \
             ON CONFLICT (epoch) DO NOTHING RETURNING epoch::text; COMMIT",
            names = super::text_array(names),
            urls = super::text_array(urls),
            me = quote(&meta.instance),
            change = quote(change),
        ))
        .await?;
    if first_column(rows).len() < 2 {
        return Err(MetaError::Invalid(format!(
            "cannot record ring epoch {epoch}: another migration is unfinished, or another proxy recorded epoch {epoch} first; see SHOW MIGRATIONS"
        )));
    }
    Ok(epoch)
}

/// Arcs of migration `epoch` recorded as moved.
pub async fn done_arcs(meta: &Meta, epoch: i64) -> Result<Vec<u32>, MetaError> {
    let rows = meta
        .query(&format!(
            "SELECT arc::text FROM taskflow_meta.migration_arcs WHERE epoch = {epoch}"
        ))
        .await?;
    Ok(first_column(rows)
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect())
}

/// Makes this proxy the owner of migration `epoch` when it has none, or a dead one, or is
/// already this proxy. True when this proxy owns it now.
pub async fn claim(meta: &Meta, epoch: i64) -> Result<bool, MetaError> {
    let rows = meta
        .query(&format!(
            "UPDATE taskflow_meta.migrations m SET owner = {me}, owner_seen = now() \
             WHERE epoch = {epoch} AND state NOT IN ('done', 'failed') AND (owner IS NULL OR owner = {me} \
               OR NOT EXISTS (SELECT 1 FROM taskflow_meta.proxies p WHERE p.instance_id = m.owner \
                              AND p.heartbeat_at > now() - interval '{dead} seconds')) \
             RETURNING epoch::text",
            me = quote(&meta.instance),
            dead = meta.settings.dead_after_secs,
        ))
        .await?;
    Ok(!first_column(rows).is_empty())
}

/// Sets the state of migration `epoch` (`from`: only when currently one of these).
pub async fn set_state(
    meta: &Meta,
    epoch: i64,
    from: &[&str],
    to: &str,
) -> Result<bool, MetaError> {
    let from: Vec<String> = from.iter().map(|s| s.to_string()).collect();
    let moving_since = if to == "moving" {
        ", moving_since = coalesce(moving_since, now())"
    } else {
        ""
    };
    let rows = meta
        .query(&format!(
            "UPDATE taskflow_meta.migrations SET state = {to}{moving_since} \
             WHERE epoch = {epoch} AND state = ANY({from}) RETURNING epoch::text",
            to = quote(to),
            from = super::text_array(&from),
        ))
        .await?;
    Ok(!first_column(rows).is_empty())
}

/// `PAUSE MIGRATION` (`pause`) or `RESUME MIGRATION` of migration `epoch`: a pause
/// remembers the state it interrupted, a resume returns to it. False when the migration
/// is not in a state that allows it.
pub async fn pause(meta: &Meta, epoch: i64, pause: bool) -> Result<bool, MetaError> {
    let sql = if pause {
        format!(
            "UPDATE taskflow_meta.migrations SET paused_from = state, state = 'paused' \
             WHERE epoch = {epoch} AND state IN ('setup', 'waiting', 'moving') RETURNING epoch::text"
        )
    } else {
        format!(
            "UPDATE taskflow_meta.migrations SET state = coalesce(paused_from, 'setup'), paused_from = NULL \
             WHERE epoch = {epoch} AND state = 'paused' RETURNING epoch::text"
        )
    };
    Ok(!first_column(meta.query(&sql).await?).is_empty())
}

/// Records (or clears, with `None`) the last error of migration `epoch`.
pub async fn set_error(meta: &Meta, epoch: i64, error: Option<&str>) -> Result<(), MetaError> {
    meta.query(&format!(
        "UPDATE taskflow_meta.migrations SET error = {} WHERE epoch = {epoch}",
        error.map_or("NULL".into(), quote)
    ))
    .await
    .map(drop)
}

/// Records the estimated total rows to move.
pub async fn set_rows_total(meta: &Meta, epoch: i64, rows: u64) -> Result<(), MetaError> {
    meta.query(&format!(
        "UPDATE taskflow_meta.migrations SET rows_total = {rows} WHERE epoch = {epoch}"
    ))
    .await
    .map(drop)
}

/// Sets the throttle (rows per second, 0 = none) of the unfinished migration.
pub async fn set_throttle(meta: &Meta, rows_per_sec: u32) -> Result<bool, MetaError> {
    let rows = meta
        .query(&format!(
            "UPDATE taskflow_meta.migrations SET throttle_rows_per_sec = {rows_per_sec} \
             WHERE state NOT IN ('done', 'failed') RETURNING epoch::text"
        ))
        .await?;
    Ok(!first_column(rows).is_empty())
}

/// One moved batch: its arcs (number, source, destination), rows and write pause.
pub struct MovedBatch<'a> {
    pub arcs: &'a [(u32, String, String)],
    pub rows: u64,
    pub pause_ms: f64,
}

/// Records a committed batch, and the owner's liveness.
pub async fn record_batch(
    meta: &Meta,
    epoch: i64,
    batch: &MovedBatch<'_>,
) -> Result<(), MetaError> {
    let values: Vec<String> = batch
        .arcs
        .iter()
        .enumerate()
        .map(|(i, (arc, source, dest))| {
            // The batch's rows are counted on its first arc.
            let rows = if i == 0 { batch.rows } else { 0 };
            format!(
                "({epoch}, {arc}, {}, {}, {rows}, {}, {})",
                quote(source),
                quote(dest),
                batch.pause_ms,
                quote(&meta.instance)
            )
        })
        .collect();
    if values.is_empty() {
        return Ok(());
    }
    meta.query(&format!(
        "BEGIN; INSERT INTO taskflow_meta.migration_arcs (epoch, arc, source, dest, rows, pause_ms, moved_by) \
         VALUES {} ON CONFLICT (epoch, arc) DO NOTHING; \
         UPDATE taskflow_meta.migrations SET rows_moved = rows_moved + {rows}, owner_seen = now(), \
           pause_p99_ms = (SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY pause_ms) \
                           FROM taskflow_meta.migration_arcs WHERE epoch = {epoch}) \
         WHERE epoch = {epoch}; COMMIT",
        values.join(", "),
        rows = batch.rows,
    ))
    .await
    .map(drop)
}

/// Ends migration `epoch`: its ring becomes the active epoch, the old one retired.
pub async fn finish(meta: &Meta, epoch: i64, from_epoch: i64) -> Result<(), MetaError> {
    meta.query(&format!(
        "BEGIN; UPDATE taskflow_meta.ring_epochs SET state = 'retired' WHERE epoch = {from_epoch}; \
         UPDATE taskflow_meta.ring_epochs SET state = 'active' WHERE epoch = {epoch}; \
         UPDATE taskflow_meta.migrations SET state = 'done', finished_at = now(), error = NULL \
         WHERE epoch = {epoch}; COMMIT"
    ))
    .await
    .map(drop)
}

/// Records that this proxy routes by migration `epoch` (and has no statement left that
/// was routed without it).
pub async fn acknowledge(meta: &Meta, epoch: i64) -> Result<(), MetaError> {
    meta.query(&format!(
        "UPDATE taskflow_meta.proxies SET ring_view = greatest(ring_view, {epoch}) WHERE instance_id = {}",
        quote(&meta.instance)
    ))
    .await
    .map(drop)
}

/// Live proxies that have not acknowledged migration `epoch` yet.
pub async fn unacknowledged(meta: &Meta, epoch: i64) -> Result<Vec<String>, MetaError> {
    let rows = meta
        .query(&format!(
            "SELECT instance_id FROM taskflow_meta.proxies WHERE ring_view < {epoch} \
             AND heartbeat_at > now() - interval '{} seconds' ORDER BY instance_id",
            meta.settings.dead_after_secs
        ))
        .await?;
    Ok(first_column(rows))
}

/// Every migration, newest first, as `SHOW MIGRATIONS` lists it.
pub async fn list(meta: &Meta) -> Result<Vec<Vec<Option<String>>>, MetaError> {
    meta.query(
        "SELECT m.epoch::text, m.state, m.change, m.owner, \
         (SELECT count(*) FROM taskflow_meta.migration_arcs a WHERE a.epoch = m.epoch)::text, \
         m.arcs_total::text, m.rows_moved::text, m.rows_total::text, \
         CASE WHEN m.moving_since IS NULL THEN '0' ELSE round(m.rows_moved / greatest(extract(epoch FROM \
           coalesce(m.finished_at, now()) - m.moving_since), 0.001))::text END, \
         CASE WHEN m.state IN ('moving', 'paused') AND m.rows_moved > 0 AND m.rows_total IS NOT NULL \
           THEN round(greatest(m.rows_total - m.rows_moved, 0) * extract(epoch FROM now() - m.moving_since) \
                / m.rows_moved)::text END, \
         round(coalesce(m.pause_p99_ms, 0)::numeric, 1)::text, m.error, \
         to_char(m.started_at, 'YYYY-MM-DD HH24:MI:SS'), to_char(m.finished_at, 'YYYY-MM-DD HH24:MI:SS'), \
         m.throttle_rows_per_sec::text \
         FROM taskflow_meta.migrations m ORDER BY m.epoch DESC",
    )
    .await
}

/// Column names of [`list`], in order.
pub const LIST_COLUMNS: &[&str] = &[
    "epoch",
    "state",
    "change",
    "owner",
    "arcs_done",
    "arcs_total",
    "rows_moved",
    "rows_total",
    "rows_per_sec",
    "eta_secs",
    "write_pause_p99_ms",
    "error",
    "started_at",
    "finished_at",
    "throttle_rows_per_sec",
];
