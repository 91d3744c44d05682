//! The merge plan of a cross-shard `SELECT` (one query block, not a UNION): which
//! columns merge how, GROUP BY and ORDER BY as column indexes, and the hidden columns the
//! shards must add for the merger.

use sqlparser::ast::{
    Distinct, Expr, GroupByExpr, OrderByExpr, Select, SelectItem, TableWithJoins,
};

use super::aggregate::{agg_of, renamed, scan, Agg};
use super::columns::{item_expr, position, resolve_output, sort_options};
use crate::merge::{ColumnMerge, MergeSpec, OrderKey};
use crate::router::expr::Ctx;

/// Columns appended to the shards' select list for the merger (avg's `sum`/`count`,
/// GROUP BY and ORDER BY expressions the client didn't select); cut before the client
/// sees the rows.
struct Hidden {
    /// Width of the client's select list: hidden column `i` is shard column
    /// `visible + i`.
    visible: usize,
    cols: Vec<(Expr, ColumnMerge)>,
}

impl Hidden {
    /// Appends a column; returns its index in the shard rows.
    fn push(&mut self, e: Expr, merge: ColumnMerge) -> usize {
        self.cols.push((e, merge));
        self.visible + self.cols.len() - 1
    }
}

/// Fills `spec` for the SELECT `sel` (whose ORDER BY is `order_exprs`) and adds the
/// hidden columns to `shard_sel`, the SELECT the shards run. Refuses what can't be merged
/// exactly.
pub(super) fn select_spec(
    ctx: &Ctx,
    sel: &Select,
    order_exprs: &[OrderByExpr],
    shard_sel: &mut Select,
    spec: &mut MergeSpec,
    from_sharded: &dyn Fn(&[TableWithJoins]) -> bool,
) -> Result<(), String> {
    check_syntax(sel)?;
    if !from_sharded(&sel.from) {
        return Err(format!(
            "the outer query reads sharded tables only in subqueries, so it would run once \
             per shard; filter by {} or route with /* shard=<name> */",
            ctx.key_column
        ));
    }
    if distinct(sel)? {
        spec.distinct = true;
    }
    if sel.having.is_some() {
        return Err(
            "HAVING can't be evaluated across shards (each shard sees partial groups); add a \
             shard key or filter in the application"
                .into(),
        );
    }
    let group_exprs = group_exprs(sel)?;
    let has_agg = has_aggregates(sel, order_exprs)?;
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
    let mut hidden = Hidden {
        visible: sel.projection.len(),
        cols: Vec::new(),
    };
    let aggs = if aggregating {
        let aggs = projection_merges(&sel.projection, !group_exprs.is_empty(), &mut hidden)?;
        spec.group_by = group_columns(group_exprs, &sel.projection, &aggs, &mut hidden)?;
        aggs
    } else {
        Vec::new()
    };
    for ob in order_exprs {
        let key = order_key(ob, &sel.projection, star, aggregating, &mut hidden)?;
        spec.order_by.push(key);
    }
    spec.order_by_hidden = star && !order_exprs.is_empty();
    spec.hidden_columns = hidden.cols.len();
    if aggregating {
        spec.aggregates = aggs;
        spec.aggregates.extend(hidden.cols.iter().map(|(_, m)| *m));
    }
    shard_sel.projection.extend(
        hidden
            .cols
            .into_iter()
            .map(|(e, _)| SelectItem::UnnamedExpr(e)),
    );
    Ok(())
}

/// Refuses SELECT syntax the merger has no rule for (mostly other dialects' clauses).
fn check_syntax(sel: &Select) -> Result<(), String> {
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
    Ok(())
}

/// `SELECT DISTINCT` (the merger de-duplicates); DISTINCT ON would need each group's
/// first row by the query's order across shards, and is refused.
fn distinct(sel: &Select) -> Result<bool, String> {
    match &sel.distinct {
        Some(Distinct::On(_)) => {
            Err("DISTINCT ON can't be merged across shards; add a shard key".into())
        }
        Some(Distinct::Distinct) => Ok(true),
        Some(Distinct::All) | None => Ok(false),
    }
}

/// The plain GROUP BY expressions; grouping sets, ROLLUP and CUBE are refused (their
/// subtotal rows would be computed per shard).
fn group_exprs(sel: &Select) -> Result<&[Expr], String> {
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
    Ok(group_exprs)
}

/// Whether the select list or ORDER BY aggregates; window functions are refused (they
/// would see only one shard's rows).
fn has_aggregates(sel: &Select, order_exprs: &[OrderByExpr]) -> Result<bool, String> {
    let proj_scan = scan(&sel.projection);
    let mut window = proj_scan.window || !sel.named_window.is_empty();
    let mut has_agg = proj_scan.aggregate;
    for s in order_exprs.iter().map(|o| scan(&o.expr)) {
        window |= s.window;
        has_agg |= s.aggregate;
    }
    if window {
        return Err("window functions can't be computed across shards; add a shard key".into());
    }
    Ok(has_agg)
}

/// How each output column of an aggregating SELECT merges. `avg(x)` gets hidden
/// `sum(x)` and `count(x)` columns, since an average of the shards' averages would be
/// wrong. A plain column without GROUP BY has no one correct value, and is refused.
fn projection_merges(
    projection: &[SelectItem],
    grouped: bool,
    hidden: &mut Hidden,
) -> Result<Vec<ColumnMerge>, String> {
    let mut aggs = Vec::with_capacity(projection.len());
    for item in projection {
        let Some(e) = item_expr(item) else {
            return Err("SELECT * together with aggregates".into());
        };
        let merge = match agg_of(e)? {
            Some(Agg::Plain(merge)) => merge,
            Some(Agg::Avg(f)) => {
                let sum_col = hidden.push(renamed(&f, "sum"), ColumnMerge::Sum);
                let count_col = hidden.push(renamed(&f, "count"), ColumnMerge::Count);
                ColumnMerge::Avg { sum_col, count_col }
            }
            None => {
                if !grouped && scan(e).column {
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
    Ok(aggs)
}

/// The shard columns that identify a group: each GROUP BY expression is an output key
/// column, or becomes a hidden one.
fn group_columns(
    group_exprs: &[Expr],
    projection: &[SelectItem],
    aggs: &[ColumnMerge],
    hidden: &mut Hidden,
) -> Result<Vec<usize>, String> {
    group_exprs
        .iter()
        .map(|g| match resolve_output(g, projection, false) {
            Some(i) if aggs.get(i) == Some(&ColumnMerge::Key) => Ok(i),
            Some(_) => Err("GROUP BY an aggregate".into()),
            None => Ok(hidden.push(g.clone(), ColumnMerge::Key)),
        })
        .collect()
}

/// One ORDER BY key: an output column, or a hidden column the shards compute. With
/// `SELECT *` the visible width is unknown here, so every key is a hidden column indexed
/// from the first hidden one ([`MergeSpec::order_by_hidden`]).
fn order_key(
    ob: &OrderByExpr,
    projection: &[SelectItem],
    star: bool,
    aggregating: bool,
    hidden: &mut Hidden,
) -> Result<OrderKey, String> {
    if ob.with_fill.is_some() {
        return Err("ORDER BY … WITH FILL".into());
    }
    let (descending, nulls_first) = sort_options(ob)?;
    let column = if star {
        star_order_column(ob, projection, hidden)?
    } else if let Some(i) = resolve_output(&ob.expr, projection, true) {
        i
    } else {
        let merge = if aggregating {
            order_merge(&ob.expr)?
        } else {
            ColumnMerge::Key
        };
        hidden.push(ob.expr.clone(), merge)
    };
    Ok(OrderKey {
        column,
        descending,
        nulls_first,
    })
}

/// The hidden column (relative to the first hidden one) of an ORDER BY key next to
/// `SELECT *`.
fn star_order_column(
    ob: &OrderByExpr,
    projection: &[SelectItem],
    hidden: &mut Hidden,
) -> Result<usize, String> {
    if position(&ob.expr).is_some() {
        return Err(
            "ORDER BY <position> with SELECT * in a cross-shard query; order by column name".into(),
        );
    }
    // Aliases can't be referenced in the select list: use the aliased expression.
    let expr = match resolve_output(&ob.expr, projection, true) {
        Some(i) => item_expr(&projection[i])
            .cloned()
            .unwrap_or(ob.expr.clone()),
        None => ob.expr.clone(),
    };
    Ok(hidden.push(expr, ColumnMerge::Key) - hidden.visible)
}

/// How an ORDER BY expression that is not in the select list of an aggregating query
/// merges as a hidden column.
fn order_merge(e: &Expr) -> Result<ColumnMerge, String> {
    match agg_of(e)? {
        Some(Agg::Plain(merge)) => Ok(merge),
        Some(Agg::Avg(_)) => {
            Err("ORDER BY avg(…) that is not in the select list; select it".into())
        }
        None => Ok(ColumnMerge::Key),
    }
}
