//! Transactions across shards: lazy BEGIN, COMMIT (one-phase when at most one shard
//! wrote, else two-phase), ROLLBACK everywhere, savepoints, and recovery of in-doubt
//! prepared transactions.
//!
//! Why 2PC with a durable decision log: a cross-shard write must commit on all shards or
//! none, even if a shard or the proxy dies half-way. Each shard first `PREPARE
//! TRANSACTION 'taskflow_<uuid>.<instance>.<shard>'` ([`gid`]); only when every shard
//! prepared does the proxy record the decision in the shared metadata
//! ([`crate::meta::decisions`]), then `COMMIT PREPARED` everywhere ([`two_phase`]).
//! [`recovery`] — run by any proxy — commits prepared transactions whose decision is
//! `commit` and rolls back those whose owner is gone without deciding.

mod gid;
mod one_phase;
mod recovery;
mod two_phase;

use std::sync::atomic::Ordering;
use std::time::Duration;

pub use gid::GID_PREFIX;
pub use recovery::{finish_commits, import_legacy_decisions, resolve_in_doubt};

use crate::backend::Pooled;
use crate::session::{ExecError, Session, Txn};
use proxy_core::wire::{self, sqlstate};

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
        if t.writes.len() <= 1 || t.conns.len() <= 1 {
            one_phase::commit(t).await
        } else {
            two_phase::commit(&self.proxy, t).await
        }
    }
}

/// Commits `t`, which wrote on several shards, with two-phase commit (the migration
/// mover's batches use it: same decision records, fence and recovery as clients').
pub async fn commit_across_shards(proxy: &crate::proxy::Proxy, t: Txn) -> Result<(), ExecError> {
    two_phase::commit(proxy, t).await
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
