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

use super::batch::{self, Batch, KnownKeys, TableCopy};
use crate::meta::moves::{self, MovedBatch};
use crate::proxy::{Proxy, Topology};
use proxy_core::placement::MoveArc;
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
        survey: None,
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

/// One look at every source at the start of moving.
#[derive(Debug, Default)]
struct Survey {
    /// Rows per pending arc (every sharded table's).
    rows: HashMap<u32, u64>,
    /// Keys per pending arc.
    keys: HashMap<u32, Vec<i64>>,
    /// Per source (union shard index): the oldest transaction its listing may have missed.
    since: HashMap<usize, u32>,
}

impl Survey {
    /// What `batch` starts from. A source missing from the survey (cannot happen: every
    /// source is surveyed) gets no `since`: every row's key is listed, slow but exact.
    fn known_keys(&self, batch: &Batch) -> KnownKeys {
        KnownKeys {
            keys: batch
                .arcs
                .iter()
                .filter_map(|a| self.keys.get(a))
                .flatten()
                .copied()
                .collect(),
            since_xid: self.since.get(&batch.source).copied(),
        }
    }
}

struct Mover {
    proxy: Arc<Proxy>,
    epoch: i64,
    /// The sources as they were at the start of moving (or of this owner's turn).
    survey: Option<Survey>,
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
        if self.survey.is_none() {
            self.reconcile(&topo).await?;
            self.survey(&topo).await?;
        }
        let Some(next) = self.next_batch(&topo) else {
            return self.finish().await;
        };
        let tables = self.tables.clone().unwrap_or_default();
        let key = self.proxy.config().sharding.key_column.clone();
        let started = Instant::now();
        let known = self
            .survey
            .as_ref()
            .map(|s| s.known_keys(&next))
            .unwrap_or_default();
        let moved = batch::run(&self.proxy, &topo, &next, &key, &tables, &known)
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
            keys_ms = moved.keys_ms,
            copy_ms = moved.copy_ms,
            commit_ms = moved.commit_ms,
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

    /// Surveys every source once: the keys and rows of each pending arc (for batch sizes,
    /// the total and the ETA, and the keys each batch starts from), and the tables'
    /// columns.
    async fn survey(&mut self, topo: &Arc<Topology>) -> Result<(), String> {
        let Some(m) = topo.placement.migration() else {
            return Ok(());
        };
        let config = self.proxy.config();
        let key = &config.sharding.key_column;
        let mut survey = Survey::default();
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
            let tables = self.tables.as_deref().unwrap_or_default();
            let (since, keys) = batch::survey(&mut conn, tables, key)
                .await
                .map_err(|e| format!("{}: {e}", pool.name))?;
            conn.release();
            survey.since.insert(s, since);
            for (k, n) in keys {
                if let Some(arc) = m.arc_of_hash(Ring::key_hash(k)) {
                    if m.arcs[arc as usize].source == s && !m.is_done(arc) {
                        *survey.rows.entry(arc).or_default() += n;
                        survey.keys.entry(arc).or_default().push(k);
                    }
                }
            }
        }
        let total: u64 = survey.rows.values().sum();
        let _ = moves::set_rows_total(&self.proxy.meta, self.epoch, total).await;
        tracing::info!(epoch = self.epoch, rows = total, "rows to move (estimate)");
        self.survey = Some(survey);
        Ok(())
    }

    /// The next batch (see [`group_batch`]).
    fn next_batch(&self, topo: &Arc<Topology>) -> Option<Batch> {
        let m = topo.placement.migration()?;
        let limit = u64::from(self.proxy.config().reshard.batch_rows);
        let rows = self.survey.as_ref().map(|s| &s.rows);
        group_batch(
            &m.arcs,
            |i| m.is_done(i),
            |i| rows.and_then(|r| r.get(&i)).copied().unwrap_or(0),
            limit,
        )
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
            self.survey = None;
            return Ok(Step::Wait(Duration::from_millis(100)));
        }
        moves::finish(&self.proxy.meta, self.epoch, view.from.epoch)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(
            epoch = self.epoch,
            "migration done: the new ring is the active epoch"
        );
        // This proxy routes by the new ring now, not at its follower's next poll: whoever
        // saw the move finish here (`SHOW MIGRATIONS`, then `SHOW SHARDS`) sees its result.
        // Other proxies follow within `reshard.poll_ms`.
        self.proxy.follow_stored_ring().await;
        Ok(Step::Finished)
    }
}

/// The next batch: the first pending arc, joined by every other pending arc with the same
/// source and destination while the estimated rows stay within `limit` (an arc alone may
/// exceed it). Arcs of one pair lie all around the ring, interleaved with other pairs'
/// arcs: grouping only neighbours made batches of one arc and a few hundred rows each,
/// and the per-batch costs (locks, key scan, two-phase commit) dominated the move.
fn group_batch(
    arcs: &[MoveArc],
    done: impl Fn(u32) -> bool,
    estimate: impl Fn(u32) -> u64,
    limit: u64,
) -> Option<Batch> {
    let mut pending = (0u32..).zip(arcs).filter(|(i, _)| !done(*i));
    let (first, a) = pending.next()?;
    let mut batch = Batch {
        arcs: vec![first],
        source: a.source,
        dest: a.dest,
    };
    let mut rows = estimate(first);
    for (i, a) in pending {
        let n = estimate(i);
        if a.source == batch.source && a.dest == batch.dest && rows + n <= limit {
            batch.arcs.push(i);
            rows += n;
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arc(source: usize, dest: usize) -> MoveArc {
        MoveArc {
            ranges: Vec::new(),
            source,
            dest,
        }
    }

    #[test]
    fn a_batch_gathers_a_pairs_arcs_from_all_around_the_ring() {
        let arcs = [
            arc(0, 3),
            arc(1, 3),
            arc(0, 3),
            arc(2, 3),
            arc(0, 3),
            arc(0, 3),
        ];
        let b = group_batch(&arcs, |_| false, |_| 100, 250).expect("a batch");
        assert_eq!((b.source, b.dest, b.arcs), (0, 3, vec![0, 2]));
        let b = group_batch(&arcs, |i| i == 0, |_| 100, 1000).expect("a batch");
        assert_eq!(b.arcs, vec![1], "shard 1's only arc");
        let b = group_batch(&arcs, |i| i < 2, |_| 100, 1000).expect("a batch");
        assert_eq!(b.arcs, vec![2, 4, 5], "arc 3 has another source");
    }

    #[test]
    fn small_arcs_fill_the_room_a_large_one_leaves() {
        let arcs = [arc(0, 1), arc(0, 1), arc(0, 1), arc(0, 1)];
        let est = |i: u32| [400, 700, 500, 100][i as usize];
        let b = group_batch(&arcs, |_| false, est, 1000).expect("a batch");
        assert_eq!(b.arcs, vec![0, 2, 3]);
        let b = group_batch(&arcs, |i| i != 1, est, 10).expect("an arc alone may exceed");
        assert_eq!(b.arcs, vec![1]);
        assert!(group_batch(&arcs, |_| true, est, 10).is_none(), "all done");
    }
}
