//! Planning a client's Bind: route the portal, then bind it on every backend it runs on.

use std::sync::Arc;

use postgres_protocol::message::frontend;
use proxy_core::merge::MergeSpec;
use proxy_core::wire::frontend::Bind;
use proxy_core::wire::{self, sqlstate};

use super::encode::{rename_bind, subset_bind};
use super::{local, local_error, Expect, Plan, Portal, PortalRoute, Slot};
use crate::session::{ExecError, Session, Stmt, Txn};

/// Per-shard SQL of a multi-row INSERT split by shard: (shard, SQL, kept parameters).
type PerShardSql = [(usize, String, Vec<usize>)];

impl Session {
    /// Routes the Bind and queues it on its backend(s); the portal remembers the route for
    /// Describe and Execute. True: stop planning.
    pub(super) async fn plan_bind(
        &mut self,
        plan: &mut Plan,
        b: &Bind,
        raw: &[u8],
    ) -> Result<bool, ExecError> {
        let Some(stmt) = self.stmts.get(&b.statement).cloned() else {
            plan.slots.push(local_error(
                sqlstate::UNDEFINED_PREPARED_STATEMENT,
                &format!("prepared statement \"{}\" does not exist", b.statement),
            ));
            return Ok(true);
        };
        if let Err(e) = self.check_not_failed() {
            plan.slots
                .push(local_error(sqlstate::IN_FAILED_TRANSACTION, &e.to_string()));
            return Ok(true);
        }
        let (route, guards) = match self.route_bind_guarded(&stmt, b) {
            Ok(r) => r,
            Err(slot) => {
                plan.slots.push(*slot);
                return Ok(true);
            }
        };
        self.plan_guards(plan, &route, &guards).await?;
        match &route {
            PortalRoute::Special => plan.slots.push(local(wire::bind_complete)),
            PortalRoute::One(shard) => {
                self.ensure_prepared(plan, *shard, &stmt).await?;
                let w = self.work(plan, *shard).await?;
                w.conn
                    .conn()
                    .wbuf
                    .extend_from_slice(&rename_bind(b, raw, &stmt.global));
                plan.slots.push(Slot::Forward {
                    shard: *shard,
                    expect: Expect::Bind,
                });
            }
            PortalRoute::Multi {
                targets,
                merge,
                per_shard_sql,
                is_write,
            } => {
                if *is_write && self.txn.is_none() && targets.len() > 1 {
                    // Autocommit write over several shards: an implicit transaction,
                    // committed (2PC) after the batch.
                    self.txn = Some(Txn::implicit(self.topo.clone()));
                    self.client.hold_output = true;
                    begin_on_taken(plan)?;
                }
                let bound = BindOn {
                    b,
                    raw,
                    stmt: &stmt,
                    merge: merge.as_ref(),
                    per_shard_sql: per_shard_sql.as_deref(),
                };
                self.bind_multi(plan, targets, &bound).await?;
            }
        }
        // A new Bind replaces the portal: a scatter read of the old one is forgotten.
        self.cursors.remove(&b.portal);
        self.portals
            .insert(b.portal.clone(), Portal { stmt, route });
        Ok(false)
    }

    /// During a migration: a Bind on keys of moving arcs, or a write to several shards, is
    /// preceded on each of its shards by the migration guard (its answers suppressed; a
    /// failed guard fails the batch with SQLSTATE 40001), inside a transaction — the
    /// proxy's own around an autocommit statement, committed after the batch.
    async fn plan_guards(
        &mut self,
        plan: &mut Plan,
        route: &PortalRoute,
        guards: &[(usize, u32)],
    ) -> Result<(), ExecError> {
        let (targets, lock_all) = match route {
            PortalRoute::One(s) => (vec![*s], false),
            PortalRoute::Multi {
                targets, is_write, ..
            } => (targets.clone(), *is_write),
            PortalRoute::Special => return Ok(()),
        };
        if guards.is_empty() && !lock_all {
            return Ok(());
        }
        let topo = self
            .txn
            .as_ref()
            .map_or_else(|| self.topo.clone(), |t| t.topo.clone());
        let wait = self.proxy.config().reshard.write_pause_ms;
        let sqls = crate::session::exec::guard_sqls(&topo, guards, &targets, lock_all, wait);
        if sqls.is_empty() {
            return Ok(());
        }
        if self.txn.is_none() {
            self.txn = Some(Txn::implicit(topo));
            self.client.hold_output = true;
            begin_on_taken(plan)?;
        }
        for (shard, sql) in sqls {
            let w = self.work(plan, shard).await?;
            let buf = &mut w.conn.conn().wbuf;
            let bad = |e: String| ExecError::sql(sqlstate::INTERNAL_ERROR, e);
            frontend::parse("", &sql, std::iter::empty(), buf).map_err(|e| bad(e.to_string()))?;
            frontend::bind(
                "",
                "",
                std::iter::empty::<i16>(),
                std::iter::empty::<Option<&[u8]>>(),
                |_: Option<&[u8]>, _: &mut bytes::BytesMut| {
                    Ok::<_, Box<dyn std::error::Error + Sync + Send>>(
                        postgres_protocol::IsNull::Yes,
                    )
                },
                std::iter::empty::<i16>(),
                buf,
            )
            .map_err(|_| bad("cannot encode the migration guard".into()))?;
            frontend::execute("", 0, buf).map_err(|e| bad(e.to_string()))?;
            for expect in [
                Expect::Parse { global: None },
                Expect::Bind,
                Expect::Execute,
            ] {
                plan.slots.push(Slot::Suppress { shard, expect });
            }
        }
        Ok(())
    }

    /// Binds on every target: a split INSERT's own SQL and parameters, a scatter read's
    /// rewritten SQL, or the statement itself; answered by one BindComplete when all succeed.
    async fn bind_multi(
        &mut self,
        plan: &mut Plan,
        targets: &[usize],
        bound: &BindOn<'_>,
    ) -> Result<(), ExecError> {
        let mut reads = Vec::with_capacity(targets.len());
        for &t in targets {
            let split = bound
                .per_shard_sql
                .and_then(|v| v.iter().find(|(s, _, _)| *s == t));
            let rewrite = bound.merge.and_then(|m| m.shard_sql.as_deref());
            if let Some((_, sql, keep)) = split {
                let types = bound.stmt.param_types();
                let sub_types: Vec<u32> = keep
                    .iter()
                    .map(|&k| types.get(k).copied().unwrap_or(0))
                    .collect();
                let bind = subset_bind(bound.b, "", keep);
                self.bind_unnamed(plan, t, sql, sub_types, &bind).await?;
            } else if let Some(sql) = rewrite {
                let bind = rename_bind(bound.b, bound.raw, "");
                let types = bound.stmt.types.clone();
                self.bind_unnamed(plan, t, sql, types, &bind).await?;
            } else {
                self.ensure_prepared(plan, t, bound.stmt).await?;
                let w = self.work(plan, t).await?;
                let bind = rename_bind(bound.b, bound.raw, &bound.stmt.global);
                w.conn.conn().wbuf.extend_from_slice(&bind);
            }
            reads.push((t, Expect::Bind));
        }
        let mut ok = bytes::BytesMut::new();
        wire::bind_complete(&mut ok);
        plan.slots.push(Slot::AllOk { reads, ok });
        Ok(())
    }

    /// Parses `sql` as the unnamed statement on `shard` (its ParseComplete suppressed),
    /// then queues `bind` against it.
    async fn bind_unnamed(
        &mut self,
        plan: &mut Plan,
        shard: usize,
        sql: &str,
        types: Vec<u32>,
        bind: &[u8],
    ) -> Result<(), ExecError> {
        let w = self.work(plan, shard).await?;
        let c = w.conn.conn();
        frontend::parse("", sql, types, &mut c.wbuf)
            .map_err(|e| ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string()))?;
        c.wbuf.extend_from_slice(bind);
        plan.slots.push(Slot::Suppress {
            shard,
            expect: Expect::Parse { global: None },
        });
        Ok(())
    }
}

/// Opens the transaction that just began on the backends this batch took before it (for
/// its Parse): without it their part of the write would run in autocommit and stay
/// applied even when the transaction rolls back. `BEGIN` goes right after the internal
/// queries already queued ahead of the client's messages, and is read back with them.
fn begin_on_taken(plan: &mut Plan) -> Result<(), ExecError> {
    for w in plan.works.values_mut() {
        let c = w.conn.conn();
        let at = offset_after_messages(&c.wbuf, w.skip as usize).ok_or_else(|| {
            ExecError::sql(
                sqlstate::INTERNAL_ERROR,
                "malformed queued backend messages",
            )
        })?;
        let tail = c.wbuf.split_off(at);
        frontend::query("BEGIN", &mut c.wbuf)
            .map_err(|e| ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string()))?;
        c.wbuf.unsplit(tail);
        w.skip += 1;
    }
    Ok(())
}

/// Byte offset just past the first `n` protocol messages in `buf`.
fn offset_after_messages(buf: &[u8], n: usize) -> Option<usize> {
    let mut at = 0usize;
    for _ in 0..n {
        let len = buf.get(at + 1..at + 5)?;
        let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
        at = at.checked_add(1 + len).filter(|&end| end <= buf.len())?;
    }
    Some(at)
}

/// A Bind being spread over several shards, with what its route decided.
struct BindOn<'a> {
    b: &'a Bind,
    raw: &'a [u8],
    stmt: &'a Arc<Stmt>,
    merge: Option<&'a MergeSpec>,
    per_shard_sql: Option<&'a PerShardSql>,
}

#[cfg(test)]
mod tests {
    use super::offset_after_messages;

    #[test]
    fn finds_the_end_of_queued_messages() {
        let mut buf = bytes::BytesMut::new();
        postgres_protocol::message::frontend::query("SET a = 1", &mut buf).expect("encode");
        let first = buf.len();
        postgres_protocol::message::frontend::query("BEGIN", &mut buf).expect("encode");
        assert_eq!(offset_after_messages(&buf, 0), Some(0));
        assert_eq!(offset_after_messages(&buf, 1), Some(first));
        assert_eq!(offset_after_messages(&buf, 2), Some(buf.len()));
        assert_eq!(offset_after_messages(&buf, 3), None);
        assert_eq!(offset_after_messages(&buf[..3], 1), None);
    }
}
