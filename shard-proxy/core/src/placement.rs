//! Placement: which shard holds a key *right now* — the ring, or, while a migration moves
//! keys from one ring to the next, the two rings plus which moving arcs are already moved.
//!
//! # Why arcs
//!
//! Moving a shard's data online needs a unit that is small (a bounded write pause), that
//! every proxy can name the same way without asking anyone (so they agree on routing), and
//! that covers keys *no row holds yet* (a performer's first task created mid-move must land
//! where its later rows will be). A stretch of the hash circle is all three: the two rings
//! split the circle into elementary segments (between consecutive points of either ring);
//! the segments whose owner differs between the rings, merged while their source and
//! destination stay the same, are the move's **arcs**, numbered in circle order. Adding one
//! shard to a 256-virtual-node ring makes about 256 of them, each about `1/(256·N)` of the
//! keys. The arcs are a pure function of the two rings, so every proxy derives the same
//! numbering; only "which arcs are done" is shared state (and only ever grows).
//!
//! # Routing during a move
//!
//! A key outside every arc routes as both rings agree. A key in an arc routes to the arc's
//! source until the arc is done, then to its destination, and the caller must *guard* the
//! statement on that shard ([`Located::arc`]): the shard itself, not this process's view,
//! says whether the arc is still there (see `migrations/sql/shard/V2__moves.sql`). That
//! keeps a stale view safe: a statement sent to a source that no longer owns the arc fails
//! its guard instead of writing where nobody will read.
//!
//! Shard indexes of a moving placement point into the union of both rings' shards: the
//! source ring's shards in their order, then the shards only the destination ring has.
//!
//! Pure logic: no I/O. The done flags are atomics so a view can be advanced in place.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::ring::Ring;

/// One moving arc: the hash ranges it covers (one, or two when it wraps past the top of
/// the circle), and where its keys come from and go to (union shard indexes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveArc {
    /// Inclusive `(lo, hi)` hash ranges.
    pub ranges: Vec<(u64, u64)>,
    pub source: usize,
    pub dest: usize,
}

impl MoveArc {
    /// Whether a key hash falls in this arc.
    pub fn contains(&self, hash: u64) -> bool {
        self.ranges.iter().any(|&(lo, hi)| lo <= hash && hash <= hi)
    }

    /// Fraction of the hash circle the arc covers.
    pub fn share(&self) -> f64 {
        let n: u128 = self
            .ranges
            .iter()
            .map(|&(lo, hi)| u128::from(hi - lo) + 1)
            .sum();
        n as f64 / (1u128 << 64) as f64
    }
}

/// The arcs that change owner from `from` to `to`, in circle order, with shard indexes
/// into `union` (which must hold every shard of both rings).
pub fn arcs(from: &Ring, to: &Ring, union: &[String]) -> Vec<MoveArc> {
    let index = |name: &str| union.iter().position(|s| s == name).unwrap_or(usize::MAX);
    let mut bounds: Vec<u64> = from
        .points()
        .iter()
        .chain(to.points())
        .map(|p| p.0)
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let owners = |h: u64| {
        let a = index(&from.shards()[from.owner_of_hash(h)]);
        let b = index(&to.shards()[to.owner_of_hash(h)]);
        (a != b).then_some((a, b))
    };
    let mut out: Vec<MoveArc> = Vec::new();
    let mut prev: Option<u64> = None;
    for &b in &bounds {
        // The segment (prev, b]; the first one is handled with the wrap-around below.
        if let Some(p) = prev {
            if let Some((source, dest)) = owners(b) {
                push_range(&mut out, (p + 1, b), source, dest);
            }
        }
        prev = Some(b);
    }
    // The wrap-around segment (last, MAX] ∪ [0, first], owned like `first`.
    if let (Some(&first), Some(&last)) = (bounds.first(), bounds.last()) {
        if let Some((source, dest)) = owners(first) {
            let mut ranges = vec![(0, first)];
            if last < u64::MAX {
                ranges.push((last + 1, u64::MAX));
            }
            out.push(MoveArc {
                ranges,
                source,
                dest,
            });
        }
    }
    out
}

/// Appends `range` to the last arc when it continues it with the same source and
/// destination, else starts a new arc.
fn push_range(out: &mut Vec<MoveArc>, range: (u64, u64), source: usize, dest: usize) {
    if let Some(last) = out.last_mut() {
        let continues = last.ranges.len() == 1
            && last.ranges[0].1.checked_add(1) == Some(range.0)
            && last.source == source
            && last.dest == dest;
        if continues {
            last.ranges[0].1 = range.1;
            return;
        }
    }
    out.push(MoveArc {
        ranges: vec![range],
        source,
        dest,
    });
}

/// Where a key is routed, and the moving arc it is in (the statement must be guarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    pub shard: usize,
    pub arc: Option<u32>,
    /// For a key in a moving arc: the arc's other shard (its destination while not moved,
    /// its source after). A read of several shards may read both sides instead of
    /// guarding: under the commit fence a batch is seen on exactly one of them.
    pub other: Option<usize>,
}

/// What the planner needs to place keys: a plain [`Ring`] or a [`Placement`].
pub trait Locate {
    /// The shard for `key` (and its moving arc, if any).
    fn locate(&self, key: i64) -> Located;
    /// The index of shard `name` (for hints).
    fn index_of(&self, name: &str) -> Option<usize>;
}

impl Locate for Ring {
    fn locate(&self, key: i64) -> Located {
        Located {
            shard: self.shard_for(key),
            arc: None,
            other: None,
        }
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        Ring::index_of(self, name)
    }
}

/// A migration in progress, as one proxy sees it.
#[derive(Debug)]
pub struct Moving {
    /// The ring epoch the move leads to.
    pub epoch: i64,
    pub from: Ring,
    pub to: Ring,
    /// Union shard indexes of `from`'s shards, by `from` index.
    from_index: Vec<usize>,
    pub arcs: Vec<MoveArc>,
    /// Flattened `(lo, hi, arc)` ranges sorted by `lo`, for lookups.
    lookup: Vec<(u64, u64, u32)>,
    done: Vec<AtomicBool>,
}

impl Moving {
    /// Arc number of a key hash, if it is moving.
    pub fn arc_of_hash(&self, hash: u64) -> Option<u32> {
        let pos = self.lookup.partition_point(|r| r.0 <= hash);
        let (lo, hi, arc) = *self.lookup.get(pos.checked_sub(1)?)?;
        (lo <= hash && hash <= hi).then_some(arc)
    }

    /// Marks an arc moved (monotonic; out-of-range numbers are ignored).
    pub fn mark_done(&self, arc: u32) {
        if let Some(d) = self.done.get(arc as usize) {
            d.store(true, Ordering::Release);
        }
    }

    pub fn is_done(&self, arc: u32) -> bool {
        self.done
            .get(arc as usize)
            .is_some_and(|d| d.load(Ordering::Acquire))
    }

    /// How many arcs are moved.
    pub fn done_count(&self) -> usize {
        self.done
            .iter()
            .filter(|d| d.load(Ordering::Acquire))
            .count()
    }
}

/// The placement of keys: a ring, or a move between two rings.
#[derive(Debug)]
pub struct Placement {
    /// Union of both rings' shards (just the ring's when not moving).
    shards: Vec<String>,
    /// The ring that routes when nothing moves (the source ring during a move).
    ring: Ring,
    moving: Option<Moving>,
}

impl From<Ring> for Placement {
    fn from(ring: Ring) -> Placement {
        Placement {
            shards: ring.shards().to_vec(),
            ring,
            moving: None,
        }
    }
}

impl Placement {
    /// A move from `from` to `to`, leading to ring epoch `epoch`, with the arcs already
    /// moved.
    pub fn moving(from: Ring, to: Ring, epoch: i64, done: &[u32]) -> Placement {
        let mut shards = from.shards().to_vec();
        for s in to.shards() {
            if !shards.contains(s) {
                shards.push(s.clone());
            }
        }
        let arcs = arcs(&from, &to, &shards);
        let mut lookup: Vec<(u64, u64, u32)> = arcs
            .iter()
            .enumerate()
            .flat_map(|(i, a)| a.ranges.iter().map(move |&(lo, hi)| (lo, hi, i as u32)))
            .collect();
        lookup.sort_unstable();
        let from_index = (0..from.shards().len()).collect();
        let moving = Moving {
            epoch,
            done: (0..arcs.len()).map(|_| AtomicBool::new(false)).collect(),
            from: from.clone(),
            to,
            from_index,
            arcs,
            lookup,
        };
        for &d in done {
            moving.mark_done(d);
        }
        Placement {
            shards,
            ring: from,
            moving: Some(moving),
        }
    }

    /// Every shard that may hold rows (both rings' during a move), in index order.
    pub fn shards(&self) -> &[String] {
        &self.shards
    }

    /// The ring that routes every key outside the moving arcs.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The move in progress, if any.
    pub fn migration(&self) -> Option<&Moving> {
        self.moving.as_ref()
    }
}

impl Locate for Placement {
    fn locate(&self, key: i64) -> Located {
        let Some(m) = &self.moving else {
            return self.ring.locate(key);
        };
        let hash = Ring::key_hash(key);
        match m.arc_of_hash(hash) {
            Some(arc) => {
                let a = &m.arcs[arc as usize];
                let (shard, other) = if m.is_done(arc) {
                    (a.dest, a.source)
                } else {
                    (a.source, a.dest)
                };
                Located {
                    shard,
                    arc: Some(arc),
                    other: Some(other),
                }
            }
            None => Located {
                shard: m.from_index[m.from.owner_of_hash(hash)],
                arc: None,
                other: None,
            },
        }
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.shards.iter().position(|s| s == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(names: &[&str]) -> Ring {
        Ring::new(names.iter().copied(), 64).expect("ring")
    }

    #[test]
    fn arcs_cover_exactly_the_keys_that_change_owner() {
        let three = ring(&["shard-1", "shard-2", "shard-3"]);
        let four = ring(&["shard-1", "shard-2", "shard-3", "shard-4"]);
        let p = Placement::moving(three.clone(), four.clone(), 2, &[]);
        let m = p.migration().expect("moving");
        assert!(m.arcs.len() > 10 && m.arcs.len() <= 64, "{}", m.arcs.len());
        assert!(m.arcs.iter().all(|a| a.dest == 3));
        for key in -3000..3000 {
            let h = Ring::key_hash(key);
            let changes = three.shard_name_for(key) != four.shard_name_for(key);
            assert_eq!(m.arc_of_hash(h).is_some(), changes, "key {key}");
            // Before any arc is done, everything routes by the old ring.
            assert_eq!(p.shards()[p.locate(key).shard], three.shard_name_for(key));
        }
        let share: f64 = m.arcs.iter().map(MoveArc::share).sum();
        assert!((share - four.ownership()[3]).abs() < 1e-9);
    }

    #[test]
    fn done_arcs_route_to_their_destination() {
        let three = ring(&["shard-1", "shard-2", "shard-3"]);
        let four = ring(&["shard-1", "shard-2", "shard-3", "shard-4"]);
        let all: Vec<u32> = {
            let p = Placement::moving(three.clone(), four.clone(), 2, &[]);
            (0..p.migration().map_or(0, |m| m.arcs.len() as u32)).collect()
        };
        let p = Placement::moving(three, four.clone(), 2, &all);
        for key in -3000..3000 {
            assert_eq!(p.shards()[p.locate(key).shard], four.shard_name_for(key));
        }
    }

    #[test]
    fn removing_a_shard_moves_its_arcs_to_the_others() {
        let four = ring(&["shard-1", "shard-2", "shard-3", "shard-4"]);
        let three = ring(&["shard-1", "shard-2", "shard-3"]);
        let p = Placement::moving(four.clone(), three.clone(), 3, &[]);
        let m = p.migration().expect("moving");
        assert!(m.arcs.iter().all(|a| a.source == 3 && a.dest < 3));
        for key in -2000..2000 {
            let h = Ring::key_hash(key);
            assert_eq!(m.arc_of_hash(h).is_some(), four.shard_for(key) == 3);
        }
    }

    #[test]
    fn the_wrap_around_segment_is_one_arc() {
        // Whatever the rings, the circle's ends belong to the same arc (or to none).
        let a = ring(&["a", "b"]);
        let b = ring(&["a", "b", "c"]);
        let p = Placement::moving(a, b, 2, &[]);
        let m = p.migration().expect("moving");
        assert_eq!(m.arc_of_hash(0), m.arc_of_hash(u64::MAX));
        assert!(m.arcs.iter().all(|x| !x.ranges.is_empty()));
    }
}
