//! Planning a client's Execute.

use postgres_protocol::message::frontend;
use proxy_core::wire::sqlstate;

use super::{local_error, Expect, Plan, PortalRoute, Slot};
use crate::session::exec::mark_session_state;
use crate::session::{ExecError, Session};

impl Session {
    /// Execute of a bound portal: relayed to its shard, or run on every target shard with
    /// the rows merged. True: stop planning.
    pub(super) async fn plan_execute(
        &mut self,
        plan: &mut Plan,
        portal: &str,
        raw: &[u8],
    ) -> Result<bool, ExecError> {
        let Some(p) = self.portals.get(portal).cloned() else {
            plan.slots.push(local_error(
                sqlstate::UNDEFINED_CURSOR,
                &format!("portal \"{portal}\" does not exist"),
            ));
            return Ok(true);
        };
        match &p.route {
            PortalRoute::Special => {}
            PortalRoute::One(shard) => {
                let w = self.work(plan, *shard).await?;
                mark_session_state(w.conn.conn(), &p.stmt.sql);
                w.conn.conn().wbuf.extend_from_slice(raw);
                if p.stmt.analysis.as_ref().is_some_and(|a| a.is_write) {
                    plan.wrote.insert(*shard);
                }
                plan.slots.push(Slot::Forward {
                    shard: *shard,
                    expect: Expect::Execute,
                });
                self.proxy.metrics.route("one");
            }
            PortalRoute::Multi {
                targets,
                merge,
                is_write,
                ..
            } => {
                for &t in targets {
                    let w = self.work(plan, t).await?;
                    let c = w.conn.conn();
                    mark_session_state(c, &p.stmt.sql);
                    frontend::describe(b'P', portal, &mut c.wbuf)
                        .and_then(|()| frontend::execute(portal, 0, &mut c.wbuf))
                        .map_err(|e| ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string()))?;
                    if *is_write {
                        plan.wrote.insert(t);
                    }
                }
                self.proxy
                    .metrics
                    .route(if *is_write { "broadcast" } else { "scatter" });
                plan.slots.push(Slot::ExecuteMulti {
                    shards: targets.clone(),
                    merge: merge.clone(),
                });
            }
        }
        Ok(false)
    }
}
