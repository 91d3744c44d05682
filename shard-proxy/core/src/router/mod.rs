//! The router: what a statement needs, and which shards it goes to.
//!
//! Routing happens in two steps so the expensive one can be cached:
//!
//! 1. [`Router::analyze`] parses the SQL text once (sqlparser, PostgreSQL dialect) into an
//!    [`Analysis`]: the statement kind, the `/* shard=name */` hint, whether it touches a
//!    sharded table, where its shard key comes from ([`KeyExpr`]: literals, or `$n`
//!    parameters still unknown), whether it writes, and — for reads that may span shards —
//!    how to merge the shards' results ([`MergeSpec`]). Analyses are cached by SQL text
//!    (bounded), because parsing costs far more than the rest of a proxy round trip
//!    (PgDog measured 28–49 % of throughput lost to parsing) and applications repeat the
//!    same statements — or, inlining values, the same statement *shapes*: those share one
//!    analysis, cached by the text with its literal values taken out (`shape.rs`).
//! 2. [`Analysis::plan`] is cheap and runs per execution: it binds `$n` keys from the Bind
//!    parameters (text or binary), hashes keys on the [`Ring`](crate::ring::Ring), and returns a [`Plan`]:
//!    one shard, several, or all, plus per-shard SQL for a multi-row INSERT whose rows
//!    belong to different shards.
//!
//! # Precedence
//!
//! A `/* shard=name */` comment anywhere in the statement wins, then the session's
//! `SET taskflow.shard = 'name'`, then the shard key. Hints and the session shard also
//! route statements the router would otherwise refuse (an INSERT without a key, SQL it
//! cannot parse): they are the escape hatch.
//!
//! # Rules
//!
//! * Keys are found in `WHERE key = v`, `v = key`, `key IN (v, …)`, `key = ANY(ARRAY[…])`,
//!   conjunctions with other predicates, and disjunctions whose every branch has a key; `v`
//!   is an integer literal (also quoted or cast) or a `$n` parameter. Keys map to the set of
//!   owning shards: one shard → [`Target::One`], several → [`Target::Many`].
//! * INSERT takes the key of every VALUES row; rows on different shards are split into one
//!   INSERT per shard ([`Plan::per_shard_sql`], `$n` renumbered). An INSERT into a sharded
//!   table without a usable key is refused ([`RouteError::InsertWithoutKey`]).
//! * A read of a sharded table without a key scatters to every shard
//!   ([`Target::All`], `scatter_read`) with a [`MergeSpec`]: concatenation, ORDER BY with
//!   LIMIT/OFFSET, `count/sum/min/max/avg` with or without GROUP BY, DISTINCT, UNION. What
//!   can't be merged exactly is refused with [`RouteError::Unsupported`] rather than
//!   answered wrongly (aggregates mixed with plain columns — PgDog #1172 —, HAVING,
//!   window functions, `count(DISTINCT …)`, per-shard aggregates in subqueries, …).
//!   Nested queries are evaluated on each shard, so joins and subqueries are correct when
//!   the rows they combine live on the same shard (sharded tables are co-located by key).
//! * UPDATE/DELETE without a key are broadcast to every shard (the wire layer adds up the
//!   row counts). An UPDATE that changes the shard key is refused unless the new value
//!   lands on the shard the row is on.
//! * Statements that touch no sharded table: reads (`SELECT 1`, `pg_catalog`,
//!   `information_schema`, `SHOW`, EXPLAIN) go to shard 0 — catalogs and unsharded
//!   relations are the same on every shard —, writes and DDL go to every shard, and so do
//!   `SET`, transaction control, `PREPARE` and `DEALLOCATE` (the wire layer intercepts
//!   transaction control and `SET taskflow.shard` itself; the targets returned for them are
//!   what a naive forwarder would need).
//! * A simple-query string with several statements routes as a unit: it needs a key in
//!   every statement that touches a sharded table and all keys on one shard, or a hint.
//!
//! # Layout
//!
//! `mod.rs` is the facade: the [`Router`] (analysis cache, stack guard) and the public
//! types, re-exported from `model` (the vocabulary every stage speaks). The stages depend
//! on each other one way only, never back:
//!
//! * `analyze` (SQL → [`Analysis`]) → `scatter/` (merge plan of a cross-shard read:
//!   `select`, `union`, `aggregate`, `columns`, `nested`) → `expr` (the normalised rules
//!   and the AST predicates both ask);
//! * `analyze` → `text` (the shard hint, a fallback for what the parser can't read);
//! * `plan` ([`Analysis::plan`]) → `split` (per-shard INSERTs) → `expr`; `params` decodes
//!   Bind parameters for `plan`;
//! * `cache`: the bounded analysis cache (`quick_cache`).
//!
//! This module is pure logic: no I/O, no async.

mod analyze;
mod cache;
mod expr;
mod model;
mod params;
mod plan;
mod scatter;
mod shape;
mod split;
mod text;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cache::AnalysisCache;

pub use model::{
    Analysis, KeyExpr, KeyValue, MergeSpec, Params, Plan, RouteError, ShardingRules, StatementKind,
    Target,
};

// ---------------------------------------------------------------------------------------
// The router and its cache

/// Default number of cached analyses.
pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;
/// Default bound on the memory the cache holds (SQL texts and analyses), in bytes.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;
/// Longest SQL text cached (longer ones, e.g. bulk INSERTs with literals, are analysed
/// every time: they rarely repeat and would crowd out the statements that do).
const MAX_CACHED_SQL: usize = 16 * 1024;

/// Parses statements and caches their [`Analysis`] by SQL text or shape. `Send + Sync`:
/// one router serves every session.
#[derive(Debug)]
pub struct Router {
    rules: ShardingRules,
    /// Lowercased sharded table names.
    tables: Vec<String>,
    key_column: String,
    /// `None`: caching disabled.
    cache: Option<AnalysisCache>,
    /// Templates by statement shape (`shape.rs`): statements that differ only in literal
    /// values share one analysis. `None` disables shapes (with `cache`, or when the bounds
    /// are too small to split).
    shapes: Option<AnalysisCache>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Router {
    /// A router with the default cache bounds (10 000 statements, 64 MiB).
    pub fn new(rules: ShardingRules) -> Router {
        Router::with_cache_capacity(rules, DEFAULT_CACHE_CAPACITY)
    }

    /// A router caching up to about `capacity` analyses (0 disables the cache) within the
    /// default memory bound.
    pub fn with_cache_capacity(rules: ShardingRules, capacity: usize) -> Router {
        Router::with_cache_limits(rules, capacity, DEFAULT_CACHE_BYTES)
    }

    /// A router caching up to about `capacity` analyses holding about `bytes` of memory
    /// (0 for either disables the cache).
    pub fn with_cache_limits(rules: ShardingRules, capacity: usize, bytes: usize) -> Router {
        let fold = |s: &str| s.to_lowercase();
        Router {
            tables: rules.tables.iter().map(|t| fold(t)).collect(),
            key_column: fold(&rules.key_column),
            rules,
            // The bounds are shared: half for exact texts, half for shapes.
            cache: AnalysisCache::new(capacity - capacity / 2, bytes - bytes / 2),
            shapes: AnalysisCache::new(capacity / 2, bytes / 2),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The rules this router applies.
    pub fn rules(&self) -> &ShardingRules {
        &self.rules
    }

    /// Analyses `sql` (cached). Never panics: unparsable text becomes
    /// [`StatementKind::Unparsed`].
    ///
    /// Looked up by the statement's shape first (its literals taken out: `shape.rs`), then
    /// by the exact text; a statement analysed in full is cached under its shape when its
    /// analysis can be shared that way, else under its text. Shape first because a
    /// statement with literals is almost always cached under its shape: an exact-text
    /// lookup before it would miss on every such statement, and cost a hash of the text.
    pub fn analyze(&self, sql: &str) -> Arc<Analysis> {
        let cache = match &self.cache {
            Some(cache) if sql.len() <= MAX_CACHED_SQL => cache,
            _ => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                return Arc::new(self.analyze_uncached(sql));
            }
        };
        let shape = self.shapes.as_ref().and_then(|_| shape::shape_of(sql));
        if let (Some(shapes), Some(shape)) = (&self.shapes, &shape) {
            let reused = shapes
                .get(&shape.text)
                .and_then(|t| shape::Template(t).instantiate(shape, sql));
            if let Some(analysis) = reused {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Arc::new(analysis);
            }
        }
        if let Some(hit) = cache.get(sql) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return hit;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let analysis = Arc::new(self.analyze_uncached(sql));
        let template = shape.and_then(|s| Some((shape::Template::of(&analysis, &s, sql)?, s)));
        match (&self.shapes, template) {
            (Some(shapes), Some((template, shape))) => shapes.insert(&shape.text, template.0),
            _ => cache.insert(sql, Arc::clone(&analysis)),
        }
        analysis
    }

    /// (hits, misses) of the analysis cache since start.
    pub fn cache_stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Approximate bytes the cache holds right now.
    pub fn cache_bytes(&self) -> usize {
        self.cache.as_ref().map_or(0, AnalysisCache::bytes)
            + self.shapes.as_ref().map_or(0, AnalysisCache::bytes)
    }

    /// Cached analyses right now.
    pub fn cache_len(&self) -> usize {
        self.cache.as_ref().map_or(0, AnalysisCache::len)
            + self.shapes.as_ref().map_or(0, AnalysisCache::len)
    }

    fn analyze_uncached(&self, sql: &str) -> Analysis {
        let mut analysis = self.analyze_text(sql);
        analysis.session_state = crate::sqltext::session_state(sql);
        analysis
    }

    fn analyze_text(&self, sql: &str) -> Analysis {
        // Operator chains (`a AND b AND …`) parse into trees as deep as they are long, and
        // the analysis walks and clones them recursively: a stack overflow would abort the
        // whole proxy. Ordinary statements run on the caller's stack; long chains on a
        // stack sized for them; absurd ones are refused.
        let ops = text::operator_count(sql);
        if ops > MAX_OPERATORS {
            return unparsed(
                sql,
                format!("statement too complex for the router (over {MAX_OPERATORS} operators)"),
            );
        }
        let simple = ops <= FAST_PATH_OPERATORS;
        let ctx = expr::Ctx {
            tables: &self.tables,
            key_column: &self.key_column,
            keep_ast: simple,
        };
        // A panic in the parser or the analysis must not take a session down either.
        let run = || std::panic::catch_unwind(|| ctx.analyze(sql));
        let result = if simple {
            run()
        } else {
            stacker::grow(STACK_PER_OPERATOR * ops + (1 << 20), run)
        };
        result.unwrap_or_else(|_| {
            unparsed(sql, "internal error while analysing the statement".into())
        })
    }
}

/// Statements with at most this many operators are analysed on the caller's stack.
const FAST_PATH_OPERATORS: usize = 100;
/// Statements with more are refused.
const MAX_OPERATORS: usize = 16_000;
/// Stack reserved per operator on the slow path (debug builds need ~4 KiB per level).
const STACK_PER_OPERATOR: usize = 16 * 1024;

/// A statement too complex to analyse: it may touch sharded data, so only a hint routes it.
fn unparsed(sql: &str, why: String) -> Analysis {
    let mut a = Analysis::new(StatementKind::Unparsed(why));
    a.hint = text::shard_hint(sql);
    a.touches_sharded = true;
    a
}
