//! Statement analysis: from SQL text to an [`Analysis`] (kind, keys, write-ness, refusals).

use std::ops::ControlFlow;
use std::sync::Arc;

use sqlparser::ast::{
    visit_relations, visit_statements, Assignment, AssignmentTarget, BinaryOperator, CopySource,
    CopyTarget, Delete, Expr, InTarget, Insert, ObjectName, ObjectNamePart, OnConflictAction,
    OnInsert, Query, Reset, Set, SetExpr, Statement, TableObject, UnaryOperator, Update, Value,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::expr::{fold, last_ident, placeholder_index, Ctx};
use super::model::{Analysis, InsertTemplate, KeyExpr, KeyValue, RouteError, StatementKind};
use super::scatter;
use super::text;

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
            Err(e) => text::fallback(sql, &|n| self.is_sharded_name(n)).unwrap_or_else(|| {
                let mut a = Analysis::new(StatementKind::Unparsed(e.to_string()));
                // Decided by the words of the statement, not by what else its text holds
                // (a `pg_catalog` in a comment must not let `tasks` through unrouted).
                a.touches_sharded = text::mentions(sql, &|n| self.is_sharded_name(n));
                a
            }),
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

    /// Analyses one statement: dispatches by kind. Data statements (SELECT, INSERT,
    /// UPDATE, DELETE, COPY, EXPLAIN) find their keys; transaction control, SET and
    /// utility statements only need their kind, because they go to every shard.
    pub(crate) fn statement(&self, stmt: &Statement) -> Analysis {
        use StatementKind as K;
        match stmt {
            Statement::Query(q) => self.query(q),
            Statement::Insert(ins) => self.insert(ins, stmt),
            Statement::Update(u) => self.update(u, stmt),
            Statement::Delete(d) => self.delete(d, stmt),
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
            Statement::Explain {
                analyze, statement, ..
            } => self.explain(*analyze, statement),
            Statement::Copy {
                source, to, target, ..
            } => self.copy(source, *to, target),
            Statement::Prepare { statement, .. } => {
                let mut a = Analysis::new(K::Prepare);
                a.touches_sharded = self.statement(statement).touches_sharded;
                a
            }
            Statement::Execute { .. } => {
                // What it runs is unknown here: assume the worst.
                let mut a = Analysis::new(K::Execute);
                a.is_write = true;
                a
            }
            Statement::Deallocate { .. } => Analysis::new(K::Deallocate),
            _ if is_show(stmt) => Analysis::new(K::Show),
            _ => self.utility(stmt),
        }
    }

    /// The common start of INSERT/UPDATE/DELETE: a write, sharded if any relation it
    /// names (subqueries included) is.
    fn write(&self, kind: StatementKind, stmt: &Statement) -> Analysis {
        let mut a = Analysis::new(kind);
        a.is_write = true;
        a.touches_sharded = self.reads_sharded(stmt);
        a
    }

    /// UPDATE: keys from WHERE. Setting the key column is only allowed when the new value
    /// lands on the row's own shard, which only the plan can tell (recorded as
    /// `key_update`), and refused outright when the statement has no key to compare with.
    fn update(&self, u: &Update, stmt: &Statement) -> Analysis {
        let mut a = self.write(StatementKind::Update, stmt);
        if !a.touches_sharded {
            return a;
        }
        let keys = u.selection.as_ref().and_then(|e| self.where_keys(e));
        if self.reads_sharded(&u.table.relation) {
            self.key_assignments(&u.assignments, keys.is_some(), &mut a);
        }
        a.keys = keys.map_or(KeyExpr::None, KeyExpr::Any);
        self.nested_writes(stmt, &mut a);
        a
    }

    /// Records the `SET key = v` of an UPDATE of a sharded table: checked at plan time when
    /// `v` is a single key value and the rows are `keyed`, refused otherwise.
    fn key_assignments(&self, assignments: &[Assignment], keyed: bool, a: &mut Analysis) {
        for asg in assignments
            .iter()
            .filter(|asg| self.assigns_key(&asg.target))
        {
            let value = match &asg.target {
                AssignmentTarget::ColumnName(_) => self.key_value(&asg.value),
                AssignmentTarget::Tuple(_) => None,
            };
            match (value, keyed) {
                (Some(v), true) => a.detail.key_update = Some((v, self.key_change_error())),
                _ => a.detail.refusal = Some(self.key_change_error()),
            }
        }
    }

    /// DELETE: keys from WHERE (none: broadcast).
    fn delete(&self, d: &Delete, stmt: &Statement) -> Analysis {
        let mut a = self.write(StatementKind::Delete, stmt);
        if a.touches_sharded {
            let keys = d.selection.as_ref().and_then(|e| self.where_keys(e));
            a.keys = keys.map_or(KeyExpr::None, KeyExpr::Any);
        }
        self.nested_writes(stmt, &mut a);
        a
    }

    /// EXPLAIN returns a plan, not the rows: one shard answers (the key's, if any).
    /// EXPLAIN ANALYZE also runs the statement, so it inherits its write-ness, refusal
    /// and key-update check.
    fn explain(&self, analyze: bool, statement: &Statement) -> Analysis {
        let inner = self.statement(statement);
        let mut a = Analysis::new(StatementKind::Show);
        a.touches_sharded = inner.touches_sharded;
        a.is_write = analyze && inner.is_write;
        a.keys = match inner.keys {
            KeyExpr::PerRow(v) => KeyExpr::Any(v),
            other => other,
        };
        a.detail.single_shard_read = true;
        if analyze {
            a.detail.refusal = inner.detail.refusal;
            a.detail.key_update = inner.detail.key_update;
        }
        a
    }

    /// DDL and other utility statements: writes (except LISTEN/UNLISTEN/NOTIFY), sent to
    /// every shard.
    fn utility(&self, stmt: &Statement) -> Analysis {
        let mut a = Analysis::new(StatementKind::Utility);
        a.is_write = !matches!(
            stmt,
            Statement::LISTEN { .. } | Statement::UNLISTEN { .. } | Statement::NOTIFY { .. }
        );
        // Not every utility statement exposes its tables to the visitor (VACUUM):
        // any mention of a sharded table's name counts.
        a.touches_sharded = self.reads_sharded(stmt)
            || text::mentions(&stmt.to_string(), &|n| self.is_sharded_name(n));
        a
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

    /// SELECT (and VALUES / set operations), including `WITH` queries that write.
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
            self.read_query(q, body_keys, &mut a);
        } else {
            self.writing_with(body_keys, &writes, &mut a);
        }
        a
    }

    /// A read of sharded tables: its keys, and the plan for reading it from several shards
    /// (or why it can't be merged, which matters only if it does span shards).
    fn read_query(&self, q: &Query, body_keys: BodyKeys, a: &mut Analysis) {
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
    }

    /// Data-modifying WITH: every write needs a key; the reads must have one too (or read
    /// no sharded table), and the statement goes to the union of their shards. A write
    /// can't be merged or split, so anything less is refused.
    fn writing_with(&self, body_keys: BodyKeys, writes: &[Statement], a: &mut Analysis) {
        let mut keys = match body_keys {
            BodyKeys::Keys(k) => Some(k),
            BodyKeys::NotSharded => Some(Vec::new()),
            BodyKeys::Unknown => None,
        };
        for w in writes {
            let inner = self.statement(w);
            if inner.detail.refusal.is_some() {
                a.detail.refusal = inner.detail.refusal;
                return;
            }
            if inner.detail.key_update.is_some() {
                a.detail.refusal = Some(self.key_change_error());
                return;
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
                BinaryOperator::Eq => self.equality_key(left, right),
                _ => None,
            },
            Expr::IsNotDistinctFrom(left, right) => self.equality_key(left, right),
            Expr::In {
                expr,
                target: InTarget::List(list),
                negated: false,
                ..
            } if self.is_key_col(expr) => self.key_list(list),
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
                    Expr::Array(arr) => self.key_list(&arr.elem),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// `key = v` or `v = key` (also `IS NOT DISTINCT FROM`): the one key `v`.
    fn equality_key(&self, left: &Expr, right: &Expr) -> Keys {
        if self.is_key_col(left) {
            self.key_value(right).map(|v| vec![v])
        } else if self.is_key_col(right) {
            self.key_value(left).map(|v| vec![v])
        } else {
            None
        }
    }

    /// `key IN (v, …)` / `key = ANY(ARRAY[v, …])`: the distinct keys, if every `v` is one.
    fn key_list(&self, list: &[Expr]) -> Keys {
        let vals: Option<Vec<KeyValue>> = list.iter().map(|v| self.key_value(v)).collect();
        vals.map(|v| union(Vec::new(), v))
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

    /// INSERT: into an unsharded table it is a write for every shard; into a sharded
    /// table every VALUES row must give the key, and the rows' keys route it.
    fn insert(&self, ins: &Insert, stmt: &Statement) -> Analysis {
        let mut a = self.write(StatementKind::Insert, stmt);
        let table = match &ins.table {
            TableObject::TableName(n) => n,
            TableObject::TableFunction(_) | TableObject::TableQuery(_) => return a,
        };
        if !self.is_sharded(table) {
            // An unsharded target: a write broadcast to every shard (no key needed).
            return a;
        }
        match self.insert_keys(ins, table) {
            Ok(keys) => {
                if keys.len() > 1 && self.keep_ast {
                    a.detail.insert = Some(Arc::new(InsertTemplate {
                        sql: stmt.to_string(),
                    }));
                }
                a.keys = KeyExpr::PerRow(keys);
            }
            Err(refusal) => a.detail.refusal = Some(refusal),
        }
        a
    }

    /// The key of every VALUES row of an INSERT into sharded `table`, or why the proxy
    /// can't tell where its rows go.
    fn insert_keys(&self, ins: &Insert, table: &ObjectName) -> Result<Vec<KeyValue>, RouteError> {
        let table_name = last_ident(table).map(fold).unwrap_or_default();
        let without_key = || RouteError::InsertWithoutKey {
            table: table_name.clone(),
            column: self.key_column.to_string(),
        };
        if self.upsert_sets_key(ins) {
            return Err(self.key_change_error());
        }
        let Some(key_pos) = ins.columns.iter().position(|c| self.is_key_name(c)) else {
            return Err(without_key());
        };
        let rows = match ins.source.as_deref().map(|q| q.body.as_ref()) {
            Some(SetExpr::Values(v)) => &v.rows,
            Some(_) => {
                return Err(RouteError::Unsupported(format!(
                    "INSERT … SELECT into sharded table \"{table_name}\": the proxy can't see \
                     which shard each row belongs to; use INSERT … VALUES with {} or a \
                     /* shard=<name> */ hint",
                    self.key_column
                )))
            }
            None => return Err(without_key()),
        };
        rows.iter()
            .enumerate()
            .map(|(i, row)| self.row_key(row, key_pos, i, &table_name))
            .collect()
    }

    /// `INSERT … ON CONFLICT DO UPDATE SET key = …`: would move an existing row.
    fn upsert_sets_key(&self, ins: &Insert) -> bool {
        match &ins.on {
            Some(OnInsert::OnConflict(oc)) => match &oc.action {
                OnConflictAction::DoUpdate(du) => du
                    .assignments
                    .iter()
                    .any(|asg| self.assigns_key(&asg.target)),
                _ => false,
            },
            _ => false,
        }
    }

    /// The key of VALUES row `i` (its `key_pos` column): a literal or a `$n`.
    fn row_key(
        &self,
        row: &[Expr],
        key_pos: usize,
        i: usize,
        table: &str,
    ) -> Result<KeyValue, RouteError> {
        row.get(key_pos)
            .and_then(|e| self.key_value(e))
            .ok_or_else(|| {
                let shown = row
                    .get(key_pos)
                    .map_or_else(|| "nothing".to_string(), |e| format!("`{e}`"));
                RouteError::Unsupported(format!(
                    "row {} of INSERT INTO \"{table}\" gives {} as {shown}; it must be an \
                     integer literal or a $n parameter",
                    i + 1,
                    self.key_column
                ))
            })
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

/// SHOW and its relatives: read-only, and the same on every shard.
fn is_show(stmt: &Statement) -> bool {
    matches!(
        stmt,
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
            | Statement::ExplainTable { .. }
    )
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
