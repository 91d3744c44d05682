//! taskflow-notify: consumes `task_events`, emails each recipient over SMTP and publishes
//! `notify_events` for the gateway's WebSocket clients.
//!
//! This binary wires the kit (configuration, logging, systemd lifecycle) to [`daemon`].

use std::process::ExitCode;

use clap::Parser;

mod config;
mod daemon;
mod directory;
mod lanes;
mod mailer;
mod metrics;
mod pipeline;

/// TaskFlow notify daemon.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    daemon: taskflow_kit::DaemonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    taskflow_kit::run("taskflow-notify", args.daemon, daemon::run)
}
