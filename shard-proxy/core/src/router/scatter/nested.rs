//! Subqueries of a cross-shard read. Each shard evaluates the whole statement over its
//! own rows, so a nested query over sharded rows is correct only when it is row-by-row
//! (or grouped by the shard key): a per-shard `count(*)`, LIMIT or DISTINCT would be
//! silently wrong, and is refused.

use std::ops::ControlFlow;

use sqlparser::ast::{GroupByExpr, Query, SetExpr, SetOperator, SetQuantifier, Visit, Visitor};

use super::aggregate::scan;
use crate::router::expr::Ctx;

/// Refuses `q` when one of its nested queries reads sharded rows other than row by row;
/// the error says which construct.
pub(super) fn check(ctx: &Ctx, q: &Query) -> Result<(), String> {
    match q.visit(&mut NestedCheck { ctx, depth: 0 }) {
        ControlFlow::Break(why) => Err(why),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// The visitor behind [`check`].
struct NestedCheck<'c, 'a> {
    ctx: &'c Ctx<'a>,
    /// Query nesting level (1 = the statement's own query).
    depth: usize,
}

impl Visitor for NestedCheck<'_, '_> {
    type Break = String;

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<String> {
        self.depth += 1;
        if self.depth > 1 && self.ctx.reads_sharded(q) {
            if let Err(what) = row_local(self.ctx, q) {
                return ControlFlow::Break(format!(
                    "a subquery over a sharded table uses {what}, which would be computed on \
                     each shard separately; filter it by {key} (or GROUP BY {key}) or route the \
                     statement with /* shard=<name> */",
                    key = self.ctx.key_column
                ));
            }
        }
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _: &Query) -> ControlFlow<String> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }
}

/// Whether a nested query yields the same rows computed per shard and concatenated.
fn row_local(ctx: &Ctx, q: &Query) -> Result<(), &'static str> {
    if q.limit_clause.is_some() || q.fetch.is_some() {
        return Err("LIMIT/OFFSET/FETCH");
    }
    body_row_local(ctx, &q.body)
}

fn body_row_local(ctx: &Ctx, body: &SetExpr) -> Result<(), &'static str> {
    match body {
        SetExpr::Select(s) => {
            let groups = match &s.group_by {
                GroupByExpr::Expressions(e, _) => e.as_slice(),
                GroupByExpr::All(_) => return Err("GROUP BY ALL"),
            };
            let by_key = groups.iter().any(|g| ctx.is_key_col(g));
            let sc = scan(&s.projection);
            if sc.window || !s.named_window.is_empty() {
                return Err("window functions");
            }
            if !by_key {
                if !groups.is_empty() || s.having.is_some() || sc.aggregate {
                    return Err("aggregates or GROUP BY");
                }
                if s.distinct.is_some() {
                    return Err("DISTINCT");
                }
            }
            Ok(())
        }
        SetExpr::SetOperation {
            op,
            set_quantifier,
            left,
            right,
        } => {
            if *op != SetOperator::Union || *set_quantifier != SetQuantifier::All {
                return Err("UNION/INTERSECT/EXCEPT");
            }
            body_row_local(ctx, left)?;
            body_row_local(ctx, right)
        }
        SetExpr::Query(q) => row_local(ctx, q),
        _ => Ok(()),
    }
}
