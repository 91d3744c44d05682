//! taskflow-kit: what every TaskFlow daemon shares, written once.
//!
//! - [`config`]: a TOML file plus `TASKFLOW_`-prefixed environment overrides, typed,
//!   validated, with unknown keys refused and every error naming its key;
//! - [`secrets`]: secrets read from files (`$CREDENTIALS_DIRECTORY` first), never inlined;
//! - [`telemetry`]: journald when stdout is the journal, else text or JSON lines;
//! - [`systemd`]: `READY=1`, `STATUS=`, `WATCHDOG=1`, `RELOADING=1`, `STOPPING=1`;
//! - [`lifecycle`]: signals → bounded graceful shutdown and configuration reloads;
//! - [`http`]: `/healthz`, `/readyz` and `/metrics` for daemons without a REST surface;
//! - [`email`]: which email addresses can be mailed (registration and the mailer agree);
//! - [`web`]: serve loop, problem+json, bounded bodies, JSON/query parsing for REST daemons.
//!
//! A daemon's `main` is one call to [`run`]; see its docs for the order of events.

pub mod config;
pub mod deps;
pub mod email;
pub mod http;
pub mod lifecycle;
pub mod postgres;
pub mod secrets;
pub mod systemd;
pub mod telemetry;
pub mod web;

mod runner;

pub use lifecycle::{Daemon, Lifecycle, Reload};
pub use runner::{run, DaemonArgs, EXIT_CONFIG};
