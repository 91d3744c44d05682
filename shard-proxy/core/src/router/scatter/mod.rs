//! Planning reads that span shards: the [`MergeSpec`] and the SQL each shard runs.
//!
//! The rule is to merge exactly or refuse. Each shard runs the query over its own rows,
//! so a construct is accepted only when the proxy can turn the per-shard answers into the
//! single-database answer:
//!
//! * plain rows: concatenated; ORDER BY keys must be output columns (by name, alias or
//!   position) or are appended as hidden columns; LIMIT n OFFSET m becomes
//!   `LIMIT n + m` on each shard and the merger skips/takes;
//! * `count`, `sum`, `min`, `max`, `avg` (avg via hidden `sum(x)`, `count(x)`), with or
//!   without GROUP BY (group keys not in the select list become hidden columns); LIMIT,
//!   OFFSET and ORDER BY are then applied only by the merger;
//! * DISTINCT and UNION (de-duplicated by the merger), UNION ALL.
//!
//! Refused: aggregates mixed with non-grouped columns (PgDog #1172 returned wrong rows),
//! HAVING, window functions, `count(DISTINCT …)` and other aggregates, DISTINCT ON,
//! INTERSECT/EXCEPT, FETCH … WITH TIES, and subqueries that aggregate/limit/de-duplicate
//! sharded rows (they would run per shard).
//!
//! Layout: [`build`] (this file) checks the query as a whole, resolves LIMIT/OFFSET and
//! rewrites them for the shards; `select` and `union` plan the two kinds of query body,
//! `aggregate` knows aggregates, `columns` resolves ORDER BY/GROUP BY to output columns,
//! `nested` refuses subqueries that would run per shard.

mod aggregate;
mod columns;
mod nested;
mod select;
mod union;

use std::ops::ControlFlow;

use sqlparser::ast::{
    visit_relations, BinaryOperator, CastKind, DataType, Expr, LimitClause, ObjectNamePart,
    OrderBy, OrderByExpr, OrderByKind, Query, SetExpr, TableWithJoins, Value,
};

use super::expr::{fold, placeholder_index, Ctx};
use super::model::Count;
use crate::merge::MergeSpec;

/// A merge plan for a query.
pub(crate) struct Built {
    pub(crate) spec: MergeSpec,
    pub(crate) limit: Option<Count>,
    pub(crate) offset: Option<Count>,
}

/// Plans the merge of `q` run on several shards: checks the whole query, plans its body
/// (SELECT or UNION), then sets what the shards run: every group when the merger
/// aggregates, else the first `limit + offset` rows.
pub(crate) fn build(ctx: &Ctx, q: &Query) -> Result<Built, String> {
    nested::check(ctx, q)?;
    if !q.pipe_operators.is_empty()
        || q.settings.is_some()
        || q.format_clause.is_some()
        || q.for_clause.is_some()
    {
        return Err("this query syntax can't be merged across shards".into());
    }
    let window = Window::of(q)?;
    let order_exprs = order_exprs(q)?;
    let ctes = sharded_ctes(ctx, q);
    let from_sharded = |from: &[TableWithJoins]| reads_sharded_from(ctx, &ctes, from);

    let mut shard_q = q.clone();
    let mut spec = MergeSpec::default();
    match (q.body.as_ref(), shard_q.body.as_mut()) {
        (SetExpr::Select(sel), SetExpr::Select(shard_sel)) => {
            select::select_spec(ctx, sel, &order_exprs, shard_sel, &mut spec, &from_sharded)?;
        }
        (SetExpr::SetOperation { .. }, _) => {
            union::union_spec(&q.body, &order_exprs, &mut spec, &from_sharded)?
        }
        _ => {
            return Err(
                "only SELECT and UNION queries can be merged across shards; add a shard key".into(),
            )
        }
    }
    if !spec.aggregates.is_empty() {
        // Groups combine across shards: every shard must return all of them.
        shard_q.limit_clause = None;
        shard_q.fetch = None;
        shard_q.order_by = None;
    } else if window.limit_e.is_some() || window.offset_e.is_some() {
        shard_q.fetch = None;
        shard_q.limit_clause = window.shard_limit()?.map(|l| LimitClause::LimitOffset {
            limit: Some(l),
            offset: None,
            limit_by: Vec::new(),
        });
    }
    if let Some(Count::Literal(l)) = window.limit {
        spec.limit = Some(l);
    }
    if let Some(Count::Literal(o)) = window.offset {
        spec.offset = o;
    }
    if shard_q != *q {
        spec.shard_sql = Some(shard_q.to_string());
    }
    Ok(Built {
        spec,
        limit: window.limit,
        offset: window.offset,
    })
}

/// LIMIT/OFFSET (or FETCH FIRST) of the query: as written, and as counts the merger
/// applies (`$n` resolved at plan time).
struct Window {
    limit_e: Option<Expr>,
    offset_e: Option<Expr>,
    limit: Option<Count>,
    offset: Option<Count>,
}

impl Window {
    fn of(q: &Query) -> Result<Window, String> {
        let (mut limit_e, offset_e) = match &q.limit_clause {
            None => (None, None),
            Some(LimitClause::LimitOffset {
                limit,
                offset,
                limit_by,
            }) => {
                if !limit_by.is_empty() {
                    return Err("LIMIT BY".into());
                }
                (limit.clone(), offset.as_ref().map(|o| o.value.clone()))
            }
            Some(LimitClause::OffsetCommaLimit { offset, limit }) => {
                (Some(limit.clone()), Some(offset.clone()))
            }
        };
        if let Some(f) = &q.fetch {
            if f.with_ties || f.percent {
                return Err(
                    "FETCH … WITH TIES / PERCENT can't be merged across shards; use LIMIT".into(),
                );
            }
            if limit_e.is_some() {
                return Err("both LIMIT and FETCH".into());
            }
            limit_e = Some(f.quantity.clone().unwrap_or_else(|| number(1)));
        }
        let limit = limit_e.as_ref().map(count_of).transpose()?.flatten();
        let offset = offset_e.as_ref().map(count_of).transpose()?.flatten();
        Ok(Window {
            limit_e,
            offset_e,
            limit,
            offset,
        })
    }

    /// The LIMIT each shard gets: no OFFSET (the merger skips after sorting all shards'
    /// rows), so `limit + offset` rows — computed here for literals, in SQL for `$n`.
    fn shard_limit(&self) -> Result<Option<Expr>, String> {
        Ok(match (&self.limit_e, self.limit, self.offset) {
            (None, _, _) => None,
            (Some(l), _, None) => Some(l.clone()),
            (Some(_), Some(Count::Literal(l)), Some(Count::Literal(o))) => {
                Some(number(l.checked_add(o).ok_or_else(unsupported_limit)?))
            }
            (Some(l), _, Some(_)) => match &self.offset_e {
                Some(o) => Some(Expr::BinaryOp {
                    left: Box::new(as_bigint(l)),
                    op: BinaryOperator::Plus,
                    right: Box::new(as_bigint(o)),
                }),
                None => Some(l.clone()),
            },
        })
    }
}

/// The ORDER BY expressions (ORDER BY ALL and INTERPOLATE are refused).
fn order_exprs(q: &Query) -> Result<Vec<OrderByExpr>, String> {
    match &q.order_by {
        None => Ok(Vec::new()),
        Some(OrderBy {
            kind: OrderByKind::Expressions(v),
            interpolate: None,
        }) => Ok(v.clone()),
        Some(_) => Err("ORDER BY ALL / INTERPOLATE".into()),
    }
}

/// Names of the CTEs over sharded tables: they count as sharded relations of the outer
/// query.
fn sharded_ctes(ctx: &Ctx, q: &Query) -> Vec<String> {
    q.with
        .iter()
        .flat_map(|w| w.cte_tables.iter())
        .filter(|c| ctx.reads_sharded(c.query.as_ref()))
        .map(|c| fold(&c.alias.name))
        .collect()
}

/// Whether a FROM list reads a sharded table, directly or through one of `ctes`.
fn reads_sharded_from(ctx: &Ctx, ctes: &[String], from: &[TableWithJoins]) -> bool {
    from.iter().any(|f| {
        ctx.reads_sharded(f)
            || visit_relations(f, |name| match name.0.as_slice() {
                [ObjectNamePart::Identifier(id)] if ctes.contains(&fold(id)) => {
                    ControlFlow::Break(())
                }
                _ => ControlFlow::Continue(()),
            })
            .is_break()
    })
}

fn unsupported_limit() -> String {
    "LIMIT/OFFSET of a cross-shard query must be an integer literal or a $n parameter".into()
}

/// A LIMIT/OFFSET value: `Ok(None)` for NULL.
fn count_of(e: &Expr) -> Result<Option<Count>, String> {
    match e {
        Expr::Nested(inner) | Expr::Cast { expr: inner, .. } => count_of(inner),
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n
                .parse::<u64>()
                .map(|n| Some(Count::Literal(n)))
                .map_err(|_| unsupported_limit()),
            Value::Null => Ok(None),
            Value::Placeholder(p) => placeholder_index(p)
                .map(|i| Some(Count::Param(i)))
                .ok_or_else(unsupported_limit),
            _ => Err(unsupported_limit()),
        },
        _ => Err(unsupported_limit()),
    }
}

fn number(n: u64) -> Expr {
    Expr::value(Value::Number(n.to_string(), false))
}

/// `(e)::bigint`, so `$1 + $2` in the shard's LIMIT adds integers whatever the
/// parameters' types.
fn as_bigint(e: &Expr) -> Expr {
    Expr::Cast {
        kind: CastKind::DoubleColon,
        expr: Box::new(Expr::Nested(Box::new(e.clone()))),
        data_type: DataType::BigInt(None),
        format: None,
    }
}
