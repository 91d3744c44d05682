//! taskflow-devstack: the whole TaskFlow stack on loopback, for development.
//!
//! `dev` runs it in the foreground (prefixed logs, Ctrl-C stops everything); `up` runs the
//! same supervisor in the background; `down`, `status`, `logs`, `db-reset` act on it through
//! the state directory; `add-shard` and `remove-shard` grow and shrink its ring by a spare
//! shard through the supervisor's control socket and the proxy's admin console. Infrastructure processes come from `taskflow-localstack`, the same
//! code the integration tests use, so the stack and the tests cannot drift apart.
//!
//! Lessons from other local-stack tools' users: one supervisor owns every process and stops
//! them all on exit (no ghost postgres), a lock file stops a second stack from sharing the
//! state directory, init steps are idempotent (migrations), and every port can be moved.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod channel;
mod control;
mod daemons;
mod layout;
mod logs;
mod progress;
mod reshard;
mod restart;
mod shards;
mod stored;
mod supervisor;

/// Run the TaskFlow stack locally.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start everything in the foreground, stream prefixed logs, stop all on Ctrl-C.
    Dev,
    /// Start everything in the background and return once every daemon is READY.
    Up,
    /// Stop a background stack and wait until no process of it is left.
    Down,
    /// `down` then `up`.
    Restart,
    /// Show each service, its port and whether it answers.
    Status,
    /// Follow the logs of every service, prefixed by service name.
    Logs {
        /// Print what is there and exit instead of following.
        #[arg(long)]
        no_follow: bool,
    },
    /// Delete all databases and Redis data (the stack must be down).
    DbReset,
    /// Start a fifth PostgreSQL (port 5437), add it to the running stack's ring as
    /// shard-4 and show the proxy's move of rows onto it until done.
    AddShard,
    /// Move shard-4's rows back onto the other shards, then stop its PostgreSQL.
    RemoveShard,
    /// The supervisor `up` starts in the background (not for direct use).
    #[command(hide = true)]
    DevBackground,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let layout = layout::Layout::from_env();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("devstack: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Dev => supervisor::run(&layout, supervisor::Mode::Foreground).await,
            Command::Up => control::up(&layout).await,
            Command::Down => control::down(&layout).await,
            Command::Restart => {
                control::down(&layout).await?;
                control::up(&layout).await
            }
            Command::Status => control::status(&layout).await,
            Command::Logs { no_follow } => logs::follow(&layout, !no_follow).await,
            Command::DbReset => control::db_reset(&layout),
            Command::AddShard => reshard::add(&layout).await,
            Command::RemoveShard => reshard::remove(&layout).await,
            Command::DevBackground => supervisor::run(&layout, supervisor::Mode::Background).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devstack: {e:#}");
            ExitCode::FAILURE
        }
    }
}
