//! taskflow-proxy-core: the shard proxy's pure logic — everything that decides *what* to do
//! with a statement, and nothing that does it.
//!
//! - [`ring`]: the consistent-hash ring (xxh64, virtual nodes) that maps a `performer_id`
//!   to a shard.
//! - [`router`]: SQL text → [`router::Analysis`] (statement kind, sharding keys, hint;
//!   cached) → [`router::Plan`] (target shards, per-shard SQL, merge spec).
//! - [`merge`]: combines the rows of a scatter read (ORDER BY/LIMIT/OFFSET, aggregates,
//!   GROUP BY, DISTINCT) with PostgreSQL's own output formats.
//! - [`placement`]: where a key is right now — the ring, or during a migration the two
//!   rings and which moving arcs are moved.
//! - [`reshard`]: what differs between two rings (shards added/removed) and which keys
//!   change owner.
//! - [`oid`]: the PostgreSQL type OIDs the proxy interprets, in one table.
//! - [`sqltext`]: leading-token readers for the statements the proxy keeps itself (`SET`,
//!   SQL-level `PREPARE`/`EXECUTE`, `COPY … FROM STDIN`), where a full parse would cost
//!   throughput on every statement.
//! - [`wire`]: PostgreSQL protocol v3 — the client-message decoder (the proxy's trust
//!   boundary; fuzzed) and the server-message builders.
//!
//! Why a crate of its own: "pure" is a property the compiler can hold. This crate has no
//! async runtime, no sockets and no files in its dependency graph (checked by the
//! workspace's layering test), so it is unit-testable and fuzzable without any server, and
//! the runtime crate (`taskflow-shard-proxy`) is the only place where I/O happens.

pub mod merge;
pub mod oid;
pub mod placement;
pub mod reshard;
pub mod ring;
pub mod router;
pub mod sqltext;
pub mod wire;
