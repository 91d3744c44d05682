//! [`run`]: the one function a daemon's `main` calls.
//!
//! Order of events: parse arguments → load and validate configuration (exit 78 naming the
//! key on error) → init logging → start the watchdog pinger and signal handling → run the
//! daemon's future, which calls [`Lifecycle::ready`] once it listens and its dependencies
//! answer → on SIGTERM/SIGINT send `STOPPING=1`, cancel the shutdown token and give the
//! future `shutdown_grace_secs` to finish.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::config::{self, DaemonConfig};
use crate::lifecycle::{Daemon, Lifecycle, Reload};
use crate::systemd::Notifier;
use crate::telemetry;

/// `EX_CONFIG` from sysexits(3): the configuration is wrong; restarting will not help.
pub const EXIT_CONFIG: u8 = 78;

/// How long a daemon may take to apply a reloaded configuration.
const RELOAD_ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Arguments every daemon accepts; `#[command(flatten)]` them into a daemon's own parser.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// TOML configuration file; `TASKFLOW_*` environment variables override it.
    #[arg(long, short = 'c', env = "TASKFLOW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Load and validate the configuration, print it, and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// Runs a daemon to completion and returns its exit code.
pub fn run<C, F, Fut>(name: &'static str, args: DaemonArgs, main: F) -> ExitCode
where
    C: DaemonConfig,
    F: FnOnce(Daemon<C>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let cfg: C = match config::load(args.config.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check_config {
        match toml::to_string_pretty(&cfg) {
            Ok(text) => {
                println!("# {name}: configuration is valid\n{text}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("{name}: configuration valid but not printable: {e}");
                return ExitCode::SUCCESS;
            }
        }
    }
    if let Err(e) = cfg.check_secrets() {
        eprintln!("{name}: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    telemetry::init(name, &cfg.common().log);

    let mut builder = match cfg.common().worker_threads {
        // One thread: the current-thread scheduler, without the work-stealing machinery
        // (run queues shared between workers, waking an idle worker) it would not use.
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().thread_name(name);
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(supervise(name, args.config, cfg, main))
}

async fn supervise<C, F, Fut>(
    name: &'static str,
    config_path: Option<PathBuf>,
    cfg: C,
    main: F,
) -> ExitCode
where
    C: DaemonConfig,
    F: FnOnce(Daemon<C>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let notifier = Notifier::new();
    let lifecycle = Lifecycle::new(notifier.clone(), cfg.common().shutdown_grace());
    notifier.status("starting");

    if let Some(every) = notifier.watchdog_interval() {
        let n = notifier.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                n.watchdog();
            }
        });
    }

    let (reload_tx, reload_rx) = mpsc::channel(1);
    if let Err(e) = spawn_signal_handler::<C>(
        name,
        config_path.clone(),
        lifecycle.clone(),
        notifier.clone(),
        reload_tx,
    ) {
        tracing::error!(error = %e, "cannot install signal handlers");
        return ExitCode::FAILURE;
    }

    let daemon = Daemon {
        name,
        config: Arc::new(cfg),
        config_path,
        lifecycle: lifecycle.clone(),
        reloads: reload_rx,
    };
    let fut = main(daemon);
    tokio::pin!(fut);

    let result = tokio::select! {
        r = &mut fut => r,
        () = lifecycle.shutdown.cancelled() => {
            match tokio::time::timeout(lifecycle.grace, &mut fut).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(grace_secs = lifecycle.grace.as_secs(), "drain did not finish in time; exiting");
                    Ok(())
                }
            }
        }
    };
    // Everything queued (STOPPING=1 above all) is sent before the process exits.
    let flusher = notifier.clone();
    let _ =
        tokio::task::spawn_blocking(move || flusher.flush(std::time::Duration::from_secs(1))).await;
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "fatal");
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn spawn_signal_handler<C: DaemonConfig>(
    name: &'static str,
    config_path: Option<PathBuf>,
    lifecycle: Lifecycle,
    notifier: Notifier,
    reload_tx: mpsc::Sender<Reload<C>>,
) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => reload(name, config_path.as_deref(), &notifier, &reload_tx).await,
            }
        }
        tracing::info!("shutdown requested");
        notifier.stopping();
        lifecycle.shutdown.cancel();
    });
    Ok(())
}

async fn reload<C: DaemonConfig>(
    name: &str,
    path: Option<&std::path::Path>,
    notifier: &Notifier,
    tx: &mpsc::Sender<Reload<C>>,
) {
    notifier.reloading();
    tracing::info!("reloading configuration");
    let loaded = config::load::<C>(path).and_then(|cfg| cfg.check_secrets().map(|()| cfg));
    let outcome = match loaded {
        Err(e) => Err(e.to_string()),
        Ok(cfg) if tx.is_closed() => {
            drop(cfg);
            Ok(())
        }
        Ok(cfg) => {
            let (done, rx) = oneshot::channel();
            if tx.send(Reload { config: cfg, done }).await.is_err() {
                Ok(())
            } else {
                // A daemon that keeps the receiver but never looks at it must not wedge
                // the service manager in "reloading" forever.
                match tokio::time::timeout(RELOAD_ACK_TIMEOUT, rx).await {
                    Ok(r) => r.unwrap_or(Ok(())),
                    Err(_) => Err(format!(
                        "the daemon did not apply the new configuration within {} s",
                        RELOAD_ACK_TIMEOUT.as_secs()
                    )),
                }
            }
        }
    };
    match outcome {
        Ok(()) => {
            tracing::info!("configuration reloaded");
            notifier.ready(&format!("{name}: configuration reloaded"));
        }
        Err(e) => {
            tracing::error!(error = %e, "reload failed; keeping the previous configuration");
            notifier.ready(&format!("reload failed: {e}"));
        }
    }
}
