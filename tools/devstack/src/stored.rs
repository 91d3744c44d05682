//! The ring the proxy stored (`taskflow_meta` on the auth cluster), read by the supervisor
//! at start-up so the shard list it writes agrees with it.
//!
//! Why: a proxy refuses to start from a shard list that a finished migration replaced.
//! `add-shard`/`remove-shard` keep the stack's list of added shards current, but a
//! `remove-shard` whose watching was stopped with Ctrl-C lets the move finish with nobody
//! left to forget shard-4, and the next `make restart` would write the stale list. The
//! stored ring settles it. While a migration is unfinished either list is accepted (the
//! proxy joins the migration), so nothing is changed then.
//!
//! Fail-safe: on a first start (no `taskflow_meta` yet) or any error, the stack keeps its
//! own list. The query reads the proxy's own tables; it is the one place the dev stack
//! depends on their shape.

use tokio_postgres::Client;

use crate::shards::Shard;

/// The shard names of the newest active ring epoch, or `None` when unknown or while a
/// migration is unfinished.
pub async fn ring(client: &Client) -> Option<Vec<String>> {
    let row = client
        .query_opt(
            "SELECT array_to_string(shards, ','), \
                    (SELECT count(*) FROM taskflow_meta.migrations \
                      WHERE state NOT IN ('done', 'failed')) \
               FROM taskflow_meta.ring_epochs WHERE state = 'active' \
              ORDER BY epoch DESC LIMIT 1",
            &[],
        )
        .await
        .ok()??;
    let names: String = row.try_get(0).ok()?;
    let unfinished: i64 = row.try_get(1).ok()?;
    (unfinished == 0).then(|| names.split(',').map(str::to_owned).collect())
}

/// What to change so the added shards agree with the stored `ring`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fix {
    /// In the ring, not remembered (the command died between `ADD SHARD` and `join`).
    Remember(Shard),
    /// Remembered, out of the ring (its removal finished unwatched).
    Forget(Shard),
}

/// Compares the spare shards with the stored ring.
pub fn fixes(ring: &[String], spare: &[Shard], added: &[Shard]) -> Vec<Fix> {
    spare
        .iter()
        .filter_map(|s| {
            let in_ring = ring.iter().any(|n| n == s.name);
            match (in_ring, added.contains(s)) {
                (true, false) => Some(Fix::Remember(*s)),
                (false, true) => Some(Fix::Forget(*s)),
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shards::SPARE;

    fn ring(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn the_stored_ring_decides_which_spare_shards_belong() {
        let four = SPARE[0];
        let three = ring(&["shard-1", "shard-2", "shard-3"]);
        let four_too = ring(&["shard-1", "shard-2", "shard-3", "shard-4"]);
        assert_eq!(fixes(&three, &SPARE, &[]), vec![]);
        assert_eq!(fixes(&four_too, &SPARE, &[four]), vec![]);
        assert_eq!(fixes(&three, &SPARE, &[four]), vec![Fix::Forget(four)]);
        assert_eq!(fixes(&four_too, &SPARE, &[]), vec![Fix::Remember(four)]);
    }
}
