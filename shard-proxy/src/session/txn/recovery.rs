//! Recovery of in-doubt prepared transactions: commit those with a recorded decision,
//! roll back the others (at start-up all of them; later only those prepared over a minute
//! ago, so a commit in flight is never touched).

use std::collections::HashSet;

use super::decision_log;
use crate::backend::{BackendConn, Pool};
use crate::proxy::Proxy;

/// Lists our prepared transactions in a shard's database: (gid, older than a minute).
const LIST_PREPARED: &str = "SELECT gid, (now() - prepared) > interval '60 seconds' \
    FROM pg_prepared_xacts WHERE gid LIKE 'taskflow\\_%' AND database = current_database()";

/// Resolves our prepared transactions on every reachable shard. Returns how many were
/// resolved.
pub async fn resolve_in_doubt(proxy: &Proxy, startup: bool) -> usize {
    let decided = decision_log::decided(&proxy.state_dir);
    let topo = proxy.topology();
    let mut seen = HashSet::new();
    let mut all_reachable = true;
    let mut resolved = 0;
    for pool in &topo.shards {
        match resolve_on(proxy, pool, &decided, startup, &mut seen).await {
            Some(n) => resolved += n,
            None => all_reachable = false,
        }
    }
    if all_reachable {
        // A decision no shard still has prepared is finished everywhere.
        for id in decided.difference(&seen) {
            decision_log::forget(&proxy.state_dir, id);
        }
    }
    resolved
}

/// Resolves one shard; `None` when it cannot be reached or listed.
async fn resolve_on(
    proxy: &Proxy,
    pool: &Pool,
    decided: &HashSet<String>,
    startup: bool,
    seen: &mut HashSet<String>,
) -> Option<usize> {
    let mut conn = pool.connect().await.ok()?;
    let rows = match conn.simple_query(LIST_PREPARED).await {
        Ok(r) => r.rows,
        Err(e) => {
            tracing::warn!(shard = %pool.name, error = %e, "cannot list prepared transactions");
            return None;
        }
    };
    let mut resolved = 0;
    for row in rows {
        let (Some(Some(gid)), old) = (row.first().cloned(), row.get(1).cloned().flatten()) else {
            continue;
        };
        let Some(id) = decision_log::gid_id(&gid).map(str::to_owned) else {
            continue;
        };
        seen.insert(id.clone());
        let action = if decided.contains(&id) {
            "COMMIT"
        } else if startup || old.as_deref() == Some("t") {
            "ROLLBACK"
        } else {
            continue;
        };
        if finish(proxy, &mut conn, &pool.name, &gid, action).await {
            resolved += 1;
        }
    }
    conn.terminate().await;
    Some(resolved)
}

/// `COMMIT PREPARED` or `ROLLBACK PREPARED` one gid; true when it worked.
async fn finish(
    proxy: &Proxy,
    conn: &mut BackendConn,
    shard: &str,
    gid: &str,
    action: &str,
) -> bool {
    match conn
        .simple_query(&format!("{action} PREPARED '{gid}'"))
        .await
    {
        Ok(_) => {
            proxy.metrics.in_doubt_resolved.inc();
            tracing::info!(shard, gid, action, "resolved in-doubt transaction");
            true
        }
        Err(e) => {
            tracing::warn!(shard, gid, error = %e, "cannot resolve in-doubt transaction");
            false
        }
    }
}
