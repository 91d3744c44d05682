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

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::backend::{BackendError, Pool, Pooled};

/// Advisory-lock key of the fence (`"tffence!"` in ASCII).
const FENCE_KEY: i64 = 0x7466_6665_6e63_6521;

/// The fence (see the module documentation).
pub struct Fence {
    local: RwLock<()>,
    /// The metadata pool when the fence spans proxies.
    cluster: Option<Arc<Pool>>,
    wait: Duration,
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
}

impl Fence {
    pub fn new(cluster: Option<Arc<Pool>>, wait: Duration) -> Fence {
        Fence {
            local: RwLock::new(()),
            cluster,
            wait,
        }
    }

    /// Takes the fence shared, for one scatter read.
    pub async fn read(&self) -> FenceGuard<'_> {
        let local = self.local.read().await;
        let cluster = match &self.cluster {
            Some(pool) => lock_shared(pool).await,
            None => None,
        };
        FenceGuard {
            _local: local,
            cluster,
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
        }
    }
}

async fn lock_shared(pool: &Arc<Pool>) -> Option<Pooled> {
    let mut conn = match pool.get().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "commit fence: metadata database unavailable; this scatter read is fenced only within this proxy");
            return None;
        }
    };
    match conn
        .conn()
        .simple_query(&format!("SELECT pg_advisory_lock_shared({FENCE_KEY})"))
        .await
    {
        Ok(_) => Some(conn),
        Err(e) => {
            tracing::warn!(error = %e, "commit fence: cannot take the shared lock; this scatter read is fenced only within this proxy");
            conn.discard();
            None
        }
    }
}

async fn lock_exclusive(pool: &Arc<Pool>, wait: Duration) -> Option<Pooled> {
    let mut conn = pool.get().await.ok()?;
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
fn unlock_later(mut conn: Pooled, sql: &'static str) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(async move {
                match conn.conn().simple_query(sql).await {
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
            unlock_later(conn, UNLOCK_SHARED);
        }
    }
}

impl Drop for ExclusiveGuard<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.cluster.take() {
            unlock_later(conn, "COMMIT");
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
