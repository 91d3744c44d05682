//! Golden vectors for the consistent-hash ring.
//!
//! Every row in every shard sits where these rules put it. The literals below were
//! generated once (and cross-checked with an independent xxHash64 implementation, Python's
//! `xxhash` package) and pasted here. **Changing any of them is a breaking change**: it
//! means stored rows would be looked up on the wrong shard. If a test here fails, fix the
//! code, not the vectors — unless a deliberate, migrated re-hash is being shipped.
//!
//! The rules (see `src/ring.rs`): key hash = xxh64(seed 0) of `performer:{id}`; point `i`
//! of shard `name` = xxh64(seed 0) of `{name}#{i}`; points sorted on the full u64 circle,
//! ties by shard name; a key belongs to the first point >= its hash, wrapping.

use std::collections::HashMap;

use taskflow_proxy_core::ring::Ring;

/// `Ring::key_hash` for a few keys, edges included.
const KEY_HASHES: [(i64, u64); 7] = [
    (0, 11894881103692357345),
    (1, 5220632680371419751),
    (-1, 17675016216731305508),
    (42, 10726068412417303711),
    (1000000, 6336473896623844000),
    (i64::MAX, 5609904847784281409),
    (i64::MIN, 5749748454775638616),
];

/// Owners of keys 1..=40 on ["shard-1", "shard-2", "shard-3"], 256 virtual nodes.
const THREE_SHARDS: [&str; 40] = [
    "shard-3", "shard-3", "shard-3", "shard-1", "shard-2", "shard-3", "shard-1", "shard-3",
    "shard-1", "shard-2", "shard-3", "shard-1", "shard-2", "shard-1", "shard-2", "shard-1",
    "shard-1", "shard-3", "shard-1", "shard-3", "shard-1", "shard-1", "shard-2", "shard-2",
    "shard-3", "shard-3", "shard-3", "shard-2", "shard-2", "shard-1", "shard-3", "shard-2",
    "shard-3", "shard-2", "shard-1", "shard-2", "shard-1", "shard-1", "shard-2", "shard-3",
];

/// Owners of keys 1..=40 after adding "shard-4" (256 virtual nodes).
const FOUR_SHARDS: [&str; 40] = [
    "shard-3", "shard-3", "shard-4", "shard-1", "shard-2", "shard-3", "shard-1", "shard-3",
    "shard-1", "shard-2", "shard-3", "shard-4", "shard-2", "shard-1", "shard-2", "shard-1",
    "shard-1", "shard-3", "shard-1", "shard-3", "shard-4", "shard-1", "shard-2", "shard-2",
    "shard-3", "shard-3", "shard-3", "shard-2", "shard-2", "shard-1", "shard-3", "shard-2",
    "shard-3", "shard-2", "shard-1", "shard-2", "shard-4", "shard-1", "shard-4", "shard-3",
];

fn three() -> Ring {
    Ring::new(["shard-1", "shard-2", "shard-3"], 256).expect("valid ring")
}

fn four() -> Ring {
    Ring::new(["shard-1", "shard-2", "shard-3", "shard-4"], 256).expect("valid ring")
}

#[test]
fn key_hash_is_pinned() {
    for (key, hash) in KEY_HASHES {
        assert_eq!(Ring::key_hash(key), hash, "key {key}");
    }
}

#[test]
fn first_ring_points_are_pinned() {
    // xxh64("shard-1#0") and the lowest points of the three-shard ring.
    let ring = three();
    assert!(ring.points().contains(&(4512806962611536115, 0)));
    assert_eq!(
        &ring.points()[..3],
        &[
            (19456164979019656, 0),
            (25284764157044336, 0),
            (28042532358620607, 0)
        ]
    );
}

#[test]
fn three_shard_owners_are_pinned() {
    let ring = three();
    for (i, want) in THREE_SHARDS.iter().enumerate() {
        let key = i as i64 + 1;
        assert_eq!(ring.shard_name_for(key), *want, "key {key}");
    }
}

#[test]
fn four_shard_owners_are_pinned() {
    let ring = four();
    for (i, want) in FOUR_SHARDS.iter().enumerate() {
        let key = i as i64 + 1;
        assert_eq!(ring.shard_name_for(key), *want, "key {key}");
    }
    // The vectors themselves show the ring property: keys that changed owner moved to
    // shard-4 and nowhere else.
    for (old, new) in THREE_SHARDS.iter().zip(FOUR_SHARDS.iter()) {
        assert!(old == new || *new == "shard-4", "{old} -> {new}");
    }
}

#[test]
fn config_order_does_not_change_owners() {
    let shuffled = Ring::new(["shard-3", "shard-1", "shard-2"], 256).unwrap();
    for (i, want) in THREE_SHARDS.iter().enumerate() {
        assert_eq!(shuffled.shard_name_for(i as i64 + 1), *want);
    }
}

#[test]
fn adding_a_shard_moves_only_its_keys_and_about_a_quarter() {
    let (before, after) = (three(), four());
    let total = 100_000i64;
    let mut moved = 0;
    let mut moved_per_origin: HashMap<String, u32> = HashMap::new();
    for key in 0..total {
        let old = before.shard_name_for(key);
        let new = after.shard_name_for(key);
        if old != new {
            assert_eq!(new, "shard-4", "key {key} moved {old} -> {new}");
            moved += 1;
            *moved_per_origin.entry(old.to_string()).or_default() += 1;
        }
    }
    let fraction = moved as f64 / total as f64;
    assert!(
        (0.15..=0.35).contains(&fraction),
        "moved {fraction} of the keys"
    );
    // shard-4 takes keys from every existing shard, not from one neighbour.
    assert_eq!(moved_per_origin.len(), 3, "{moved_per_origin:?}");
    // The new shard's share of the circle agrees with the keys it took.
    let share = after.ownership()[3];
    assert!(
        (share - fraction).abs() < 0.02,
        "share {share} vs moved {fraction}"
    );
}
