//! Planning a client's Describe of a statement or a portal.

use postgres_protocol::message::frontend;
use proxy_core::wire::{self, sqlstate};

use super::{local, local_error, Expect, Plan, PortalRoute, Slot};
use crate::session::{ExecError, Session};

impl Session {
    /// Describe of a prepared statement: asked of any backend that has it (a special
    /// statement is described locally: no parameters, no rows). True: stop planning.
    pub(super) async fn plan_describe_statement(
        &mut self,
        plan: &mut Plan,
        name: &str,
    ) -> Result<bool, ExecError> {
        let Some(stmt) = self.stmts.get(name).cloned() else {
            plan.slots.push(local_error(
                sqlstate::UNDEFINED_PREPARED_STATEMENT,
                &format!("prepared statement \"{name}\" does not exist"),
            ));
            return Ok(true);
        };
        if stmt
            .analysis
            .as_ref()
            .is_some_and(|a| super::is_special(&a.kind))
        {
            plan.slots.push(local(|b| {
                b.extend_from_slice(&[b't', 0, 0, 0, 6, 0, 0]);
                wire::no_data(b);
            }));
            return Ok(false);
        }
        let shard = self.plan_default_shard(plan);
        self.ensure_prepared(plan, shard, &stmt).await?;
        let w = self.work(plan, shard).await?;
        frontend::describe(b'S', &stmt.global, &mut w.conn.conn().wbuf)
            .map_err(|e| ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string()))?;
        plan.slots.push(Slot::Forward {
            shard,
            expect: Expect::DescribeStmt { stmt },
        });
        Ok(false)
    }

    /// Describe of a portal: relayed to its shard; a multi-shard portal is described by
    /// its first shard, with the columns the merge adds for itself cut off.
    pub(super) async fn plan_describe_portal(
        &mut self,
        plan: &mut Plan,
        name: &str,
        raw: &[u8],
    ) -> Result<bool, ExecError> {
        let Some(portal) = self.portals.get(name).cloned() else {
            plan.slots.push(local_error(
                sqlstate::UNDEFINED_CURSOR,
                &format!("portal \"{name}\" does not exist"),
            ));
            return Ok(true);
        };
        let (shard, slot) = match &portal.route {
            PortalRoute::Special => {
                plan.slots.push(local(wire::no_data));
                return Ok(false);
            }
            PortalRoute::One(shard) => (
                *shard,
                Slot::Forward {
                    shard: *shard,
                    expect: Expect::DescribePortal,
                },
            ),
            PortalRoute::Multi { targets, merge, .. } => {
                let Some(&first) = targets.first() else {
                    plan.slots.push(local(wire::no_data));
                    return Ok(false);
                };
                let visible_cut = merge.as_ref().map(|m| m.hidden_columns).unwrap_or(0);
                (
                    first,
                    Slot::DescribeMulti {
                        shard: first,
                        visible_cut,
                    },
                )
            }
        };
        let w = self.work(plan, shard).await?;
        w.conn.conn().wbuf.extend_from_slice(raw);
        plan.slots.push(slot);
        Ok(false)
    }
}
