//! Two-phase commit across shards: `PREPARE TRANSACTION` everywhere, record the decision
//! durably in `taskflow_meta.decisions`, then `COMMIT PREPARED` everywhere under the
//! commit fence — or, if any shard failed to prepare (or a recovering proxy already
//! decided to abort), `ROLLBACK PREPARED` everywhere.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::gid;
use crate::backend::{BackendError, Pooled};
use crate::meta::decisions::{self, Outcome};
use crate::meta::fence::ExclusiveGuard;
use crate::proxy::Proxy;
use crate::session::{ExecError, Txn};
use proxy_core::wire::sqlstate;

/// Test hook (`TFSP_TEST_2PC_HOOK`): `abort-before-decision`,
/// `abort-after-decision`, or `sleep-<stage>=<ms>`. Used by the crash tests only.
const HOOK_ENV: &str = "TFSP_TEST_2PC_HOOK";

async fn hook(stage: &str) {
    let Ok(v) = std::env::var(HOOK_ENV) else {
        return;
    };
    if v == format!("abort-{stage}") {
        tracing::error!(stage, "2PC test hook: aborting the process");
        std::process::abort();
    }
    if let Some(ms) = v
        .strip_prefix(&format!("sleep-{stage}="))
        .and_then(|ms| ms.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// Commits `t` on every shard it touched, or on none.
pub(super) async fn commit(proxy: &Proxy, t: Txn) -> Result<(), ExecError> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let conns: Vec<(String, Pooled)> = t
        .conns
        .into_iter()
        .map(|(s, c)| {
            let name = t
                .topo
                .shards
                .get(s)
                .map_or_else(|| c.pool().name.clone(), |p| p.name.clone());
            (gid::gid(&id, &proxy.meta.instance, &name), c)
        })
        .collect();
    let (prepared, failure) = prepare_all(conns).await;
    // The fence is taken before the decision is recorded and released (by the
    // transaction that deletes it) after the fan-out: a reader holding the fence shared
    // that still finds a `commit` decision knows its owner died mid-way.
    let mut fence = None;
    let decision = match failure {
        Some(why) => Err(why),
        None => {
            hook("before-decision").await;
            let f = fence.insert(proxy.commit_fence.exclusive().await);
            if !f.complete {
                tracing::warn!("commit fence not acquired in time; a concurrent scatter read may see this commit half done");
            }
            let gids: Vec<String> = prepared.iter().map(|(g, _)| g.clone()).collect();
            match decisions::decide_commit(&proxy.meta, &id, &gids).await {
                Ok(Outcome::Commit) => Ok(()),
                Ok(Outcome::Abort) => {
                    Err("another proxy took this one for dead and abandoned the transaction".into())
                }
                Err(e) => Err(format!("cannot record the commit decision: {e}")),
            }
        }
    };
    let (Ok(()), Some(fence)) = (&decision, fence) else {
        rollback_prepared(prepared).await;
        proxy.metrics.two_phase_aborts.inc();
        let why = decision.err().unwrap_or_default();
        return Err(ExecError::sql(
            sqlstate::TRANSACTION_ROLLBACK,
            format!("transaction rolled back on every shard: {why}"),
        ));
    };
    hook("after-decision").await;
    commit_prepared(proxy, prepared, &id, fence).await;
    proxy.metrics.two_phase_commits.inc();
    proxy.stats.two_phase.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Sends `PREPARE TRANSACTION` to every shard at once, then reads each answer. Returns the
/// prepared connections with their gids, and the first failure.
async fn prepare_all(mut conns: Vec<(String, Pooled)>) -> (Vec<(String, Pooled)>, Option<String>) {
    let mut failure = None;
    for (gid, conn) in conns.iter_mut() {
        let sql = format!("PREPARE TRANSACTION '{gid}'");
        if let Err(e) = postgres_protocol::message::frontend::query(&sql, &mut conn.conn().wbuf) {
            failure.get_or_insert(e.to_string());
        }
    }
    for (_, conn) in conns.iter_mut() {
        let _ = conn.conn().flush().await;
    }
    let mut prepared = Vec::new();
    for (gid, mut conn) in conns {
        let name = conn.pool().name.clone();
        match conn.conn().collect_until_ready().await {
            Ok(r) if r.tags.last().map(String::as_str) == Some("PREPARE TRANSACTION") => {
                prepared.push((gid, conn))
            }
            Ok(_) => {
                failure.get_or_insert(format!("shard {name} had aborted the transaction"));
                conn.release();
            }
            Err(BackendError::Server(info)) => {
                failure.get_or_insert(format!("shard {name} could not prepare: {}", info.message));
                if conn.conn().status == b'I' {
                    conn.release();
                } else {
                    conn.discard();
                }
            }
            Err(e) => {
                failure.get_or_insert(format!("shard {name} is unavailable: {e}"));
                conn.discard();
            }
        }
    }
    (prepared, failure)
}

/// `ROLLBACK PREPARED` everywhere; what fails is left to recovery.
async fn rollback_prepared(prepared: Vec<(String, Pooled)>) {
    for (gid, mut conn) in prepared {
        match conn
            .conn()
            .simple_query(&format!("ROLLBACK PREPARED '{gid}'"))
            .await
        {
            Ok(_) => conn.release(),
            Err(e) => {
                tracing::warn!(gid = %gid, error = %e, "ROLLBACK PREPARED failed; recovery will resolve it");
                conn.discard();
            }
        }
    }
}

/// `COMMIT PREPARED` everywhere, holding the commit fence (taken by the caller before it
/// recorded the decision) so scatter readers see the commit on every shard or on none.
/// When every shard committed, the decision is deleted in the transaction that releases
/// the fence; what fails is finished by recovery from the decision.
///
/// The fence wait was bounded: a scatter read that itself waits on a row lock of this
/// transaction (`SELECT … FOR UPDATE`) must not deadlock the commit. After the wait the
/// commit goes ahead (logged), and a concurrent scatter read may see it half done.
async fn commit_prepared(
    proxy: &Proxy,
    prepared: Vec<(String, Pooled)>,
    id: &str,
    mut fence: ExclusiveGuard<'_>,
) {
    let mut all = true;
    for (i, (gid, mut conn)) in prepared.into_iter().enumerate() {
        if i > 0 {
            hook("between-commits").await;
        }
        match conn
            .conn()
            .simple_query(&format!("COMMIT PREPARED '{gid}'"))
            .await
        {
            Ok(_) => conn.release(),
            // Already committed by a reader's repair or another proxy's recovery.
            Err(BackendError::Server(e)) if e.code == UNDEFINED_OBJECT => conn.release(),
            Err(e) => {
                all = false;
                tracing::warn!(gid = %gid, error = %e, "COMMIT PREPARED failed; the decision is recorded and recovery will finish it");
                conn.discard();
            }
        }
    }
    if all && !fence.release_with(decisions::forget_sql(id)) {
        let (meta, id) = (proxy.meta.clone(), id.to_owned());
        tokio::spawn(async move {
            if let Err(e) = decisions::forget(&meta, &id).await {
                tracing::debug!(error = %e, "cannot forget a finished 2PC decision yet");
            }
        });
    }
}

/// SQLSTATE of `COMMIT PREPARED` for a gid that no longer exists.
pub(super) const UNDEFINED_OBJECT: &str = "42704";
