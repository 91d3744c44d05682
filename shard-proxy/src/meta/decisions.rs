//! 2PC outcomes, one row per cross-shard transaction in `taskflow_meta.decisions`.
//!
//! Why a table with a primary key rather than a log: the row *is* the agreement. The owner
//! inserts `commit` after every shard prepared and before any `COMMIT PREPARED`; a
//! recovering proxy that wants to roll back an undecided transaction first inserts
//! `abort`. Whoever inserts first wins (`ON CONFLICT DO NOTHING`), and both read back the
//! outcome that stands, so no proxy can roll back what another committed — not even one
//! that wrongly took a slow owner for dead.

use std::collections::{HashMap, HashSet};

use super::{quote, text_array, Meta, MetaError};

/// Commit decisions are deleted once no shard holds the transaction prepared; abort
/// decisions are kept this long, in case a slow owner prepares one more shard late.
const KEEP_ABORTS: &str = "1 hour";

/// What was decided for one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Commit,
    Abort,
}

impl Outcome {
    fn parse(s: &str) -> Option<Outcome> {
        match s {
            "commit" => Some(Outcome::Commit),
            "abort" => Some(Outcome::Abort),
            _ => None,
        }
    }
}

/// Records that `txn_id` (this proxy's) commits, unless a recovering proxy already
/// decided to abort it. Returns the outcome that stands; the write is committed (durable)
/// when this returns.
pub async fn decide_commit(
    meta: &Meta,
    txn_id: &str,
    gids: &[String],
) -> Result<Outcome, MetaError> {
    decide(meta, txn_id, &meta.instance, Outcome::Commit, gids).await
}

/// Records that `txn_id`, owned by `owner`, is abandoned, unless it was already decided.
/// Returns the outcome that stands (`Commit` when the owner got there first).
pub async fn presume_abort(meta: &Meta, txn_id: &str, owner: &str) -> Result<Outcome, MetaError> {
    decide(meta, txn_id, owner, Outcome::Abort, &[]).await
}

async fn decide(
    meta: &Meta,
    txn_id: &str,
    owner: &str,
    outcome: Outcome,
    gids: &[String],
) -> Result<Outcome, MetaError> {
    let word = match outcome {
        Outcome::Commit => "commit",
        Outcome::Abort => "abort",
    };
    let rows = meta
        .query(&format!(
            "INSERT INTO taskflow_meta.decisions (txn_id, owner, outcome, gids, decided_by) \
             VALUES ({id}, {owner}, '{word}', {gids}, {me}) \
             ON CONFLICT (txn_id) DO NOTHING RETURNING outcome",
            id = quote(txn_id),
            owner = quote(owner),
            gids = text_array(gids),
            me = quote(&meta.instance),
        ))
        .await?;
    if !rows.is_empty() {
        return Ok(outcome);
    }
    let rows = meta
        .query(&format!(
            "SELECT outcome FROM taskflow_meta.decisions WHERE txn_id = {}",
            quote(txn_id)
        ))
        .await?;
    super::first_column(rows)
        .first()
        .and_then(|o| Outcome::parse(o))
        .ok_or_else(|| MetaError::Invalid(format!("the decision on {txn_id} vanished")))
}

/// One recorded decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub owner: String,
    /// The gids of a commit (one per shard), empty for a presumed abort.
    pub gids: Vec<String>,
    /// Seconds since it was recorded (by the metadata database's clock).
    pub age_secs: i64,
}

/// The columns [`parse_rows`] reads, in order.
pub const COLUMNS: &str = "txn_id, outcome, owner, array_to_string(gids, ','), \
    extract(epoch FROM now() - decided_at)::bigint::text";

/// Every recorded decision by transaction id.
pub async fn all(meta: &Meta) -> Result<HashMap<String, Decision>, MetaError> {
    let rows = meta
        .query(&format!("SELECT {COLUMNS} FROM taskflow_meta.decisions"))
        .await?;
    Ok(parse_rows(rows))
}

/// Decisions from rows of [`COLUMNS`].
pub fn parse_rows(rows: Vec<Vec<Option<String>>>) -> HashMap<String, Decision> {
    rows.into_iter()
        .filter_map(|r| {
            let mut it = r.into_iter().map(Option::unwrap_or_default);
            let id = it.next()?;
            let outcome = Outcome::parse(&it.next()?)?;
            let owner = it.next()?;
            let gids = it
                .next()?
                .split(',')
                .filter(|g| !g.is_empty())
                .map(str::to_owned)
                .collect();
            let age_secs = it.next()?.parse().unwrap_or(0);
            Some((
                id,
                Decision {
                    outcome,
                    owner,
                    gids,
                    age_secs,
                },
            ))
        })
        .collect()
}

/// SQL deleting transaction `txn_id`'s commit decision (run once every shard committed).
pub fn forget_sql(txn_id: &str) -> String {
    format!(
        "DELETE FROM taskflow_meta.decisions WHERE txn_id = {} AND outcome = 'commit'",
        quote(txn_id)
    )
}

/// Forgets this transaction's commit decision once every shard committed.
pub async fn forget(meta: &Meta, txn_id: &str) -> Result<(), MetaError> {
    meta.query(&forget_sql(txn_id)).await.map(drop)
}

/// Deletes abort decisions read *before* the shards were listed (`read`) that no shard
/// still holds prepared (`prepared`) and that are older than [`KEEP_ABORTS`]. (Commit
/// decisions are deleted by whoever finishes their `COMMIT PREPARED`s.)
pub async fn prune(
    meta: &Meta,
    read: &HashMap<String, Decision>,
    prepared: &HashSet<String>,
) -> Result<(), MetaError> {
    let done: Vec<String> = read
        .iter()
        .filter(|(id, d)| d.outcome == Outcome::Abort && !prepared.contains(*id))
        .map(|(id, _)| id.clone())
        .collect();
    if done.is_empty() {
        return Ok(());
    }
    meta.query(&format!(
        "DELETE FROM taskflow_meta.decisions WHERE txn_id = ANY({}) \
         AND outcome = 'abort' AND decided_at < now() - interval '{KEEP_ABORTS}'",
        text_array(&done)
    ))
    .await
    .map(drop)
}
