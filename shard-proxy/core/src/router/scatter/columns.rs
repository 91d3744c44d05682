//! Output columns of a cross-shard SELECT: which select-list item an ORDER BY or
//! GROUP BY expression refers to (by position, output name or equal expression), and the
//! sort options of an ORDER BY key. The merger sorts and groups by column index, so every
//! key must resolve to one.

use sqlparser::ast::{Expr, OrderByExpr, OrderBySort, SelectItem, Value};

use super::aggregate::func_name;
use crate::router::expr::fold;

/// `(descending, nulls_first)` of an ORDER BY key, with PostgreSQL's default for NULLS
/// (last ascending, first descending). `USING <operator>` is refused: the merger knows no
/// operator classes.
pub(super) fn sort_options(ob: &OrderByExpr) -> Result<(bool, bool), String> {
    let descending = match &ob.options.sort {
        None | Some(OrderBySort::Asc) => false,
        Some(OrderBySort::Desc) => true,
        Some(OrderBySort::Using(_)) => {
            return Err("ORDER BY … USING <operator> can't be merged across shards".into())
        }
    };
    Ok((descending, ob.options.nulls_first.unwrap_or(descending)))
}

/// The expression of a select-list item (`None` for `*`).
pub(super) fn item_expr(item: &SelectItem) -> Option<&Expr> {
    match item {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
        _ => None,
    }
}

/// The column name PostgreSQL gives an output item.
pub(super) fn output_name(item: &SelectItem) -> Option<String> {
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

/// `ORDER BY 2`: `Some(Some(2))`; a number that is no position: `Some(None)`.
pub(super) fn position(e: &Expr) -> Option<Option<usize>> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => Some(n.parse::<usize>().ok()),
            _ => None,
        },
        _ => None,
    }
}

/// Output column an ORDER BY (`by_name`) or GROUP BY expression refers to.
pub(super) fn resolve_output(e: &Expr, projection: &[SelectItem], by_name: bool) -> Option<usize> {
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
