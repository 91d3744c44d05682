//! Planning a client's Parse.

use std::sync::Arc;

use proxy_core::wire::frontend::{Frame, FrontendMessage};
use proxy_core::wire::{self, sqlstate};

use super::{is_special, local, local_error, write_prepare, Expect, Plan, PortalRoute, Slot};
use crate::session::{global_name, ExecError, Session, Stmt};

impl Session {
    /// Registers the statement and prepares it (under its proxy-global name) on the backend
    /// its next Bind will use — or answers ParseComplete locally when that backend already
    /// has it. Returns true when planning must stop (error).
    pub(super) async fn plan_parse(
        &mut self,
        plan: &mut Plan,
        batch: &[Frame],
        i: usize,
        name: &str,
        query: &str,
        param_types: &[u32],
    ) -> Result<bool, ExecError> {
        if !name.is_empty() && self.stmts.contains_key(name) {
            plan.slots.push(local_error(
                sqlstate::DUPLICATE_PREPARED_STATEMENT,
                &format!("prepared statement \"{name}\" already exists"),
            ));
            return Ok(true);
        }
        let analysis = (!self.passthrough).then(|| self.topo.router.analyze(query));
        let stmt = Arc::new(Stmt {
            global: global_name(query, param_types),
            sql: query.to_owned(),
            types: param_types.to_vec(),
            described: std::sync::Mutex::new(None),
            analysis,
            session_state: proxy_core::sqltext::session_state(query),
        });
        self.stmts.insert(name.to_owned(), stmt.clone());
        if stmt.analysis.as_ref().is_some_and(|a| is_special(&a.kind)) {
            plan.slots.push(local(wire::parse_complete));
            return Ok(false);
        }
        let shard = self.parse_shard(plan, batch.get(i + 1), name, &stmt);
        let w = self.work(plan, shard).await?;
        let c = w.conn.conn();
        if c.prepared.contains(&stmt.global) {
            plan.slots.push(local(wire::parse_complete));
            return Ok(false);
        }
        write_prepare(c, &stmt)?;
        plan.slots.push(Slot::Suppress {
            shard,
            expect: Expect::Close,
        });
        plan.slots.push(Slot::Forward {
            shard,
            expect: Expect::Parse {
                global: Some(stmt.global.clone()),
            },
        });
        Ok(false)
    }

    /// Where to Parse: where the following Bind of this statement will run if that is
    /// known now, else a backend the plan already uses (or the default shard).
    fn parse_shard(&self, plan: &Plan, next: Option<&Frame>, name: &str, stmt: &Stmt) -> usize {
        if let Some(FrontendMessage::Bind(b)) = next.map(|f| &f.msg) {
            if b.statement == name {
                if let Ok(PortalRoute::One(s)) = self.route_bind(stmt, b) {
                    return s;
                }
            }
        }
        self.plan_default_shard(plan)
    }
}
