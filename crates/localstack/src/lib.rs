//! # taskflow-localstack — real infrastructure for tests and the local dev stack
//!
//! This crate's job is to start **real** infrastructure processes — PostgreSQL clusters,
//! Redis, a Kafka-API broker (tansu), an SMTP sink (MailDev, or Mailpit where that is what
//! is installed) — on loopback ports, and to tear them down again, for TaskFlow's integration tests (free ports, temporary
//! directories) and for the local dev stack tool (fixed ports, persistent directories).
//! It also offers a fake systemd `NOTIFY_SOCKET` for testing the daemons' `sd_notify`
//! behaviour, and helpers to find free ports, poll conditions, locate workspace binaries
//! and read a simple query's rows as text.
//!
//! Every component runs in its own process group. Dropping its handle — including
//! during a panic's unwinding — sends the polite stop signal to the whole group, waits
//! briefly, then SIGKILLs whatever is left, and reaps the process: no orphans.
//!
//! ```no_run
//! # async fn demo() -> taskflow_localstack::Result<()> {
//! use taskflow_localstack::{PgCluster, RedisServer};
//! let pg = PgCluster::builder().database("tasks").start().await?;
//! let client = pg.client("tasks").await?;
//! client.query_one("SELECT 1", &[]).await?;
//! let redis = RedisServer::temp().await?;
//! println!("{} {}", pg.url("tasks"), redis.url());
//! # Ok(()) }
//! ```
//!
//! Running as root (this project's machines and CI do), PostgreSQL programs run as the
//! `postgres` system user, which owns the data directories.

mod error;
mod kafka;
mod notify;
mod pg;
mod process;
mod redis_server;
mod shards;
mod smtp;
mod util;

pub use error::{Error, Result};
pub use kafka::{tansu_binary, KafkaBroker, KafkaBrokerBuilder, TANSU_VERSION};
pub use notify::NotifySocket;
pub use pg::{
    text_rows, PgBinaries, PgCluster, PgClusterBuilder, PG_PASSWORD, PG_SUPERUSER, PG_USER,
};
pub use redis_server::{RedisServer, RedisServerBuilder};
pub use shards::{AuthDb, Shards, AUTH_DB, TASKS_DB};
pub use smtp::{
    choose_sink, maildev_binary, mailpit_binary, sink_binary, ReceivedMail, SinkKind, SmtpSink,
    SmtpSinkBuilder, MAILDEV_VERSION,
};
pub use util::{
    binary_path, ephemeral_ports_start, free_port, reserve_port, wait_until, wait_until_some,
    which, LOCALHOST, TEST_PORTS_FROM,
};
