//! The backend side: raw connections to PostgreSQL servers and per-shard pools.
//!
//! Why split from the frontend: backends are shared, long-lived and trusted; clients are
//! many, short-lived and untrusted. Everything that knows how to authenticate *to* a
//! server and keep its session state lives here.

pub mod client;
pub mod conn;
pub mod copy;
pub mod pool;

pub use conn::{BackendConn, BackendError};
pub use pool::{Pool, PoolError, Pooled};
