//! Statement analysis: from SQL text to an [`Analysis`] (kind, keys, write-ness, refusals),
//! and splitting a multi-row INSERT by shard.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use sqlparser::ast::{
    visit_expressions, visit_expressions_mut, visit_relations, visit_statements, AssignmentTarget,
    BinaryOperator, CopySource, CopyTarget, Expr, Ident, InTarget, Insert, ObjectName,
    ObjectNamePart, OnConflictAction, OnInsert, Query, Reset, Set, SetExpr, Statement, TableObject,
    UnaryOperator, Update, Value,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::scatter;
use super::text;
use super::{Analysis, InsertTemplate, KeyExpr, KeyValue, RouteError, StatementKind};

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

fn last_ident(name: &ObjectName) -> Option<&Ident> {
    match name.0.last() {
        Some(ObjectNamePart::Identifier(id)) => Some(id),
        _ => None,
    }
}

/// Keys found in a predicate: `None` = unconstrained.
type Keys = Option<Vec<KeyValue>>;

fn union(mut a: Vec<KeyValue>, b: Vec<KeyValue>) -> Vec<KeyValue> {
    for v in b {
        if !a.contains(&v) {
            a.push(v);
        }
    }
    a
}

impl Ctx<'_> {
    pub(crate) fn is_sharded_name(&self, name: &str) -> bool {
        self.tables.iter().any(|t| t == name)
    }

    fn is_sharded(&self, name: &ObjectName) -> bool {
        last_ident(name).is_some_and(|id| self.is_sharded_name(&fold(id)))
    }

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

    /// Analyses a whole SQL text.
    pub(crate) fn analyze(&self, sql: &str) -> Analysis {
        let hint = text::shard_hint(sql);
        let mut a = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
            Ok(stmts) => match stmts.as_slice() {
                [] => {
                    let mut a = Analysis::new(StatementKind::Empty);
                    a.statement_count = 0;
                    a
                }
                [one] => self.statement(one),
                many => self.multi(many),
            },
            Err(e) => text::fallback(sql, &|n| self.is_sharded_name(n))
                .unwrap_or_else(|| Analysis::new(StatementKind::Unparsed(e.to_string()))),
        };
        a.hint = hint;
        a
    }

    /// Several statements routed as one unit.
    fn multi(&self, stmts: &[Statement]) -> Analysis {
        let parts: Vec<Analysis> = stmts.iter().map(|s| self.statement(s)).collect();
        let mut a = Analysis::new(parts[0].kind.clone());
        a.statement_count = parts.len();
        a.detail.multi = true;
        a.is_write = parts.iter().any(|p| p.is_write);
        a.touches_sharded = parts.iter().any(|p| p.touches_sharded);
        a.detail.refusal = parts.iter().find_map(|p| p.detail.refusal.clone());
        a.detail.broadcast = parts.iter().any(|p| {
            matches!(
                p.kind,
                StatementKind::Begin
                    | StatementKind::Commit
                    | StatementKind::Rollback
                    | StatementKind::Savepoint
                    | StatementKind::Set
                    | StatementKind::SetShard(_)
                    | StatementKind::Prepare
                    | StatementKind::Deallocate
                    | StatementKind::Utility
            )
        });
        if a.detail.refusal.is_none() && parts.iter().any(|p| p.kind == StatementKind::Execute) {
            a.detail.refusal = Some(RouteError::Unsupported(
                "SQL-level EXECUTE inside a multi-statement query string".into(),
            ));
        }
        let mut keys: Vec<KeyValue> = Vec::new();
        let mut complete = true;
        for p in parts.iter().filter(|p| p.touches_sharded) {
            match &p.keys {
                KeyExpr::Any(v) | KeyExpr::PerRow(v) => keys = union(keys, v.clone()),
                KeyExpr::None => complete = false,
            }
            if p.detail.key_update.is_some() && a.detail.refusal.is_none() {
                a.detail.refusal = Some(RouteError::Unsupported(
                    "changing the shard key in UPDATE inside a multi-statement query string".into(),
                ));
            }
        }
        if a.touches_sharded && complete {
            a.keys = KeyExpr::Any(keys);
        }
        a
    }

    /// Analyses one statement.
    pub(crate) fn statement(&self, stmt: &Statement) -> Analysis {
        use StatementKind as K;
        match stmt {
            Statement::Query(q) => self.query(q),
            Statement::Insert(ins) => self.insert(ins, stmt),
            Statement::Update(Update {
                table,
                assignments,
                selection,
                ..
            }) => {
                let mut a = Analysis::new(K::Update);
                a.is_write = true;
                a.touches_sharded = self.reads_sharded(stmt);
                if !a.touches_sharded {
                    return a;
                }
                let keys = selection.as_ref().and_then(|e| self.where_keys(e));
                let target_sharded = self.reads_sharded(&table.relation);
                if target_sharded {
                    for asg in assignments {
                        let sets_key = match &asg.target {
                            AssignmentTarget::ColumnName(n) => {
                                last_ident(n).is_some_and(|id| fold(id) == self.key_column)
                            }
                            AssignmentTarget::Tuple(ns) => ns.iter().any(|n| {
                                last_ident(n).is_some_and(|id| fold(id) == self.key_column)
                            }),
                        };
                        if !sets_key {
                            continue;
                        }
                        let value = match &asg.target {
                            AssignmentTarget::ColumnName(_) => self.key_value(&asg.value),
                            AssignmentTarget::Tuple(_) => None,
                        };
                        match (value, &keys) {
                            (Some(v), Some(_)) => {
                                a.detail.key_update = Some((v, self.key_change_error()))
                            }
                            _ => a.detail.refusal = Some(self.key_change_error()),
                        }
                    }
                }
                a.keys = keys.map_or(KeyExpr::None, KeyExpr::Any);
                self.nested_writes(stmt, &mut a);
                a
            }
            Statement::Delete(d) => {
                let mut a = Analysis::new(K::Delete);
                a.is_write = true;
                a.touches_sharded = self.reads_sharded(stmt);
                if a.touches_sharded {
                    let keys = d.selection.as_ref().and_then(|e| self.where_keys(e));
                    a.keys = keys.map_or(KeyExpr::None, KeyExpr::Any);
                }
                self.nested_writes(stmt, &mut a);
                a
            }
            Statement::StartTransaction { .. } => Analysis::new(K::Begin),
            Statement::Commit { .. } => Analysis::new(K::Commit),
            Statement::Rollback { .. } => Analysis::new(K::Rollback),
            Statement::Savepoint { .. } | Statement::ReleaseSavepoint { .. } => {
                Analysis::new(K::Savepoint)
            }
            Statement::Set(set) => Analysis::new(self.set(set)),
            Statement::Reset(r) => Analysis::new(match &r.reset {
                Reset::ConfigurationParameter(name) if is_shard_setting(name) => K::SetShard(None),
                _ => K::Set,
            }),
            Statement::Discard { .. } => Analysis::new(K::Set),
            Statement::ShowVariable { .. }
            | Statement::ShowVariables { .. }
            | Statement::ShowStatus { .. }
            | Statement::ShowTables { .. }
            | Statement::ShowColumns { .. }
            | Statement::ShowCollation { .. }
            | Statement::ShowFunctions { .. }
            | Statement::ShowSchemas { .. }
            | Statement::ShowDatabases { .. }
            | Statement::ShowViews { .. }
            | Statement::ShowCreate { .. }
            | Statement::ShowObjects(_)
            | Statement::ExplainTable { .. } => Analysis::new(K::Show),
            Statement::Explain {
                analyze, statement, ..
            } => {
                let inner = self.statement(statement);
                let mut a = Analysis::new(K::Show);
                a.touches_sharded = inner.touches_sharded;
                a.is_write = *analyze && inner.is_write;
                a.keys = match inner.keys {
                    KeyExpr::PerRow(v) => KeyExpr::Any(v),
                    other => other,
                };
                a.detail.single_shard_read = true;
                if *analyze {
                    a.detail.refusal = inner.detail.refusal;
                    a.detail.key_update = inner.detail.key_update;
                }
                a
            }
            Statement::Copy {
                source, to, target, ..
            } => self.copy(source, *to, target),
            Statement::Prepare { statement, .. } => {
                let mut a = Analysis::new(K::Prepare);
                a.touches_sharded = self.statement(statement).touches_sharded;
                a
            }
            Statement::Execute { .. } => {
                let mut a = Analysis::new(K::Execute);
                a.is_write = true;
                a
            }
            Statement::Deallocate { .. } => Analysis::new(K::Deallocate),
            _ => {
                let mut a = Analysis::new(K::Utility);
                a.is_write = !matches!(
                    stmt,
                    Statement::LISTEN { .. }
                        | Statement::UNLISTEN { .. }
                        | Statement::NOTIFY { .. }
                );
                // Not every utility statement exposes its tables to the visitor (VACUUM):
                // any mention of a sharded table's name counts.
                a.touches_sharded = self.reads_sharded(stmt)
                    || text::mentions(&stmt.to_string(), &|n| self.is_sharded_name(n));
                a
            }
        }
    }

    fn key_change_error(&self) -> RouteError {
        RouteError::Unsupported(format!(
            "changing {} in UPDATE; move the row with DELETE + INSERT in one transaction",
            self.key_column
        ))
    }

    fn set(&self, set: &Set) -> StatementKind {
        let Set::SingleAssignment {
            variable, values, ..
        } = set
        else {
            return StatementKind::Set;
        };
        if !is_shard_setting(variable) {
            return StatementKind::Set;
        }
        match values.as_slice() {
            [Expr::Identifier(id)]
                if id.quote_style.is_none() && id.value.eq_ignore_ascii_case("default") =>
            {
                StatementKind::SetShard(None)
            }
            [v] => StatementKind::SetShard(Some(set_value_text(v))),
            _ => StatementKind::SetShard(Some(
                values
                    .iter()
                    .map(set_value_text)
                    .collect::<Vec<_>>()
                    .join(","),
            )),
        }
    }

    fn copy(&self, source: &CopySource, to: bool, target: &CopyTarget) -> Analysis {
        let from_stdin = !to && matches!(target, CopyTarget::Stdin);
        let mut a = Analysis::new(StatementKind::Copy { from_stdin });
        match source {
            CopySource::Table { table_name, .. } => {
                a.touches_sharded = self.is_sharded(table_name);
                a.is_write = !to;
                if !to && !from_stdin && a.touches_sharded {
                    a.detail.refusal = Some(RouteError::Unsupported(
                        "COPY from a server-side file or program into a sharded table; \
                         use COPY … FROM STDIN so the proxy can split rows by key"
                            .into(),
                    ));
                }
            }
            CopySource::Query(q) => {
                let inner = self.query(q);
                a.touches_sharded = inner.touches_sharded;
                a.is_write = inner.is_write;
                a.keys = inner.keys;
                a.detail.refusal = inner.detail.refusal;
                // COPY out of several shards can only be concatenated.
                let needs_merge = inner.merge.as_ref().is_some_and(|m| {
                    m.shard_sql.is_some() || *m != crate::merge::MergeSpec::default()
                }) || inner.detail.limit.is_some()
                    || inner.detail.offset.is_some();
                a.detail.scatter_refusal = inner.detail.scatter_refusal.or_else(|| {
                    needs_merge.then(|| {
                        "COPY (query) TO across shards can only concatenate rows; ORDER BY, \
                         LIMIT, DISTINCT and aggregates need a plain SELECT or a shard key"
                            .to_string()
                    })
                });
            }
        }
        a
    }

    /// SELECT (and VALUES / set operations).
    pub(crate) fn query(&self, q: &Query) -> Analysis {
        let mut a = Analysis::new(StatementKind::Select);
        a.touches_sharded = self.reads_sharded(q);
        let writes = nested_dml(q);
        a.is_write = !writes.is_empty();
        if !a.touches_sharded {
            return a;
        }
        let body_keys = self.query_keys(q);
        if writes.is_empty() {
            a.keys = match body_keys {
                BodyKeys::Keys(k) => KeyExpr::Any(k),
                BodyKeys::NotSharded | BodyKeys::Unknown => KeyExpr::None,
            };
            match scatter::build(self, q) {
                Ok(b) => {
                    a.merge = Some(b.spec);
                    a.detail.limit = b.limit;
                    a.detail.offset = b.offset;
                }
                Err(why) => a.detail.scatter_refusal = Some(why),
            }
            return a;
        }
        // Data-modifying WITH: every write needs a key; the reads must have one too (or
        // read no sharded table), and the statement goes to the union of their shards.
        let mut keys = match body_keys {
            BodyKeys::Keys(k) => Some(k),
            BodyKeys::NotSharded => Some(Vec::new()),
            BodyKeys::Unknown => None,
        };
        for w in writes {
            let inner = self.statement(&w);
            if inner.detail.refusal.is_some() {
                a.detail.refusal = inner.detail.refusal;
                return a;
            }
            if inner.detail.key_update.is_some() {
                a.detail.refusal = Some(self.key_change_error());
                return a;
            }
            if !inner.touches_sharded {
                continue;
            }
            match inner.keys {
                KeyExpr::Any(v) | KeyExpr::PerRow(v) => keys = keys.map(|k| union(k, v)),
                KeyExpr::None => keys = None,
            }
        }
        match keys {
            Some(k) => a.keys = KeyExpr::Any(k),
            None => {
                a.detail.refusal = Some(RouteError::Unsupported(format!(
                    "a data-modifying WITH query on sharded tables needs {} in every part \
                     (or a /* shard=<name> */ hint)",
                    self.key_column
                )))
            }
        }
        a
    }

    /// Writes nested in an UPDATE/DELETE (`WITH` is not allowed there by sqlparser, but
    /// subqueries could hide data-modifying CTEs).
    fn nested_writes(&self, stmt: &Statement, a: &mut Analysis) {
        let mut depth = 0;
        let _ = visit_statements(stmt, |s| {
            depth += 1;
            if depth > 1
                && matches!(
                    s,
                    Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_)
                )
            {
                a.detail.refusal = Some(RouteError::Unsupported(
                    "data-modifying subqueries inside UPDATE/DELETE".into(),
                ));
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        });
    }

    /// Keys of a query: every branch reading a sharded table (directly or through a CTE)
    /// must restrict the key.
    fn query_keys(&self, q: &Query) -> BodyKeys {
        let mut ctes: Vec<(String, BodyKeys)> = Vec::new();
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                if self.reads_sharded(cte.query.as_ref()) {
                    ctes.push((fold(&cte.alias.name), self.query_keys(&cte.query)));
                }
            }
        }
        self.set_expr_keys(&q.body, &ctes)
    }

    fn set_expr_keys(&self, body: &SetExpr, ctes: &[(String, BodyKeys)]) -> BodyKeys {
        match body {
            SetExpr::Select(s) => {
                let direct = s.from.iter().any(|f| self.reads_sharded(f));
                let mut via_cte: Vec<&BodyKeys> = Vec::new();
                let _ = visit_relations(&s.from, |name| {
                    if let [ObjectNamePart::Identifier(id)] = name.0.as_slice() {
                        if let Some((_, k)) = ctes.iter().find(|(n, _)| *n == fold(id)) {
                            via_cte.push(k);
                        }
                    }
                    ControlFlow::<()>::Continue(())
                });
                if !direct && via_cte.is_empty() {
                    // Sharded tables only in subqueries: no usable key at this level.
                    return if self.reads_sharded(s.as_ref()) {
                        BodyKeys::Unknown
                    } else {
                        BodyKeys::NotSharded
                    };
                }
                let mut keys = if direct {
                    match s.selection.as_ref().and_then(|e| self.where_keys(e)) {
                        Some(k) => BodyKeys::Keys(k),
                        None => BodyKeys::Unknown,
                    }
                } else {
                    BodyKeys::NotSharded
                };
                for k in via_cte {
                    keys = keys.combine(k.clone());
                }
                keys
            }
            SetExpr::Query(q) => self.query_keys(q),
            SetExpr::Insert(stmt) | SetExpr::Update(stmt) | SetExpr::Delete(stmt) => {
                let inner = self.statement(stmt);
                match inner.keys {
                    _ if !inner.touches_sharded => BodyKeys::NotSharded,
                    KeyExpr::Any(k) | KeyExpr::PerRow(k) => BodyKeys::Keys(k),
                    KeyExpr::None => BodyKeys::Unknown,
                }
            }
            SetExpr::SetOperation { left, right, .. } => self
                .set_expr_keys(left, ctes)
                .combine(self.set_expr_keys(right, ctes)),
            other => {
                if self.reads_sharded(other) {
                    BodyKeys::Unknown
                } else {
                    BodyKeys::NotSharded
                }
            }
        }
    }

    /// Shard keys a WHERE clause restricts rows to.
    pub(crate) fn where_keys(&self, e: &Expr) -> Keys {
        match e {
            Expr::Nested(inner) => self.where_keys(inner),
            Expr::BinaryOp { left, op, right } => match op {
                BinaryOperator::And => match (self.where_keys(left), self.where_keys(right)) {
                    (Some(a), Some(b)) => Some(intersect(a, b)),
                    (Some(a), None) | (None, Some(a)) => Some(a),
                    (None, None) => None,
                },
                BinaryOperator::Or => {
                    let a = self.where_keys(left)?;
                    let b = self.where_keys(right)?;
                    Some(union(a, b))
                }
                BinaryOperator::Eq => {
                    if self.is_key_col(left) {
                        self.key_value(right).map(|v| vec![v])
                    } else if self.is_key_col(right) {
                        self.key_value(left).map(|v| vec![v])
                    } else {
                        None
                    }
                }
                _ => None,
            },
            Expr::IsNotDistinctFrom(left, right) => {
                if self.is_key_col(left) {
                    self.key_value(right).map(|v| vec![v])
                } else if self.is_key_col(right) {
                    self.key_value(left).map(|v| vec![v])
                } else {
                    None
                }
            }
            Expr::In {
                expr,
                target: InTarget::List(list),
                negated: false,
                ..
            } if self.is_key_col(expr) => {
                let vals: Option<Vec<KeyValue>> = list.iter().map(|v| self.key_value(v)).collect();
                vals.map(|v| union(Vec::new(), v))
            }
            Expr::AnyOp {
                left,
                compare_op: BinaryOperator::Eq,
                right,
                ..
            } if self.is_key_col(left) => {
                let mut r = right.as_ref();
                while let Expr::Nested(inner) = r {
                    r = inner;
                }
                match r {
                    Expr::Array(arr) => {
                        let vals: Option<Vec<KeyValue>> =
                            arr.elem.iter().map(|v| self.key_value(v)).collect();
                        vals.map(|v| union(Vec::new(), v))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// A shard-key value: integer literal (maybe quoted, signed or cast) or `$n`.
    pub(crate) fn key_value(&self, e: &Expr) -> Option<KeyValue> {
        match e {
            Expr::Nested(inner) => self.key_value(inner),
            Expr::Cast { expr, .. } => self.key_value(expr),
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => n.parse().ok().map(KeyValue::Literal),
                Value::SingleQuotedString(s) => s.trim().parse().ok().map(KeyValue::Literal),
                Value::Placeholder(p) => placeholder_index(p).map(KeyValue::Param),
                _ => None,
            },
            Expr::TypedString(ts) => match &ts.value.value {
                Value::SingleQuotedString(s) => s.trim().parse().ok().map(KeyValue::Literal),
                _ => None,
            },
            Expr::UnaryOp { op, expr } => match (op, expr.as_ref()) {
                (UnaryOperator::Minus, Expr::Value(v)) => match &v.value {
                    Value::Number(n, _) => format!("-{n}").parse().ok().map(KeyValue::Literal),
                    _ => None,
                },
                (UnaryOperator::Plus, inner) => self.key_value(inner),
                _ => None,
            },
            _ => None,
        }
    }

    fn insert(&self, ins: &Insert, stmt: &Statement) -> Analysis {
        let mut a = Analysis::new(StatementKind::Insert);
        a.is_write = true;
        a.touches_sharded = self.reads_sharded(stmt);
        let table = match &ins.table {
            TableObject::TableName(n) => n,
            TableObject::TableFunction(_) | TableObject::TableQuery(_) => return a,
        };
        if !self.is_sharded(table) {
            // An unsharded target: a write broadcast to every shard (no key needed).
            return a;
        }
        let table_name = last_ident(table).map(fold).unwrap_or_default();
        let without_key = || RouteError::InsertWithoutKey {
            table: table_name.clone(),
            column: self.key_column.to_string(),
        };
        let key_pos = ins
            .columns
            .iter()
            .position(|c| last_ident(c).is_some_and(|id| fold(id) == self.key_column));
        if let Some(OnInsert::OnConflict(oc)) = &ins.on {
            if let OnConflictAction::DoUpdate(du) = &oc.action {
                let sets_key = du.assignments.iter().any(|asg| match &asg.target {
                    AssignmentTarget::ColumnName(n) => {
                        last_ident(n).is_some_and(|id| fold(id) == self.key_column)
                    }
                    AssignmentTarget::Tuple(ns) => ns
                        .iter()
                        .any(|n| last_ident(n).is_some_and(|id| fold(id) == self.key_column)),
                });
                if sets_key {
                    a.detail.refusal = Some(self.key_change_error());
                    return a;
                }
            }
        }
        let Some(key_pos) = key_pos else {
            a.detail.refusal = Some(without_key());
            return a;
        };
        let rows = match ins.source.as_deref().map(|q| q.body.as_ref()) {
            Some(SetExpr::Values(v)) => &v.rows,
            Some(_) => {
                a.detail.refusal = Some(RouteError::Unsupported(format!(
                    "INSERT … SELECT into sharded table \"{table_name}\": the proxy can't see \
                     which shard each row belongs to; use INSERT … VALUES with {} or a \
                     /* shard=<name> */ hint",
                    self.key_column
                )));
                return a;
            }
            None => {
                a.detail.refusal = Some(without_key());
                return a;
            }
        };
        let mut keys = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            match row.get(key_pos).and_then(|e| self.key_value(e)) {
                Some(v) => keys.push(v),
                None => {
                    let shown = row
                        .get(key_pos)
                        .map_or_else(|| "nothing".to_string(), |e| format!("`{e}`"));
                    a.detail.refusal = Some(RouteError::Unsupported(format!(
                        "row {} of INSERT INTO \"{table_name}\" gives {} as {shown}; it must be \
                         an integer literal or a $n parameter",
                        i + 1,
                        self.key_column
                    )));
                    return a;
                }
            }
        }
        if keys.len() > 1 && self.keep_ast {
            a.detail.insert = Some(Arc::new(InsertTemplate {
                sql: stmt.to_string(),
            }));
        }
        a.keys = KeyExpr::PerRow(keys);
        a
    }
}

/// Keys of a query body.
#[derive(Clone)]
enum BodyKeys {
    /// The body reads no sharded table at this level.
    NotSharded,
    /// Every branch reading a sharded table restricts its key to these.
    Keys(Vec<KeyValue>),
    /// Some branch reads a sharded table without a key.
    Unknown,
}

impl BodyKeys {
    /// Both parts run: every sharded part needs a key.
    fn combine(self, other: BodyKeys) -> BodyKeys {
        match (self, other) {
            (BodyKeys::Unknown, _) | (_, BodyKeys::Unknown) => BodyKeys::Unknown,
            (BodyKeys::NotSharded, o) | (o, BodyKeys::NotSharded) => o,
            (BodyKeys::Keys(a), BodyKeys::Keys(b)) => BodyKeys::Keys(union(a, b)),
        }
    }
}

/// `a AND b`: rows satisfy both; with literals only, the intersection, else the shorter
/// list (either is a correct superset).
fn intersect(a: Vec<KeyValue>, b: Vec<KeyValue>) -> Vec<KeyValue> {
    let literal = |v: &[KeyValue]| v.iter().all(|k| matches!(k, KeyValue::Literal(_)));
    if literal(&a) && literal(&b) {
        a.into_iter().filter(|k| b.contains(k)).collect()
    } else if a.len() <= b.len() {
        a
    } else {
        b
    }
}

/// `taskflow.shard`, the session routing setting.
fn is_shard_setting(name: &ObjectName) -> bool {
    let parts: Vec<String> = name
        .0
        .iter()
        .filter_map(|p| match p {
            ObjectNamePart::Identifier(id) => Some(fold(id)),
            _ => None,
        })
        .collect();
    parts == ["taskflow", "shard"]
}

/// `$n` → `n - 1`.
pub(crate) fn placeholder_index(p: &str) -> Option<usize> {
    let n: usize = p.strip_prefix('$')?.parse().ok()?;
    n.checked_sub(1)
}

/// The text of a `SET taskflow.shard` value: a quoted string, a bare word or number, and
/// (leniently) a hyphenated bare name like `shard-1`, which the parser sees as `shard - 1`.
fn set_value_text(e: &Expr) -> String {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
            Value::Number(n, _) => n.clone(),
            other => other.to_string(),
        },
        Expr::Identifier(id) => id.value.clone(),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Minus,
            right,
        } => format!("{}-{}", set_value_text(left), set_value_text(right)),
        other => other.to_string(),
    }
}

/// INSERT/UPDATE/DELETE statements nested in a query (data-modifying WITH).
fn nested_dml(q: &Query) -> Vec<Statement> {
    let mut found = Vec::new();
    let _ = visit_statements(q, |s| {
        if matches!(
            s,
            Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_)
        ) {
            found.push(s.clone());
        }
        ControlFlow::<()>::Continue(())
    });
    found
}

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
        // Parameters still used, in ascending original order → $1, $2, …
        let mut used = BTreeMap::new();
        let _ = visit_expressions(&stmt, |e| {
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
        let _ = visit_expressions_mut(&mut stmt, |e| {
            if let Expr::Value(v) = e {
                if let Value::Placeholder(p) = &mut v.value {
                    if let Some(new) = placeholder_index(p).and_then(|i| used.get(&i)) {
                        *p = format!("${}", new + 1);
                    }
                }
            }
            ControlFlow::<()>::Continue(())
        });
        out.push((shard, stmt.to_string(), used.into_keys().collect()));
    }
    Ok(out)
}
