//! One-phase commit: at most one shard wrote, so a plain `COMMIT` on each is atomic.

use crate::backend::{BackendError, Pooled};
use crate::session::{ExecError, Txn};
use proxy_core::wire::sqlstate;

/// Commits readers first and the (single) writer last: only the writer's outcome matters
/// to the client.
pub(super) async fn commit(t: Txn) -> Result<(), ExecError> {
    let mut conns: Vec<(usize, Pooled)> = t.conns.into_iter().collect();
    conns.sort_by_key(|(s, _)| t.writes.contains(s));
    let mut result = Ok(());
    for (shard, conn) in conns {
        if let Err(e) = commit_one(conn).await {
            if t.writes.contains(&shard) {
                result = Err(e);
            }
        }
    }
    result
}

/// `COMMIT` on one connection; the connection goes back to its pool only if clean.
async fn commit_one(mut conn: Pooled) -> Result<(), ExecError> {
    let name = conn.pool().name.clone();
    match conn.conn().simple_query("COMMIT").await {
        Ok(res) if conn.conn().status == b'I' => {
            conn.release();
            if res.tags.last().map(String::as_str) == Some("ROLLBACK") {
                return Err(ExecError::sql(
                    sqlstate::TRANSACTION_ROLLBACK,
                    format!("transaction rolled back on shard {name}"),
                ));
            }
            Ok(())
        }
        Ok(_) => {
            conn.discard();
            Ok(())
        }
        Err(BackendError::Server(info)) => {
            conn.discard();
            Err(ExecError::sql(
                sqlstate::TRANSACTION_ROLLBACK,
                format!("commit failed on shard {name}: {}", info.message),
            ))
        }
        Err(e) => {
            conn.discard();
            Err(ExecError::Unavailable {
                shard: name,
                message: format!("commit outcome unknown: {e}"),
            })
        }
    }
}
