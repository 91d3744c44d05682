//! taskflow-shard-proxy: the runtime of the PostgreSQL-wire shard proxy — sockets, pools,
//! sessions, two-phase commit, the admin console. What to do with each statement is decided
//! by the pure [`proxy_core`] crate (ring, router, merge, wire codecs); this crate does it.
//!
//! Layering (see ARCHITECTURE.md): `server` accepts a connection and hands it to `frontend`
//! (handshake, TLS, authentication), which returns an authenticated client; `server` then
//! dispatches it to a `session` (the `tasks`/`auth` databases) or to `admin`. Sessions use
//! `backend` (server connections and pools) and the shared state in `proxy`.

pub use proxy_core;

pub mod admin;
pub mod backend;
pub mod config;
pub mod frontend;
pub mod meta;
pub mod metrics;
pub mod proxy;
pub mod reshard;
pub mod scram;
pub mod server;
pub mod session;
