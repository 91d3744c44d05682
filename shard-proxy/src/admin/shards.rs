//! `ADD SHARD <name> '<url>'` and `REMOVE SHARD <name>`: change the shard set from the
//! console, as a RELOAD with one shard more or less would.
//!
//! `ADD SHARD` first applies the shard schema (`migrations/`) to the new shard, so it never
//! joins the ring without its tables. The ring change itself goes through
//! [`Proxy::reload`], so it obeys the same rule as every other ring change: recorded as the
//! next epoch in `taskflow_meta.ring_epochs` while no shard holds rows, else started as an
//! online migration (`crate::reshard`; `SHOW MIGRATIONS` follows it). The configuration
//! file is not rewritten: change it too — a restart with either the old or the new shard
//! list joins an unfinished migration; after it, the old list would start the reverse move.
//!
//! `PAUSE MIGRATION`, `RESUME MIGRATION` and `SET MIGRATION THROTTLE` steer the unfinished
//! migration through its shared record, so they act whichever proxy drives it.

use proxy_core::wire::sqlstate;

use super::Answer;
use crate::config::{BackendTarget, ShardConfig};
use crate::proxy::Proxy;

/// `ADD SHARD`: schema first, then the ring.
pub(super) async fn add(proxy: &Proxy, name: &str, url: &str) -> Answer {
    let mut config = (*proxy.config()).clone();
    if config.shards.iter().any(|s| s.name == name) {
        return Answer::Error(
            sqlstate::SYNTAX_ERROR,
            format!("shard {name} is already in the ring"),
        );
    }
    config.shards.push(ShardConfig {
        name: name.to_owned(),
        url: url.to_owned(),
    });
    // The name was checked by the command parser; the URL is checked here.
    if let Err(e) = BackendTarget::parse(url) {
        return Answer::Error(sqlstate::SYNTAX_ERROR, format!("shard {name}: {e}"));
    }
    match proxy.meta.apply_shard_schema(url).await {
        Ok(applied) => tracing::info!(shard = name, ?applied, "shard schema applied"),
        Err(e) => {
            return Answer::Error(
                sqlstate::CONNECTION_FAILURE,
                format!("cannot apply the shard schema to {name}: {e}"),
            )
        }
    }
    match proxy.change_ring(config).await {
        Ok(summary) => {
            tracing::info!(shard = name, %summary, "shard added by admin console");
            Answer::Tag("ADD SHARD".into())
        }
        Err(e) => Answer::Error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!("{name} has the shard schema but was not added: {e}"),
        ),
    }
}

/// `REMOVE SHARD`: the ring without it.
pub(super) async fn remove(proxy: &Proxy, name: &str) -> Answer {
    let mut config = (*proxy.config()).clone();
    let before = config.shards.len();
    config.shards.retain(|s| s.name != name);
    if config.shards.len() == before {
        return Answer::Error(
            sqlstate::SYNTAX_ERROR,
            format!("shard {name} is not in the ring"),
        );
    }
    if config.shards.is_empty() {
        return Answer::Error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "the ring needs at least one shard".into(),
        );
    }
    match proxy.change_ring(config).await {
        Ok(summary) => {
            tracing::info!(shard = name, %summary, "shard removed by admin console");
            Answer::Tag("REMOVE SHARD".into())
        }
        Err(e) => Answer::Error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!("{name} was not removed: {e}"),
        ),
    }
}

/// `PAUSE MIGRATION` (`pause`) or `RESUME MIGRATION`.
pub(super) async fn pause_migration(proxy: &Proxy, pause: bool) -> Answer {
    let active = match crate::meta::moves::active(&proxy.meta).await {
        Ok(Some(a)) => a,
        Ok(None) => {
            return Answer::Error(
                sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                "no migration is unfinished".into(),
            )
        }
        Err(e) => return Answer::Error(sqlstate::CONNECTION_FAILURE, e.to_string()),
    };
    let tag = if pause {
        "PAUSE MIGRATION"
    } else {
        "RESUME MIGRATION"
    };
    match crate::meta::moves::pause(&proxy.meta, active.epoch, pause).await {
        Ok(true) => {
            tracing::info!(
                epoch = active.epoch,
                command = tag,
                "migration steered from the admin console"
            );
            Answer::Tag(tag.into())
        }
        Ok(false) => Answer::Error(
            sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "migration {} is {}; {tag} does not apply",
                active.epoch, active.state
            ),
        ),
        Err(e) => Answer::Error(sqlstate::CONNECTION_FAILURE, e.to_string()),
    }
}

/// `SET MIGRATION THROTTLE <rows per second>`.
pub(super) async fn throttle(proxy: &Proxy, rows_per_sec: u32) -> Answer {
    match crate::meta::moves::set_throttle(&proxy.meta, rows_per_sec).await {
        Ok(true) => Answer::Tag("SET".into()),
        Ok(false) => Answer::Error(
            sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
            "no migration is unfinished".into(),
        ),
        Err(e) => Answer::Error(sqlstate::CONNECTION_FAILURE, e.to_string()),
    }
}
