//! Starting and stopping the proxy as a whole: in-doubt recovery, the client listener and
//! the dispatch of each authenticated client (to a session or the admin console), and
//! background maintenance (pool gauges, shard health, periodic 2PC resolution).
//!
//! Why dispatch lives here: `frontend` only establishes who a client is, `session` and
//! `admin` only serve one; the module that knows all three is the one above them, so none
//! of them calls up into another.
//!
//! Why in the library rather than `main`: integration tests start the real proxy in-process
//! on a free port with the same code path the binary uses; `main` only adds the systemd
//! lifecycle, ops endpoints and signal-driven reloads around it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ProxyConfig, SetupError};
use crate::frontend::io::ClientError;
use crate::metrics::Metrics;
use crate::proxy::{ClientInfo, Proxy};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("state_dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Meta(#[from] crate::meta::MetaError),
    #[error("listen {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running proxy.
pub struct Running {
    pub addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    pub shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Running {
    /// Stops accepting, lets sessions finish their transactions (bounded by `grace`).
    pub async fn stop(self, grace: Duration) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace elapsed with clients still connected");
        }
        if let Err(e) = crate::meta::registry::deregister(&self.proxy.meta).await {
            tracing::warn!(error = %e, "cannot remove this proxy from the registry");
        }
        let topo = self.proxy.topology();
        for p in topo
            .all_pools()
            .chain(std::iter::once(&self.proxy.meta.pool))
        {
            for c in p.drain_idle() {
                c.terminate().await;
            }
        }
    }
}

/// Builds the proxy, resolves in-doubt transactions, binds the listener and starts serving.
/// Returns the running proxy and its metrics registry.
pub async fn start(
    config: ProxyConfig,
    config_path: Option<PathBuf>,
    shutdown: CancellationToken,
) -> Result<(Running, Registry), ServerError> {
    let (metrics, registry) = Metrics::new();
    let listen = config.listen;
    let state_dir = config.state_dir.clone();
    std::fs::create_dir_all(&state_dir).map_err(|source| ServerError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    let proxy = Proxy::new(config, config_path, Arc::new(metrics))?;
    prepare_metadata(&proxy).await?;
    let weak = Arc::downgrade(&proxy);
    proxy.commit_fence.set_repair(Box::new(move |pending| {
        let weak = weak.clone();
        Box::pin(async move {
            if let Some(proxy) = weak.upgrade() {
                crate::session::txn::finish_commits(&proxy, pending).await;
            }
        })
    }));
    tracing::info!(instance = %proxy.meta.instance, "registered in taskflow_meta.proxies");
    let epoch = adopt_ring_or_leave(&proxy).await?;
    tracing::info!(epoch, "routing by the stored ring epoch");
    let imported = crate::session::txn::import_legacy_decisions(&proxy).await?;
    if imported > 0 {
        tracing::info!(
            imported,
            "moved 2PC decision files of an earlier version into taskflow_meta.decisions"
        );
    }
    let resolved = crate::session::txn::resolve_in_doubt(&proxy, true).await;
    if resolved > 0 {
        tracing::info!(
            resolved,
            "resolved in-doubt prepared transactions at startup"
        );
    }
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Listen {
            addr: listen,
            source,
        })?;
    let tracker = TaskTracker::new();
    tokio::spawn(accept_loop(
        proxy.clone(),
        listener,
        shutdown.clone(),
        tracker.clone(),
    ));
    tokio::spawn(maintenance(proxy.clone(), shutdown.clone()));
    tokio::spawn(heartbeats(proxy.clone(), shutdown.clone()));
    tokio::spawn(crate::reshard::follow(proxy.clone(), shutdown.clone()));
    tracing::info!(%addr, "shard proxy listening");
    Ok((
        Running {
            addr,
            proxy,
            shutdown,
            tracker,
        },
        registry,
    ))
}

/// Adopts (records, or starts migrating to) the configured ring; on failure leaves the
/// registry first — not serving after all, this proxy must not count as a live one (holding
/// up a migration's acknowledgements, and its instance id) until its heartbeat expires.
async fn adopt_ring_or_leave(proxy: &Proxy) -> Result<i64, ServerError> {
    match proxy.adopt_ring().await {
        Ok(epoch) => Ok(epoch),
        Err(e) => {
            if let Err(d) = crate::meta::registry::deregister(&proxy.meta).await {
                tracing::warn!(error = %d, "cannot leave taskflow_meta.proxies");
            }
            Err(e.into())
        }
    }
}

/// How long start-up waits for the metadata database (the auth cluster) to accept a
/// connection, e.g. when the proxy boots before it.
const METADATA_WAIT: Duration = Duration::from_secs(60);

/// Migrates `taskflow_meta` and registers this proxy, waiting (bounded) for the auth
/// cluster to come up; any other error is final.
async fn prepare_metadata(proxy: &Proxy) -> Result<(), crate::meta::MetaError> {
    let deadline = tokio::time::Instant::now() + METADATA_WAIT;
    loop {
        let attempt = async {
            let applied = crate::meta::schema::migrate(&proxy.meta).await?;
            if !applied.is_empty() {
                tracing::info!(?applied, "metadata schema taskflow_meta migrated");
            }
            crate::meta::registry::register(&proxy.meta).await
        };
        match attempt.await {
            Err(crate::meta::MetaError::Pool(e)) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "waiting for the metadata database");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// Accepts clients until `shutdown`; each runs in its own task tracked by `tracker`.
async fn accept_loop(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let connected = Arc::new(AtomicUsize::new(0));
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let max = proxy.config().limits.max_clients;
        let Some(slot) = ClientSlot::take(&connected, max) else {
            tracing::warn!(client = %addr, max, "refusing a client: limits.max_clients reached");
            tracker.spawn(crate::frontend::refuse_too_many(tcp, max));
            continue;
        };
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _slot = slot;
            if let Err(e) = serve_client(proxy, tcp, addr, shutdown).await {
                tracing::debug!(client = %addr, error = %e, "client connection ended with an error");
            }
        });
    }
}

/// One of `limits.max_clients` connection slots, given back when dropped.
struct ClientSlot(Arc<AtomicUsize>);

impl ClientSlot {
    fn take(connected: &Arc<AtomicUsize>, max: usize) -> Option<ClientSlot> {
        let taken = connected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        taken.then(|| ClientSlot(connected.clone()))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One client from its first byte to its last: handshake, registration (for `SHOW CLIENTS`
/// and cancel requests), then the admin console or a session.
async fn serve_client(
    proxy: Arc<Proxy>,
    tcp: TcpStream,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), ClientError> {
    let Some(auth) = crate::frontend::accept(&proxy, tcp).await? else {
        return Ok(());
    };
    let (id, pid, secret, cancel_slot) = proxy.register_client(ClientInfo {
        id: 0,
        user: auth.user.clone(),
        database: auth.database.clone(),
        addr: addr.to_string(),
        application_name: auth.application_name(),
        connected_at: SystemTime::now(),
        tls: auth.tls,
    });
    let result = if auth.database == "admin" {
        crate::admin::run(proxy.clone(), auth, pid, secret, shutdown).await
    } else {
        crate::session::run(proxy.clone(), auth, id, pid, secret, cancel_slot, shutdown).await
    };
    proxy.unregister_client(id, pid, secret);
    result
}

/// Every 5 s: pool gauges, health probes of unhealthy shards, 2PC resolution, and the
/// stored ring epoch (followed when another proxy recorded a new one).
async fn maintenance(proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        proxy.refresh_pool_metrics();
        for p in proxy.topology().all_pools() {
            if !p.healthy.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(c) = p.connect().await {
                    c.terminate().await;
                }
            }
        }
        // Every tick: another proxy's leftovers are resolved soon after it dies.
        crate::session::txn::resolve_in_doubt(&proxy, false).await;
        proxy.follow_stored_ring().await;
    }
}

/// Every `metadata.heartbeat_secs`: tells the other proxies this one is alive.
async fn heartbeats(proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let every = Duration::from_secs(proxy.meta.settings.heartbeat_secs);
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if let Err(e) = crate::meta::registry::heartbeat(&proxy.meta).await {
            tracing::warn!(error = %e, "heartbeat not recorded");
        }
    }
}
