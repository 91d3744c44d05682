//! taskflow-shard-proxy: a PostgreSQL-wire proxy that routes every statement to the shard
//! owning its `performer_id` on a consistent-hash ring, scatters and merges key-less reads,
//! and commits cross-shard writes with two-phase commit.
//!
//! Layering (see ARCHITECTURE.md): `frontend` (client side of the wire) → `router`
//! (what a statement needs) → `backend` (server connections and pools). `ring`, `merge`
//! and `admin` are rooms of their own; `ring` and `router` are pure logic with no I/O.
//! `session` glues them per client; `proxy` holds what all sessions share.

pub mod admin;
pub mod backend;
pub mod config;
pub mod frontend;
pub mod merge;
pub mod metrics;
pub mod proxy;
pub mod ring;
pub mod router;
pub mod server;
pub mod session;
pub mod wire;
