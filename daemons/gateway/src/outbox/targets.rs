//! Which shards the outbox relay polls, cycle by cycle.
//!
//! Why not just `outbox_shards`: shards join and leave while the gateway runs (`ADD SHARD`
//! in the proxy's admin console, `make add-shard`), and once the proxy moves a performer
//! onto a new shard, that performer's task writes put their outbox rows there. A list
//! fixed at start-up would never publish them.
//!
//! So the relay asks the proxy: `SHOW taskflow.shards` in the sharded database, one row
//! per shard that may hold rows (both rings' during an online migration; one column,
//! named `taskflow.shards` as PostgreSQL names a `SHOW` column), at most every
//! [`REFRESH`], and polls each listed shard by hint. A proxy that does not answer it (the statement then reaches a
//! shard's PostgreSQL, which knows no such setting) or a plain database leaves the relay
//! on its configuration: each of `outbox_shards` by hint, plus — every [`SWEEP_EVERY`] —
//! one pass without a hint, which the proxy runs on every shard of its current ring (a
//! scatter read and a broadcast stamp: a cross-shard transaction, slower, but it misses
//! no shard, including one added at run time). With `outbox_shards` empty that unhinted
//! pass is all there is, every cycle, as before. Such a proxy is asked again every
//! [`RECHECK`], so the relay switches over once the proxy learns the statement.
//!
//! The state machine is pure (the clock is passed in); [`ask`] is its only I/O.

use std::time::{Duration, Instant};

use tokio_postgres::SimpleQueryMessage;

/// What the relay asks the proxy.
pub const LIST_SHARDS: &str = "SHOW taskflow.shards";
/// How often a proxy that lists its shards is asked again.
pub const REFRESH: Duration = Duration::from_secs(1);
/// How often a database that did not list its shards is asked again.
pub const RECHECK: Duration = Duration::from_secs(60);
/// Without a list from the proxy: how often every shard is swept by an unhinted pass.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The proxy's answer to [`LIST_SHARDS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The shards that may hold rows, by name.
    Shards(Vec<String>),
    /// No list; why (the server's message, or what was wrong with the list).
    Unsupported(String),
}

/// Asks the proxy for its shards. `Err` only when the question did not get through (the
/// connection); an error the server answered means it does not list shards.
pub async fn ask(client: &tokio_postgres::Client) -> Result<Answer, tokio_postgres::Error> {
    match client.simple_query(LIST_SHARDS).await {
        Ok(messages) => Ok(Answer::from_rows(messages.iter().filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => {
                let column = name_column(row.columns().iter().map(|c| c.name()));
                Some(column.map(|i| row.try_get(i).ok().flatten().map(str::to_owned)))
            }
            _ => None,
        }))),
        Err(e) => match e.as_db_error() {
            Some(db) => Ok(Answer::Unsupported(format!(
                "{LIST_SHARDS}: {} (SQLSTATE {})",
                db.message(),
                db.code().code()
            ))),
            None => Err(e),
        },
    }
}

/// Which column holds the shard name: `taskflow.shards` (what the proxy answers), `name`,
/// or the only one there is.
fn name_column<'a>(columns: impl Iterator<Item = &'a str>) -> Option<usize> {
    let names: Vec<&str> = columns.collect();
    names
        .iter()
        .position(|c| *c == "taskflow.shards" || *c == "name")
        .or((names.len() == 1).then_some(0))
}

impl Answer {
    /// Each row's shard name: `None` when the row has no such column, `Some(None)` for
    /// NULL. Names go into a `/* shard=… */` comment, so anything but a plain shard name
    /// (letters, digits, `-`, `_`: what the proxy and `outbox_shards` accept) rejects the
    /// whole list rather than be spliced into SQL.
    pub fn from_rows(rows: impl Iterator<Item = Option<Option<String>>>) -> Self {
        let mut names = Vec::new();
        for row in rows {
            match row {
                None => {
                    return Answer::Unsupported(format!("{LIST_SHARDS} has no shard name column"))
                }
                Some(Some(name)) if is_shard_name(&name) => names.push(name),
                Some(other) => {
                    return Answer::Unsupported(format!(
                        "{LIST_SHARDS} listed {other:?}, not a shard name"
                    ))
                }
            }
        }
        if names.is_empty() {
            return Answer::Unsupported(format!("{LIST_SHARDS} listed no shard"));
        }
        Answer::Shards(names)
    }
}

/// Letters, digits, `-` and `_`; not empty.
pub fn is_shard_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Where the list comes from now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// Not asked yet, or the question did not get through.
    Unknown,
    /// The proxy's list.
    Listed(Vec<String>),
    /// The database does not list shards: configuration and sweeps.
    Unsupported,
}

/// The relay's view of the shards to poll.
#[derive(Debug)]
pub struct Targets {
    configured: Vec<String>,
    source: Source,
    asked_at: Option<Instant>,
    swept_at: Option<Instant>,
}

impl Targets {
    /// `configured`: `outbox_shards`.
    pub fn new(configured: Vec<String>) -> Self {
        Targets {
            configured,
            source: Source::Unknown,
            asked_at: None,
            swept_at: None,
        }
    }

    /// Whether to ask the proxy now.
    pub fn due(&self, now: Instant) -> bool {
        let every = match self.source {
            Source::Unknown => Duration::ZERO,
            Source::Listed(_) => REFRESH,
            Source::Unsupported => RECHECK,
        };
        self.asked_at
            .is_none_or(|t| now.saturating_duration_since(t) >= every)
    }

    /// Takes the proxy's answer; returns what to log when the relay's targets change.
    pub fn record(&mut self, now: Instant, answer: Answer) -> Option<String> {
        self.asked_at = Some(now);
        let (source, note) = match answer {
            Answer::Shards(names) => {
                let note = format!("polling the shards the proxy lists: {}", names.join(", "));
                (Source::Listed(names), note)
            }
            Answer::Unsupported(why) => {
                let note = if self.configured.is_empty() {
                    format!("the database does not list shards ({why}); polling it as one")
                } else {
                    format!(
                        "the proxy does not list its shards ({why}); polling outbox_shards ({}) \
                         and, every {} s, every shard at once",
                        self.configured.join(", "),
                        SWEEP_EVERY.as_secs()
                    )
                };
                (Source::Unsupported, note)
            }
        };
        let changed = source != self.source;
        self.source = source;
        changed.then_some(note)
    }

    /// A hinted poll failed (the shard may have left the ring): ask again next cycle.
    pub fn stale(&mut self) {
        if matches!(self.source, Source::Listed(_)) {
            self.asked_at = None;
        }
    }

    /// This cycle's targets: `Some(name)` polls that shard by hint, `None` the database
    /// as one (through the proxy: every shard of its ring).
    pub fn plan(&mut self, now: Instant) -> Vec<Option<String>> {
        if let Source::Listed(names) = &self.source {
            return names.iter().cloned().map(Some).collect();
        }
        if self.configured.is_empty() {
            return vec![None];
        }
        let mut targets: Vec<Option<String>> = self.configured.iter().cloned().map(Some).collect();
        if self
            .swept_at
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY)
        {
            self.swept_at = Some(now);
            targets.push(None);
        }
        targets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn hinted(list: &[&str]) -> Vec<Option<String>> {
        list.iter().map(|s| Some((*s).to_owned())).collect()
    }

    #[test]
    fn a_listing_proxy_decides_what_is_polled() {
        let t0 = Instant::now();
        let mut t = Targets::new(names(&["shard-1", "shard-2", "shard-3"]));
        assert!(t.due(t0));
        let note = t.record(
            t0,
            Answer::Shards(names(&["shard-1", "shard-2", "shard-3", "shard-4"])),
        );
        assert!(note.is_some_and(|n| n.contains("shard-4")));
        // The proxy's list, including the shard added at run time; no sweep.
        for at in [t0, t0 + SWEEP_EVERY * 3] {
            assert_eq!(
                t.plan(at),
                hinted(&["shard-1", "shard-2", "shard-3", "shard-4"])
            );
        }
        assert!(!t.due(t0 + REFRESH / 2));
        assert!(t.due(t0 + REFRESH));
        // Asked again with the same answer: nothing to log.
        let same = t.record(
            t0 + REFRESH,
            Answer::Shards(names(&["shard-1", "shard-2", "shard-3", "shard-4"])),
        );
        assert_eq!(same, None);
        // shard-4 removed: the next answer drops it.
        t.record(
            t0 + REFRESH * 2,
            Answer::Shards(names(&["shard-1", "shard-2", "shard-3"])),
        );
        assert_eq!(
            t.plan(t0 + REFRESH * 2),
            hinted(&["shard-1", "shard-2", "shard-3"])
        );
        // A failed hinted poll asks again at once.
        assert!(!t.due(t0 + REFRESH * 2));
        t.stale();
        assert!(t.due(t0 + REFRESH * 2));
    }

    #[test]
    fn without_a_list_the_configured_shards_are_polled_and_every_shard_swept() {
        let t0 = Instant::now();
        let mut t = Targets::new(names(&["shard-1", "shard-2"]));
        // Before any answer (the question did not get through): the same fallback.
        let mut first = hinted(&["shard-1", "shard-2"]);
        first.push(None);
        assert_eq!(t.plan(t0), first);
        let note = t.record(t0, Answer::Unsupported("no such setting".into()));
        assert!(
            note.is_some_and(|n| n.contains("no such setting") && n.contains("shard-1, shard-2"))
        );
        // The sweep at most every SWEEP_EVERY.
        assert_eq!(
            t.plan(t0 + SWEEP_EVERY / 2),
            hinted(&["shard-1", "shard-2"])
        );
        assert_eq!(t.plan(t0 + SWEEP_EVERY), first);
        assert_eq!(t.plan(t0 + SWEEP_EVERY), hinted(&["shard-1", "shard-2"]));
        // Asked again only after RECHECK; stale() does not hurry that.
        t.stale();
        assert!(!t.due(t0 + RECHECK / 2));
        assert!(t.due(t0 + RECHECK));
        // Once the proxy lists its shards, the relay follows the list.
        t.record(
            t0 + RECHECK,
            Answer::Shards(names(&["shard-1", "shard-2", "shard-3"])),
        );
        assert_eq!(
            t.plan(t0 + RECHECK * 2),
            hinted(&["shard-1", "shard-2", "shard-3"])
        );
    }

    #[test]
    fn an_empty_configuration_without_a_list_polls_the_database_as_one() {
        let t0 = Instant::now();
        let mut t = Targets::new(Vec::new());
        t.record(t0, Answer::Unsupported("x".into()));
        for at in [t0, t0, t0 + SWEEP_EVERY] {
            assert_eq!(t.plan(at), vec![None]);
        }
        t.record(t0, Answer::Shards(names(&["a", "b"])));
        assert_eq!(t.plan(t0), hinted(&["a", "b"]));
    }

    #[test]
    fn the_name_is_the_shows_column_or_the_only_one() {
        let at = |cols: &[&str]| name_column(cols.iter().copied());
        assert_eq!(at(&["taskflow.shards"]), Some(0));
        assert_eq!(at(&["whatever"]), Some(0));
        assert_eq!(at(&["url", "name", "healthy"]), Some(1));
        assert_eq!(at(&["url", "healthy"]), None);
        assert_eq!(at(&[]), None);
    }

    #[test]
    fn only_plain_shard_names_are_taken_from_the_proxy() {
        let rows = |r: Vec<Option<Option<&str>>>| {
            Answer::from_rows(r.into_iter().map(|c| c.map(|v| v.map(str::to_owned))))
        };
        assert_eq!(
            rows(vec![Some(Some("shard-1")), Some(Some("shard_2"))]),
            Answer::Shards(names(&["shard-1", "shard_2"]))
        );
        for bad in [
            vec![
                Some(Some("shard-1")),
                Some(Some("x */ DELETE FROM outbox; /*")),
            ],
            vec![Some(None)],
            vec![Some(Some(""))],
            vec![None],
            vec![],
        ] {
            assert!(
                matches!(rows(bad.clone()), Answer::Unsupported(_)),
                "{bad:?}"
            );
        }
    }
}
