//! The merge plan of a cross-shard UNION / UNION ALL of plain SELECTs.

use sqlparser::ast::{
    Expr, GroupByExpr, OrderByExpr, SelectItem, SetExpr, SetOperator, SetQuantifier, TableWithJoins,
};

use super::aggregate::scan;
use super::columns::{item_expr, output_name, position, resolve_output, sort_options};
use crate::merge::{MergeSpec, OrderKey};
use crate::router::expr::fold;

/// Fills `spec` for a UNION [ALL] of plain SELECTs: rows concatenated (UNION also
/// de-duplicated by the merger), ORDER BY by output column.
pub(super) fn union_spec(
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
        check_branch(b, distinct, from_sharded)?;
    }
    let first = match branches.first() {
        Some(SetExpr::Select(s)) => &s.projection,
        _ => return Err("UNION".into()),
    };
    for ob in order_exprs {
        spec.order_by.push(union_order_key(ob, first)?);
    }
    Ok(())
}

/// The branches of a chain of UNIONs, left to right, and the quantifier of each UNION.
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

/// A UNION branch must be a plain row-by-row SELECT; under UNION ALL (no de-duplication)
/// it must also read a sharded table, or every shard would return its rows again.
fn check_branch(
    b: &SetExpr,
    distinct: bool,
    from_sharded: &dyn Fn(&[TableWithJoins]) -> bool,
) -> Result<(), String> {
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
    Ok(())
}

/// An ORDER BY key of a UNION: it can only name or number an output column of the first
/// SELECT.
fn union_order_key(ob: &OrderByExpr, first: &[SelectItem]) -> Result<OrderKey, String> {
    let (descending, nulls_first) = sort_options(ob)?;
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
    Ok(OrderKey {
        column,
        descending,
        nulls_first,
    })
}
