//! Transactions across shards: lazy BEGIN, COMMIT (one-phase when at most one shard
//! wrote, else two-phase), ROLLBACK everywhere, savepoints, and recovery of in-doubt
//! prepared transactions.
//!
//! Why 2PC with a durable decision log: a cross-shard write must commit on all shards or
//! none, even if a shard or the proxy dies half-way. Each shard first `PREPARE
//! TRANSACTION 'taskflow_<uuid>_<shard>'`; only when every shard prepared does the proxy
//! write (and fsync) the decision file `<state_dir>/2pc/<uuid>.commit`, then `COMMIT
//! PREPARED` everywhere. Recovery commits prepared transactions whose decision exists and
//! rolls back the others (at startup all of them; later only those older than a minute, so
//! a commit in flight is never touched).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How long a cross-shard commit waits for running scatter reads before it goes ahead.
const COMMIT_FENCE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

use crate::backend::Pooled;
use crate::proxy::Proxy;
use crate::session::{ExecError, Session, Txn};
use proxy_core::wire::{self, sqlstate};

/// Prefix of every prepared-transaction id the proxy creates.
pub const GID_PREFIX: &str = "taskflow_";

/// Test hook (`TFSP_TEST_2PC_HOOK`): `abort-before-decision`,
/// `abort-after-decision`, or `sleep-after-decision=<ms>`. Used by the crash tests only.
const HOOK_ENV: &str = "TFSP_TEST_2PC_HOOK";

fn hook(stage: &str) -> Option<Duration> {
    let v = std::env::var(HOOK_ENV).ok()?;
    if v == format!("abort-{stage}") {
        tracing::error!(stage, "2PC test hook: aborting the process");
        std::process::abort();
    }
    v.strip_prefix(&format!("sleep-{stage}="))
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
}

pub fn decisions_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("2pc")
}

/// Writes the commit decision durably (file and directory fsync'd).
fn write_decision(state_dir: &Path, id: &str, gids: &[String]) -> std::io::Result<PathBuf> {
    let dir = decisions_dir(state_dir);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!("{id}.tmp"));
    let path = dir.join(format!("{id}.commit"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(gids.join("\n").as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(path)
}

/// The uuid part of one of our gids.
pub fn gid_id(gid: &str) -> Option<&str> {
    let rest = gid.strip_prefix(GID_PREFIX)?;
    let id = rest.get(..32)?;
    if id.bytes().all(|b| b.is_ascii_hexdigit()) && rest.as_bytes().get(32) == Some(&b'_') {
        Some(id)
    } else {
        None
    }
}

impl Session {
    pub fn begin(&mut self, sql: &str) -> Result<(), ExecError> {
        let tag = if proxy_core::sqltext::first_keyword(sql) == "START" {
            "START TRANSACTION"
        } else {
            "BEGIN"
        };
        if self.txn.as_ref().is_some_and(|t| t.explicit) {
            wire::notice(
                &mut self.client.out,
                "WARNING",
                sqlstate::ACTIVE_TRANSACTION,
                "there is already a transaction in progress",
            );
            wire::command_complete(&mut self.client.out, tag);
            return Ok(());
        }
        self.proxy
            .stats
            .transactions
            .fetch_add(1, Ordering::Relaxed);
        self.txn = Some(Txn::explicit(
            sql.trim().trim_end_matches(';').to_owned(),
            self.topo.clone(),
        ));
        wire::command_complete(&mut self.client.out, tag);
        Ok(())
    }

    pub async fn commit(&mut self) -> Result<(), ExecError> {
        let Some(t) = self.txn.take() else {
            wire::notice(
                &mut self.client.out,
                "WARNING",
                sqlstate::NO_ACTIVE_TRANSACTION,
                "there is no transaction in progress",
            );
            wire::command_complete(&mut self.client.out, "COMMIT");
            return Ok(());
        };
        if t.failed {
            rollback_conns(t.conns).await;
            wire::command_complete(&mut self.client.out, "ROLLBACK");
            return Ok(());
        }
        self.finish_commit(t).await?;
        wire::command_complete(&mut self.client.out, "COMMIT");
        Ok(())
    }

    pub async fn rollback_cmd(&mut self, _sql: &str) -> Result<(), ExecError> {
        match self.txn.take() {
            None => {
                wire::notice(
                    &mut self.client.out,
                    "WARNING",
                    sqlstate::NO_ACTIVE_TRANSACTION,
                    "there is no transaction in progress",
                );
            }
            Some(t) => rollback_conns(t.conns).await,
        }
        wire::command_complete(&mut self.client.out, "ROLLBACK");
        Ok(())
    }

    /// Rolls back and forgets the current transaction (after a failure).
    pub async fn abort_txn(&mut self) {
        if let Some(t) = self.txn.take() {
            rollback_conns(t.conns).await;
        }
    }

    /// SAVEPOINT / RELEASE / ROLLBACK TO: sent to every shard in the transaction and
    /// remembered for shards that join later.
    pub async fn savepoint(
        &mut self,
        _raw: Option<bytes::Bytes>,
        sql: &str,
    ) -> Result<(), ExecError> {
        let is_rollback_to = proxy_core::sqltext::first_keyword(sql) == "ROLLBACK";
        let Some(t) = self.txn.as_mut().filter(|t| t.explicit) else {
            return Err(ExecError::sql(
                sqlstate::NO_ACTIVE_TRANSACTION,
                format!(
                    "{} can only be used in transaction blocks",
                    proxy_core::sqltext::first_keyword(sql)
                ),
            ));
        };
        if t.failed && !is_rollback_to {
            return Err(ExecError::sql(
                sqlstate::IN_FAILED_TRANSACTION,
                "current transaction is aborted, commands ignored until end of transaction block",
            ));
        }
        let sql = sql.trim().trim_end_matches(';').to_owned();
        let mut first_error = None;
        let mut tag = None;
        let mut broken = Vec::new();
        for (shard, conn) in t.conns.iter_mut() {
            match conn.conn().simple_query(&sql).await {
                Ok(r) => tag = tag.or(r.tags.last().cloned()),
                Err(crate::backend::BackendError::Server(info)) => {
                    first_error.get_or_insert(info);
                }
                Err(e) => {
                    broken.push(*shard);
                    first_error.get_or_insert(wire::ErrorInfo {
                        severity: "ERROR".into(),
                        code: sqlstate::CONNECTION_FAILURE.into(),
                        message: format!("shard #{shard} is unavailable: {e}"),
                    });
                }
            }
        }
        for s in broken {
            if let Some(c) = t.conns.remove(&s) {
                c.discard();
            }
        }
        t.savepoints.push(sql.clone());
        if let Some(info) = first_error {
            t.failed = true;
            wire::error(&mut self.client.out, "ERROR", &info.code, &info.message);
            return Ok(());
        }
        if is_rollback_to {
            t.failed = false;
        }
        let tag = tag.unwrap_or_else(|| {
            match proxy_core::sqltext::first_keyword(&sql).as_str() {
                "RELEASE" => "RELEASE",
                "ROLLBACK" => "ROLLBACK",
                _ => "SAVEPOINT",
            }
            .to_owned()
        });
        wire::command_complete(&mut self.client.out, &tag);
        Ok(())
    }

    /// Commits a transaction: one phase when at most one shard wrote, else 2PC.
    pub async fn finish_commit(&mut self, t: Txn) -> Result<(), ExecError> {
        let proxy = self.proxy.clone();
        let names: Vec<(usize, String)> = t
            .conns
            .keys()
            .map(|&s| {
                (
                    s,
                    t.topo
                        .shards
                        .get(s)
                        .map(|p| p.name.clone())
                        .unwrap_or_else(|| self.shard_name(s)),
                )
            })
            .collect();
        if t.writes.len() <= 1 || t.conns.len() <= 1 {
            // Readers first, the (single) writer last: only the writer's outcome matters.
            let mut conns: Vec<(usize, Pooled)> = t.conns.into_iter().collect();
            conns.sort_by_key(|(s, _)| t.writes.contains(s));
            let mut result = Ok(());
            for (shard, mut conn) in conns {
                let name = conn.pool().name.clone();
                let r = conn.conn().simple_query("COMMIT").await;
                match r {
                    Ok(res) if conn.conn().status == b'I' => {
                        if t.writes.contains(&shard)
                            && res.tags.last().map(String::as_str) == Some("ROLLBACK")
                        {
                            result = Err(ExecError::sql(
                                sqlstate::TRANSACTION_ROLLBACK,
                                format!("transaction rolled back on shard {name}"),
                            ));
                        }
                        conn.release();
                    }
                    Ok(_) => conn.discard(),
                    Err(crate::backend::BackendError::Server(info)) => {
                        if t.writes.contains(&shard) {
                            result = Err(ExecError::sql(
                                sqlstate::TRANSACTION_ROLLBACK,
                                format!("commit failed on shard {name}: {}", info.message),
                            ));
                        }
                        conn.discard();
                    }
                    Err(e) => {
                        if t.writes.contains(&shard) {
                            result = Err(ExecError::Unavailable {
                                shard: name,
                                message: format!("commit outcome unknown: {e}"),
                            });
                        }
                        conn.discard();
                    }
                }
            }
            return result;
        }

        // Two-phase commit.
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut prepared: Vec<(Pooled, String)> = Vec::new();
        let mut failure: Option<String> = None;
        let mut conns: Vec<(usize, Pooled)> = t.conns.into_iter().collect();
        for (shard, conn) in conns.iter_mut() {
            let name = names
                .iter()
                .find(|(s, _)| s == shard)
                .map(|(_, n)| n.clone())
                .unwrap_or_default();
            let gid = format!("{GID_PREFIX}{id}_{name}");
            if let Err(e) = postgres_protocol::message::frontend::query(
                &format!("PREPARE TRANSACTION '{gid}'"),
                &mut conn.conn().wbuf,
            ) {
                failure.get_or_insert(e.to_string());
            }
        }
        for (_, conn) in conns.iter_mut() {
            let _ = conn.conn().flush().await;
        }
        for (shard, mut conn) in conns {
            let name = names
                .iter()
                .find(|(s, _)| *s == shard)
                .map(|(_, n)| n.clone())
                .unwrap_or_default();
            let gid = format!("{GID_PREFIX}{id}_{name}");
            match conn.conn().collect_until_ready().await {
                Ok(r) if r.tags.last().map(String::as_str) == Some("PREPARE TRANSACTION") => {
                    prepared.push((conn, gid))
                }
                Ok(_) => {
                    failure.get_or_insert(format!("shard {name} had aborted the transaction"));
                    conn.release();
                }
                Err(crate::backend::BackendError::Server(info)) => {
                    failure
                        .get_or_insert(format!("shard {name} could not prepare: {}", info.message));
                    if conn.conn().status == b'I' {
                        conn.release();
                    } else {
                        conn.discard();
                    }
                }
                Err(e) => {
                    failure.get_or_insert(format!("shard {name} is unavailable: {e}"));
                    conn.discard();
                }
            }
        }
        if failure.is_none() {
            if let Some(d) = hook("before-decision") {
                tokio::time::sleep(d).await;
            }
        }
        let decision = match failure {
            Some(_) => None,
            None => {
                let gids: Vec<String> = prepared.iter().map(|(_, g)| g.clone()).collect();
                match write_decision(&proxy.state_dir, &id, &gids) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        failure = Some(format!("cannot record the commit decision: {e}"));
                        None
                    }
                }
            }
        };
        let Some(decision) = decision else {
            for (mut conn, gid) in prepared {
                match conn
                    .conn()
                    .simple_query(&format!("ROLLBACK PREPARED '{gid}'"))
                    .await
                {
                    Ok(_) => conn.release(),
                    Err(e) => {
                        tracing::warn!(gid = %gid, error = %e, "ROLLBACK PREPARED failed; recovery will resolve it");
                        conn.discard();
                    }
                }
            }
            proxy.metrics.two_phase_aborts.inc();
            let why = failure.unwrap_or_default();
            return Err(ExecError::sql(
                sqlstate::TRANSACTION_ROLLBACK,
                format!("transaction rolled back on every shard: {why}"),
            ));
        };
        if let Some(d) = hook("after-decision") {
            tokio::time::sleep(d).await;
        }
        // Scatter readers see this commit on every shard or on none. Bounded: a scatter
        // read that itself waits on a row lock of this transaction (SELECT … FOR UPDATE)
        // must not deadlock the commit.
        let fence = tokio::time::timeout(COMMIT_FENCE_WAIT, proxy.commit_fence.write())
            .await
            .ok();
        if fence.is_none() {
            tracing::warn!("commit fence not acquired in time; a concurrent scatter read may see this commit half done");
        }
        let mut all = true;
        for (i, (mut conn, gid)) in prepared.into_iter().enumerate() {
            if i > 0 {
                if let Some(d) = hook("between-commits") {
                    tokio::time::sleep(d).await;
                }
            }
            match conn
                .conn()
                .simple_query(&format!("COMMIT PREPARED '{gid}'"))
                .await
            {
                Ok(_) => conn.release(),
                Err(e) => {
                    all = false;
                    tracing::warn!(gid = %gid, error = %e, "COMMIT PREPARED failed; the decision is logged and recovery will finish it");
                    conn.discard();
                }
            }
        }
        drop(fence);
        if all {
            let _ = std::fs::remove_file(&decision);
        }
        proxy.metrics.two_phase_commits.inc();
        proxy.stats.two_phase.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Rolls back each connection; clean ones go back to their pool.
pub async fn rollback_conns(conns: impl IntoIterator<Item = (usize, Pooled)>) {
    for (_, mut conn) in conns {
        let ok = tokio::time::timeout(Duration::from_secs(5), conn.conn().simple_query("ROLLBACK"))
            .await
            .is_ok_and(|r| r.is_ok());
        if ok && conn.conn().status == b'I' {
            conn.release();
        } else {
            conn.discard();
        }
    }
}

/// Resolves our prepared transactions on every reachable shard. At `startup` every
/// undecided one is rolled back; later only those prepared over a minute ago.
/// Returns how many were resolved.
pub async fn resolve_in_doubt(proxy: &Proxy, startup: bool) -> usize {
    let dir = decisions_dir(&proxy.state_dir);
    let decided: HashSet<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".commit").map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    let topo = proxy.topology();
    let mut seen = HashSet::new();
    let mut all_reachable = true;
    let mut resolved = 0;
    for pool in &topo.shards {
        let mut conn = match pool.connect().await {
            Ok(c) => c,
            Err(_) => {
                all_reachable = false;
                continue;
            }
        };
        let rows = match conn
            .simple_query(
                "SELECT gid, (now() - prepared) > interval '60 seconds' FROM pg_prepared_xacts \
                 WHERE gid LIKE 'taskflow\\_%' AND database = current_database()",
            )
            .await
        {
            Ok(r) => r.rows,
            Err(e) => {
                tracing::warn!(shard = %pool.name, error = %e, "cannot list prepared transactions");
                all_reachable = false;
                continue;
            }
        };
        for row in rows {
            let (Some(Some(gid)), old) = (row.first().cloned(), row.get(1).cloned().flatten())
            else {
                continue;
            };
            let Some(id) = gid_id(&gid).map(str::to_owned) else {
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
            match conn
                .simple_query(&format!("{action} PREPARED '{gid}'"))
                .await
            {
                Ok(_) => {
                    resolved += 1;
                    proxy.metrics.in_doubt_resolved.inc();
                    tracing::info!(shard = %pool.name, gid = %gid, action, "resolved in-doubt transaction");
                }
                Err(e) => {
                    tracing::warn!(shard = %pool.name, gid = %gid, error = %e, "cannot resolve in-doubt transaction")
                }
            }
        }
        conn.terminate().await;
    }
    if all_reachable {
        for id in decided.difference(&seen) {
            let _ = std::fs::remove_file(dir.join(format!("{id}.commit")));
        }
    }
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_ids() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(gid_id(&format!("taskflow_{id}_shard-1")), Some(id));
        assert_eq!(gid_id("taskflow_short_shard-1"), None);
        assert_eq!(gid_id("other_0123456789abcdef0123456789abcdef_x"), None);
    }

    #[test]
    fn decision_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write_decision(dir.path(), "abc", &["g1".into(), "g2".into()]).expect("write");
        assert_eq!(std::fs::read_to_string(p).expect("read"), "g1\ng2");
    }
}
