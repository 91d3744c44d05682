//! One batch of a migration: the rows of some moving arcs go from their source shard to
//! their destination in one two-phase commit, together with the arcs' ownership.
//!
//! On the source, the batch first locks its arcs' `taskflow_moves` rows exclusively
//! (waiting at most `reshard.write_pause_ms` for guarded statements to finish); from then
//! on every guarded statement on those arcs waits — that wait is the write pause, measured
//! here until the commit. Under the lock it takes the keys present on the source in the
//! batch's arcs: those the mover's survey listed ([`KnownKeys`]), plus the keys of rows
//! written since the survey began (row `xmin` no older than the oldest transaction the
//! survey could have missed) — a cheap scan instead of a full key listing per batch, and
//! exact, because the lock keeps any further write out of the arcs. It copies their rows
//! to the destination (binary COPY streamed server to server,
//! serial columns renumbered by the destination), deletes them at the source, and flips
//! the arcs to `gone` (source) and `owned` (destination). Both sides commit through the
//! proxy's 2PC: the decision is recorded before any `COMMIT PREPARED`, under the commit
//! fence, so scatter readers see the batch on one side or the other, never both or
//! neither, and a proxy that dies mid-way leaves a decision any proxy finishes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{copy, BackendError, Pooled};
use crate::proxy::{Proxy, Topology};
use crate::session::{txn, Txn};
use proxy_core::placement::Moving;
use proxy_core::ring::Ring;

/// Consecutive pending arcs with one source and one destination (union shard indexes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub arcs: Vec<u32>,
    pub source: usize,
    pub dest: usize,
}

/// The keys a batch starts from: what the mover's survey of the source found in the
/// batch's arcs, and where that survey's view ended.
#[derive(Debug, Clone, Default)]
pub struct KnownKeys {
    pub keys: Vec<i64>,
    /// The oldest transaction id (32-bit, as `xmin`) that was running when the survey
    /// took its snapshot: rows from it or younger may be missing from `keys`. `None`:
    /// no survey, every row's key is listed.
    pub since_xid: Option<u32>,
}

/// What a committed batch moved.
#[derive(Debug, Clone, Copy)]
pub struct Moved {
    pub rows: u64,
    /// From the lock on the arcs to the end of the commit.
    pub pause_ms: f64,
    /// Of the pause: listing the source's keys, copying and deleting the rows, and the
    /// two-phase commit (the debug log shows them per batch).
    pub keys_ms: f64,
    pub copy_ms: f64,
    pub commit_ms: f64,
}

/// Why a batch did not commit (nothing of it is applied).
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("shard {shard}: {message}")]
    Shard { shard: String, message: String },
    #[error("{0}")]
    Commit(String),
    #[error("the proxy does not route by migration {0} (yet)")]
    NotMoving(i64),
}

/// A sharded table as the batch copies it.
#[derive(Debug, Clone)]
pub struct TableCopy {
    pub name: String,
    /// Columns copied (serial columns are left to the destination's sequence).
    pub columns: Vec<String>,
    /// Serial columns, the copy's order (the rows keep their relative order).
    pub order_by: Vec<String>,
}

/// Reads each sharded table's columns at `conn` (in `tables` order).
pub async fn describe_tables(
    conn: &mut Pooled,
    tables: &[String],
) -> Result<Vec<TableCopy>, BackendError> {
    let list: Vec<String> = tables.iter().map(|t| literal(t)).collect();
    let rows = conn
        .conn()
        .simple_query(&format!(
            "SELECT table_name, column_name, (coalesce(column_default, '') LIKE 'nextval(%')::text \
             FROM information_schema.columns WHERE table_schema = current_schema() \
             AND table_name IN ({}) ORDER BY table_name, ordinal_position",
            list.join(", ")
        ))
        .await?
        .rows;
    let mut out: Vec<TableCopy> = tables
        .iter()
        .map(|t| TableCopy {
            name: t.clone(),
            columns: Vec::new(),
            order_by: Vec::new(),
        })
        .collect();
    for row in rows {
        let mut it = row.into_iter().map(Option::unwrap_or_default);
        let (Some(table), Some(column), Some(serial)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if let Some(t) = out.iter_mut().find(|t| t.name == table) {
            if serial == "true" {
                t.order_by.push(column);
            } else {
                t.columns.push(column);
            }
        }
    }
    Ok(out)
}

/// Moves `batch` of migration `epoch`; nothing is applied unless it returns `Ok`.
pub async fn run(
    proxy: &Proxy,
    topo: &Arc<Topology>,
    batch: &Batch,
    key_column: &str,
    tables: &[TableCopy],
    known: &KnownKeys,
) -> Result<Moved, BatchError> {
    let moving = topo.placement.migration().ok_or(BatchError::NotMoving(0))?;
    let epoch = moving.epoch;
    let wait_ms = proxy.config().reshard.write_pause_ms;
    let mut src = take(topo, batch.source).await?;
    let mut dst = take(topo, batch.dest).await?;
    let arcs = int_array(&batch.arcs);
    let lock = |state: &str| {
        format!(
            "BEGIN; SET LOCAL lock_timeout = '{wait_ms}ms'; \
             SELECT count(*)::text FROM (SELECT 1 FROM taskflow_moves WHERE epoch = {epoch} \
             AND arc = ANY({arcs}) AND state = '{state}' FOR UPDATE) s"
        )
    };
    let source_name = topo.shards[batch.source].name.clone();
    let dest_name = topo.shards[batch.dest].name.clone();
    let result = async {
        expect_count(&mut src, &lock("owned"), batch.arcs.len(), &source_name).await?;
        let locked = Instant::now();
        let recent =
            keys_since(&mut src, tables, key_column, known.since_xid, &source_name).await?;
        let listed = Instant::now();
        let keys = keys_in_arcs(
            moving,
            &batch.arcs,
            known.keys.iter().copied().chain(recent),
        );
        expect_count(&mut dst, &lock("incoming"), batch.arcs.len(), &dest_name).await?;
        let rows = copy_rows(
            &mut src,
            &mut dst,
            tables,
            key_column,
            &keys,
            (&source_name, &dest_name),
        )
        .await?;
        let flip = |state: &str| {
            format!("UPDATE taskflow_moves SET state = '{state}' WHERE epoch = {epoch} AND arc = ANY({arcs})")
        };
        sql(&mut src, &flip("gone"), &source_name).await?;
        sql(&mut dst, &flip("owned"), &dest_name).await?;
        Ok::<_, BatchError>((rows, locked, listed))
    };
    let (rows, locked, listed) = match result.await {
        Ok(r) => r,
        Err(e) => {
            txn::rollback_conns([(batch.source, src), (batch.dest, dst)]).await;
            return Err(e);
        }
    };
    let copied = Instant::now();
    let mut t = Txn::implicit(topo.clone());
    t.conns = BTreeMap::from([(batch.source, src), (batch.dest, dst)]);
    t.writes = BTreeSet::from([batch.source, batch.dest]);
    txn::commit_across_shards(proxy, t)
        .await
        .map_err(|e| BatchError::Commit(e.to_string()))?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    Ok(Moved {
        rows,
        pause_ms: ms(locked.elapsed()),
        keys_ms: ms(listed - locked),
        copy_ms: ms(copied - listed),
        commit_ms: ms(copied.elapsed()),
    })
}

/// The distinct keys among `candidates` that hash into one of `arcs`.
fn keys_in_arcs(moving: &Moving, arcs: &[u32], candidates: impl Iterator<Item = i64>) -> Vec<i64> {
    candidates
        .filter(|k| {
            moving
                .arc_of_hash(Ring::key_hash(*k))
                .is_some_and(|a| arcs.contains(&a))
        })
        .collect::<BTreeSet<i64>>()
        .into_iter()
        .collect()
}

async fn take(topo: &Topology, shard: usize) -> Result<Pooled, BatchError> {
    let pool = topo.shards.get(shard).ok_or_else(|| BatchError::Shard {
        shard: format!("#{shard}"),
        message: "not in the topology".into(),
    })?;
    pool.get().await.map_err(|e| BatchError::Shard {
        shard: pool.name.clone(),
        message: e.to_string(),
    })
}

async fn sql(
    conn: &mut Pooled,
    q: &str,
    shard: &str,
) -> Result<crate::backend::conn::SimpleResult, BatchError> {
    conn.conn()
        .simple_query(q)
        .await
        .map_err(|e| BatchError::Shard {
            shard: shard.to_owned(),
            message: e.to_string(),
        })
}

/// Runs `q` (its last row's first column a count) and checks the count.
async fn expect_count(
    conn: &mut Pooled,
    q: &str,
    want: usize,
    shard: &str,
) -> Result<(), BatchError> {
    let r = sql(conn, q, shard).await?;
    let got = r
        .rows
        .last()
        .and_then(|row| row.first().cloned().flatten())
        .and_then(|v| v.parse::<usize>().ok());
    if got == Some(want) {
        Ok(())
    } else {
        Err(BatchError::Shard {
            shard: shard.to_owned(),
            message: format!(
                "{} of the batch's {want} arcs are in the expected state (moved by another proxy, or not set up)",
                got.unwrap_or(0)
            ),
        })
    }
}

/// One source's keys with their rows over all sharded tables, and the oldest transaction
/// the listing may not have seen (taken *before* the listing's snapshot, so it is no
/// younger than that snapshot's own oldest running transaction).
pub async fn survey(
    conn: &mut Pooled,
    tables: &[TableCopy],
    key_column: &str,
) -> Result<(u32, Vec<(i64, u64)>), BackendError> {
    let since = conn
        .conn()
        .simple_query("SELECT (txid_snapshot_xmin(txid_current_snapshot()) % 4294967296)::text")
        .await?
        .rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| BackendError::Protocol("no snapshot xmin".into()))?;
    let counts = tables
        .iter()
        .map(|t| {
            format!(
                "SELECT {k} AS k, count(*) AS n FROM {} GROUP BY 1",
                ident(&t.name),
                k = ident(key_column)
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let rows = conn
        .conn()
        .simple_query(&format!(
            "SELECT k::text, sum(n)::text FROM ({counts}) s GROUP BY 1"
        ))
        .await?
        .rows;
    let keys = rows
        .into_iter()
        .filter_map(|row| {
            let mut it = row
                .into_iter()
                .map(|v| v.and_then(|v| v.parse::<i64>().ok()));
            match (it.next(), it.next()) {
                (Some(Some(k)), Some(Some(n))) => Some((k, n.max(0) as u64)),
                _ => None,
            }
        })
        .collect();
    Ok((since, keys))
}

/// The distinct keys of rows written by transaction `since_xid` or younger, over all
/// sharded tables (a sequential scan comparing `xmin`; wrap-around safe through `age`:
/// a frozen row whose old id looks young again is merely listed once more).
async fn keys_since(
    conn: &mut Pooled,
    tables: &[TableCopy],
    key_column: &str,
    since_xid: Option<u32>,
    shard: &str,
) -> Result<Vec<i64>, BatchError> {
    let since = since_xid
        .map(|x| format!(" WHERE age(xmin) <= age('{x}'::xid)"))
        .unwrap_or_default();
    let q = tables
        .iter()
        .map(|t| {
            format!(
                "SELECT {} FROM {}{since}",
                ident(key_column),
                ident(&t.name)
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ");
    let r = sql(conn, &q, shard).await?;
    Ok(r.rows
        .into_iter()
        .filter_map(|row| row.into_iter().next().flatten())
        .filter_map(|v| v.parse().ok())
        .collect())
}

/// Copies the rows of `keys` table by table (in order), then deletes them at the source
/// (in reverse order, so references go first). Returns the rows moved.
async fn copy_rows(
    src: &mut Pooled,
    dst: &mut Pooled,
    tables: &[TableCopy],
    key_column: &str,
    keys: &[i64],
    names: (&str, &str),
) -> Result<u64, BatchError> {
    if keys.is_empty() {
        return Ok(0);
    }
    let key_list = format!(
        "ARRAY[{}]::bigint[]",
        keys.iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut moved = 0u64;
    for t in tables {
        moved += copy_table(src, dst, t, key_column, &key_list, names).await?;
    }
    for t in tables.iter().rev() {
        sql(
            src,
            &format!(
                "DELETE FROM {} WHERE {} = ANY({key_list})",
                ident(&t.name),
                ident(key_column)
            ),
            names.0,
        )
        .await?;
    }
    Ok(moved)
}

/// One table's rows of the batch's keys, copied to the destination. The copy's SELECT
/// locks each row it reads (`FOR UPDATE`): a writer that does not go through the guard —
/// the outbox relay stamping `sent_at` with a shard hint — finishes first, and the copy
/// reads the row as that writer left it.
async fn copy_table(
    src: &mut Pooled,
    dst: &mut Pooled,
    t: &TableCopy,
    key_column: &str,
    key_list: &str,
    (source, dest): (&str, &str),
) -> Result<u64, BatchError> {
    let (table, key) = (ident(&t.name), ident(key_column));
    let cols = t
        .columns
        .iter()
        .map(|c| ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let order = if t.order_by.is_empty() {
        String::new()
    } else {
        let by: Vec<String> = t
            .order_by
            .iter()
            .map(|c| format!("x.{}", ident(c)))
            .collect();
        format!(" ORDER BY {}", by.join(", "))
    };
    let copy_out = format!(
        "COPY (SELECT {cols} FROM {table} x WHERE x.{key} = ANY({key_list}){order} FOR UPDATE) \
         TO STDOUT (FORMAT binary)"
    );
    let copy_in = format!("COPY {table} ({cols}) FROM STDIN (FORMAT binary)");
    copy::copy_between(src.conn(), &copy_out, dst.conn(), &copy_in)
        .await
        .map_err(|e| BatchError::Shard {
            shard: format!("{source} → {dest}"),
            message: format!("copying {}: {e}", t.name),
        })
}

/// An SQL identifier.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// An SQL string literal (standard_conforming_strings).
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn int_array(v: &[u32]) -> String {
    format!(
        "ARRAY[{}]::integer[]",
        v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
    )
}
