//! Process-wide state shared by every client session: one atomic configuration snapshot
//! (configuration, users, TLS, topology), metrics, the cancel registry, the PAUSE switch and
//! the commit fence.
//!
//! Why one snapshot: a reload (SIGHUP or admin `RELOAD`) builds the whole new state —
//! users, TLS, shards, pools, ring, router — validates it, and swaps it in with one atomic
//! pointer store, or not at all. A reader (a handshake, a transaction) loads one
//! [`Snapshot`] and so can never see new users with old shards. Transactions in flight keep
//! the topology they began with; pools of shards whose backend did not change are carried
//! over, so a reload does not drop connections.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::backend::Pool;
use crate::config::{
    resolve, BackendSecurity, BackendTarget, FenceScope, PoolConfig, ProxyConfig, SetupError, User,
};
use crate::meta::epochs::{self, Verdict};
use crate::meta::{Fence, Meta};
use crate::metrics::Metrics;
use crate::scram::{random_bytes, Verifier};
use proxy_core::placement::Placement;
use proxy_core::ring::Ring;
use proxy_core::router::{Router, ShardingRules};

/// How often start-up compares its ring with the stored one when other proxies keep
/// recording epochs first.
const ADOPT_ATTEMPTS: u32 = 5;

/// Shards, their pools, the ring and the router, as of one configuration.
pub struct Topology {
    pub generation: u64,
    /// Where keys are: the ring, or during an online migration both rings and the arcs
    /// already moved ([`proxy_core::placement`]).
    pub placement: Placement,
    /// Indexed like `placement.shards()`.
    pub shards: Vec<Arc<Pool>>,
    pub auth: Arc<Pool>,
    pub router: Arc<Router>,
    pub sharded_database: String,
    pub sharded_tables: Vec<String>,
    /// Client messages (and transactions) being handled under this topology; a proxy
    /// acknowledges a migration only once the topology before it has none
    /// ([`InFlight`]).
    pub in_flight: AtomicUsize,
}

/// Counts one message or transaction handled under a topology, while it lives.
pub struct InFlight(Arc<Topology>);

impl InFlight {
    pub fn new(topo: &Arc<Topology>) -> InFlight {
        topo.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(topo.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InFlight(generation {})", self.0.generation)
    }
}

/// A migration a topology routes by: the source and target rings, the target epoch, and
/// the arcs already moved.
#[derive(Debug, Clone)]
pub struct MoveView {
    pub epoch: i64,
    pub from: crate::meta::epochs::StoredRing,
    pub to: crate::meta::epochs::StoredRing,
    pub done: Vec<u32>,
    /// Still in `setup`: nothing routes by it yet.
    pub setup: bool,
}

/// What a new topology routes by.
enum Routing {
    /// The configuration's shard list.
    Config,
    /// A stored ring (a migration's source while it is set up).
    Stored(crate::meta::epochs::StoredRing),
    /// A migration in progress.
    Moving(MoveView),
}

/// `shards`, each with the URL the configuration gives it, else its own.
fn with_config_urls(
    shards: &[crate::config::ShardConfig],
    config: &ProxyConfig,
) -> Vec<crate::config::ShardConfig> {
    shards
        .iter()
        .map(|s| crate::config::ShardConfig {
            name: s.name.clone(),
            url: config
                .shards
                .iter()
                .find(|c| c.name == s.name)
                .map_or_else(|| s.url.clone(), |c| c.url.clone()),
        })
        .collect()
}

impl MoveView {
    /// Every shard of both rings (source ring's first), each with the URL the
    /// configuration gives it, else the stored one.
    fn shards(&self, config: &ProxyConfig) -> Vec<crate::config::ShardConfig> {
        let mut all = self.from.shards.clone();
        for s in &self.to.shards {
            if !all.iter().any(|o| o.name == s.name) {
                all.push(s.clone());
            }
        }
        with_config_urls(&all, config)
    }
}

impl Topology {
    /// The ring keys outside moving arcs route by.
    pub fn ring(&self) -> &Ring {
        self.placement.ring()
    }

    pub fn pool_by_name(&self, name: &str) -> Option<&Arc<Pool>> {
        self.shards.iter().find(|p| p.name == name)
    }

    /// Every pool: shards first, then the auth database.
    pub fn all_pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.shards.iter().chain(std::iter::once(&self.auth))
    }
}

/// Everything a configuration determines, swapped as one value on reload.
pub struct Snapshot {
    pub config: Arc<ProxyConfig>,
    /// Client logins by name.
    pub users: HashMap<String, User>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub topology: Arc<Topology>,
}

/// What `SHOW CLIENTS` lists.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub addr: String,
    pub application_name: String,
    pub connected_at: SystemTime,
    pub tls: bool,
}

/// A backend a client's statement is running on, for cancel forwarding.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    /// Shared with the backend connection: taking a backend must not allocate.
    pub host: Arc<str>,
    pub port: u16,
    pub pid: i32,
    pub secret: i32,
}

/// Where cancel requests find the backends a client is using right now.
pub type CancelSlot = Arc<Mutex<Vec<CancelTarget>>>;

pub struct Proxy {
    snapshot: ArcSwap<Snapshot>,
    /// Serialises reloads: each builds on the snapshot the previous one stored.
    reload_lock: tokio::sync::Mutex<()>,
    pub config_path: Option<PathBuf>,
    pub metrics: Arc<Metrics>,
    cancels: Mutex<HashMap<(i32, i32), CancelSlot>>,
    pub clients: Mutex<HashMap<u64, ClientInfo>>,
    next_client: AtomicU64,
    next_pid: AtomicI32,
    /// Keys the mock SCRAM salt of unknown user names (see [`Verifier::impossible`]).
    mock_key: [u8; 32],
    /// `true` while PAUSEd: new transactions wait.
    pub paused: watch::Sender<bool>,
    pub started: Instant,
    pub state_dir: PathBuf,
    /// Counters for `SHOW STATS`.
    pub stats: ProxyStats,
    /// Makes a cross-shard commit atomic to scatter readers: the `COMMIT PREPARED` fan-out
    /// holds it exclusively, a scatter read holds it shared. Without it a read running
    /// between two shards' `COMMIT PREPARED` sees a row moved between shards on neither
    /// (or on both). Spans every proxy with `metadata.fence = "cluster"` (see
    /// [`crate::meta::fence`]); bounded.
    pub commit_fence: Fence,
    /// The proxies' shared metadata (2PC decisions, registry) on the auth cluster.
    pub meta: Arc<Meta>,
    /// The stored ring epoch this proxy routes by (`taskflow_meta.ring_epochs`).
    pub ring_epoch: AtomicI64,
    /// The migration this proxy routes by (its target epoch), 0 when none.
    pub migration_epoch: AtomicI64,
}

#[derive(Debug, Default)]
pub struct ProxyStats {
    pub statements: AtomicU64,
    pub transactions: AtomicU64,
    pub scatter_reads: AtomicU64,
    pub broadcasts: AtomicU64,
    pub two_phase: AtomicU64,
    pub errors: AtomicU64,
}

impl Proxy {
    /// Builds the proxy from a validated configuration (reads secrets and TLS files).
    pub fn new(
        config: ProxyConfig,
        config_path: Option<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Proxy>, SetupError> {
        let password = resolve(&config)?.backend_password;
        let meta = Arc::new(Meta::new(&config, password.as_deref())?);
        let commit_fence = Fence::new(
            (config.metadata.fence == FenceScope::Cluster).then(|| meta.pool.clone()),
            std::time::Duration::from_millis(config.metadata.fence_wait_ms),
        );
        let snapshot = build_snapshot(config, None, &Routing::Config)?;
        let mock_key = random_bytes::<32>().map_err(|e| SetupError::Load(e.to_string()))?;
        let (paused, _) = watch::channel(false);
        Ok(Arc::new(Proxy {
            state_dir: snapshot.config.state_dir.clone(),
            snapshot: ArcSwap::from_pointee(snapshot),
            reload_lock: tokio::sync::Mutex::new(()),
            config_path,
            metrics,
            cancels: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(1),
            next_pid: AtomicI32::new(1),
            mock_key,
            paused,
            started: Instant::now(),
            stats: ProxyStats::default(),
            commit_fence,
            meta,
            ring_epoch: AtomicI64::new(0),
            migration_epoch: AtomicI64::new(0),
        }))
    }

    /// The current configuration snapshot; everything in it belongs to one configuration.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The current topology (shorthand for `snapshot().topology`).
    pub fn topology(&self) -> Arc<Topology> {
        self.snapshot.load().topology.clone()
    }

    /// Whether `topo` is the current topology (no reference count taken: every message
    /// asks).
    pub fn is_current(&self, topo: &Arc<Topology>) -> bool {
        Arc::ptr_eq(&self.snapshot.load().topology, topo)
    }

    /// The current configuration (shorthand for `snapshot().config`).
    pub fn config(&self) -> Arc<ProxyConfig> {
        self.snapshot.load().config.clone()
    }

    /// The verifier to run SCRAM against for `user` in `snapshot`: the user's own, or one
    /// nobody can satisfy (with a salt stable per name) when the name is unknown.
    pub fn verifier(&self, snapshot: &Snapshot, user: &str) -> (Verifier, bool) {
        match snapshot.users.get(user) {
            Some(u) => (u.verifier.clone(), true),
            None => (Verifier::impossible(user, &self.mock_key), false),
        }
    }

    /// Replaces the configuration: builds and validates the complete new snapshot first,
    /// then stores it in one step. On error the running state is untouched. A ring that
    /// differs from the stored epoch is refused while a current shard holds rows, else
    /// recorded as the next epoch. Listeners and the state directory are fixed
    /// at start; changing them needs a restart (logged).
    pub async fn reload(&self, config: ProxyConfig) -> Result<String, SetupError> {
        self.reload_as(config, false).await
    }

    /// A reload that asks for a ring change on purpose (`ADD SHARD`, `REMOVE SHARD`): it may
    /// move rows back to the ring a finished migration left, which a reload or restart
    /// with a stale shard list may not.
    pub async fn change_ring(&self, config: ProxyConfig) -> Result<String, SetupError> {
        self.reload_as(config, true).await
    }

    async fn reload_as(&self, config: ProxyConfig, on_purpose: bool) -> Result<String, SetupError> {
        let _serial = self.reload_lock.lock().await;
        let current = self.snapshot();
        if current.config.listen != config.listen
            || current.config.metrics_listen != config.metrics_listen
        {
            tracing::warn!("listen addresses changed: takes effect after a restart");
        }
        let verdict = epochs::check(
            &self.meta,
            &config.shards,
            config.ring.virtual_nodes,
            &current.topology.shards,
            &current.topology.sharded_tables,
            on_purpose,
        )
        .await?;
        let next = self
            .settle(verdict, config, Some(&current.topology))
            .await?;
        let summary = format!(
            "{} shard(s): {}; {} user(s)",
            next.topology.shards.len(),
            next.topology.placement.shards().join(", "),
            next.users.len()
        );
        self.snapshot.store(Arc::new(next));
        Ok(summary)
    }

    /// The snapshot a verdict leads to: the configuration's ring (recorded as a new epoch
    /// when the verdict says so), or a migration's view (started here when it says so).
    async fn settle(
        &self,
        verdict: Verdict,
        config: ProxyConfig,
        previous: Option<&Topology>,
    ) -> Result<Snapshot, SetupError> {
        let routing = match verdict {
            Verdict::Same(epoch) => {
                self.ring_epoch.store(epoch, Ordering::Relaxed);
                Routing::Config
            }
            Verdict::Record(after) => {
                let epoch = self.record_epoch(after, &config).await?;
                self.ring_epoch.store(epoch, Ordering::Relaxed);
                Routing::Config
            }
            Verdict::Migrate(from) => {
                crate::meta::begin::begin(&self.meta, &from, &config).await?;
                // Until its setup is done, the migration routes nothing: the stored ring does.
                Routing::Stored(from)
            }
            Verdict::Follow(epoch) => {
                let view = self.move_view(epoch).await?;
                if view.setup {
                    Routing::Stored(view.from)
                } else {
                    Routing::Moving(view)
                }
            }
        };
        let next = build_snapshot(config, previous, &routing)?;
        let (ring_epoch, migration) = match &routing {
            Routing::Config => (self.ring_epoch.load(Ordering::Relaxed), 0),
            Routing::Stored(r) => (r.epoch, 0),
            Routing::Moving(v) => (v.from.epoch, v.epoch),
        };
        self.ring_epoch.store(ring_epoch, Ordering::Relaxed);
        self.migration_epoch.store(migration, Ordering::Relaxed);
        Ok(next)
    }

    /// Reads migration `epoch`'s rings and moved arcs.
    pub async fn move_view(&self, epoch: i64) -> Result<MoveView, SetupError> {
        let fail = |message: String| SetupError::Config {
            key: "shards".into(),
            message,
        };
        let active = crate::meta::moves::active(&self.meta)
            .await
            .map_err(|e| fail(format!("cannot read migration {epoch}: {e}")))?
            .filter(|a| a.epoch == epoch)
            .ok_or_else(|| fail(format!("migration to ring epoch {epoch} is not unfinished")))?;
        let ring = |e: i64| async move {
            epochs::load(&self.meta, e)
                .await
                .map_err(|err| fail(format!("cannot read ring epoch {e}: {err}")))?
                .ok_or_else(|| fail(format!("ring epoch {e} is missing")))
        };
        let from = ring(active.from_epoch).await?;
        let to = ring(epoch).await?;
        let done = crate::meta::moves::done_arcs(&self.meta, epoch)
            .await
            .map_err(|e| {
                fail(format!(
                    "cannot read the moved arcs of migration {epoch}: {e}"
                ))
            })?;
        Ok(MoveView {
            epoch,
            from,
            to,
            done,
            setup: active.state == "setup",
        })
    }

    /// Re-reads the configuration file and environment (admin `RELOAD`).
    pub async fn reload_from_disk(&self) -> Result<String, SetupError> {
        let cfg: ProxyConfig = taskflow_kit::config::load(self.config_path.as_deref())
            .map_err(|e| SetupError::Load(e.to_string()))?;
        self.reload(cfg).await
    }

    /// Compares the running configuration's ring with the stored epoch (start-up): adopts
    /// it, records it (first proxy, or every shard still empty), starts or joins the
    /// online migration it implies, or refuses naming the difference. Losing the race to
    /// record an epoch to another proxy starting at the same moment is not an error: the
    /// comparison runs again against what that proxy stored (up to [`ADOPT_ATTEMPTS`]).
    pub async fn adopt_ring(&self) -> Result<i64, SetupError> {
        let _serial = self.reload_lock.lock().await;
        let mut attempt = 1;
        loop {
            match self.adopt_ring_once().await {
                // Proxies started together over a fresh metadata schema all see no ring
                // and all record one; the others then find it stored, and agree or not.
                Err(SetupError::EpochTaken(epoch)) if attempt < ADOPT_ATTEMPTS => {
                    tracing::info!(
                        epoch,
                        "another proxy recorded the ring first; comparing again"
                    );
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn adopt_ring_once(&self) -> Result<i64, SetupError> {
        let snap = self.snapshot();
        let topo = &snap.topology;
        let verdict = epochs::check(
            &self.meta,
            &snap.config.shards,
            topo.ring().virtual_nodes(),
            &topo.shards,
            &topo.sharded_tables,
            false,
        )
        .await?;
        let next = self
            .settle(verdict, (*snap.config).clone(), Some(topo))
            .await?;
        self.snapshot.store(Arc::new(next));
        Ok(self.ring_epoch.load(Ordering::Relaxed))
    }

    /// Follows a ring epoch another proxy recorded (RELOAD with a new shard list while
    /// every shard was empty): reloads with the stored shards and virtual nodes. Called
    /// periodically; a failure is logged and retried on the next call.
    pub async fn follow_stored_ring(&self) {
        let active = match crate::meta::moves::active(&self.meta).await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the unfinished migration");
                return;
            }
        };
        if let Some(a) = active {
            // Route by the migration (its source ring while it is set up).
            if a.state != "setup" && a.epoch != self.migration_epoch.load(Ordering::Relaxed) {
                if let Err(e) = self.reload((*self.config()).clone()).await {
                    tracing::warn!(epoch = a.epoch, error = %e, "cannot follow the unfinished migration");
                }
            }
            return;
        }
        let stored = match epochs::current(&self.meta).await {
            Ok(Some(s))
                if s.epoch != self.ring_epoch.load(Ordering::Relaxed)
                    || self.migration_epoch.load(Ordering::Relaxed) != 0 =>
            {
                s
            }
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the stored ring");
                return;
            }
        };
        let mut config = (*self.config()).clone();
        config.shards = with_config_urls(&stored.shards, &config);
        config.ring.virtual_nodes = stored.virtual_nodes;
        match self.reload(config).await {
            Ok(summary) => {
                tracing::info!(epoch = stored.epoch, %summary, "routing by the stored ring epoch")
            }
            Err(e) => {
                tracing::warn!(epoch = stored.epoch, error = %e, "cannot follow the stored ring epoch")
            }
        }
    }

    /// Records the configuration's ring as the epoch after `after`.
    async fn record_epoch(
        &self,
        after: Option<i64>,
        config: &ProxyConfig,
    ) -> Result<i64, SetupError> {
        let epoch = epochs::record(&self.meta, after, &config.shards, config.ring.virtual_nodes)
            .await
            .map_err(|e| match e {
                crate::meta::MetaError::EpochTaken(epoch) => SetupError::EpochTaken(epoch),
                e => SetupError::Config {
                    key: "shards".into(),
                    message: format!("cannot record the ring: {e}"),
                },
            })?;
        tracing::info!(epoch, shards = ?config.shards.iter().map(|s| &s.name).collect::<Vec<_>>(), "ring epoch recorded");
        Ok(epoch)
    }

    /// Registers a new client; returns its id, the (pid, secret) it is told in
    /// BackendKeyData, and the slot cancel requests will read.
    pub fn register_client(&self, info: ClientInfo) -> (u64, i32, i32, CancelSlot) {
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
        let secret = i32::from_ne_bytes(random_bytes::<4>().unwrap_or_else(|_| {
            // No entropy source: a cancel key guessable from the clock is still unique
            // enough to route cancels; authentication itself already failed without one.
            (SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos()))
            .to_ne_bytes()
        }));
        let slot: CancelSlot = Arc::new(Mutex::new(Vec::new()));
        if let Ok(mut c) = self.cancels.lock() {
            c.insert((pid, secret), slot.clone());
        }
        if let Ok(mut c) = self.clients.lock() {
            c.insert(id, ClientInfo { id, ..info });
        }
        self.metrics.clients.inc();
        (id, pid, secret, slot)
    }

    pub fn unregister_client(&self, id: u64, pid: i32, secret: i32) {
        if let Ok(mut c) = self.cancels.lock() {
            c.remove(&(pid, secret));
        }
        if let Ok(mut c) = self.clients.lock() {
            c.remove(&id);
        }
        self.metrics.clients.dec();
    }

    /// The backends to cancel for a CancelRequest, if the key matches a client.
    pub fn cancel_targets(&self, pid: i32, secret: i32) -> Vec<CancelTarget> {
        let slot = self
            .cancels
            .lock()
            .ok()
            .and_then(|c| c.get(&(pid, secret)).cloned());
        slot.and_then(|s| s.lock().ok().map(|v| v.clone()))
            .unwrap_or_default()
    }

    /// Waits while the proxy is PAUSEd, at most `limit`; false when still paused then.
    pub async fn wait_unpaused(&self, limit: std::time::Duration) -> bool {
        if !*self.paused.borrow() {
            // Not paused (every statement asks): no subscription, no timer.
            return true;
        }
        let mut rx = self.paused.subscribe();
        let wait = async {
            while *rx.borrow_and_update() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    /// Refreshes pool gauges (called periodically).
    pub fn refresh_pool_metrics(&self) {
        let topo = self.topology();
        for p in topo.all_pools() {
            let l = crate::metrics::ShardLabel {
                shard: p.name.clone(),
            };
            self.metrics
                .pool_in_use
                .get_or_create(&l)
                .set(p.stats.in_use.load(Ordering::Relaxed) as i64);
            self.metrics
                .pool_idle
                .get_or_create(&l)
                .set(p.idle_count() as i64);
            self.metrics
                .pool_waiting
                .get_or_create(&l)
                .set(p.stats.waiting.load(Ordering::Relaxed) as i64);
            self.metrics
                .shard_up
                .get_or_create(&l)
                .set(i64::from(p.healthy.load(Ordering::Relaxed)));
        }
    }
}

/// Resolves `config`'s files and builds its topology: the whole state of one configuration.
fn build_snapshot(
    config: ProxyConfig,
    previous: Option<&Topology>,
    routing: &Routing,
) -> Result<Snapshot, SetupError> {
    // During a migration the topology spans both rings' shards; the configuration the
    // operator gave is kept as it is.
    let mut spanned = config.clone();
    let moving = match routing {
        Routing::Config => None,
        Routing::Stored(ring) => {
            spanned.shards = with_config_urls(&ring.shards, &config);
            spanned.ring.virtual_nodes = ring.virtual_nodes;
            None
        }
        Routing::Moving(m) => {
            spanned.shards = m.shards(&config);
            Some(m)
        }
    };
    let resolved = resolve(&spanned)?;
    let generation = previous.map_or(1, |p| p.generation + 1);
    let topology = build_topology(
        &spanned,
        resolved.backend_password.as_deref(),
        &resolved.backend_security,
        previous,
        generation,
        moving,
    )?;
    Ok(Snapshot {
        config: Arc::new(config),
        users: resolved.users,
        tls: resolved.tls,
        topology: Arc::new(topology),
    })
}

/// Makes the pools of a new topology, reusing `previous`'s pool of the same name when its
/// backend and settings did not change.
struct PoolMaker<'a> {
    /// The role every backend connection logs in as (`backend.user`).
    user: &'a str,
    password: Option<&'a str>,
    security: &'a HashMap<String, BackendSecurity>,
    previous: Option<&'a Topology>,
}

impl PoolMaker<'_> {
    /// The pool `name` for `url` with `settings`; `key` names the URL's configuration key
    /// in errors.
    fn make(
        &self,
        name: &str,
        url: &str,
        key: String,
        settings: &PoolConfig,
    ) -> Result<Arc<Pool>, SetupError> {
        let security = self
            .security
            .get(url)
            .cloned()
            .ok_or_else(|| SetupError::Config {
                key: key.clone(),
                message: "TLS settings were not resolved".into(),
            })?;
        let user = self.user;
        let previous = self
            .previous
            .and_then(|p| p.all_pools().find(|p| p.name == name).cloned());
        if let Some(prev) = previous {
            if prev.same_backend(url, &security, user, self.password, settings) {
                return Ok(prev);
            }
        }
        let target =
            BackendTarget::parse(url).map_err(|message| SetupError::Config { key, message })?;
        Ok(Pool::new(
            name.to_owned(),
            url.to_owned(),
            target,
            security,
            user.to_owned(),
            self.password.map(str::to_owned),
            settings,
        ))
    }
}

/// Builds the topology of `config`, carrying over the pools of `previous` whose backend did
/// not change (so a reload drops no connection).
fn build_topology(
    config: &ProxyConfig,
    password: Option<&str>,
    security: &HashMap<String, BackendSecurity>,
    previous: Option<&Topology>,
    generation: u64,
    moving: Option<&MoveView>,
) -> Result<Topology, SetupError> {
    let pools = PoolMaker {
        user: &config.backend.user,
        password,
        security,
        previous,
    };
    let placement = match moving {
        None => Placement::from(
            Ring::new(
                config.shards.iter().map(|s| s.name.clone()),
                config.ring.virtual_nodes,
            )
            .map_err(|e| SetupError::Ring(e.to_string()))?,
        ),
        Some(m) => {
            let ring = |r: &crate::meta::epochs::StoredRing| {
                Ring::new(r.names(), r.virtual_nodes).map_err(|e| SetupError::Ring(e.to_string()))
            };
            Placement::moving(ring(&m.from)?, ring(&m.to)?, m.epoch, &m.done)
        }
    };
    let mut shards = Vec::with_capacity(config.shards.len());
    for name in placement.shards() {
        let (i, s) = config
            .shards
            .iter()
            .enumerate()
            .find(|(_, s)| &s.name == name)
            .ok_or_else(|| SetupError::Ring(format!("ring names unknown shard {name}")))?;
        shards.push(pools.make(&s.name, &s.url, format!("shards[{i}].url"), &config.pool)?);
    }
    let auth = pools.make(
        "auth",
        &config.auth_database.url,
        "auth_database.url".into(),
        &config.auth_pool(),
    )?;
    let router = Arc::new(Router::new(ShardingRules {
        database: config.sharding.database.clone(),
        tables: config.sharding.tables.clone(),
        key_column: config.sharding.key_column.clone(),
    }));
    Ok(Topology {
        generation,
        placement,
        shards,
        auth,
        router,
        sharded_database: config.sharding.database.clone(),
        sharded_tables: config.sharding.tables.clone(),
        in_flight: AtomicUsize::new(0),
    })
}
