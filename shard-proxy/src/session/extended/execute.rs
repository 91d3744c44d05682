//! Planning a client's Execute.

use postgres_protocol::message::frontend;
use proxy_core::wire::sqlstate;

use super::{local_error, Expect, Plan, Portal, PortalRoute, Slot};
use crate::metrics::Route;
use crate::session::exec::mark_known_session_state;
use crate::session::scatter::Cursor;
use crate::session::{ExecError, Session};

impl Session {
    /// Execute of a bound portal: relayed to its shard, streamed from every target shard
    /// (a read), or run on every target with the answers gathered (a write). True: stop
    /// planning.
    pub(super) async fn plan_execute(
        &mut self,
        plan: &mut Plan,
        portal: &str,
        max_rows: i32,
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
                mark_known_session_state(w.conn.conn(), p.stmt.session_state);
                w.conn.conn().wbuf.extend_from_slice(raw);
                if p.stmt.analysis.as_ref().is_some_and(|a| a.is_write) {
                    plan.wrote.insert(*shard);
                }
                plan.slots.push(Slot::Forward {
                    shard: *shard,
                    expect: Expect::Execute,
                });
                self.proxy.metrics.route(Route::One);
            }
            PortalRoute::Multi {
                is_write: false, ..
            } => return self.plan_scatter_read(plan, portal, &p, max_rows).await,
            PortalRoute::Multi {
                targets,
                merge,
                is_write: true,
                ..
            } => {
                for &t in targets {
                    let w = self.work(plan, t).await?;
                    let c = w.conn.conn();
                    mark_known_session_state(c, p.stmt.session_state);
                    frontend::describe(b'P', portal, &mut c.wbuf)
                        .and_then(|()| frontend::execute(portal, 0, &mut c.wbuf))
                        .map_err(|e| ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string()))?;
                    plan.wrote.insert(t);
                }
                self.proxy.metrics.route(Route::Broadcast);
                plan.slots.push(Slot::ExecuteMulti {
                    shards: targets.clone(),
                    merge: merge.clone(),
                });
            }
        }
        Ok(false)
    }

    /// Execute of a multi-shard read portal: each shard that can still contribute is asked
    /// for the rows this Execute may need (its portal described on the first Execute);
    /// the portal's cursor, kept between Executes, merges them.
    async fn plan_scatter_read(
        &mut self,
        plan: &mut Plan,
        portal: &str,
        p: &Portal,
        max_rows: i32,
    ) -> Result<bool, ExecError> {
        let PortalRoute::Multi { targets, merge, .. } = &p.route else {
            return Ok(false);
        };
        let again = plan
            .slots
            .iter()
            .any(|s| matches!(s, Slot::ScatterRead { portal: q, .. } if q == portal));
        if again {
            // The second fetch would depend on what the first one read, which is only known
            // after this batch ran.
            plan.slots.push(local_error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "a portal that reads several shards can be executed once per Sync; send Sync between Executes",
            ));
            return Ok(true);
        }
        let cursor = self
            .cursors
            .entry(portal.to_owned())
            .or_insert_with(|| Cursor::new(targets, merge.clone()));
        let max_rows = match u32::try_from(max_rows) {
            Ok(n) if cursor.honours_row_limit() => n,
            _ => 0,
        };
        let fetches = cursor.fetches(max_rows);
        for f in &fetches {
            let Some(&shard) = targets.get(f.pos) else {
                continue;
            };
            let w = self.work(plan, shard).await?;
            let c = w.conn.conn();
            if f.describe {
                mark_known_session_state(c, p.stmt.session_state);
                frontend::describe(b'P', portal, &mut c.wbuf)
                    .map_err(|e| ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string()))?;
            }
            frontend::execute(portal, f.rows, &mut c.wbuf)
                .map_err(|e| ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string()))?;
        }
        self.proxy.metrics.route(Route::Scatter);
        plan.slots.push(Slot::ScatterRead {
            portal: portal.to_owned(),
            fetches,
            max_rows,
        });
        Ok(false)
    }
}
