//! The commit fence: a scatter read never runs while a cross-shard `COMMIT PREPARED`
//! fan-out is half done, so a row moved between shards is seen exactly once.
//!
//! Why two levels: within one process a `tokio` read/write lock costs nothing; across
//! proxies (`metadata.fence = "cluster"`, the default) the same shared/exclusive pair is a
//! PostgreSQL advisory lock on the auth cluster — one lock in one place, so there is no
//! lock ordering across shards to get wrong. A scatter read holds it shared (session level,
//! on a connection of the metadata pool) for the whole read; a commit fan-out holds it
//! exclusively (transaction level, with `lock_timeout`). The commit's wait is bounded
//! (`metadata.fence_wait_ms`): a reader blocked on a row lock of the very transaction being
//! committed must not deadlock it; past the bound the commit goes ahead (logged, counted).
//! If the auth cluster cannot be reached, a reader falls back to the process fence (logged):
//! reads stay available, fenced only against this process's commits.
//!
//! A proxy that dies in the middle of its fan-out releases the lock with its connection,
//! leaving some shards committed and others prepared. The commit's decision row says so:
//! the owner records it only while holding the exclusive lock, and deletes it in the same
//! transaction that releases the lock. So a reader
//! that holds the lock shared and still sees a `commit` decision knows its gids may be
//! half applied; before reading it has them finished ([`Fence::set_repair`], which
//! commits them under the exclusive lock) — the reader never sees the half state.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::decisions::{self, Decision};
use crate::backend::{BackendError, Pool, Pooled};

/// Finishes the given commit decisions (their `COMMIT PREPARED`s), under the exclusive
/// fence, and forgets them.
pub type RepairFn = Box<
    dyn Fn(HashMap<String, Decision>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync,
>;

/// How often one read repairs before it reads anyway.
const MAX_REPAIRS: usize = 1;

/// Advisory-lock key of the fence (`"tffence!"` in ASCII).
const FENCE_KEY: i64 = 0x7466_6665_6e63_6521;

/// The fence (see the module documentation).
pub struct Fence {
    local: RwLock<()>,
    /// The metadata pool when the fence spans proxies.
    cluster: Option<Arc<Pool>>,
    wait: Duration,
    repair: OnceLock<RepairFn>,
}

/// Held by a scatter read.
pub struct FenceGuard<'a> {
    _local: RwLockReadGuard<'a, ()>,
    cluster: Option<Pooled>,
}

/// Held by a cross-shard commit fan-out; `complete` is false when the wait ran out.
pub struct ExclusiveGuard<'a> {
    _local: Option<RwLockWriteGuard<'a, ()>>,
    cluster: Option<Pooled>,
    pub complete: bool,
    /// Run in the lock's transaction, just before it commits (and so releases the lock).
    last: Option<String>,
}

impl ExclusiveGuard<'_> {
    /// Runs `sql` in the same transaction that releases the cluster lock; false (and
    /// nothing runs) when this guard holds no cluster lock.
    pub fn release_with(&mut self, sql: String) -> bool {
        self.last = Some(sql);
        self.cluster.is_some()
    }
}

impl Fence {
    pub fn new(cluster: Option<Arc<Pool>>, wait: Duration) -> Fence {
        Fence {
            local: RwLock::new(()),
            cluster,
            wait,
            repair: OnceLock::new(),
        }
    }

    /// Installs what finishes half-applied commits of dead proxies (set once, at start).
    pub fn set_repair(&self, repair: RepairFn) {
        let _ = self.repair.set(repair);
    }

    /// Takes the fence shared, for one scatter read; first has half-applied commits
    /// finished (see the module documentation).
    pub async fn read(&self) -> FenceGuard<'_> {
        let mut repairs = 0;
        loop {
            let local = self.local.read().await;
            let Some(pool) = &self.cluster else {
                return FenceGuard {
                    _local: local,
                    cluster: None,
                };
            };
            let (conn, pending) = lock_shared(pool).await;
            let repair = self.repair.get().filter(|_| repairs < MAX_REPAIRS);
            match repair {
                Some(repair) if !pending.is_empty() => {
                    if let Some(conn) = conn {
                        unlock_later(conn, UNLOCK_SHARED.into());
                    }
                    drop(local);
                    repairs += 1;
                    repair(pending).await;
                }
                _ => {
                    return FenceGuard {
                        _local: local,
                        cluster: conn,
                    }
                }
            }
        }
    }

    /// Takes the fence exclusively for a `COMMIT PREPARED` fan-out, waiting at most
    /// `metadata.fence_wait_ms` in all.
    pub async fn exclusive(&self) -> ExclusiveGuard<'_> {
        let started = Instant::now();
        let local = tokio::time::timeout(self.wait, self.local.write())
            .await
            .ok();
        let mut complete = local.is_some();
        let mut cluster = None;
        if let Some(pool) = &self.cluster {
            let left = self
                .wait
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(1));
            cluster = lock_exclusive(pool, left).await;
            complete &= cluster.is_some();
        }
        ExclusiveGuard {
            _local: local,
            cluster,
            complete,
            last: None,
        }
    }
}

/// Takes the shared cluster lock; returns the connection holding it (none when the
/// metadata database is unavailable) and the commit decisions still recorded.
async fn lock_shared(pool: &Arc<Pool>) -> (Option<Pooled>, HashMap<String, Decision>) {
    let mut conn = match pool.get().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "commit fence: metadata database unavailable; this scatter read is fenced only within this proxy");
            return (None, HashMap::new());
        }
    };
    let sql = format!(
        "SELECT pg_advisory_lock_shared({FENCE_KEY}); \
         SELECT {} FROM taskflow_meta.decisions WHERE outcome = 'commit'",
        decisions::COLUMNS
    );
    match conn.conn().simple_query(&sql).await {
        Ok(r) => {
            let pending = decisions::parse_rows(r.rows.into_iter().skip(1).collect());
            (Some(conn), pending)
        }
        Err(e) => {
            tracing::warn!(error = %e, "commit fence: cannot take the shared lock; this scatter read is fenced only within this proxy");
            conn.discard();
            (None, HashMap::new())
        }
    }
}

async fn lock_exclusive(pool: &Arc<Pool>, wait: Duration) -> Option<Pooled> {
    // Readers hold metadata connections while they read: the wait for one is bounded too.
    let mut conn = tokio::time::timeout(wait, pool.get()).await.ok()?.ok()?;
    let sql = format!(
        "BEGIN; SET LOCAL lock_timeout = '{}ms'; SELECT pg_advisory_xact_lock({FENCE_KEY})",
        wait.as_millis()
    );
    match conn.conn().simple_query(&sql).await {
        Ok(_) => Some(conn),
        Err(BackendError::Server(_)) => {
            match conn.conn().simple_query("ROLLBACK").await {
                Ok(_) => conn.release(),
                Err(_) => conn.discard(),
            }
            None
        }
        Err(_) => {
            conn.discard();
            None
        }
    }
}

/// Runs `sql` (the unlock) on `conn` in the background, then pools it; a connection that
/// cannot be unlocked is closed, which releases its locks too.
fn unlock_later(mut conn: Pooled, sql: String) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(async move {
                match conn.conn().simple_query(&sql).await {
                    Ok(_) if conn.conn().status == b'I' => conn.release(),
                    _ => conn.discard(),
                }
            });
        }
        Err(_) => conn.discard(),
    }
}

const UNLOCK_SHARED: &str = "SELECT pg_advisory_unlock_shared(8387503941853865249)";

impl Drop for FenceGuard<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.cluster.take() {
            unlock_later(conn, UNLOCK_SHARED.into());
        }
    }
}

impl Drop for ExclusiveGuard<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.cluster.take() {
            let sql = match self.last.take() {
                Some(last) => format!("{last}; COMMIT"),
                None => "COMMIT".into(),
            };
            unlock_later(conn, sql);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unlock_names_the_fence_key() {
        assert_eq!(
            super::UNLOCK_SHARED,
            format!("SELECT pg_advisory_unlock_shared({})", super::FENCE_KEY)
        );
    }
}
