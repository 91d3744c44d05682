//! [`Analysis::plan`]: the per-execution routing decision — cheap, because the parse
//! happened once in the analysis. Binds `$n` keys from the Bind parameters, hashes them on
//! the [`Ring`] and picks the target; a multi-row INSERT whose rows land on several shards
//! is split (see `split`).

use super::model::{
    Analysis, Count, KeyExpr, KeyValue, Params, Plan, RouteError, StatementKind, Target,
};
use super::split;
use crate::placement::Locate;

impl Analysis {
    /// Decides where this statement goes for one execution.
    ///
    /// `session_shard` is the session's `SET taskflow.shard` value, if any.
    pub fn plan(
        &self,
        ring: &impl Locate,
        params: &Params,
        session_shard: Option<&str>,
    ) -> Result<Plan, RouteError> {
        if let Some(name) = self.forced_shard(session_shard) {
            let idx = ring
                .index_of(name)
                .ok_or_else(|| RouteError::UnknownShard(name.to_string()))?;
            return Ok(Plan::to(Target::One(idx)));
        }
        if let Some(err) = &self.detail.refusal {
            return Err(err.clone());
        }
        match &self.kind {
            StatementKind::Empty | StatementKind::Show => self.keyed_or_first(ring, params),
            StatementKind::Begin
            | StatementKind::Commit
            | StatementKind::Rollback
            | StatementKind::Savepoint
            | StatementKind::SetShard(_)
            | StatementKind::Set
            | StatementKind::Prepare
            | StatementKind::Deallocate
            | StatementKind::Utility
                if !self.detail.multi =>
            {
                Ok(Plan::to(Target::All))
            }
            StatementKind::Execute if !self.detail.multi => Err(RouteError::Unsupported(
                "SQL-level EXECUTE: the proxy can't see which shard the prepared statement's \
                 key points to; use the extended protocol (Parse/Bind) or a /* shard=<name> */ hint"
                    .into(),
            )),
            StatementKind::Unparsed(msg) => Err(RouteError::Unsupported(format!(
                "the proxy could not parse this statement ({msg}); route it explicitly with \
                 /* shard=<name> */ or SET taskflow.shard"
            ))),
            StatementKind::Copy { from_stdin } if !self.detail.multi => {
                if *from_stdin {
                    // Rows come later; the wire layer splits them by key column.
                    Ok(Plan::to(Target::All))
                } else {
                    self.keyed_or_first(ring, params)
                }
            }
            _ => {
                if !self.touches_sharded {
                    return Ok(Plan::to(if self.is_write || self.detail.broadcast {
                        Target::All
                    } else {
                        Target::One(0)
                    }));
                }
                self.plan_keyed(ring, params)
            }
        }
    }

    /// The shard named by a `/* shard=name */` hint, else by the session's
    /// `SET taskflow.shard` (except for the statement that sets it).
    fn forced_shard<'s>(&'s self, session_shard: Option<&'s str>) -> Option<&'s str> {
        match (&self.hint, session_shard) {
            (Some(h), _) => Some(h.as_str()),
            (None, Some(s)) if !matches!(self.kind, StatementKind::SetShard(_)) => Some(s),
            _ => None,
        }
    }

    /// A read that is the same on every shard unless it touches a sharded table.
    fn keyed_or_first(&self, ring: &impl Locate, params: &Params) -> Result<Plan, RouteError> {
        if self.touches_sharded {
            self.plan_keyed(ring, params)
        } else {
            Ok(Plan::to(Target::One(0)))
        }
    }

    /// Routing of a statement that touches a sharded table, by its keys.
    fn plan_keyed(&self, ring: &impl Locate, params: &Params) -> Result<Plan, RouteError> {
        match &self.keys {
            KeyExpr::None => self.plan_unkeyed(params),
            KeyExpr::Any(values) => self.plan_any(ring, params, values),
            KeyExpr::PerRow(values) => self.plan_rows(ring, params, values),
        }
    }

    /// No key: a read scatters to every shard and is merged, UPDATE/DELETE are broadcast,
    /// EXPLAIN asks one shard. A multi-statement string can't be split by statement.
    fn plan_unkeyed(&self, params: &Params) -> Result<Plan, RouteError> {
        if self.detail.multi {
            return Err(RouteError::Unsupported(
                "a query string with several statements must give the shard key in \
                 every statement that uses a sharded table (or a /* shard=<name> */ \
                 hint); send them one at a time"
                    .into(),
            ));
        }
        if self.detail.single_shard_read {
            if self.is_write {
                return Err(RouteError::Unsupported(
                    "EXPLAIN ANALYZE of a write without the shard key would run it on \
                     one shard only; add the key or a /* shard=<name> */ hint"
                        .into(),
                ));
            }
            return Ok(Plan::to(Target::One(0)));
        }
        if self.is_write {
            // UPDATE/DELETE without key: broadcast.
            Ok(Plan::to(Target::All))
        } else {
            self.scatter(Target::All, params)
        }
    }

    /// `WHERE key = v` / `IN` / `OR`: the shards owning those keys.
    fn plan_any(
        &self,
        ring: &impl Locate,
        params: &Params,
        values: &[KeyValue],
    ) -> Result<Plan, RouteError> {
        // Sorted vectors, not sets: a statement names one key or a few, and this runs for
        // every routed statement (a `BTreeSet` allocated and walked a node each time).
        let mut shards = Vec::with_capacity(values.len());
        let mut guards = Vec::new();
        let mut other_sides = Vec::new();
        for v in values {
            if let Some(key) = resolve(*v, params)? {
                let at = ring.locate(key);
                shards.push(at.shard);
                if let Some(arc) = at.arc {
                    guards.push((at.shard, arc));
                }
                other_sides.extend(at.other);
            }
        }
        sort_dedup(&mut shards);
        if let Some((new_key, moving)) = &self.detail.key_update {
            return plan_key_update(ring, params, *new_key, moving, &shards, guards);
        }
        if !self.is_write && shards.len() > 1 && !other_sides.is_empty() {
            // A read of several shards during a move reads both sides of each moving arc
            // it touches: it runs under the commit fence, so a batch is seen on exactly
            // one side, whatever this proxy's view of the arc (no guard needed).
            shards.extend(other_sides);
            sort_dedup(&mut shards);
            guards.clear();
        }
        let plan = match shards.as_slice() {
            // Every key is NULL: nothing can match; any one shard answers.
            [] => Ok(Plan::to(Target::One(0))),
            [one] => Ok(Plan::to(Target::One(*one))),
            _ => self.plan_many(shards, params),
        };
        plan.map(|p| p.guarded(guards))
    }

    /// Keys on several shards: a read is merged, a write goes to each; a multi-statement
    /// string can't be, and EXPLAIN asks the first.
    fn plan_many(&self, shards: Vec<usize>, params: &Params) -> Result<Plan, RouteError> {
        if self.detail.multi {
            return Err(RouteError::Unsupported(
                "the statements of this query string route to different shards; \
                 send them one at a time"
                    .into(),
            ));
        }
        if self.detail.single_shard_read {
            if self.is_write {
                return Err(RouteError::Unsupported(
                    "EXPLAIN ANALYZE of a write spanning several shards".into(),
                ));
            }
            return Ok(Plan::to(Target::One(shards[0])));
        }
        if self.is_write {
            Ok(Plan::to(Target::Many(shards)))
        } else {
            self.scatter(Target::Many(shards), params)
        }
    }

    /// INSERT VALUES: the shard of each row; rows on several shards are split into one
    /// INSERT per shard.
    fn plan_rows(
        &self,
        ring: &impl Locate,
        params: &Params,
        values: &[KeyValue],
    ) -> Result<Plan, RouteError> {
        let mut guards = Vec::new();
        let per_row = row_shards(ring, params, values, &mut guards)?;
        let mut shards = per_row.clone();
        sort_dedup(&mut shards);
        match shards.as_slice() {
            [] => Ok(Plan::to(Target::One(0))),
            [one] => Ok(Plan::to(Target::One(*one)).guarded(guards)),
            _ => {
                if self.detail.multi {
                    return Err(RouteError::Unsupported(
                        "a multi-row INSERT in a multi-statement query string whose \
                         rows belong to different shards; send it on its own"
                            .into(),
                    ));
                }
                let template = self.detail.insert.as_ref().ok_or_else(|| {
                    RouteError::Unsupported("cannot split this INSERT by shard".into())
                })?;
                let per_shard = split::split_insert(template, &per_row, &shards)?;
                Ok(Plan {
                    target: Target::Many(shards),
                    per_shard_sql: Some(per_shard),
                    scatter_read: false,
                    merge: None,
                    guards: Vec::new(),
                }
                .guarded(guards))
            }
        }
    }

    /// A read spanning shards: merged by the analysis' [`MergeSpec`](crate::merge::MergeSpec), its
    /// `$n` LIMIT/OFFSET resolved — or refused if it can't be merged exactly.
    fn scatter(&self, target: Target, params: &Params) -> Result<Plan, RouteError> {
        if let Some(why) = &self.detail.scatter_refusal {
            return Err(RouteError::Unsupported(why.clone()));
        }
        let mut spec = self.merge.clone().unwrap_or_default();
        if let Some(limit) = self.detail.limit {
            spec.limit = resolve_count(limit, params, "LIMIT")?;
        }
        if let Some(offset) = self.detail.offset {
            spec.offset = resolve_count(offset, params, "OFFSET")?.unwrap_or(0);
        }
        Ok(Plan {
            target,
            per_shard_sql: None,
            scatter_read: true,
            merge: Some(spec),
            guards: Vec::new(),
        })
    }
}

/// The shard of each INSERT row, in row order (a NULL key is an error: no shard owns it).
fn row_shards(
    ring: &impl Locate,
    params: &Params,
    values: &[KeyValue],
    guards: &mut Vec<(usize, u32)>,
) -> Result<Vec<usize>, RouteError> {
    let mut per_row = Vec::with_capacity(values.len());
    for (row, v) in values.iter().enumerate() {
        match resolve(*v, params)? {
            Some(key) => per_row.push(place(ring, key, guards)),
            None => {
                let index = match v {
                    KeyValue::Param(i) => *i,
                    KeyValue::Literal(_) => 0,
                };
                return Err(RouteError::BadKeyParam {
                    index,
                    reason: format!("NULL shard key in row {} of the INSERT", row + 1),
                });
            }
        }
    }
    Ok(per_row)
}

/// An UPDATE setting the key: allowed only when the new key lands on the row's shard.
fn plan_key_update(
    ring: &impl Locate,
    params: &Params,
    new_key: KeyValue,
    moving: &RouteError,
    shards: &[usize],
    mut guards: Vec<(usize, u32)>,
) -> Result<Plan, RouteError> {
    let Some(new_key) = resolve(new_key, params)? else {
        return Err(moving.clone());
    };
    let dest = place(ring, new_key, &mut guards);
    match shards {
        [only] if *only == dest => Ok(Plan::to(Target::One(dest)).guarded(guards)),
        _ => Err(moving.clone()),
    }
}

impl Plan {
    fn to(target: Target) -> Plan {
        Plan {
            target,
            per_shard_sql: None,
            scatter_read: false,
            merge: None,
            guards: Vec::new(),
        }
    }

    /// The plan with the moving arcs its keys fall in (sorted, without repeats).
    fn guarded(mut self, mut guards: Vec<(usize, u32)>) -> Plan {
        guards.sort_unstable();
        guards.dedup();
        self.guards = guards;
        self
    }
}

/// Sorts `shards` and drops repeats: the set of shards, as a slice.
fn sort_dedup(shards: &mut Vec<usize>) {
    shards.sort_unstable();
    shards.dedup();
}

/// The shard of `key`; records its moving arc, if any, as a guard on that shard.
fn place(ring: &impl Locate, key: i64, guards: &mut Vec<(usize, u32)>) -> usize {
    let at = ring.locate(key);
    if let Some(arc) = at.arc {
        guards.push((at.shard, arc));
    }
    at.shard
}

/// The key a [`KeyValue`] stands for in this execution (`None` = NULL).
fn resolve(v: KeyValue, params: &Params) -> Result<Option<i64>, RouteError> {
    match v {
        KeyValue::Literal(k) => Ok(Some(k)),
        KeyValue::Param(i) => params.key(i),
    }
}

fn resolve_count(c: Count, params: &Params, what: &str) -> Result<Option<u64>, RouteError> {
    match c {
        Count::Literal(n) => Ok(Some(n)),
        Count::Param(i) => match params.key(i) {
            Ok(None) => Ok(None),
            Ok(Some(n)) => u64::try_from(n)
                .map(Some)
                .map_err(|_| RouteError::Unsupported(format!("negative {what}"))),
            Err(RouteError::BadKeyParam { index, reason }) => Err(RouteError::Unsupported(
                format!("{what} parameter ${} is unusable: {reason}", index + 1),
            )),
            Err(e) => Err(e),
        },
    }
}
