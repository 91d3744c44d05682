//! Splitting a multi-row INSERT whose rows belong to different shards into one INSERT per
//! shard, at plan time.
//!
//! Why at plan time and from text: the rows' shards are known only once `$n` keys are
//! bound, and most multi-row INSERTs land on one shard anyway; so the analysis keeps only
//! the statement's text ([`InsertTemplate`]) and this module re-parses it when a split is
//! really needed (keeping the AST in the cache would cost ~30× the text).

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use sqlparser::ast::{visit_expressions, visit_expressions_mut, Expr, SetExpr, Statement, Value};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::expr::placeholder_index;
use super::model::{InsertTemplate, RouteError};

/// Per-shard INSERTs holding only each shard's rows, `$n` renumbered.
pub(crate) fn split_insert(
    template: &InsertTemplate,
    row_shards: &[usize],
    shards: &[usize],
) -> Result<Vec<(usize, String, Vec<usize>)>, RouteError> {
    let cannot = || RouteError::Unsupported("cannot split this INSERT by shard".into());
    let parsed = Parser::parse_sql(&PostgreSqlDialect {}, &template.sql).map_err(|_| cannot())?;
    let [original] = parsed.as_slice() else {
        return Err(cannot());
    };
    let mut out = Vec::with_capacity(shards.len());
    for &shard in shards {
        let mut stmt = original.clone();
        let Statement::Insert(ins) = &mut stmt else {
            return Err(cannot());
        };
        let Some(SetExpr::Values(values)) = ins.source.as_deref_mut().map(|q| q.body.as_mut())
        else {
            return Err(cannot());
        };
        if values.rows.len() != row_shards.len() {
            return Err(cannot());
        }
        let mut i = 0;
        values.rows.retain(|_| {
            let keep = row_shards[i] == shard;
            i += 1;
            keep
        });
        let used = renumber_params(&mut stmt);
        out.push((shard, stmt.to_string(), used));
    }
    Ok(out)
}

/// Renumbers the `$n` parameters a statement still uses to `$1, $2, …` (in ascending
/// original order) and returns the original 0-based indexes, in their new order: a split
/// INSERT is sent with only its own rows' parameters.
fn renumber_params(stmt: &mut Statement) -> Vec<usize> {
    let mut used = BTreeMap::new();
    let _ = visit_expressions(&*stmt, |e| {
        if let Expr::Value(v) = e {
            if let Value::Placeholder(p) = &v.value {
                if let Some(idx) = placeholder_index(p) {
                    used.insert(idx, 0usize);
                }
            }
        }
        ControlFlow::<()>::Continue(())
    });
    for (new, slot) in used.values_mut().enumerate() {
        *slot = new;
    }
    let _ = visit_expressions_mut(stmt, |e| {
        if let Expr::Value(v) = e {
            if let Value::Placeholder(p) = &mut v.value {
                if let Some(new) = placeholder_index(p).and_then(|i| used.get(&i)) {
                    *p = format!("${}", new + 1);
                }
            }
        }
        ControlFlow::<()>::Continue(())
    });
    used.into_keys().collect()
}
