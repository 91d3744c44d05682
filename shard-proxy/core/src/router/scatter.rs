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

use std::ops::ControlFlow;

use sqlparser::ast::{
    visit_relations, BinaryOperator, CastKind, DataType, Distinct, DuplicateTreatment, Expr,
    Function, FunctionArguments, GroupByExpr, Ident, LimitClause, ObjectName, ObjectNamePart,
    OrderBy, OrderByExpr, OrderByKind, OrderBySort, Query, Select, SelectItem, SetExpr,
    SetOperator, SetQuantifier, TableWithJoins, Value, Visit, Visitor,
};

use super::analyze::{fold, placeholder_index, Ctx};
use super::Count;
use crate::merge::{ColumnMerge, MergeSpec, OrderKey};

/// A merge plan for a query.
pub(crate) struct Built {
    pub(crate) spec: MergeSpec,
    pub(crate) limit: Option<Count>,
    pub(crate) offset: Option<Count>,
}

/// Aggregate functions of PostgreSQL (and a few extensions' spellings).
const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "array_agg",
    "string_agg",
    "bool_and",
    "bool_or",
    "every",
    "bit_and",
    "bit_or",
    "bit_xor",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "json_agg_strict",
    "jsonb_agg_strict",
    "json_objectagg",
    "json_arrayagg",
    "xmlagg",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "corr",
    "covar_pop",
    "covar_samp",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "any_value",
    "range_agg",
    "range_intersect_agg",
    "grouping",
];

fn func_name(f: &Function) -> String {
    match f.name.0.last() {
        Some(ObjectNamePart::Identifier(id)) => fold(id),
        _ => String::new(),
    }
}

fn is_aggregate_call(f: &Function) -> bool {
    f.over.is_none() && AGGREGATES.contains(&func_name(f).as_str())
}

/// What an expression contains at its own query level (not inside subqueries).
#[derive(Default)]
struct Scan {
    depth: usize,
    aggregate: bool,
    window: bool,
    column: bool,
}

impl Visitor for Scan {
    type Break = ();

    fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if self.depth == 0 {
            match e {
                Expr::Function(f) if f.over.is_some() => self.window = true,
                Expr::Function(f) if is_aggregate_call(f) => self.aggregate = true,
                Expr::Identifier(_) | Expr::CompoundIdentifier(_) => self.column = true,
                _ => {}
            }
        }
        ControlFlow::Continue(())
    }
}

fn scan<V: Visit>(node: &V) -> Scan {
    let mut s = Scan::default();
    let _ = node.visit(&mut s);
    s
}

/// Refuses nested queries over sharded rows that aren't row-by-row.
struct NestedCheck<'c, 'a> {
    ctx: &'c Ctx<'a>,
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

/// `DESC`; `USING <operator>` is refused (the merger knows no operator classes).
fn descending(ob: &OrderByExpr) -> Result<bool, String> {
    match &ob.options.sort {
        None | Some(OrderBySort::Asc) => Ok(false),
        Some(OrderBySort::Desc) => Ok(true),
        Some(OrderBySort::Using(_)) => {
            Err("ORDER BY … USING <operator> can't be merged across shards".into())
        }
    }
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

fn as_bigint(e: &Expr) -> Expr {
    Expr::Cast {
        kind: CastKind::DoubleColon,
        expr: Box::new(Expr::Nested(Box::new(e.clone()))),
        data_type: DataType::BigInt(None),
        format: None,
    }
}

/// Plans the merge of `q` run on several shards.
pub(crate) fn build(ctx: &Ctx, q: &Query) -> Result<Built, String> {
    let mut check = NestedCheck { ctx, depth: 0 };
    if let ControlFlow::Break(why) = q.visit(&mut check) {
        return Err(why);
    }
    if !q.pipe_operators.is_empty()
        || q.settings.is_some()
        || q.format_clause.is_some()
        || q.for_clause.is_some()
    {
        return Err("this query syntax can't be merged across shards".into());
    }
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

    let order_exprs: Vec<OrderByExpr> = match &q.order_by {
        None => Vec::new(),
        Some(OrderBy {
            kind: OrderByKind::Expressions(v),
            interpolate: None,
        }) => v.clone(),
        Some(_) => return Err("ORDER BY ALL / INTERPOLATE".into()),
    };

    // CTEs over sharded tables count as sharded relations of the outer query.
    let ctes: Vec<String> = q
        .with
        .iter()
        .flat_map(|w| w.cte_tables.iter())
        .filter(|c| ctx.reads_sharded(c.query.as_ref()))
        .map(|c| fold(&c.alias.name))
        .collect();
    let from_sharded = |from: &[TableWithJoins]| {
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
    };

    let mut shard_q = q.clone();
    let mut spec = MergeSpec::default();
    match (q.body.as_ref(), shard_q.body.as_mut()) {
        (SetExpr::Select(sel), SetExpr::Select(shard_sel)) => {
            select_spec(ctx, sel, &order_exprs, shard_sel, &mut spec, &from_sharded)?;
        }
        (SetExpr::SetOperation { .. }, _) => {
            union_spec(&q.body, &order_exprs, &mut spec, &from_sharded)?
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
    } else if limit_e.is_some() || offset_e.is_some() {
        shard_q.fetch = None;
        let shard_limit = match (&limit_e, limit, offset) {
            (None, _, _) => None,
            (Some(l), _, None) => Some(l.clone()),
            (Some(_), Some(Count::Literal(l)), Some(Count::Literal(o))) => {
                Some(number(l.checked_add(o).ok_or_else(unsupported_limit)?))
            }
            (Some(l), _, Some(_)) => match &offset_e {
                Some(o) => Some(Expr::BinaryOp {
                    left: Box::new(as_bigint(l)),
                    op: BinaryOperator::Plus,
                    right: Box::new(as_bigint(o)),
                }),
                None => Some(l.clone()),
            },
        };
        shard_q.limit_clause = shard_limit.map(|l| LimitClause::LimitOffset {
            limit: Some(l),
            offset: None,
            limit_by: Vec::new(),
        });
    }
    if let Some(Count::Literal(l)) = limit {
        spec.limit = Some(l);
    }
    if let Some(Count::Literal(o)) = offset {
        spec.offset = o;
    }
    if shard_q != *q {
        spec.shard_sql = Some(shard_q.to_string());
    }
    Ok(Built {
        spec,
        limit,
        offset,
    })
}

enum Agg {
    Count,
    Sum,
    Min,
    Max,
    Avg(Box<Function>),
}

/// The mergeable aggregate an output expression is, `None` if it has no aggregate.
fn agg_of(e: &Expr) -> Result<Option<Agg>, String> {
    match e {
        Expr::Nested(inner) => agg_of(inner),
        Expr::Cast { expr, .. } if matches!(agg_of(expr), Ok(Some(Agg::Count))) => {
            Ok(Some(Agg::Count))
        }
        Expr::Function(f) if is_aggregate_call(f) => {
            let name = func_name(f);
            let FunctionArguments::List(list) = &f.args else {
                return Err(format!("the aggregate `{e}` can't be merged across shards"));
            };
            if !f.within_group.is_empty()
                || !list.clauses.is_empty()
                || f.null_treatment.is_some()
                || list.args.len() != 1
                || scan(&list.args).aggregate
            {
                return Err(format!("the aggregate `{e}` can't be merged across shards"));
            }
            let distinct = matches!(list.duplicate_treatment, Some(DuplicateTreatment::Distinct));
            match name.as_str() {
                "min" => Ok(Some(Agg::Min)),
                "max" => Ok(Some(Agg::Max)),
                _ if distinct => Err(format!(
                    "`{e}`: {name}(DISTINCT …) can't be merged across shards"
                )),
                "count" => Ok(Some(Agg::Count)),
                "sum" => Ok(Some(Agg::Sum)),
                "avg" => Ok(Some(Agg::Avg(Box::new(f.clone())))),
                _ => Err(format!(
                    "the aggregate `{e}` can't be merged across shards (supported: count, sum, \
                     min, max, avg)"
                )),
            }
        }
        other => {
            if scan(other).aggregate {
                Err(format!(
                    "the expression `{other}` computes with aggregates; only plain count/sum/min/\
                     max/avg columns can be merged across shards"
                ))
            } else {
                Ok(None)
            }
        }
    }
}

fn renamed(f: &Function, name: &str) -> Expr {
    let mut f = f.clone();
    f.name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(name))]);
    Expr::Function(f)
}

fn item_expr(item: &SelectItem) -> Option<&Expr> {
    match item {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
        _ => None,
    }
}

/// The column name PostgreSQL gives an output item.
fn output_name(item: &SelectItem) -> Option<String> {
    match item {
        SelectItem::ExprWithAlias { alias, .. } => Some(fold(alias)),
        SelectItem::UnnamedExpr(e) => match e {
            Expr::Identifier(id) => Some(fold(id)),
            Expr::CompoundIdentifier(parts) => parts.last().map(fold),
            Expr::Function(f) => Some(func_name(f)),
            _ => None,
        },
        _ => None,
    }
}

/// Same expression, treating `t.col` and `col` as the same column.
fn same_expr(a: &Expr, b: &Expr) -> bool {
    if a == b {
        return true;
    }
    let col = |e: &Expr| -> Option<(Option<String>, String)> {
        match e {
            Expr::Identifier(id) => Some((None, fold(id))),
            Expr::CompoundIdentifier(p) if p.len() >= 2 => {
                Some((Some(fold(&p[p.len() - 2])), fold(&p[p.len() - 1])))
            }
            _ => None,
        }
    };
    match (col(a), col(b)) {
        (Some((qa, na)), Some((qb, nb))) => na == nb && (qa.is_none() || qb.is_none() || qa == qb),
        _ => false,
    }
}

fn position(e: &Expr) -> Option<Option<usize>> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => Some(n.parse::<usize>().ok()),
            _ => None,
        },
        _ => None,
    }
}

/// Output column an ORDER BY (`by_name`) or GROUP BY expression refers to.
fn resolve_output(e: &Expr, projection: &[SelectItem], by_name: bool) -> Option<usize> {
    if let Some(pos) = position(e) {
        let k = pos?;
        return (k >= 1 && k <= projection.len() && item_expr(&projection[k - 1]).is_some())
            .then(|| k - 1);
    }
    if by_name {
        if let Expr::Identifier(id) = e {
            let name = fold(id);
            if let Some(i) = projection
                .iter()
                .position(|it| output_name(it).as_deref() == Some(name.as_str()))
            {
                return Some(i);
            }
        }
    }
    projection
        .iter()
        .position(|it| item_expr(it).is_some_and(|x| same_expr(x, e)))
}

fn select_spec(
    ctx: &Ctx,
    sel: &Select,
    order_exprs: &[OrderByExpr],
    shard_sel: &mut Select,
    spec: &mut MergeSpec,
    from_sharded: &dyn Fn(&[TableWithJoins]) -> bool,
) -> Result<(), String> {
    if sel.into.is_some() {
        return Err("SELECT INTO".into());
    }
    if sel.top.is_some()
        || !sel.lateral_views.is_empty()
        || sel.prewhere.is_some()
        || !sel.cluster_by.is_empty()
        || !sel.distribute_by.is_empty()
        || !sel.sort_by.is_empty()
        || sel.qualify.is_some()
        || !sel.connect_by.is_empty()
        || sel.value_table_mode.is_some()
        || sel.exclude.is_some()
    {
        return Err("this SELECT syntax can't be merged across shards".into());
    }
    if !from_sharded(&sel.from) {
        return Err(format!(
            "the outer query reads sharded tables only in subqueries, so it would run once \
             per shard; filter by {} or route with /* shard=<name> */",
            ctx.key_column
        ));
    }
    match &sel.distinct {
        Some(Distinct::On(_)) => {
            return Err("DISTINCT ON can't be merged across shards; add a shard key".into())
        }
        Some(Distinct::Distinct) => spec.distinct = true,
        Some(Distinct::All) | None => {}
    }
    if sel.having.is_some() {
        return Err(
            "HAVING can't be evaluated across shards (each shard sees partial groups); add a \
             shard key or filter in the application"
                .into(),
        );
    }
    let group_exprs: &[Expr] = match &sel.group_by {
        GroupByExpr::Expressions(e, mods) if mods.is_empty() => e,
        _ => return Err("GROUP BY ALL / ROLLUP / CUBE / GROUPING SETS".into()),
    };
    if group_exprs
        .iter()
        .any(|g| matches!(g, Expr::GroupingSets(_) | Expr::Cube(_) | Expr::Rollup(_)))
    {
        return Err("GROUP BY ROLLUP / CUBE / GROUPING SETS".into());
    }
    let order_scan = order_exprs.iter().map(|o| scan(&o.expr));
    let proj_scan = scan(&sel.projection);
    let mut window = proj_scan.window || !sel.named_window.is_empty();
    let mut has_agg = proj_scan.aggregate;
    for s in order_scan {
        window |= s.window;
        has_agg |= s.aggregate;
    }
    if window {
        return Err("window functions can't be computed across shards; add a shard key".into());
    }
    let star = sel.projection.iter().any(|i| {
        matches!(
            i,
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
        )
    });
    let aggregating = has_agg || !group_exprs.is_empty();
    if aggregating && star {
        return Err("SELECT * together with aggregates or GROUP BY".into());
    }

    let visible = sel.projection.len();
    let mut aggs: Vec<ColumnMerge> = Vec::with_capacity(visible);
    let mut hidden: Vec<(Expr, ColumnMerge)> = Vec::new();

    if aggregating {
        for item in &sel.projection {
            let Some(e) = item_expr(item) else {
                return Err("SELECT * together with aggregates".into());
            };
            let merge = match agg_of(e)? {
                Some(Agg::Count) => ColumnMerge::Count,
                Some(Agg::Sum) => ColumnMerge::Sum,
                Some(Agg::Min) => ColumnMerge::Min,
                Some(Agg::Max) => ColumnMerge::Max,
                Some(Agg::Avg(f)) => {
                    let sum_col = visible + hidden.len();
                    hidden.push((renamed(&f, "sum"), ColumnMerge::Sum));
                    hidden.push((renamed(&f, "count"), ColumnMerge::Count));
                    ColumnMerge::Avg {
                        sum_col,
                        count_col: sum_col + 1,
                    }
                }
                None => {
                    if group_exprs.is_empty() && scan(e).column {
                        return Err(format!(
                            "the column `{e}` is mixed with aggregates without GROUP BY; a \
                             cross-shard merge can't give it one correct value"
                        ));
                    }
                    ColumnMerge::Key
                }
            };
            aggs.push(merge);
        }
        for g in group_exprs {
            match resolve_output(g, &sel.projection, false) {
                Some(i) if aggs.get(i) == Some(&ColumnMerge::Key) => spec.group_by.push(i),
                Some(_) => return Err("GROUP BY an aggregate".into()),
                None => {
                    spec.group_by.push(visible + hidden.len());
                    hidden.push((g.clone(), ColumnMerge::Key));
                }
            }
        }
    }

    for ob in order_exprs {
        if ob.with_fill.is_some() {
            return Err("ORDER BY … WITH FILL".into());
        }
        let descending = descending(ob)?;
        let nulls_first = ob.options.nulls_first.unwrap_or(descending);
        let column = if star {
            if position(&ob.expr).is_some() {
                return Err(
                    "ORDER BY <position> with SELECT * in a cross-shard query; order by column \
                     name"
                        .into(),
                );
            }
            // Aliases can't be referenced in the select list: use the aliased expression.
            let expr = match resolve_output(&ob.expr, &sel.projection, true) {
                Some(i) => item_expr(&sel.projection[i])
                    .cloned()
                    .unwrap_or(ob.expr.clone()),
                None => ob.expr.clone(),
            };
            spec.order_by_hidden = true;
            hidden.push((expr, ColumnMerge::Key));
            hidden.len() - 1
        } else if let Some(i) = resolve_output(&ob.expr, &sel.projection, true) {
            i
        } else {
            let merge = if aggregating {
                match agg_of(&ob.expr)? {
                    Some(Agg::Count) => ColumnMerge::Count,
                    Some(Agg::Sum) => ColumnMerge::Sum,
                    Some(Agg::Min) => ColumnMerge::Min,
                    Some(Agg::Max) => ColumnMerge::Max,
                    Some(Agg::Avg(_)) => {
                        return Err(
                            "ORDER BY avg(…) that is not in the select list; select it".into()
                        )
                    }
                    None => ColumnMerge::Key,
                }
            } else {
                ColumnMerge::Key
            };
            hidden.push((ob.expr.clone(), merge));
            visible + hidden.len() - 1
        };
        spec.order_by.push(OrderKey {
            column,
            descending,
            nulls_first,
        });
    }

    spec.hidden_columns = hidden.len();
    if aggregating {
        spec.aggregates = aggs;
        spec.aggregates.extend(hidden.iter().map(|(_, m)| *m));
    }
    shard_sel
        .projection
        .extend(hidden.into_iter().map(|(e, _)| SelectItem::UnnamedExpr(e)));
    Ok(())
}

fn union_spec(
    body: &SetExpr,
    order_exprs: &[OrderByExpr],
    spec: &mut MergeSpec,
    from_sharded: &dyn Fn(&[TableWithJoins]) -> bool,
) -> Result<(), String> {
    let mut branches = Vec::new();
    let mut quantifiers = Vec::new();
    flatten_union(body, &mut branches, &mut quantifiers)?;
    let distinct = quantifiers.iter().all(|q| *q != SetQuantifier::All);
    if !distinct && quantifiers.iter().any(|q| *q != SetQuantifier::All) {
        return Err("mixing UNION and UNION ALL across shards".into());
    }
    spec.distinct = distinct;
    for b in &branches {
        let SetExpr::Select(s) = b else {
            return Err("UNION branches must be plain SELECTs to be merged across shards".into());
        };
        let sc = scan(&s.projection);
        let grouped = !matches!(&s.group_by, GroupByExpr::Expressions(e, _) if e.is_empty());
        if sc.aggregate || sc.window || grouped || s.having.is_some() {
            return Err(
                "UNION branches with aggregates, GROUP BY or window functions can't be merged \
                 across shards"
                    .into(),
            );
        }
        if !distinct {
            if s.distinct.is_some() {
                return Err("DISTINCT inside UNION ALL can't be merged across shards".into());
            }
            if !from_sharded(&s.from) {
                return Err(
                    "a UNION ALL branch that reads no sharded table would be repeated once per \
                     shard"
                        .into(),
                );
            }
        }
    }
    let first = match branches.first() {
        Some(SetExpr::Select(s)) => &s.projection,
        _ => return Err("UNION".into()),
    };
    for ob in order_exprs {
        let descending = descending(ob)?;
        let nulls_first = ob.options.nulls_first.unwrap_or(descending);
        let star = first.iter().any(|i| item_expr(i).is_none());
        let column = match (&ob.expr, star) {
            (e, false) if position(e).is_some() => resolve_output(e, first, false),
            (Expr::Identifier(id), false) => first
                .iter()
                .position(|it| output_name(it).as_deref() == Some(fold(id).as_str())),
            _ => None,
        }
        .ok_or_else(|| {
            "ORDER BY of a cross-shard UNION must name or number an output column (and the \
             first SELECT can't use *)"
                .to_string()
        })?;
        spec.order_by.push(OrderKey {
            column,
            descending,
            nulls_first,
        });
    }
    Ok(())
}

fn flatten_union<'q>(
    body: &'q SetExpr,
    branches: &mut Vec<&'q SetExpr>,
    quantifiers: &mut Vec<SetQuantifier>,
) -> Result<(), String> {
    match body {
        SetExpr::SetOperation {
            op,
            set_quantifier,
            left,
            right,
        } => {
            if *op != SetOperator::Union {
                return Err(format!(
                    "{op} can't be merged across shards; add a shard key"
                ));
            }
            if !matches!(
                set_quantifier,
                SetQuantifier::All | SetQuantifier::Distinct | SetQuantifier::None
            ) {
                return Err("UNION BY NAME".into());
            }
            quantifiers.push(*set_quantifier);
            flatten_union(left, branches, quantifiers)?;
            flatten_union(right, branches, quantifiers)
        }
        other => {
            branches.push(other);
            Ok(())
        }
    }
}
