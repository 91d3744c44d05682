//! The analysis cache: [`Analysis`] by SQL text (the router keeps two: exact texts and
//! statement shapes), bounded both in entries and in bytes.
//!
//! Why a cache: parsing costs far more than the rest of a proxy round trip, and
//! applications repeat the same statements. Why `quick_cache`: a maintained, sharded,
//! lock-light concurrent cache whose eviction (CLOCK with a probation queue, S3-FIFO-like)
//! keeps statements that repeat over ones seen once, so a burst of one-off SQL (literals
//! inlined by an ORM, ad-hoc queries) does not flush the application's hot statements.
//!
//! Two bounds, one weight: `quick_cache` bounds the total *weight* of its entries. Each
//! entry weighs its approximate footprint in bytes, but at least `bytes / capacity`; so the
//! total weight staying under `bytes` keeps both the memory under `bytes` and the number of
//! entries under `capacity`.

use std::sync::Arc;

use quick_cache::sync::Cache;
use quick_cache::{OptionsBuilder, Weighter};

use super::model::Analysis;

/// Shards of the cache (each with its own lock): as many as concurrent sessions usefully
/// contend on. `quick_cache` uses fewer when the capacity is small (≥ 32 entries a shard).
const SHARDS: usize = 16;

/// A cached analysis and its approximate footprint in bytes.
#[derive(Debug, Clone)]
struct Cached {
    analysis: Arc<Analysis>,
    bytes: u64,
}

/// An entry's weight: its footprint, at least `floor` (see the module doc).
#[derive(Debug, Clone)]
struct Footprint {
    floor: u64,
}

impl Weighter<Box<str>, Cached> for Footprint {
    fn weight(&self, _sql: &Box<str>, entry: &Cached) -> u64 {
        entry.bytes.max(self.floor)
    }
}

/// Analyses by SQL text. `Send + Sync`; shared by every session.
#[derive(Debug)]
pub(crate) struct AnalysisCache {
    cache: Cache<Box<str>, Cached, Footprint>,
}

impl AnalysisCache {
    /// A cache holding at most about `capacity` analyses and `bytes` bytes; `None` (no
    /// caching) when either is 0.
    pub(crate) fn new(capacity: usize, bytes: usize) -> Option<AnalysisCache> {
        if capacity == 0 || bytes == 0 {
            return None;
        }
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        let capacity_u64 = u64::try_from(capacity).unwrap_or(u64::MAX);
        let options = OptionsBuilder::new()
            .shards(SHARDS)
            .estimated_items_capacity(capacity)
            .weight_capacity(bytes)
            .build()
            .ok()?;
        let floor = bytes.div_ceil(capacity_u64).max(1);
        let cache = Cache::with_options(
            options,
            Footprint { floor },
            Default::default(),
            Default::default(),
        );
        Some(AnalysisCache { cache })
    }

    /// The cached analysis of `sql`, if any (marks it recently used).
    pub(crate) fn get(&self, sql: &str) -> Option<Arc<Analysis>> {
        self.cache.get(sql).map(|c| c.analysis)
    }

    /// Caches `analysis` for `sql`, evicting others as the bounds require.
    pub(crate) fn insert(&self, sql: &str, analysis: Arc<Analysis>) {
        let bytes = u64::try_from(footprint(sql, &analysis)).unwrap_or(u64::MAX);
        self.cache.insert(sql.into(), Cached { analysis, bytes });
    }

    /// Cached analyses right now.
    pub(crate) fn len(&self) -> usize {
        self.cache.len()
    }

    /// Approximate bytes the cached entries hold right now (walks the cache: for
    /// diagnostics, not the hot path).
    pub(crate) fn bytes(&self) -> usize {
        let total: u64 = self.cache.iter().map(|(_, c)| c.bytes).sum();
        usize::try_from(total).unwrap_or(usize::MAX)
    }
}

/// Approximate memory an entry holds: the SQL text (the key), the rewritten SQL for the
/// shards, the INSERT template, the analysis itself and the cache's bookkeeping.
fn footprint(sql: &str, a: &Analysis) -> usize {
    let shard_sql = a
        .merge
        .as_ref()
        .and_then(|m| m.shard_sql.as_ref())
        .map_or(0, String::len);
    let template = a.detail.insert.as_ref().map_or(0, |t| t.sql.len());
    sql.len() + shard_sql + template + std::mem::size_of::<Analysis>() + 128
}
