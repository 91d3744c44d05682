//! Online migration: adding or removing a shard while clients keep reading and writing.
//!
//! The pieces, in the order a migration meets them:
//! - [`crate::meta::begin::begin`] (a reload, a restart or `ADD SHARD`/`REMOVE SHARD`
//!   whose ring moves rows):
//!   the shard schema on every shard of both rings, then the migration recorded in
//!   `taskflow_meta` as `setup` (one unfinished migration at a time).
//! - [`follow`] runs in every proxy: it reads the unfinished migration every
//!   `reshard.poll_ms`, switches this proxy's topology to route by it (source and target
//!   rings, arcs moved; `proxy_core::placement`), acknowledges it once nothing routed
//!   without it is still running here, marks arcs moved as other proxies move them, and
//!   drives the migration when it has no live owner.
//! - [`mover`] is the owner's loop: `setup` (each shard's `taskflow_moves` rows) →
//!   `waiting` (until every live proxy acknowledged) → `moving` (batches, throttled,
//!   pausable) → `done` (the target ring becomes the active epoch).
//! - [`batch`] moves one batch of arcs from one shard to another in one two-phase commit.
//!
//! Guarantees and why they hold are in ARCHITECTURE.md ("Online migration").

pub mod batch;
pub mod mover;
pub mod setup;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::meta::moves;
use crate::proxy::{Proxy, Topology};

/// What the follower remembers between polls.
#[derive(Default)]
struct Following {
    /// The topology this proxy routed by before it switched to the migration's view;
    /// the migration is acknowledged once nothing runs under it any more.
    before: Option<Arc<Topology>>,
    acknowledged: i64,
    mover: Option<tokio::task::JoinHandle<()>>,
}

/// Every `reshard.poll_ms` until `shutdown`: follows the unfinished migration (see the
/// module documentation).
pub async fn follow(proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let mut state = Following::default();
    loop {
        let every = Duration::from_millis(proxy.config().reshard.poll_ms);
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => {
                if let Some(m) = state.mover.take() {
                    m.abort();
                }
                return;
            }
        }
        if let Err(e) = follow_once(&proxy, &mut state).await {
            tracing::debug!(error = %e, "cannot read the unfinished migration");
        }
    }
}

async fn follow_once(
    proxy: &Arc<Proxy>,
    state: &mut Following,
) -> Result<(), crate::meta::MetaError> {
    let active = moves::active(&proxy.meta).await?;
    let mine = proxy.migration_epoch.load(Ordering::Relaxed);
    let Some(active) = active else {
        if mine != 0 || state.before.is_some() {
            // Finished (or failed): route by the stored ring.
            state.before = None;
            proxy.follow_stored_ring().await;
        }
        return Ok(());
    };
    if active.state != "setup" && active.epoch != mine {
        let before = proxy.topology();
        proxy.follow_stored_ring().await;
        if proxy.migration_epoch.load(Ordering::Relaxed) == active.epoch {
            tracing::info!(epoch = active.epoch, "routing by the unfinished migration");
            state.before = Some(before);
        }
    }
    if proxy.migration_epoch.load(Ordering::Relaxed) == active.epoch {
        mark_moved(proxy, active.epoch).await?;
        acknowledge(proxy, active.epoch, state).await?;
    }
    let owned_elsewhere =
        active.owner_alive && active.owner.as_deref() != Some(proxy.meta.instance.as_str());
    let running = state.mover.as_ref().is_some_and(|m| !m.is_finished());
    if !owned_elsewhere && !running {
        let p = proxy.clone();
        state.mover = Some(tokio::spawn(async move {
            mover::drive(p, active.epoch).await;
        }));
    }
    Ok(())
}

/// Marks in this proxy's view the arcs other proxies recorded as moved.
async fn mark_moved(proxy: &Proxy, epoch: i64) -> Result<(), crate::meta::MetaError> {
    let done = moves::done_arcs(&proxy.meta, epoch).await?;
    let topo = proxy.topology();
    if let Some(m) = topo.placement.migration().filter(|m| m.epoch == epoch) {
        for arc in done {
            m.mark_done(arc);
        }
    }
    Ok(())
}

/// Acknowledges migration `epoch` once nothing routed without it runs here any more.
async fn acknowledge(
    proxy: &Proxy,
    epoch: i64,
    state: &mut Following,
) -> Result<(), crate::meta::MetaError> {
    if state.acknowledged >= epoch {
        return Ok(());
    }
    if let Some(before) = &state.before {
        let n = before.in_flight.load(Ordering::Acquire);
        if n > 0 {
            tracing::debug!(
                epoch,
                in_flight = n,
                "waiting for statements routed without the migration"
            );
            return Ok(());
        }
    }
    moves::acknowledge(&proxy.meta, epoch).await?;
    state.acknowledged = epoch;
    state.before = None;
    tracing::info!(
        epoch,
        "acknowledged the migration: every statement here is routed by it"
    );
    Ok(())
}
