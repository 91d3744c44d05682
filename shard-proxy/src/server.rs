//! Starting and stopping the proxy as a whole: in-doubt recovery, the client listener,
//! and background maintenance (pool gauges, shard health, periodic 2PC resolution).
//!
//! Why in the library rather than `main`: integration tests start the real proxy in-process
//! on a free port with the same code path the binary uses; `main` only adds the systemd
//! lifecycle, ops endpoints and signal-driven reloads around it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ProxyConfig;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, SetupError};

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
        for p in self.proxy.topology().all_pools() {
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
    std::fs::create_dir_all(crate::session::txn::decisions_dir(&state_dir)).map_err(|source| {
        ServerError::StateDir {
            path: state_dir.clone(),
            source,
        }
    })?;
    let proxy = Proxy::new(config, config_path, Arc::new(metrics))?;
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
    tokio::spawn(crate::frontend::serve(
        proxy.clone(),
        listener,
        shutdown.clone(),
        tracker.clone(),
    ));
    tokio::spawn(maintenance(proxy.clone(), shutdown.clone()));
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

/// Every 5 s: pool gauges and health probes of unhealthy shards; every 30 s: 2PC resolution.
async fn maintenance(proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        n += 1;
        proxy.refresh_pool_metrics();
        for p in proxy.topology().all_pools() {
            if !p.healthy.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(c) = p.connect().await {
                    c.terminate().await;
                }
            }
        }
        if n.is_multiple_of(6) {
            crate::session::txn::resolve_in_doubt(&proxy, false).await;
        }
    }
}
