//! Recovery of in-doubt prepared transactions, by any proxy over the same shards.
//!
//! A `commit` decision in `taskflow_meta.decisions` whose owner is gone (or that is over
//! 10 s old) → `COMMIT PREPARED` of all its gids under the commit fence, as a whole
//! ([`finish_commits`], which scatter readers also use). For each other prepared
//! `taskflow_*` transaction on a shard: an `abort` decision → `ROLLBACK PREPARED`; no
//! decision → presume it abandoned (record `abort`, which loses to a
//! concurrent `commit` by the owner, then apply whichever outcome stands) only when its
//! owner is gone: another proxy whose heartbeat expired, or this proxy itself restarted
//! (at start-up any of its own; later only those prepared over a minute ago, so a commit
//! in flight is never touched). A live owner's transactions are left alone. Without the
//! metadata database nothing is resolved (nothing can be decided safely).

use std::collections::{HashMap, HashSet};

use super::gid;
use crate::backend::{BackendConn, BackendError, Pool};
use crate::meta::decisions::{self, Decision, Outcome};
use crate::meta::registry;
use crate::proxy::Proxy;

/// Lists our prepared transactions in a shard's database: (gid, older than a minute).
const LIST_PREPARED: &str = "SELECT gid, (now() - prepared) > interval '60 seconds' \
    FROM pg_prepared_xacts WHERE gid LIKE 'taskflow\\_%' AND database = current_database()";

/// What recovery does with one prepared transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Rollback,
    PresumeAbort,
    Leave,
}

/// What one pass knows: decisions (read before any shard was listed) and live proxies.
struct Pass<'a> {
    proxy: &'a Proxy,
    decided: HashMap<String, Decision>,
    live: HashSet<String>,
    startup: bool,
}

/// Resolves our prepared transactions on every reachable shard. Returns how many were
/// resolved.
pub async fn resolve_in_doubt(proxy: &Proxy, startup: bool) -> usize {
    let meta = &proxy.meta;
    let known = async {
        Ok::<_, crate::meta::MetaError>((decisions::all(meta).await?, registry::live(meta).await?))
    };
    let (decided, live) = match known.await {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %e, "2PC recovery skipped: the metadata database is unavailable");
            return 0;
        }
    };
    // Commits decided by a proxy that is gone (or long ago) are finished as a whole,
    // under the commit fence; the per-shard pass below leaves them alone.
    let stale: HashMap<String, Decision> = decided
        .iter()
        .filter(|(_, d)| {
            d.outcome == Outcome::Commit
                && (!live.contains(&d.owner)
                    || d.age_secs > COMMIT_STALE_SECS
                    || (startup && d.owner == meta.instance))
        })
        .map(|(id, d)| (id.clone(), d.clone()))
        .collect();
    let mut resolved = finish_commits(proxy, stale).await;
    let pass = Pass {
        proxy,
        decided,
        live,
        startup,
    };
    let topo = proxy.topology();
    let mut seen = HashSet::new();
    let mut all_reachable = true;
    for pool in &topo.shards {
        match resolve_on(&pass, pool, &mut seen).await {
            Some(n) => resolved += n,
            None => all_reachable = false,
        }
    }
    if all_reachable {
        if let Err(e) = decisions::prune(meta, &pass.decided, &seen).await {
            tracing::debug!(error = %e, "cannot prune finished 2PC decisions yet");
        }
    }
    resolved
}

/// Moves commit decisions an earlier version kept as files (`state_dir/2pc/<id>.commit`,
/// one gid a line) into `taskflow_meta.decisions`, so an upgrade never rolls back a
/// transaction that version had decided to commit. Returns how many it moved.
pub async fn import_legacy_decisions(proxy: &Proxy) -> Result<usize, crate::meta::MetaError> {
    let dir = proxy.state_dir.join("2pc");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(0);
    };
    let mut moved = 0;
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".commit"))
            .map(str::to_owned)
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let gids: Vec<String> = text.lines().map(str::to_owned).collect();
        decisions::decide_commit(&proxy.meta, &id, &gids).await?;
        let _ = std::fs::remove_file(&path);
        moved += 1;
    }
    Ok(moved)
}

/// A commit decision older than this is finished by recovery even if its owner lives.
const COMMIT_STALE_SECS: i64 = 10;

/// Finishes commit decisions: every gid `COMMIT PREPARED` (one already gone counts as
/// done), all under the exclusive commit fence; a decision whose gids all committed is
/// deleted as the fence is released. Returns how many gids it committed. Used by
/// recovery and by scatter readers that find a commit possibly half applied.
pub async fn finish_commits(proxy: &Proxy, pending: HashMap<String, Decision>) -> usize {
    if pending.is_empty() {
        return 0;
    }
    let mut fence = proxy.commit_fence.exclusive().await;
    let mut done = Vec::new();
    let mut committed = 0;
    for (id, d) in pending {
        let (n, all) = commit_gids(proxy, &d.gids).await;
        committed += n;
        if all {
            done.push(id);
        }
    }
    if !done.is_empty() {
        let sql = format!(
            "DELETE FROM taskflow_meta.decisions WHERE outcome = 'commit' AND txn_id = ANY({})",
            crate::meta::text_array(&done)
        );
        if !fence.release_with(sql.clone()) {
            if let Err(e) = proxy.meta.query(&sql).await {
                tracing::debug!(error = %e, "cannot forget finished 2PC decisions yet");
            }
        }
    }
    committed
}

/// `COMMIT PREPARED` each gid on the shard it names; (committed now, all done).
async fn commit_gids(proxy: &Proxy, gids: &[String]) -> (usize, bool) {
    let topo = proxy.topology();
    let (mut committed, mut all) = (0, true);
    for g in gids {
        let shard = gid::shard_of(g).unwrap_or_default();
        let Some(pool) = topo.pool_by_name(shard) else {
            tracing::warn!(gid = %g, "a commit decision names a shard that is not configured");
            all = false;
            continue;
        };
        // A connection of its own: this runs under the exclusive fence, and a reader
        // waiting for the fence may hold the pool's last connection.
        let Ok(mut conn) = pool.connect().await else {
            all = false;
            continue;
        };
        let result = conn.simple_query(&format!("COMMIT PREPARED '{g}'")).await;
        conn.terminate().await;
        match result {
            Ok(_) => {
                committed += 1;
                proxy.metrics.in_doubt_resolved.inc();
                tracing::info!(shard, gid = %g, "finished a decided commit");
            }
            Err(BackendError::Server(e)) if e.code == super::two_phase::UNDEFINED_OBJECT => {}
            Err(e) => {
                all = false;
                tracing::warn!(shard, gid = %g, error = %e, "cannot finish a decided commit yet");
            }
        }
    }
    (committed, all)
}

/// Resolves one shard; `None` when it cannot be reached or listed.
async fn resolve_on(pass: &Pass<'_>, pool: &Pool, seen: &mut HashSet<String>) -> Option<usize> {
    let (mut conn, rows) = list_prepared(pool).await?;
    let mut resolved = 0;
    for row in rows {
        let (Some(Some(g)), old) = (row.first().cloned(), row.get(1).cloned().flatten()) else {
            continue;
        };
        let Some(parsed) = gid::parse(&g) else {
            continue;
        };
        seen.insert(parsed.id.to_owned());
        let old = old.as_deref() == Some("t");
        let mut action = choose(pass, parsed, old);
        if action == Action::PresumeAbort {
            let owner = parsed.owner.unwrap_or(&pass.proxy.meta.instance);
            action = match decisions::presume_abort(&pass.proxy.meta, parsed.id, owner).await {
                // The owner decided first: finished as a whole by a later pass.
                Ok(Outcome::Commit) => Action::Leave,
                Ok(Outcome::Abort) => Action::Rollback,
                Err(e) => {
                    tracing::warn!(gid = %g, error = %e, "cannot record an abort decision");
                    Action::Leave
                }
            };
        }
        if action != Action::Rollback {
            continue;
        }
        if finish(pass.proxy, &mut conn, &pool.name, &g, "ROLLBACK").await {
            resolved += 1;
        }
    }
    pool.keep_upkeep(conn).await;
    Some(resolved)
}

/// The shard's prepared transactions, listed on its maintenance connection (kept between
/// passes); `None` when the shard cannot be reached or listed. A kept connection the
/// server has closed since (a restart, an idle timeout) is replaced once, so such a pass
/// does not count the shard as unreachable.
async fn list_prepared(pool: &Pool) -> Option<(Box<BackendConn>, Vec<Vec<Option<String>>>)> {
    let (mut conn, kept) = pool.upkeep_conn().await.ok()?;
    let mut result = conn.simple_query(LIST_PREPARED).await;
    if kept && matches!(result, Err(ref e) if !matches!(e, BackendError::Server(_))) {
        conn = Box::new(pool.connect().await.ok()?);
        result = conn.simple_query(LIST_PREPARED).await;
    }
    match result {
        Ok(r) => Some((conn, r.rows)),
        Err(e) => {
            tracing::warn!(shard = %pool.name, error = %e, "cannot list prepared transactions");
            None
        }
    }
}

/// The action for one prepared transaction (see the module documentation).
fn choose(pass: &Pass<'_>, parsed: gid::Parsed<'_>, old: bool) -> Action {
    decide(
        pass.decided.get(parsed.id).map(|d| d.outcome),
        parsed.owner,
        &pass.proxy.meta.instance,
        &pass.live,
        pass.startup || old,
    )
}

fn decide(
    decided: Option<Outcome>,
    owner: Option<&str>,
    me: &str,
    live: &HashSet<String>,
    own_abandoned: bool,
) -> Action {
    match (decided, owner) {
        // Finished as a whole by `finish_commits`, never one shard at a time.
        (Some(Outcome::Commit), _) => Action::Leave,
        (Some(Outcome::Abort), _) => Action::Rollback,
        (None, Some(o)) if o != me && !live.contains(o) => Action::PresumeAbort,
        (None, Some(o)) if o != me => Action::Leave,
        (None, _) if own_abandoned => Action::PresumeAbort,
        (None, _) => Action::Leave,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_abandoned_transactions_are_presumed_aborted() {
        let live: HashSet<String> = ["me".into(), "other".into()].into();
        let d = |decided, owner, abandoned| decide(decided, owner, "me", &live, abandoned);
        assert_eq!(
            d(Some(Outcome::Commit), Some("dead"), false),
            Action::Leave,
            "finished as a whole"
        );
        assert_eq!(
            d(Some(Outcome::Abort), Some("other"), false),
            Action::Rollback
        );
        assert_eq!(
            d(None, Some("other"), true),
            Action::Leave,
            "a live owner decides"
        );
        assert_eq!(d(None, Some("dead"), false), Action::PresumeAbort);
        assert_eq!(d(None, Some("me"), false), Action::Leave, "maybe in flight");
        assert_eq!(d(None, Some("me"), true), Action::PresumeAbort);
        assert_eq!(d(None, None, true), Action::PresumeAbort, "legacy gid");
        assert_eq!(d(None, None, false), Action::Leave);
    }
}
