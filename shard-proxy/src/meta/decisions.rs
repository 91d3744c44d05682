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

/// Every recorded outcome.
pub async fn all(meta: &Meta) -> Result<HashMap<String, Outcome>, MetaError> {
    let rows = meta
        .query("SELECT txn_id, outcome FROM taskflow_meta.decisions")
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let mut it = r.into_iter();
            let id = it.next().flatten()?;
            let outcome = Outcome::parse(&it.next().flatten()?)?;
            Some((id, outcome))
        })
        .collect())
}

/// Forgets this transaction's commit decision once every shard committed.
pub async fn forget(meta: &Meta, txn_id: &str) -> Result<(), MetaError> {
    meta.query(&format!(
        "DELETE FROM taskflow_meta.decisions WHERE txn_id = {} AND outcome = 'commit'",
        quote(txn_id)
    ))
    .await
    .map(drop)
}

/// Deletes decisions read *before* the shards were listed (`read`) that no shard still
/// holds prepared (`prepared`): commits at once, aborts after [`KEEP_ABORTS`].
pub async fn prune(
    meta: &Meta,
    read: &HashMap<String, Outcome>,
    prepared: &HashSet<String>,
) -> Result<(), MetaError> {
    let done: Vec<String> = read
        .keys()
        .filter(|id| !prepared.contains(*id))
        .cloned()
        .collect();
    if done.is_empty() {
        return Ok(());
    }
    meta.query(&format!(
        "DELETE FROM taskflow_meta.decisions WHERE txn_id = ANY({}) \
         AND (outcome = 'commit' OR decided_at < now() - interval '{KEEP_ABORTS}')",
        text_array(&done)
    ))
    .await
    .map(drop)
}
