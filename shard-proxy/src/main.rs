//! The `taskflow-shard-proxy` binary: configuration, lifecycle and listeners.
//!
//! `taskflow-shard-proxy [--config FILE]` serves; `taskflow-shard-proxy migrate` applies
//! `migrations/` to the auth database and every shard. The daemon kit provides config
//! loading (exit 78 naming the key), logging, systemd notifications and signals.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use taskflow_kit::deps::Checks;
use taskflow_kit::http::Readiness;
use taskflow_kit::{Daemon, DaemonArgs};
use taskflow_shard_proxy::config::{backend_security, BackendTarget, ProxyConfig};
use taskflow_shard_proxy::proxy::Proxy;
use tokio_util::sync::CancellationToken;

const NAME: &str = "taskflow-shard-proxy";

/// mimalloc instead of glibc's malloc: per-thread free lists for the small, short-lived
/// buffers every statement allocates. Measured (`shard-proxy/BENCHMARKS.md`, run of
/// 2026-12-07 20:22): glibc's malloc/free were ~8 % of the instructions per routed
/// statement, and mimalloc saves 4–5 % of them — for ~5 KiB more per idle client.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = NAME, version, about = "PostgreSQL-wire shard proxy for TaskFlow")]
struct Cli {
    #[command(flatten)]
    daemon: DaemonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Apply the schema migrations to the auth database and to every shard, then exit.
    Migrate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Migrate) => taskflow_kit::run(NAME, cli.daemon, migrate),
        None => taskflow_kit::run(NAME, cli.daemon, serve),
    }
}

async fn serve(mut daemon: Daemon<ProxyConfig>) -> anyhow::Result<()> {
    let config = (*daemon.config).clone();
    let metrics_listen = config.metrics_listen;
    let shutdown = daemon.lifecycle.shutdown.clone();
    let inner_shutdown = CancellationToken::new();
    let (running, registry) = taskflow_shard_proxy::server::start(
        config,
        daemon.config_path.clone(),
        inner_shutdown.clone(),
    )
    .await
    .context("starting the shard proxy")?;
    let readiness = Readiness::new();
    readiness.set("listener", Ok(()));
    let ops = taskflow_kit::http::serve_ops(
        metrics_listen,
        readiness.clone(),
        Arc::new(registry),
        shutdown.clone(),
    )
    .await
    .with_context(|| format!("metrics_listen {metrics_listen}"))?;
    let proxy = running.proxy.clone();
    if backend_checks(&proxy)
        .wait_ready(&readiness, &daemon.lifecycle)
        .await
    {
        daemon.lifecycle.ready(&format!(
            "listening on {}; metrics on {ops}; {}",
            running.addr,
            backend_status(&proxy, &readiness)
        ));
        supervise(&mut daemon, &proxy, &readiness).await;
    }
    tracing::info!("draining clients");
    inner_shutdown.cancel();
    running.stop(daemon.lifecycle.grace).await;
    Ok(())
}

/// Until shutdown: status every 10 s, and reloads on SIGHUP (all of the new configuration
/// or none of it).
async fn supervise(daemon: &mut Daemon<ProxyConfig>, proxy: &Proxy, readiness: &Readiness) {
    let shutdown = daemon.lifecycle.shutdown.clone();
    let mut probe_tick = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = probe_tick.tick() => {
                let status = backend_status(proxy, readiness);
                daemon.lifecycle.status(&status);
            }
            reload = daemon.reloads.recv() => {
                let Some(reload) = reload else { continue };
                match proxy.reload(reload.config.clone()).await {
                    Ok(summary) => {
                        tracing::info!(%summary, "configuration reloaded");
                        reload.done(Ok(()));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reload refused; keeping the previous configuration");
                        reload.done(Err(e.to_string()));
                    }
                }
            }
        }
    }
}

/// One check per backend of the start-up configuration (the auth database and every
/// shard): READY waits until each accepts a connection.
fn backend_checks(proxy: &Arc<Proxy>) -> Checks {
    let mut checks = Checks::new();
    for pool in proxy.topology().all_pools() {
        let (proxy, name) = (proxy.clone(), pool.name.clone());
        checks = checks.add(&pool.name.clone(), move || {
            let (proxy, name) = (proxy.clone(), name.clone());
            async move {
                let Some(pool) = proxy
                    .topology()
                    .pool_by_name(&name)
                    .cloned()
                    .or_else(|| (name == "auth").then(|| proxy.topology().auth.clone()))
                else {
                    return Ok(());
                };
                let conn = pool.connect().await.map_err(|e| e.to_string())?;
                conn.terminate().await;
                Ok(())
            }
        });
    }
    checks
}

/// Records each current backend's health in `/readyz`; returns a status line.
fn backend_status(proxy: &Proxy, readiness: &Readiness) -> String {
    let topo = proxy.topology();
    let mut down = Vec::new();
    for p in topo.all_pools() {
        let up = p.healthy.load(Ordering::Relaxed);
        readiness.set(
            &p.name,
            if up {
                Ok(())
            } else {
                Err("unreachable".into())
            },
        );
        if !up {
            down.push(p.name.clone());
        }
    }
    if down.is_empty() {
        format!("{} shard(s) up", topo.shards.len())
    } else {
        format!("unavailable: {}", down.join(", "))
    }
}

async fn migrate(daemon: Daemon<ProxyConfig>) -> anyhow::Result<()> {
    let config = &daemon.config;
    let password = match &config.backend.password_file {
        Some(f) => Some(taskflow_kit::secrets::read_secret(f).context("backend.password_file")?),
        None => None,
    };
    // The same TLS (sslmode, CA) as the pools: never plaintext where a URL asks for TLS.
    let security = backend_security(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let connect = |url: String, key: String| {
        let target = BackendTarget::parse(&url).map_err(|m| anyhow::anyhow!("{key}: {m}"));
        let secured = security.get(&url).cloned();
        let user = config.backend.user.clone();
        let password = password.clone();
        async move {
            let target = target?;
            let secured = secured.ok_or_else(|| anyhow::anyhow!("{key}: TLS not resolved"))?;
            taskflow_shard_proxy::backend::client::connect(
                &target,
                &secured,
                &user,
                password.as_deref(),
            )
            .await
            .with_context(|| format!("connecting to {url}"))
        }
    };
    let mut auth = connect(config.auth_database.url.clone(), "auth_database.url".into()).await?;
    let report = taskflow_migrations::apply_auth(&mut auth)
        .await
        .context("migrating the auth database")?;
    println!("auth: {report:?}");
    for (i, shard) in config.shards.iter().enumerate() {
        let mut c = connect(shard.url.clone(), format!("shards[{i}].url")).await?;
        let report = taskflow_migrations::apply_shard(&mut c)
            .await
            .with_context(|| format!("migrating shard {}", shard.name))?;
        println!("{}: {report:?}", shard.name);
    }
    Ok(())
}
