//! What changes between two rings: which shards are added or removed, and which keys move
//! from which shard to which.
//!
//! Why here: the proxy decides from this whether a new shard list may be used at all (it
//! must never silently re-route keys that have rows), and a mover would use it to pick
//! exactly the keys whose owner changes. Pure logic: rings in, names and keys out.

use std::fmt;

use crate::ring::Ring;

/// The difference between a stored ring and a proposed one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RingDiff {
    /// Shards only in the proposed ring (sorted).
    pub added: Vec<String>,
    /// Shards only in the stored ring (sorted).
    pub removed: Vec<String>,
    /// `(stored, proposed)` virtual nodes per shard, when they differ.
    pub virtual_nodes: Option<(u32, u32)>,
}

impl RingDiff {
    /// Compares shard *names* and virtual nodes (config order never matters).
    pub fn between(stored: &Ring, proposed: &Ring) -> RingDiff {
        Self::of_names(
            stored.shards(),
            stored.virtual_nodes(),
            proposed.shards(),
            proposed.virtual_nodes(),
        )
    }

    /// Like [`RingDiff::between`], from shard names and virtual nodes.
    pub fn of_names(
        stored: &[String],
        stored_vnodes: u32,
        proposed: &[String],
        proposed_vnodes: u32,
    ) -> RingDiff {
        let mut added: Vec<String> = proposed
            .iter()
            .filter(|s| !stored.contains(s))
            .cloned()
            .collect();
        let mut removed: Vec<String> = stored
            .iter()
            .filter(|s| !proposed.contains(s))
            .cloned()
            .collect();
        added.sort();
        removed.sort();
        RingDiff {
            added,
            removed,
            virtual_nodes: (stored_vnodes != proposed_vnodes)
                .then_some((stored_vnodes, proposed_vnodes)),
        }
    }

    /// True when both rings route every key alike.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.virtual_nodes.is_none()
    }
}

impl fmt::Display for RingDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.added.is_empty() {
            parts.push(format!("adds {}", self.added.join(", ")));
        }
        if !self.removed.is_empty() {
            parts.push(format!("removes {}", self.removed.join(", ")));
        }
        if let Some((a, b)) = self.virtual_nodes {
            parts.push(format!("changes ring.virtual_nodes from {a} to {b}"));
        }
        if parts.is_empty() {
            f.write_str("no change")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

/// Where `key` lives under `from` and under `to`, by shard name, when they differ.
pub fn moves<'a>(from: &'a Ring, to: &'a Ring, key: i64) -> Option<(&'a str, &'a str)> {
    let (a, b) = (from.shard_name_for(key), to.shard_name_for(key));
    (a != b).then_some((a, b))
}

/// Of `keys`, those whose owner changes from `from` to `to`: `(key, source, destination)`.
pub fn moving_keys<'a>(
    from: &'a Ring,
    to: &'a Ring,
    keys: impl IntoIterator<Item = i64>,
) -> Vec<(i64, &'a str, &'a str)> {
    keys.into_iter()
        .filter_map(|k| moves(from, to, k).map(|(a, b)| (k, a, b)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(names: &[&str]) -> Ring {
        Ring::new(names.iter().copied(), 64).expect("ring")
    }

    #[test]
    fn names_the_difference() {
        let three = ring(&["shard-1", "shard-2", "shard-3"]);
        let four = ring(&["shard-4", "shard-1", "shard-2", "shard-3"]);
        let d = RingDiff::between(&three, &four);
        assert_eq!(d.added, vec!["shard-4".to_string()]);
        assert!(d.removed.is_empty());
        assert_eq!(d.to_string(), "adds shard-4");
        let reordered = ring(&["shard-3", "shard-1", "shard-2"]);
        assert!(RingDiff::between(&three, &reordered).is_empty());
        let other = Ring::new(["shard-1", "shard-3"], 32).expect("ring");
        assert_eq!(
            RingDiff::between(&three, &other).to_string(),
            "removes shard-2; changes ring.virtual_nodes from 64 to 32"
        );
    }

    #[test]
    fn adding_a_shard_moves_only_keys_onto_it() {
        let three = ring(&["shard-1", "shard-2", "shard-3"]);
        let four = ring(&["shard-1", "shard-2", "shard-3", "shard-4"]);
        let moving = moving_keys(&three, &four, 0..10_000);
        assert!(moving.iter().all(|(_, _, to)| *to == "shard-4"));
        // About a quarter of the keys move (1/N of the new ring).
        assert!((1500..3500).contains(&moving.len()), "{}", moving.len());
        // Removing it again moves exactly the same keys back.
        let back = moving_keys(&four, &three, 0..10_000);
        assert_eq!(back.len(), moving.len());
        assert!(back.iter().all(|(_, from, _)| *from == "shard-4"));
    }
}
