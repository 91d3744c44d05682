//! Aggregates in a cross-shard SELECT: which functions are aggregates, what an
//! expression contains at its own query level, and how an output column's aggregate
//! merges.

use std::ops::ControlFlow;

use sqlparser::ast::{
    DuplicateTreatment, Expr, Function, FunctionArguments, Ident, ObjectName, ObjectNamePart,
    Query, Visit, Visitor,
};

use crate::merge::ColumnMerge;
use crate::router::expr::fold;

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

/// A function call's unqualified, folded name.
pub(super) fn func_name(f: &Function) -> String {
    match f.name.0.last() {
        Some(ObjectNamePart::Identifier(id)) => fold(id),
        _ => String::new(),
    }
}

/// An aggregate call (not a window function: those have `OVER`).
fn is_aggregate_call(f: &Function) -> bool {
    f.over.is_none() && AGGREGATES.contains(&func_name(f).as_str())
}

/// What an expression contains at its own query level (not inside subqueries).
#[derive(Default)]
pub(super) struct Scan {
    depth: usize,
    /// An aggregate call.
    pub(super) aggregate: bool,
    /// A window function.
    pub(super) window: bool,
    /// A column reference.
    pub(super) column: bool,
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

/// Scans `node` at its own query level.
pub(super) fn scan<V: Visit>(node: &V) -> Scan {
    let mut s = Scan::default();
    let _ = node.visit(&mut s);
    s
}

/// A mergeable aggregate output column.
pub(super) enum Agg {
    /// `count`, `sum`, `min`, `max`: one column, merged as this.
    Plain(ColumnMerge),
    /// `avg(x)`: merged from hidden `sum(x)` and `count(x)` columns (an average of the
    /// shards' averages would be wrong).
    Avg(Box<Function>),
}

/// The mergeable aggregate an output expression is, `None` if it has no aggregate.
pub(super) fn agg_of(e: &Expr) -> Result<Option<Agg>, String> {
    match e {
        Expr::Nested(inner) => agg_of(inner),
        Expr::Cast { expr, .. }
            if matches!(agg_of(expr), Ok(Some(Agg::Plain(ColumnMerge::Count)))) =>
        {
            Ok(Some(Agg::Plain(ColumnMerge::Count)))
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
                "min" => Ok(Some(Agg::Plain(ColumnMerge::Min))),
                "max" => Ok(Some(Agg::Plain(ColumnMerge::Max))),
                _ if distinct => Err(format!(
                    "`{e}`: {name}(DISTINCT …) can't be merged across shards"
                )),
                "count" => Ok(Some(Agg::Plain(ColumnMerge::Count))),
                "sum" => Ok(Some(Agg::Plain(ColumnMerge::Sum))),
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

/// The same call under another name (`avg(x)` → `sum(x)`, `count(x)`).
pub(super) fn renamed(f: &Function, name: &str) -> Expr {
    let mut f = f.clone();
    f.name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(name))]);
    Expr::Function(f)
}
