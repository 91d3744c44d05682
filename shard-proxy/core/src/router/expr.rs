//! Shared vocabulary of the router's SQL analysis: the normalised sharding rules
//! ([`Ctx`]) and the small AST predicates both the statement analysis (`analyze`) and the
//! scatter planner (`scatter`) ask — is this a sharded table, is this the key column, which
//! `$n` is this.
//!
//! Why a module of its own: `analyze` calls `scatter` to plan reads that span shards, and
//! `scatter` needs these same predicates. Keeping them here (a leaf: it depends on no other
//! router module) keeps the dependency direction one-way: `analyze → scatter → expr`.

use std::ops::ControlFlow;

use sqlparser::ast::{visit_relations, AssignmentTarget, Expr, Ident, ObjectName, ObjectNamePart};

/// The sharding rules, normalised for matching.
pub(crate) struct Ctx<'a> {
    /// Lowercased sharded table names.
    pub(crate) tables: &'a [String],
    /// Lowercased key column.
    pub(crate) key_column: &'a str,
    /// Whether the statement is small enough to keep its AST in the analysis (for
    /// splitting multi-row INSERTs at plan time, on the caller's stack).
    pub(crate) keep_ast: bool,
}

/// An identifier as PostgreSQL sees it: unquoted names fold to lower case.
pub(crate) fn fold(id: &Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_lowercase()
    }
}

/// The last part of a possibly qualified name (`public.tasks` → `tasks`).
pub(crate) fn last_ident(name: &ObjectName) -> Option<&Ident> {
    match name.0.last() {
        Some(ObjectNamePart::Identifier(id)) => Some(id),
        _ => None,
    }
}

/// `$n` → `n - 1`.
pub(crate) fn placeholder_index(p: &str) -> Option<usize> {
    let n: usize = p.strip_prefix('$')?.parse().ok()?;
    n.checked_sub(1)
}

impl Ctx<'_> {
    /// Whether `name` (already folded, unqualified) is a sharded table.
    pub(crate) fn is_sharded_name(&self, name: &str) -> bool {
        self.tables.iter().any(|t| t == name)
    }

    /// Whether a (possibly qualified) table name is a sharded table.
    pub(crate) fn is_sharded(&self, name: &ObjectName) -> bool {
        last_ident(name).is_some_and(|id| self.is_sharded_name(&fold(id)))
    }

    /// Whether any relation anywhere in `node` (subqueries included) is a sharded table.
    pub(crate) fn reads_sharded<V: sqlparser::ast::Visit>(&self, node: &V) -> bool {
        visit_relations(node, |name| {
            if self.is_sharded(name) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .is_break()
    }

    /// Whether `e` is the shard key column (`performer_id`, `t.performer_id`).
    pub(crate) fn is_key_col(&self, e: &Expr) -> bool {
        match e {
            Expr::Identifier(id) => fold(id) == self.key_column,
            Expr::CompoundIdentifier(parts) => {
                parts.last().is_some_and(|id| fold(id) == self.key_column)
            }
            Expr::Nested(inner) => self.is_key_col(inner),
            _ => false,
        }
    }

    /// Whether `name` (a column, maybe qualified) is the shard key column.
    pub(crate) fn is_key_name(&self, name: &ObjectName) -> bool {
        last_ident(name).is_some_and(|id| fold(id) == self.key_column)
    }

    /// Whether an UPDATE / `ON CONFLICT DO UPDATE` assignment sets the shard key column
    /// (`SET performer_id = …` or `SET (…, performer_id, …) = …`).
    pub(crate) fn assigns_key(&self, target: &AssignmentTarget) -> bool {
        match target {
            AssignmentTarget::ColumnName(n) => self.is_key_name(n),
            AssignmentTarget::Tuple(ns) => ns.iter().any(|n| self.is_key_name(n)),
        }
    }
}
