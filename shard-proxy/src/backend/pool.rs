//! Per-shard pools of backend connections, used in *transaction* pooling mode.
//!
//! Why: thousands of clients must share a few server connections per shard. A client holds
//! a connection only for one statement (autocommit) or one transaction; then it goes back
//! to the pool. Connections are created lazily, bounded by a semaphore (`pool.size`),
//! checked for staleness when taken (so a restarted shard is reconnected transparently), and
//! discarded rather than reused whenever their state is uncertain.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::conn::{BackendConn, BackendError};
use crate::config::{BackendSecurity, BackendTarget, PoolConfig};
use crate::metrics::{Metrics, ShardSeries};

/// Most prepared statements a pooled connection may carry before it is retired.
const MAX_PREPARED_PER_CONN: usize = 2000;

/// Why a connection could not be had from a pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("shard {shard} is unavailable: {source}")]
    Unavailable {
        shard: String,
        #[source]
        source: BackendError,
    },
    #[error("timed out waiting for a free connection to shard {0}")]
    Exhausted(String),
    #[error("pool for shard {0} is closed")]
    Closed(String),
}

/// Counters shown by `SHOW POOLS` and exported as metrics.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub in_use: AtomicUsize,
    pub waiting: AtomicUsize,
    pub connects: AtomicU64,
    pub connect_errors: AtomicU64,
    pub checkouts: AtomicU64,
    pub discarded: AtomicU64,
}

/// A pool of connections to one backend (a shard or the auth database).
pub struct Pool {
    pub name: String,
    pub url: String,
    pub target: BackendTarget,
    /// TLS and the password methods allowed (from `sslmode`, the CA, `backend.*`).
    pub security: BackendSecurity,
    user: String,
    password: Option<String>,
    /// Boxed: a checkout moves the connection several times (out of this list, into
    /// [`Pooled`], into the session's work), and a `BackendConn` is a few hundred bytes.
    #[allow(
        clippy::vec_box,
        reason = "the box is what a checkout moves; measured: callgrind, pgbench -S"
    )]
    idle: Mutex<Vec<Box<BackendConn>>>,
    sem: Arc<Semaphore>,
    pub size: usize,
    connect_timeout: Duration,
    /// How long a client waits for a free connection before its statement fails.
    checkout_timeout: Duration,
    pub stats: PoolStats,
    pub healthy: AtomicBool,
    /// ParameterStatus values from the most recent connection (server_version, ...).
    server_params: Mutex<Vec<(String, String)>>,
    /// This backend's statement metrics, looked up on first use.
    series: OnceLock<ShardSeries>,
    /// The connection maintenance (2PC recovery) works on, kept from one pass to the next
    /// outside the pool's accounting: opening a new one every pass (every 5 s) cost a
    /// login — SCRAM's 4,096 rounds on both sides — and a server process per shard.
    upkeep: Mutex<Option<Box<BackendConn>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({})", self.name)
    }
}

impl Pool {
    pub fn new(
        name: String,
        url: String,
        target: BackendTarget,
        security: BackendSecurity,
        user: String,
        password: Option<String>,
        settings: &PoolConfig,
    ) -> Arc<Pool> {
        let size = settings.size;
        Arc::new(Pool {
            name,
            url,
            target,
            security,
            user,
            password,
            idle: Mutex::new(Vec::new()),
            sem: Arc::new(Semaphore::new(size)),
            size,
            connect_timeout: settings.connect_timeout(),
            checkout_timeout: Duration::from_secs(settings.checkout_timeout_secs),
            stats: PoolStats::default(),
            healthy: AtomicBool::new(true),
            server_params: Mutex::new(Vec::new()),
            series: OnceLock::new(),
            upkeep: Mutex::new(None),
        })
    }

    /// Counts a statement sent at `started` and answered now in `metrics`.
    pub fn observe_query(&self, metrics: &Metrics, started: Instant) {
        self.series
            .get_or_init(|| metrics.shard_series(&self.name))
            .observe(started.elapsed().as_secs_f64());
    }

    /// Whether this pool serves the same backend with the same credentials as `other` would.
    pub fn same_backend(
        &self,
        url: &str,
        security: &BackendSecurity,
        user: &str,
        password: Option<&str>,
        settings: &PoolConfig,
    ) -> bool {
        self.url == url
            && self.security.same_as(security)
            && self.user == user
            && self.password.as_deref() == password
            && self.size == settings.size
            && self.connect_timeout == settings.connect_timeout()
            && self.checkout_timeout == Duration::from_secs(settings.checkout_timeout_secs)
    }

    /// Takes a connection: an idle one if a healthy one exists, else a new one.
    pub async fn get(self: &Arc<Self>) -> Result<Pooled, PoolError> {
        let permit = match self.sem.clone().try_acquire_owned() {
            Ok(p) => p,
            // The common case needs no timer; only a client that must wait arms one.
            Err(_) => self.wait_for_permit().await?,
        };
        loop {
            let candidate = match self.idle.lock() {
                Ok(mut idle) => idle.pop(),
                Err(_) => None,
            };
            let Some(mut conn) = candidate else { break };
            if conn.is_stale() {
                self.stats.discarded.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
            self.stats.in_use.fetch_add(1, Ordering::Relaxed);
            return Ok(Pooled {
                conn: Some(conn),
                pool: self.clone(),
                _permit: permit,
            });
        }
        let conn = Box::new(self.connect().await?);
        self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
        self.stats.in_use.fetch_add(1, Ordering::Relaxed);
        Ok(Pooled {
            conn: Some(conn),
            pool: self.clone(),
            _permit: permit,
        })
    }

    /// Waits up to `pool.checkout_timeout_secs` for a free slot (counted in `waiting`).
    async fn wait_for_permit(&self) -> Result<OwnedSemaphorePermit, PoolError> {
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let permit =
            tokio::time::timeout(self.checkout_timeout, self.sem.clone().acquire_owned()).await;
        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        match permit {
            Err(_) => Err(PoolError::Exhausted(self.name.clone())),
            Ok(Err(_)) => Err(PoolError::Closed(self.name.clone())),
            Ok(Ok(p)) => Ok(p),
        }
    }

    /// Opens a new connection outside the pool's accounting (for recovery and probes).
    pub async fn connect(&self) -> Result<BackendConn, PoolError> {
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        match BackendConn::connect(
            &self.target,
            &self.security,
            &self.user,
            self.password.as_deref(),
            self.connect_timeout,
        )
        .await
        {
            Ok(c) => {
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!(shard = %self.name, "backend is reachable again");
                }
                if let Ok(mut p) = self.server_params.lock() {
                    p.clone_from(&c.params);
                }
                Ok(c)
            }
            Err(e) => {
                self.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::warn!(shard = %self.name, error = %e, "backend is unavailable");
                }
                Err(PoolError::Unavailable {
                    shard: self.name.clone(),
                    source: e,
                })
            }
        }
    }

    /// Server parameters seen on the latest connection (empty before the first one).
    pub fn server_params(&self) -> Vec<(String, String)> {
        self.server_params
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    /// Drops every idle connection, the maintenance one included (used on PAUSE/reload
    /// and shutdown).
    pub fn drain_idle(&self) -> Vec<Box<BackendConn>> {
        let mut conns = self
            .idle
            .lock()
            .map(|mut i| std::mem::take(&mut *i))
            .unwrap_or_default();
        conns.extend(self.upkeep.lock().ok().and_then(|mut u| u.take()));
        conns
    }

    /// The connection kept for maintenance, else a new one (outside the pool's accounting,
    /// like [`Pool::connect`]: maintenance must not wait behind clients for a slot). Hand
    /// it back with [`Pool::keep_upkeep`]; a kept connection the server has since closed
    /// fails on first use, so a caller retries once with a new one.
    pub async fn upkeep_conn(&self) -> Result<(Box<BackendConn>, bool), PoolError> {
        if let Some(kept) = self.upkeep.lock().ok().and_then(|mut u| u.take()) {
            return Ok((kept, true));
        }
        Ok((Box::new(self.connect().await?), false))
    }

    /// Keeps `conn` for the next maintenance pass if it is idle outside a transaction;
    /// otherwise it is closed.
    pub async fn keep_upkeep(&self, conn: Box<BackendConn>) {
        if conn.status == b'I' {
            if let Ok(mut kept) = self.upkeep.lock() {
                *kept = Some(conn);
                return;
            }
        }
        conn.terminate().await;
    }
}

/// A connection checked out of a pool. [`Pooled::release`] returns it; dropping it
/// instead closes the connection (its state is unknown), which also rolls back any open
/// transaction on the server.
pub struct Pooled {
    conn: Option<Box<BackendConn>>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Pooled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pooled({:?})", self.conn)
    }
}

impl Pooled {
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The connection. Present until released or discarded.
    pub fn conn(&mut self) -> &mut BackendConn {
        // `conn` is only taken by `release`/`discard`, which consume `self`.
        match self.conn.as_mut() {
            Some(c) => c,
            None => unreachable_conn(),
        }
    }

    pub fn conn_ref(&self) -> Option<&BackendConn> {
        self.conn.as_deref()
    }

    /// Returns the connection to the pool if it is idle and clean; otherwise closes it.
    pub fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.stats.in_use.fetch_sub(1, Ordering::Relaxed);
            if let Some(what) = conn.session_state {
                tracing::debug!(shard = %self.pool.name, state = what, "closing a server connection that holds a client's session state");
            } else if conn.status == b'I'
                && conn.wbuf.is_empty()
                && conn.prepared.len() <= MAX_PREPARED_PER_CONN
            {
                if let Ok(mut idle) = self.pool.idle.lock() {
                    idle.push(conn);
                    return;
                }
            }
            self.pool.stats.discarded.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes the connection without returning it.
    pub fn discard(mut self) {
        if self.conn.take().is_some() {
            self.pool.stats.in_use.fetch_sub(1, Ordering::Relaxed);
            self.pool.stats.discarded.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            self.pool.stats.in_use.fetch_sub(1, Ordering::Relaxed);
            self.pool.stats.discarded.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cold]
fn unreachable_conn() -> ! {
    // Only reachable through a logic error inside this module.
    panic!("pooled connection used after release")
}
