//! Consistent-hash ring: which shard owns a `performer_id`.
//!
//! # Why a ring with virtual nodes
//!
//! Hash-modulo sharding (`hash(key) % N`, what PgDog does) remaps almost every key when `N`
//! changes, so adding a shard means moving nearly all data. On a ring each shard owns many
//! small arcs ("virtual nodes"); adding `shard-4` inserts only shard-4's points, and the only
//! keys that change owner are those that now fall on one of those new arcs — about `1/N` of
//! them, all moving *to* the new shard. Points derive from shard **names**, not positions in
//! the config, so reordering the `[[shards]]` list never moves a key.
//!
//! # The hash (a compatibility contract — never change it)
//!
//! * Key hash: `xxh64(seed = 0)` of the UTF-8 bytes of `performer:{id}`, where `{id}` is the
//!   decimal `i64` (`performer:42`, `performer:-7`). This is the string the original Go
//!   TaskFlow hashed, so keys hash the same here.
//! * Ring point `i` (0-based, `i < virtual_nodes`) of shard `name`: `xxh64(seed = 0)` of
//!   `{name}#{i}` (`shard-1#0`, `shard-1#1`, …).
//! * Points are sorted on the full `u64` circle (the Go ring reduced hashes mod 2^32; this
//!   ring deliberately keeps all 64 bits, so shard assignment differs from the Go ring even
//!   though the key hash itself is the same). Equal points are ordered by shard name, so the
//!   order is total and independent of config order.
//! * A key belongs to the first point whose value is `>=` its hash, wrapping past the top of
//!   the circle to the first point.
//!
//! `tests/ring_golden.rs` pins these rules with literal vectors; a change that alters any of
//! them re-homes stored rows and is a breaking change.
//!
//! This module is pure logic: no I/O, no async.

use xxhash_rust::xxh64::xxh64;

/// Default number of virtual nodes per shard (`ring.virtual_nodes`).
pub const DEFAULT_VIRTUAL_NODES: u32 = 256;

/// Why a ring can't be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The shard list is empty.
    #[error("the hash ring needs at least one shard")]
    NoShards,
    /// The same shard name appears twice.
    #[error("shard {0:?} is listed more than once")]
    DuplicateShard(String),
    /// `virtual_nodes` is 0.
    #[error("ring.virtual_nodes must be at least 1")]
    ZeroVirtualNodes,
}

/// A consistent-hash ring over named shards. Cheap to query, immutable once built: to add a
/// shard build a new ring (and compare the two to find the keys that move).
#[derive(Clone, Debug)]
pub struct Ring {
    shards: Vec<String>,
    virtual_nodes: u32,
    /// Sorted by (point, shard name).
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// Builds the ring. `shards` keeps its order for [`Ring::shards`] (indexes returned by
    /// [`Ring::shard_for`] point into it), but that order has no effect on ownership.
    pub fn new<I, S>(shards: I, virtual_nodes: u32) -> Result<Ring, RingError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        if virtual_nodes == 0 {
            return Err(RingError::ZeroVirtualNodes);
        }
        let shards: Vec<String> = shards.into_iter().map(Into::into).collect();
        if shards.is_empty() {
            return Err(RingError::NoShards);
        }
        for (i, name) in shards.iter().enumerate() {
            if shards[..i].contains(name) {
                return Err(RingError::DuplicateShard(name.clone()));
            }
        }
        let mut points = Vec::with_capacity(shards.len() * virtual_nodes as usize);
        for (idx, name) in shards.iter().enumerate() {
            for i in 0..virtual_nodes {
                points.push((xxh64(format!("{name}#{i}").as_bytes(), 0), idx));
            }
        }
        points.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| shards[a.1].cmp(&shards[b.1])));
        Ok(Ring {
            shards,
            virtual_nodes,
            points,
        })
    }

    /// The hash of a shard key: `xxh64("performer:{key}", seed 0)`. Stable forever.
    ///
    /// The decimal digits are written by hand into a stack buffer: this runs for every
    /// routed statement, and `write!` through `core::fmt` cost more than the hash itself.
    pub fn key_hash(key: i64) -> u64 {
        const PREFIX: &[u8] = b"performer:";
        // "performer:" (10) + at most 20 characters of an i64 ("-9223372036854775808").
        let mut buf = [0u8; 32];
        let mut at = buf.len();
        let mut magnitude = key.unsigned_abs();
        loop {
            at -= 1;
            // `magnitude % 10` < 10: the cast cannot truncate.
            buf[at] = b'0' + (magnitude % 10) as u8;
            magnitude /= 10;
            if magnitude == 0 {
                break;
            }
        }
        if key < 0 {
            at -= 1;
            buf[at] = b'-';
        }
        at -= PREFIX.len();
        buf[at..at + PREFIX.len()].copy_from_slice(PREFIX);
        xxh64(&buf[at..], 0)
    }

    /// Index (into [`Ring::shards`]) of the shard owning `key`.
    pub fn shard_for(&self, key: i64) -> usize {
        self.owner_of_hash(Self::key_hash(key))
    }

    /// Name of the shard owning `key`.
    pub fn shard_name_for(&self, key: i64) -> &str {
        &self.shards[self.shard_for(key)]
    }

    /// Index of the shard owning a raw hash value (first point `>=` hash, wrapping).
    pub fn owner_of_hash(&self, hash: u64) -> usize {
        let pos = self.points.partition_point(|p| p.0 < hash);
        match self.points.get(pos) {
            Some(p) => p.1,
            // Past the last point: wrap to the first. `points` is never empty.
            None => self.points.first().map_or(0, |p| p.1),
        }
    }

    /// Shard names in config order.
    pub fn shards(&self) -> &[String] {
        &self.shards
    }

    /// Index of the shard called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.shards.iter().position(|s| s == name)
    }

    /// Virtual nodes per shard.
    pub fn virtual_nodes(&self) -> u32 {
        self.virtual_nodes
    }

    /// All ring points, sorted, with the index of the shard each belongs to (`SHOW RING`).
    pub fn points(&self) -> &[(u64, usize)] {
        &self.points
    }

    /// Fraction of the hash circle each shard owns, indexed like [`Ring::shards`]; sums to 1.
    pub fn ownership(&self) -> Vec<f64> {
        let mut owned = vec![0u128; self.shards.len()];
        let n = self.points.len();
        if n == 1 {
            owned[self.points[0].1] = 1u128 << 64;
        } else {
            for i in 0..n {
                let (point, shard) = self.points[i];
                let prev = self.points[(i + n - 1) % n].0;
                // The arc (prev, point]; for the first point it wraps around the top.
                owned[shard] += u128::from(point.wrapping_sub(prev));
            }
            // Equal first/last points would make every arc 0: the first point owns it all.
            if owned.iter().all(|&o| o == 0) {
                owned[self.points[0].1] = 1u128 << 64;
            }
        }
        let circle = (1u128 << 64) as f64;
        owned.into_iter().map(|o| o as f64 / circle).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Ring {
        Ring::new(["shard-1", "shard-2", "shard-3"], 256).unwrap()
    }

    #[test]
    fn errors() {
        assert_eq!(
            Ring::new(Vec::<String>::new(), 4).unwrap_err(),
            RingError::NoShards
        );
        assert_eq!(
            Ring::new(["a", "b", "a"], 4).unwrap_err(),
            RingError::DuplicateShard("a".into())
        );
        assert_eq!(
            Ring::new(["a"], 0).unwrap_err(),
            RingError::ZeroVirtualNodes
        );
    }

    #[test]
    fn key_hash_matches_formatted_string() {
        let mut keys = vec![0, 1, -1, 9, 10, -10, 42, 99, 100, -101, i64::MAX, i64::MIN];
        keys.extend((0..64).map(|bit| 1i64 << bit));
        keys.extend((0..64).map(|bit| (1i64 << bit).wrapping_neg()));
        keys.extend((1..19).map(|digits| 10i64.pow(digits) - 1));
        for key in keys {
            assert_eq!(
                Ring::key_hash(key),
                xxh64(format!("performer:{key}").as_bytes(), 0)
            );
        }
    }

    #[test]
    fn points_sorted_and_counted() {
        let ring = three();
        assert_eq!(ring.points().len(), 3 * 256);
        assert!(ring.points().windows(2).all(|w| w[0].0 <= w[1].0));
        assert_eq!(ring.virtual_nodes(), 256);
        assert_eq!(ring.shards(), ["shard-1", "shard-2", "shard-3"]);
        assert_eq!(ring.index_of("shard-2"), Some(1));
        assert_eq!(ring.index_of("nope"), None);
    }

    #[test]
    fn owner_is_first_point_at_or_after_hash() {
        let ring = three();
        for key in 0..2000 {
            let h = Ring::key_hash(key);
            let expected = ring
                .points()
                .iter()
                .find(|p| p.0 >= h)
                .unwrap_or(&ring.points()[0])
                .1;
            assert_eq!(ring.shard_for(key), expected);
            assert_eq!(ring.shard_name_for(key), ring.shards()[expected]);
        }
        // Exact hits and wrap-around.
        let (p, s) = ring.points()[10];
        assert_eq!(ring.owner_of_hash(p), s);
        assert_eq!(ring.owner_of_hash(u64::MAX), ring.points()[0].1);
        assert_eq!(ring.owner_of_hash(0), ring.points()[0].1);
    }

    #[test]
    fn config_order_does_not_matter() {
        let a = three();
        let b = Ring::new(["shard-3", "shard-1", "shard-2"], 256).unwrap();
        for key in -500..500 {
            assert_eq!(a.shard_name_for(key), b.shard_name_for(key));
        }
    }

    #[test]
    fn ownership_sums_to_one_and_is_balanced() {
        let ring = three();
        let own = ring.ownership();
        assert_eq!(own.len(), 3);
        assert!((own.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        for o in own {
            assert!(o > 0.25 && o < 0.42, "unbalanced: {o}");
        }
        let single = Ring::new(["only"], 1).unwrap();
        assert_eq!(single.ownership(), vec![1.0]);
        let single = Ring::new(["only"], 8).unwrap();
        assert!((single.ownership()[0] - 1.0).abs() < 1e-12);
    }
}
