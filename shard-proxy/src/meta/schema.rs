//! The metadata schema `taskflow_meta`, migrated by every proxy at start-up.
//!
//! Why plain versioned SQL here rather than in `migrations/`: the schema belongs to the
//! proxy (its format changes with the proxy's code, not with the application's tables),
//! and each proxy must be able to bring it up to date on its own before serving. The
//! versions run in one transaction under a transaction-level advisory lock, so two proxies
//! starting at once apply each version exactly once, and a re-run changes nothing.

use super::{Meta, MetaError};

/// Advisory-lock key serialising metadata migrations (`"tfmetamg"` in ASCII).
const LOCK_KEY: i64 = 0x7466_6d65_7461_6d67;

/// Every version, in order. Never edit a released one; append.
const VERSIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE taskflow_meta.proxies (
            instance_id text PRIMARY KEY,
            addr text NOT NULL,
            pid integer NOT NULL,
            version text NOT NULL,
            started_at timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE taskflow_meta.decisions (
            txn_id text PRIMARY KEY,
            owner text NOT NULL,
            outcome text NOT NULL CHECK (outcome IN ('commit', 'abort')),
            gids text[] NOT NULL DEFAULT '{}',
            decided_by text NOT NULL,
            decided_at timestamptz NOT NULL DEFAULT now());",
    ),
    (
        2,
        "CREATE TABLE taskflow_meta.ring_epochs (
            epoch bigint PRIMARY KEY,
            shards text[] NOT NULL,
            urls text[] NOT NULL,
            virtual_nodes integer NOT NULL,
            state text NOT NULL CHECK (state IN ('active', 'migrating', 'retired')),
            created_by text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now());",
    ),
    (
        3,
        "CREATE TABLE taskflow_meta.migrations (
            epoch bigint PRIMARY KEY,
            from_epoch bigint NOT NULL,
            change text NOT NULL,
            state text NOT NULL CHECK (state IN ('setup', 'waiting', 'moving', 'paused', 'done', 'failed')),
            owner text,
            owner_seen timestamptz,
            arcs_total integer NOT NULL,
            rows_moved bigint NOT NULL DEFAULT 0,
            rows_total bigint,
            throttle_rows_per_sec integer NOT NULL DEFAULT 0,
            paused_from text,
            pause_p99_ms double precision,
            error text,
            started_at timestamptz NOT NULL DEFAULT now(),
            moving_since timestamptz,
            finished_at timestamptz);
         CREATE TABLE taskflow_meta.migration_arcs (
            epoch bigint NOT NULL,
            arc integer NOT NULL,
            source text NOT NULL,
            dest text NOT NULL,
            rows bigint NOT NULL,
            pause_ms double precision NOT NULL,
            moved_by text NOT NULL,
            moved_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (epoch, arc));
         ALTER TABLE taskflow_meta.proxies ADD COLUMN ring_view bigint NOT NULL DEFAULT 0;",
    ),
];

/// Brings `taskflow_meta` up to date; returns the versions this call applied.
pub async fn migrate(meta: &Meta) -> Result<Vec<i32>, MetaError> {
    let mut conn = meta.pool.get().await?;
    let result = migrate_on(conn.conn()).await;
    match &result {
        Ok(_) if conn.conn().status == b'I' => conn.release(),
        Ok(_) => conn.discard(),
        Err(_) => {
            let _ = conn.conn().simple_query("ROLLBACK").await;
            conn.discard();
        }
    }
    result
}

async fn migrate_on(conn: &mut crate::backend::BackendConn) -> Result<Vec<i32>, MetaError> {
    conn.simple_query(&format!(
        "BEGIN; SELECT pg_advisory_xact_lock({LOCK_KEY}); \
         CREATE SCHEMA IF NOT EXISTS taskflow_meta; \
         CREATE TABLE IF NOT EXISTS taskflow_meta.schema_version ( \
            version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    ))
    .await?;
    let rows = conn
        .simple_query("SELECT version FROM taskflow_meta.schema_version")
        .await?
        .rows;
    let done: Vec<i32> = super::first_column(rows)
        .iter()
        .filter_map(|v| v.parse().ok())
        .collect();
    let mut applied = Vec::new();
    for (version, sql) in VERSIONS {
        if done.contains(version) {
            continue;
        }
        conn.simple_query(sql).await?;
        conn.simple_query(&format!(
            "INSERT INTO taskflow_meta.schema_version (version) VALUES ({version})"
        ))
        .await?;
        applied.push(*version);
    }
    conn.simple_query("COMMIT").await?;
    Ok(applied)
}
