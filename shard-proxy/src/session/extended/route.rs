//! Where a bound portal runs: one shard, several (scatter read, broadcast write, split
//! INSERT), or the proxy itself (transaction control).
//!
//! Why at Bind: only the Bind carries the parameter values the sharding key is read from.
//! The router's plan is computed once here and kept in the portal's [`PortalRoute`], so the
//! Bind that follows uses the same per-shard SQL the route was decided by.

use proxy_core::router::{Analysis, Params, StatementKind, Target};
use proxy_core::wire::frontend::Bind;
use proxy_core::wire::sqlstate;

use super::{boxed_error, is_special, PortalRoute, Slot};
use crate::session::exec::targets_of;
use crate::session::{Session, Stmt};

/// A Bind's route and the moving arcs its keys are in (`(shard, arc)`, see
/// `proxy_core::placement`).
pub(super) type Routed = (PortalRoute, Vec<(usize, u32)>);

impl Session {
    /// Routes a Bind; `Err` carries a ready-made error slot.
    pub(super) fn route_bind(&self, stmt: &Stmt, b: &Bind) -> Result<PortalRoute, Box<Slot>> {
        self.route_bind_guarded(stmt, b).map(|(r, _)| r)
    }

    /// Routes a Bind, with the moving arcs its keys are in (see `proxy_core::placement`).
    pub(super) fn route_bind_guarded(&self, stmt: &Stmt, b: &Bind) -> Result<Routed, Box<Slot>> {
        let plain = |r: PortalRoute| Ok((r, Vec::new()));
        if self.passthrough {
            return plain(PortalRoute::One(0));
        }
        let Some(analysis) = &stmt.analysis else {
            return plain(PortalRoute::One(self.default_shard()));
        };
        if is_special(&analysis.kind) {
            return plain(PortalRoute::Special);
        }
        match &analysis.kind {
            StatementKind::Set | StatementKind::Show => {
                return plain(PortalRoute::One(self.default_shard()))
            }
            StatementKind::Unparsed(reason) => {
                return self
                    .route_unparsed(analysis, reason)
                    .map(|r| (r, Vec::new()))
            }
            _ => {}
        }
        self.route_planned(stmt, analysis, b)
    }

    /// A statement the router could not parse: routed as in the simple protocol.
    fn route_unparsed(&self, analysis: &Analysis, reason: &str) -> Result<PortalRoute, Box<Slot>> {
        self.route_unparsed_sql(analysis.hint.as_deref(), analysis.touches_sharded, reason)
            .map(|(shard, _)| PortalRoute::One(shard))
            .map_err(|e| boxed_error(e.code(), &e.to_string()))
    }

    /// A parsed statement: the router's plan with this Bind's parameters.
    fn route_planned(
        &self,
        stmt: &Stmt,
        analysis: &Analysis,
        b: &Bind,
    ) -> Result<Routed, Box<Slot>> {
        let values: Vec<Option<&[u8]>> = b.params.iter().map(|p| p.as_deref()).collect();
        let types = stmt.param_types();
        let params = Params {
            values: &values,
            formats: &b.param_formats,
            types: &types,
        };
        let topo = self.txn.as_ref().map(|t| &t.topo).unwrap_or(&self.topo);
        let plan = analysis
            .plan(&topo.placement, &params, self.shard_hint.as_deref())
            .map_err(|e| boxed_error(sqlstate::FEATURE_NOT_SUPPORTED, &e.to_string()))?;
        if !analysis.touches_sharded
            && !analysis.is_write
            && plan.merge.is_none()
            && matches!(plan.target, Target::One(_))
        {
            return Ok((PortalRoute::One(self.default_shard()), Vec::new()));
        }
        let targets = targets_of(&plan.target, topo.shards.len());
        if targets.len() == 1 && plan.per_shard_sql.is_none() && plan.merge.is_none() {
            return Ok((PortalRoute::One(targets[0]), plan.guards));
        }
        if let StatementKind::Copy { .. } = analysis.kind {
            return Err(boxed_error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "a COPY that spans shards needs the simple query protocol (or a /* shard=<name> */ hint)",
            ));
        }
        let guards = plan.guards;
        Ok((
            PortalRoute::Multi {
                targets: match &plan.per_shard_sql {
                    Some(per) => per.iter().map(|(s, _, _)| *s).collect(),
                    None => targets,
                },
                merge: plan.merge,
                per_shard_sql: plan.per_shard_sql,
                is_write: analysis.is_write,
            },
            guards,
        ))
    }
}
