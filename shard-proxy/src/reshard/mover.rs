//! The owner's loop of one migration: setup → waiting → moving ⇄ paused → done.
//!
//! Any proxy may run it; [`moves::claim`] makes sure one does at a time (the owner's
//! liveness is its registry heartbeat, so a SIGKILLed owner is replaced after
//! `metadata.dead_after_secs`). Everything it needs to resume is shared: the stored rings
//! give the arcs, the shards' `taskflow_moves` rows say which are moved (a batch committed
//! just before a crash is found there and recorded), and a batch left prepared is finished
//! by 2PC recovery. A shard that cannot be reached fails the batch; the loop records the
//! error (SHOW MIGRATIONS) and retries with a back-off — the move pauses until it returns.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::batch::{self, Batch, TableCopy};
use crate::meta::moves::{self, MovedBatch};
use crate::proxy::{Proxy, Topology};
use proxy_core::ring::Ring;

/// Drives migration `epoch` while this proxy owns it.
pub async fn drive(proxy: Arc<Proxy>, epoch: i64) {
    match moves::claim(&proxy.meta, epoch).await {
        Ok(true) => tracing::info!(epoch, "driving the migration"),
        Ok(false) => return,
        Err(e) => {
            tracing::debug!(epoch, error = %e, "cannot claim the migration");
            return;
        }
    }
    let mut mover = Mover {
        proxy,
        epoch,
        estimates: None,
        tables: None,
        backoff: Duration::from_millis(200),
        last_wait_log: None,
    };
    loop {
        match mover.step().await {
            Ok(Step::Again) => mover.backoff = Duration::from_millis(200),
            Ok(Step::Wait(d)) => tokio::time::sleep(d).await,
            Ok(Step::Finished) => return,
            Err(e) => {
                tracing::warn!(epoch, error = %e, retry_in = ?mover.backoff, "migration step failed");
                let _ = moves::set_error(&mover.proxy.meta, epoch, Some(&e)).await;
                tokio::time::sleep(mover.backoff).await;
                mover.backoff = (mover.backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

enum Step {
    Again,
    Wait(Duration),
    Finished,
}

struct Mover {
    proxy: Arc<Proxy>,
    epoch: i64,
    /// Rows per arc at the start of moving (for batch sizes, the total and the ETA).
    estimates: Option<HashMap<u32, u64>>,
    tables: Option<Vec<TableCopy>>,
    backoff: Duration,
    last_wait_log: Option<Instant>,
}

impl Mover {
    async fn step(&mut self) -> Result<Step, String> {
        let meta = &self.proxy.meta;
        let active = moves::active(meta)
            .await
            .map_err(|e| e.to_string())?
            .filter(|a| a.epoch == self.epoch);
        let Some(active) = active else {
            return Ok(Step::Finished);
        };
        if active.owner.as_deref() != Some(meta.instance.as_str()) {
            tracing::info!(epoch = self.epoch, owner = ?active.owner, "another proxy drives the migration now");
            return Ok(Step::Finished);
        }
        match active.state.as_str() {
            "setup" => self.setup().await,
            "waiting" => self.wait_for_proxies().await,
            "paused" => Ok(Step::Wait(Duration::from_millis(200))),
            _ => self.move_next(active.throttle_rows_per_sec).await,
        }
    }

    async fn setup(&mut self) -> Result<Step, String> {
        let view = self
            .proxy
            .move_view(self.epoch)
            .await
            .map_err(|e| e.to_string())?;
        let arcs = super::setup::prepare(&self.proxy, &view.from, &view.to).await?;
        moves::set_state(&self.proxy.meta, self.epoch, &["setup"], "waiting")
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(
            epoch = self.epoch,
            arcs,
            "migration set up on every shard; waiting for every proxy to route by it"
        );
        Ok(Step::Again)
    }

    async fn wait_for_proxies(&mut self) -> Result<Step, String> {
        let pending = moves::unacknowledged(&self.proxy.meta, self.epoch)
            .await
            .map_err(|e| e.to_string())?;
        if pending.is_empty() {
            moves::set_state(&self.proxy.meta, self.epoch, &["waiting"], "moving")
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(
                epoch = self.epoch,
                "every live proxy routes by the migration: moving rows"
            );
            return Ok(Step::Again);
        }
        if self
            .last_wait_log
            .is_none_or(|t| t.elapsed() > Duration::from_secs(5))
        {
            tracing::info!(
                epoch = self.epoch,
                ?pending,
                "waiting for proxies to acknowledge the migration"
            );
            self.last_wait_log = Some(Instant::now());
        }
        Ok(Step::Wait(Duration::from_millis(100)))
    }

    /// The topology routing by this migration (this proxy's follower switches to it).
    fn topology(&self) -> Option<Arc<Topology>> {
        let topo = self.proxy.topology();
        let ok = topo
            .placement
            .migration()
            .is_some_and(|m| m.epoch == self.epoch);
        ok.then_some(topo)
    }

    async fn move_next(&mut self, throttle: u32) -> Result<Step, String> {
        let Some(topo) = self.topology() else {
            return Ok(Step::Wait(Duration::from_millis(50)));
        };
        if self.estimates.is_none() {
            self.reconcile(&topo).await?;
            self.estimate(&topo).await?;
        }
        let Some(next) = self.next_batch(&topo) else {
            return self.finish().await;
        };
        let tables = self.tables.clone().unwrap_or_default();
        let key = self.proxy.config().sharding.key_column.clone();
        let started = Instant::now();
        let moved = batch::run(&self.proxy, &topo, &next, &key, &tables)
            .await
            .map_err(|e| e.to_string())?;
        let arcs: Vec<(u32, String, String)> = next
            .arcs
            .iter()
            .map(|a| {
                (
                    *a,
                    topo.shards[next.source].name.clone(),
                    topo.shards[next.dest].name.clone(),
                )
            })
            .collect();
        if let Some(m) = topo.placement.migration() {
            for a in &next.arcs {
                m.mark_done(*a);
            }
        }
        let record = MovedBatch {
            arcs: &arcs,
            rows: moved.rows,
            pause_ms: moved.pause_ms,
        };
        moves::record_batch(&self.proxy.meta, self.epoch, &record)
            .await
            .map_err(|e| e.to_string())?;
        self.proxy.metrics.reshard_rows.inc_by(moved.rows);
        self.proxy
            .metrics
            .reshard_pause
            .observe(moved.pause_ms / 1000.0);
        tracing::debug!(
            epoch = self.epoch,
            arcs = next.arcs.len(),
            rows = moved.rows,
            pause_ms = moved.pause_ms,
            "batch moved"
        );
        let _ = moves::set_error(&self.proxy.meta, self.epoch, None).await;
        if throttle > 0 {
            let due = Duration::from_secs_f64(moved.rows as f64 / f64::from(throttle));
            return Ok(Step::Wait(due.saturating_sub(started.elapsed())));
        }
        Ok(Step::Again)
    }

    /// Arcs a previous owner committed but did not record: found on the sources.
    async fn reconcile(&mut self, topo: &Arc<Topology>) -> Result<(), String> {
        let Some(m) = topo.placement.migration() else {
            return Ok(());
        };
        let recorded = moves::done_arcs(&self.proxy.meta, self.epoch)
            .await
            .map_err(|e| e.to_string())?;
        let sources: std::collections::BTreeSet<usize> = m.arcs.iter().map(|a| a.source).collect();
        for s in sources {
            let pool = &topo.shards[s];
            let mut conn = pool
                .get()
                .await
                .map_err(|e| format!("{}: {e}", pool.name))?;
            let r = conn
                .conn()
                .simple_query(&format!(
                    "SELECT arc::text FROM taskflow_moves WHERE epoch = {} AND state = 'gone'",
                    self.epoch
                ))
                .await
                .map_err(|e| format!("{}: {e}", pool.name))?;
            conn.release();
            for arc in r
                .rows
                .into_iter()
                .filter_map(|r| r.into_iter().next().flatten())
            {
                let Ok(arc) = arc.parse::<u32>() else {
                    continue;
                };
                if recorded.contains(&arc) {
                    continue;
                }
                let Some(a) = m.arcs.get(arc as usize) else {
                    continue;
                };
                m.mark_done(arc);
                let arcs = [(
                    arc,
                    topo.shards[a.source].name.clone(),
                    topo.shards[a.dest].name.clone(),
                )];
                let record = MovedBatch {
                    arcs: &arcs,
                    rows: 0,
                    pause_ms: 0.0,
                };
                moves::record_batch(&self.proxy.meta, self.epoch, &record)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(
                    epoch = self.epoch,
                    arc,
                    "found a batch committed by the previous owner"
                );
            }
        }
        Ok(())
    }

    /// Rows per pending arc (each source's keys counted once), and the tables' columns.
    async fn estimate(&mut self, topo: &Arc<Topology>) -> Result<(), String> {
        let Some(m) = topo.placement.migration() else {
            return Ok(());
        };
        let config = self.proxy.config();
        let key = &config.sharding.key_column;
        let first = config.sharding.tables.first().cloned().unwrap_or_default();
        let mut per_arc: HashMap<u32, u64> = HashMap::new();
        let sources: std::collections::BTreeSet<usize> = m.arcs.iter().map(|a| a.source).collect();
        for s in sources {
            let pool = &topo.shards[s];
            let mut conn = pool
                .get()
                .await
                .map_err(|e| format!("{}: {e}", pool.name))?;
            if self.tables.is_none() {
                let tables = batch::describe_tables(&mut conn, &config.sharding.tables)
                    .await
                    .map_err(|e| format!("{}: {e}", pool.name))?;
                self.tables = Some(tables);
            }
            let r = conn
                .conn()
                .simple_query(&format!(
                    "SELECT \"{k}\"::text, count(*)::text FROM \"{t}\" GROUP BY 1",
                    k = key.replace('"', "\"\""),
                    t = first.replace('"', "\"\"")
                ))
                .await
                .map_err(|e| format!("{}: {e}", pool.name))?;
            conn.release();
            for row in r.rows {
                let mut it = row
                    .into_iter()
                    .map(|v| v.and_then(|v| v.parse::<i64>().ok()));
                let (Some(Some(k)), Some(Some(n))) = (it.next(), it.next()) else {
                    continue;
                };
                if let Some(arc) = m.arc_of_hash(Ring::key_hash(k)) {
                    if m.arcs[arc as usize].source == s && !m.is_done(arc) {
                        *per_arc.entry(arc).or_default() += n as u64;
                    }
                }
            }
        }
        let total: u64 = per_arc.values().sum();
        let _ = moves::set_rows_total(&self.proxy.meta, self.epoch, total).await;
        tracing::info!(epoch = self.epoch, rows = total, "rows to move (estimate)");
        self.estimates = Some(per_arc);
        Ok(())
    }

    /// The next batch: pending arcs in order, grouped while source and destination stay
    /// the same and the estimated rows stay under `reshard.batch_rows`.
    fn next_batch(&self, topo: &Arc<Topology>) -> Option<Batch> {
        let m = topo.placement.migration()?;
        let limit = u64::from(self.proxy.config().reshard.batch_rows);
        let est = self.estimates.as_ref();
        let mut out: Option<Batch> = None;
        let mut rows = 0u64;
        for (i, a) in m.arcs.iter().enumerate() {
            let i = i as u32;
            if m.is_done(i) {
                continue;
            }
            let n = est.and_then(|e| e.get(&i)).copied().unwrap_or(0);
            match &mut out {
                None => {
                    out = Some(Batch {
                        arcs: vec![i],
                        source: a.source,
                        dest: a.dest,
                    });
                    rows = n;
                }
                Some(b) if b.source == a.source && b.dest == a.dest && rows + n <= limit => {
                    b.arcs.push(i);
                    rows += n;
                }
                Some(_) => break,
            }
        }
        out
    }

    async fn finish(&mut self) -> Result<Step, String> {
        let view = self
            .proxy
            .move_view(self.epoch)
            .await
            .map_err(|e| e.to_string())?;
        if view.done.len()
            < self
                .topology()
                .and_then(|t| t.placement.migration().map(|m| m.arcs.len()))
                .unwrap_or(usize::MAX)
        {
            // Recorded arcs lag this proxy's marks only if a record failed: retry it.
            self.estimates = None;
            return Ok(Step::Wait(Duration::from_millis(100)));
        }
        moves::finish(&self.proxy.meta, self.epoch, view.from.epoch)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(
            epoch = self.epoch,
            "migration done: the new ring is the active epoch"
        );
        Ok(Step::Finished)
    }
}
