//! taskflow-auth: registers users, checks passwords (bcrypt) and issues EdDSA-signed JWTs.
//!
//! Started through the daemon kit: configuration (exit 78 naming a bad key), logging,
//! systemd readiness and graceful drain come from there. This file wires the pieces:
//! wait for the `auth` database, compute the dummy hash used to equalise login timing,
//! bind the ops listener (`/metrics`, `/readyz`) and the API listener, report READY, keep
//! `/readyz` current, and drain on SIGTERM.
//!
//! `taskflow-auth --generate-keys DIR` writes a fresh Ed25519 key pair
//! (`jwt-private.pem`, `jwt-public.pem`) for development stacks and tests.

// Handlers return `Result<_, Response>` so an early error is the response itself; the
// size of that `Err` is irrelevant next to a network round trip.
#![allow(clippy::result_large_err)]

mod api;
mod config;
mod hashing;
mod keys;
mod users;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use taskflow_kit::deps::Checks;
use taskflow_kit::http::Readiness;
use taskflow_kit::web;
use taskflow_kit::{Daemon, DaemonArgs};

use crate::config::AuthConfig;

#[derive(Parser)]
#[command(name = "taskflow-auth", version, about = "TaskFlow auth daemon")]
struct Cli {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Write a new Ed25519 key pair (jwt-private.pem, jwt-public.pem) into DIR unless one
    /// exists there, then exit.
    #[arg(long, value_name = "DIR")]
    generate_keys: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(dir) = cli.generate_keys {
        return match keys::generate_into(&dir) {
            Ok(true) => {
                println!("wrote {}/jwt-private.pem and jwt-public.pem", dir.display());
                ExitCode::SUCCESS
            }
            Ok(false) => {
                println!("{}/jwt-private.pem exists; left unchanged", dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("taskflow-auth: {e}");
                ExitCode::FAILURE
            }
        };
    }
    taskflow_kit::run("taskflow-auth", cli.daemon, run)
}

/// The user store, once the auth database answers; `None` if shutdown came first.
/// (Waiting before binding: READY must mean "answers requests".)
async fn connect(
    cfg: &AuthConfig,
    lifecycle: &taskflow_kit::Lifecycle,
    readiness: &Readiness,
) -> anyhow::Result<Option<users::Users>> {
    let pool = taskflow_kit::postgres::pool(cfg.pg_config()?, cfg.database_pool_size)
        .context("building the database pool")?;
    let users = users::Users::new(pool);
    // Wait for the database before binding: READY must mean "answers requests".
    let probe = users.clone();
    let checks = Checks::new().add("postgres", move || {
        let users = probe.clone();
        async move { users.ping().await.map_err(|e| e.to_string()) }
    });
    if !checks.wait_ready(readiness, lifecycle).await {
        return Ok(None);
    }
    Ok(Some(users))
}

async fn run(daemon: Daemon<AuthConfig>) -> anyhow::Result<()> {
    let cfg = daemon.config.clone();
    let lifecycle = daemon.lifecycle.clone();
    drop(daemon.reloads);

    // Checked by `check_secrets` before start-up; an error here means the file changed since.
    let keys = keys::SigningKeys::load(&cfg.jwt_private_key_file)
        .map_err(|e| anyhow::anyhow!("jwt_private_key_file: {e}"))?;
    let readiness = Readiness::new();
    let Some(users) = connect(&cfg, &lifecycle, &readiness).await? else {
        return Ok(());
    };

    let cost = cfg.bcrypt_cost;
    let dummy_hash = tokio::task::spawn_blocking(move || {
        let random: [u8; 16] = rand_bytes();
        bcrypt::hash(random, cost)
    })
    .await
    .context("computing the dummy hash")?
    .context("computing the dummy hash")?;

    let mut registry = prometheus_client::registry::Registry::with_prefix("taskflow_auth");
    let metrics = web::HttpMetrics::register(&mut registry);
    let workers = match cfg.bcrypt_workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let app = Arc::new(api::App {
        users: users.clone(),
        keys,
        token_ttl_secs: cfg.token_ttl_secs,
        bcrypt_cost: cfg.bcrypt_cost,
        dummy_hash,
        hashing: hashing::BcryptPool::new(
            workers,
            cfg.bcrypt_queue,
            Duration::from_millis(cfg.bcrypt_queue_timeout_ms),
        ),
        metrics,
    });
    let ops = taskflow_kit::http::serve_ops(
        cfg.ops_listen,
        readiness.clone(),
        Arc::new(registry),
        lifecycle.shutdown.clone(),
    )
    .await
    .with_context(|| format!("binding ops_listen {}", cfg.ops_listen))?;

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;

    // Keep /readyz current.
    {
        let users = users.clone();
        let readiness = readiness.clone();
        let shutdown = lifecycle.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    () = shutdown.cancelled() => break,
                }
                readiness.set("postgres", users.ping().await.map_err(|e| e.to_string()));
            }
        });
    }

    lifecycle.ready(&format!("listening on {addr} (ops on {ops})"));
    let handler = Arc::new(move |req, peer| app.clone().handle(req, peer));
    web::serve(listener, lifecycle.shutdown.clone(), cfg.server, handler).await;
    Ok(())
}

fn rand_bytes() -> [u8; 16] {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 16];
    // On the (never seen) failure the all-zero password is still unguessable by callers,
    // because nobody can register an account whose hash is the dummy one.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b
}
